"""Released MambaInLlama checkpoints <-> hybrid_jax (params, ModelConfig), losslessly.

A MambaInLlama checkpoint directory (jxiw/MambaInLlama `MambaTransformerHybridModelWrapper`) holds
  - the state dict of the wrapped `LlamaForCausalLM` whose non-attention layers were replaced by
    `MambaDecoderLayer`s: `model.layers.{i}.mamba.*` / `model.layers.{i}.self_attn.*`, `.mlp.*`, norms,
    `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`; as `*.safetensors` or
    `pytorch_model*.bin`;
  - `mamba_config.json`: d_model, ssm_cfg (kwargs of the mixer class), rms_norm_eps, vocab_size, d_inner,
    d_xb, intermediate_size, hidden_act, n_layer, attn_layers;
  - the teacher's `config.json` (its `_name_or_path` names the teacher).
The Mamba variant is read from the state-dict keys (`mamba.in_proj_x` -> Mamba-1, `mamba.in_proj` -> Mamba-2).

Tensor layout: torch Linear weight [out, in] <-> ours [in, out]; Conv1d weight [C, 1, K] <-> ours [K, C].
Dtypes are kept as stored (bf16 via ml_dtypes), so load -> export gives identical tensors.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np

from hybrid_jax.config import ConfigError, ModelConfig, SSMConfig
from hybrid_jax.convert.llama_hf import ConversionError
from hybrid_jax.errors import read_json_object, reading

MAMBA_CONFIG = "mamba_config.json"
_RAW = ("A_log", "D", "dt_bias")  # nn.Parameters stored under their own name
_NORMS = ("norm",)  # modules with only a weight that is not a Linear (no transpose)
# Keys of older transformers state dicts that are derived buffers, not parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# ssm_cfg kwargs the reference mixers accept, with the values hybrid_jax implements (None: any value).
_M1_FIXED = {"repeat_kv_before_conv": True, "conv_bias": True, "proj_x_bias": False, "proj_z_bias": False,
             "out_proj_bias": False, "dt_init": None, "dt_scale": None, "use_fast_path": None,
             "layer_idx": None, "device": None, "dtype": None}
_M1_FREE = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor")
_M2_FIXED = {"repeat_kv_before_conv": False, "conv_bias": True, "bias": False, "rmsnorm": True,
             "norm_before_gate": False, "D_has_hdim": False, "d_ssm": None, "dt_limit": None,
             "conv_init": None, "A_init_range": None, "use_mem_eff_path": None, "layer_idx": None,
             "process_group": None, "sequence_parallel": None, "device": None, "dtype": None}
_M2_FREE = ("d_state", "d_conv", "expand", "headdim", "ngroups", "dt_min", "dt_max", "dt_init_floor",
            "chunk_size")
# The reference classes' own defaults (Mamba: expand 2, d_state 16; Mamba2: expand 2, d_state 128, ngroups 1).
_DEFAULTS = {"mamba": {"d_state": 16, "d_conv": 4, "expand": 2},
             "mamba2": {"d_state": 128, "d_conv": 4, "expand": 2, "ngroups": 1, "chunk_size": 256}}


# ------------------------------------------------------------------------------------------------
# torch <-> numpy without losing bf16
def _to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _to_torch(a):
  import torch
  a = np.ascontiguousarray(np.asarray(a))
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


# ------------------------------------------------------------------------------------------------
# mixer params <-> torch names
def mixer_to_torch(p: dict) -> dict[str, np.ndarray]:
  """One mixer's params -> {torch name (relative to `.mamba.`): array in torch layout}."""
  out = {}
  for k, v in p.items():
    if isinstance(v, dict):  # a module with weight and bias
      w = np.asarray(v["weight"])
      out[f"{k}.weight"] = w.T[:, None, :] if k == "conv1d" else w.T
      out[f"{k}.bias"] = np.asarray(v["bias"])
    elif k in _RAW:
      out[k] = np.asarray(v)
    elif k in _NORMS:
      out[f"{k}.weight"] = np.asarray(v)
    else:  # Linear without bias
      out[f"{k}.weight"] = np.asarray(v).T
  return out


def mixer_from_torch(sd: dict[str, np.ndarray], template: dict) -> dict:
  """Inverse of `mixer_to_torch`, structured like `template` (an init_mixer result). KeyError on a miss."""
  out = {}
  for k, v in template.items():
    if isinstance(v, dict):
      w = sd[f"{k}.weight"]
      out[k] = {"weight": (w[:, 0, :].T if k == "conv1d" else w.T), "bias": sd[f"{k}.bias"]}
    elif k in _RAW:
      out[k] = sd[k]
    elif k in _NORMS:
      out[k] = sd[f"{k}.weight"]
    else:
      out[k] = sd[f"{k}.weight"].T
  return out


def _mixer_template(cfg: ModelConfig, layer: int | None = None) -> dict:
  """Shapes of one layer's mixer (the first Mamba layer's by default; jax.eval_shape: no compute)."""
  import jax

  from hybrid_jax.model import hybrid
  layer = cfg.ssm_layers[0] if layer is None else layer
  return jax.eval_shape(lambda: hybrid.init_mixer_params(cfg, layer, jax.random.PRNGKey(0)))


# ------------------------------------------------------------------------------------------------
# whole model
def params_to_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """hybrid_jax params -> MambaInLlama state dict (numpy, torch layout). Tied heads write lm_head too,
  as `LlamaForCausalLM.state_dict()` does, so `load_state_dict(strict=True)` accepts it."""
  sd = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]),
        "model.norm.weight": np.asarray(params["norm"])}
  sd["lm_head.weight"] = (np.asarray(params["embed_tokens"]) if cfg.tie_word_embeddings
                          else np.asarray(params["lm_head"]).T)
  for i in range(cfg.num_hidden_layers):
    lp = params[f"layers_{i}"]
    pre = f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = np.asarray(lp["input_layernorm"])
    sd[pre + "post_attention_layernorm.weight"] = np.asarray(lp["post_attention_layernorm"])
    for k, w in lp["mlp"].items():
      sd[pre + f"mlp.{k}.weight"] = np.asarray(w).T
    if "self_attn" in lp:
      for k, w in lp["self_attn"].items():
        sd[pre + f"self_attn.{k}.weight"] = np.asarray(w).T
    else:
      for k, w in mixer_to_torch(lp["mamba"]).items():
        sd[pre + f"mamba.{k}"] = w
  return sd


def state_dict_to_params(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """MambaInLlama state dict -> hybrid_jax params. Raises ValueError naming missing / unexpected tensors
  and shape mismatches (all of them at once)."""
  import jax

  sd = {k: v for k, v in sd.items() if not _IGNORED.match(k)}
  used: set[str] = set()
  missing: list[str] = []
  bad_shape: list[str] = []

  def get(name: str, shape: tuple[int, ...] | None = None):
    if name not in sd:
      missing.append(name)
      return None
    used.add(name)
    a = sd[name]
    if shape is not None and tuple(a.shape) != tuple(shape):
      bad_shape.append(f"{name}: {tuple(a.shape)} != expected {tuple(shape)}")
    return a

  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  params: dict[str, Any] = {"embed_tokens": get("model.embed_tokens.weight", (v, d)),
                            "norm": get("model.norm.weight", (d,))}
  head = get("lm_head.weight", (v, d)) if (not cfg.tie_word_embeddings or "lm_head.weight" in sd) else None
  if cfg.tie_word_embeddings:
    if head is not None and params["embed_tokens"] is not None and not np.array_equal(
        np.asarray(head), np.asarray(params["embed_tokens"])):
      raise ValueError("tie_word_embeddings is set but lm_head.weight differs from model.embed_tokens.weight")
  elif head is not None:
    params["lm_head"] = head.T
  attn = [i for i in range(cfg.num_hidden_layers) if cfg.is_attention(i)]
  att_t = _mixer_template(cfg, attn[0]) if attn else None
  mix_t = _mixer_template(cfg) if cfg.is_hybrid else None
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}."
    lp: dict[str, Any] = {"input_layernorm": get(pre + "input_layernorm.weight", (d,)),
                          "post_attention_layernorm": get(pre + "post_attention_layernorm.weight", (d,)),
                          "mlp": {}}
    for k, shp in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      w = get(pre + f"mlp.{k}.weight", shp)
      lp["mlp"][k] = None if w is None else w.T
    if cfg.is_attention(i):
      lp["self_attn"] = {}
      for k, s in att_t.items():
        w = get(pre + f"self_attn.{k}.weight", s.shape[::-1])
        lp["self_attn"][k] = None if w is None else w.T
    else:
      tsd = mixer_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), mix_t,
                                        is_leaf=lambda x: hasattr(x, "shape")))
      sub = {}
      for k, ref in tsd.items():
        w = get(pre + f"mamba.{k}", ref.shape)
        if w is not None:
          sub[k] = w
      if len(sub) == len(tsd):
        lp["mamba"] = mixer_from_torch(sub, mix_t)
    params[f"layers_{i}"] = lp
  unexpected = sorted(set(sd) - used)
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {missing[:20]}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}")
  if bad_shape:
    problems.append(f"shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
  if problems:
    raise ValueError("MambaInLlama state dict does not match the config "
                     f"(attn_layers={list(cfg.attn_layers or [])}, variant="
                     f"{cfg.ssm.variant if cfg.ssm else None}): " + "; ".join(problems))
  return jax.tree.map(np.ascontiguousarray, params)  # transposed views -> plain arrays


# ------------------------------------------------------------------------------------------------
# configs
def _detect_variant(keys) -> str | None:
  m1 = any(".mamba.in_proj_x." in k for k in keys)
  m2 = any(".mamba.in_proj.weight" in k for k in keys)
  if m1 and m2:
    raise ValueError("state dict mixes Mamba-1 (mamba.in_proj_x) and Mamba-2 (mamba.in_proj) layers")
  return "mamba" if m1 else "mamba2" if m2 else None


def config_from_mambainllama(mamba_cfg: dict, teacher_hf: dict, variant: str) -> ModelConfig:
  """mamba_config.json + teacher config.json -> ModelConfig. ConfigError names the offending field."""
  need = ("d_model", "ssm_cfg", "n_layer", "attn_layers")
  absent = [k for k in need if k not in mamba_cfg]
  if absent:
    raise ConfigError(f"{MAMBA_CONFIG} lacks fields {absent}")
  base = ModelConfig.from_hf(teacher_hf)
  checks = {"d_model": base.hidden_size, "n_layer": base.num_hidden_layers,
            "intermediate_size": base.intermediate_size, "vocab_size": base.vocab_size}
  for k, want in checks.items():
    if mamba_cfg.get(k) is not None and mamba_cfg[k] != want:
      raise ConfigError(f"{MAMBA_CONFIG}: {k}={mamba_cfg[k]} disagrees with the teacher config ({want})")
  if mamba_cfg.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{MAMBA_CONFIG}: hidden_act={mamba_cfg['hidden_act']!r} is not supported (only silu)")
  ssm_cfg = dict(mamba_cfg["ssm_cfg"] or {})
  fixed, free = (_M1_FIXED, _M1_FREE) if variant == "mamba" else (_M2_FIXED, _M2_FREE)
  for k, val in ssm_cfg.items():
    if k in free:
      continue
    if k not in fixed:
      raise ConfigError(f"{MAMBA_CONFIG}: ssm_cfg.{k} is not a parameter of the {variant} mixer")
    if fixed[k] is not None and val != fixed[k]:
      raise ConfigError(f"{MAMBA_CONFIG}: ssm_cfg.{k}={val!r} is not supported (hybrid_jax implements "
                        f"{k}={fixed[k]!r})")
  if variant == "mamba" and ssm_cfg.get("dt_init", "random") not in ("random", "constant"):
    raise ConfigError(f"{MAMBA_CONFIG}: ssm_cfg.dt_init={ssm_cfg['dt_init']!r} is not random|constant")
  if variant == "mamba2" and ssm_cfg.get("dt_limit", (0.0, float("inf"))) not in (
      (0.0, float("inf")), [0.0, float("inf")]):
    raise ConfigError(f"{MAMBA_CONFIG}: ssm_cfg.dt_limit={ssm_cfg['dt_limit']!r} is not supported")
  s = {**_DEFAULTS[variant], **{k: ssm_cfg[k] for k in free if k in ssm_cfg}}
  d = base.hidden_size
  d_inner = mamba_cfg.get("d_inner") or s["expand"] * d
  d_xb = mamba_cfg.get("d_xb") or base.num_key_value_heads * base.head_dim
  dt_rank = s.get("dt_rank", "auto")
  kw = {"variant": variant, "d_state": int(s["d_state"]), "d_conv": int(s["d_conv"]), "expand": int(s["expand"]),
            "d_inner": int(d_inner), "d_xb": int(d_xb)}
  if variant == "mamba":
    kw["dt_rank"] = 0 if dt_rank == "auto" else int(dt_rank)
  else:
    kw["ngroups"] = int(s["ngroups"])
    kw["headdim"] = 0  # the reference overrides headdim with d_state
    kw["chunk_size"] = int(s["chunk_size"])
  for k in ("dt_min", "dt_max", "dt_init_floor"):
    if k in s:
      kw[k] = float(s[k])
  attn = tuple(int(i) for i in mamba_cfg["attn_layers"])
  eps = mamba_cfg.get("rms_norm_eps", base.rms_norm_eps)
  if abs(float(eps) - base.rms_norm_eps) > 0:
    raise ConfigError(f"{MAMBA_CONFIG}: rms_norm_eps={eps} disagrees with the teacher's {base.rms_norm_eps}")
  cfg = base.replace(attn_layers=attn, ssm=SSMConfig(**kw))
  if cfg.is_hybrid:  # surface impossible dimension combinations now, with the field names
    try:
      _mixer_template(cfg)
    except ValueError as e:
      raise ConfigError(f"{MAMBA_CONFIG}: {e}") from None
  return cfg


def config_to_mambainllama(cfg: ModelConfig) -> dict:
  """ModelConfig -> mamba_config.json dict (ssm_cfg holds only kwargs the reference mixer accepts)."""
  s = cfg.ssm or SSMConfig()
  ssm_cfg: dict[str, Any] = {"expand": s.expand, "d_state": s.d_state, "d_conv": s.d_conv,
                             "dt_min": s.dt_min, "dt_max": s.dt_max, "dt_init_floor": s.dt_init_floor}
  if s.variant == "mamba":
    ssm_cfg["dt_rank"] = cfg.dt_rank
  else:
    ssm_cfg["ngroups"] = s.ngroups or cfg.num_attention_heads
    ssm_cfg["chunk_size"] = s.chunk_size
  return {"d_model": cfg.hidden_size, "ssm_cfg": ssm_cfg, "rms_norm_eps": cfg.rms_norm_eps,
          "vocab_size": cfg.vocab_size, "d_inner": cfg.d_inner, "d_xb": cfg.d_xb,
          "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
          "n_layer": cfg.num_hidden_layers,
          "attn_layers": list(range(cfg.num_hidden_layers)) if cfg.attn_layers is None
          else list(cfg.attn_layers)}


# ------------------------------------------------------------------------------------------------
# directories
def is_mambainllama_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MAMBA_CONFIG))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of `*.safetensors` (preferred) or `pytorch_model*.bin` files in `path`."""
  st = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  out: dict[str, np.ndarray] = {}
  if st:
    from safetensors.torch import load_file
    for fn in st:
      with reading(fn, ConversionError):
        out.update({k: _to_numpy(t) for k, t in load_file(fn).items()})
    return out
  bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
  if not bins:
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
  import torch
  for fn in bins:
    with reading(fn, ConversionError):
      out.update({k: _to_numpy(t) for k, t in torch.load(fn, map_location="cpu", weights_only=True).items()})
  return out


def load(path: str, dtype: str | None = None) -> tuple[dict, ModelConfig]:
  """MambaInLlama checkpoint dir -> (params as numpy arrays in their stored dtype, ModelConfig).
  `dtype` sets cfg.param_dtype / cfg.dtype (default: the dtype of the embedding)."""
  for name in (MAMBA_CONFIG, "config.json"):
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(f"{path} is not a MambaInLlama checkpoint: {name} missing")
  mcfg = read_json_object(os.path.join(path, MAMBA_CONFIG), ConversionError)
  hf = read_json_object(os.path.join(path, "config.json"), ConversionError)
  sd = read_state_dict(path)
  variant = _detect_variant(sd)
  n_ssm = mcfg.get("n_layer", 0) - len(mcfg.get("attn_layers", []))
  if variant is None:
    if n_ssm > 0:
      raise ValueError(f"{path}: mamba_config lists Mamba layers but no model.layers.*.mamba.* tensors found")
    variant = "mamba"
  cfg = config_from_mambainllama(mcfg, hf, variant)
  store = str(sd["model.embed_tokens.weight"].dtype) if "model.embed_tokens.weight" in sd else "float32"
  dt = dtype or store
  cfg = cfg.replace(param_dtype=dt, dtype=dt)
  params = state_dict_to_params(sd, cfg)
  return (jax_tree_cast(params, dtype) if dtype else params), cfg


def export(params: dict, cfg: ModelConfig, out_dir: str, *, teacher_name: str = "",
           safetensors: bool = True) -> None:
  """Writes a MambaInLlama checkpoint dir (weights in their param dtypes, mamba_config.json, config.json)."""
  if cfg.attn_layers is not None and cfg.is_hybrid and cfg.ssm is None:
    raise ConfigError("a hybrid config needs `ssm`")
  os.makedirs(out_dir, exist_ok=True)
  sd = {k: _to_torch(v) for k, v in params_to_state_dict(params, cfg).items()}
  if safetensors:
    from safetensors.torch import save_file
    # Tied heads share storage with the embedding; safetensors refuses shared tensors unless cloned.
    save_file({k: t.clone() for k, t in sd.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
  else:
    import torch
    torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
  with open(os.path.join(out_dir, MAMBA_CONFIG), "w") as fh:
    json.dump(config_to_mambainllama(cfg), fh, indent=4)
  hf = cfg.to_hf()
  hf["_name_or_path"] = teacher_name
  hf["torch_dtype"] = str(np.dtype(cfg.param_dtype)) if cfg.param_dtype != "bfloat16" else "bfloat16"
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(hf, fh, indent=2)


# ------------------------------------------------------------------------------------------------
# hybrid_jax checkpoint directories (used by convert_torch.py)
TEACHER_META = "mambainllama_teacher.json"  # {'name_or_path': str, 'config': teacher HF config.json dict}


def _conversion_error(e: Exception):
  return ConversionError(str(e))


def mambainllama_to_checkpoint(src: str, output: str, dtype: str | None = None) -> str:
  """MambaInLlama dir -> hybrid_jax checkpoint (with the dir's tokenizer, if any, and the teacher config)."""
  from hybrid_jax.checkpoint import load_tokenizer, save_model
  try:
    params, cfg = load(src, dtype=dtype)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise _conversion_error(e) from None
  hf = read_json_object(os.path.join(src, "config.json"), ConversionError)
  meta = {"name_or_path": hf.get("_name_or_path", ""), "config": hf}
  return save_model(output, params, cfg, tokenizer=load_tokenizer(src), extra={TEACHER_META: meta})


def jax_tree_cast(params: dict, dtype: str) -> dict:
  """Floating leaves -> numpy arrays of `dtype` (bfloat16 through ml_dtypes); others unchanged."""
  import jax
  import ml_dtypes
  target = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)

  def cast(a):
    a = np.asarray(a)
    floating = np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"
    return a.astype(target) if floating else a
  return jax.tree.map(cast, params)


def checkpoint_to_mambainllama(ckpt: str, output: str, dtype: str | None = None, teacher_name: str = "") -> str:
  """hybrid_jax checkpoint -> MambaInLlama dir (atomically). The teacher name comes from `teacher_name`,
  else the checkpoint's TEACHER_META (written by conversion / --init-hybrid)."""
  from hybrid_jax.checkpoint import atomic_dir, load_model, read_metadata
  params, cfg, tok = load_model(ckpt, dtype=dtype)
  if dtype is not None:
    cfg = cfg.replace(dtype=cfg.param_dtype)
  meta = read_metadata(ckpt, TEACHER_META) or {}
  name = teacher_name or meta.get("name_or_path", "")
  with atomic_dir(output) as tmp:
    export(jax_tree_cast(params, cfg.param_dtype), cfg, tmp, teacher_name=name)
    if tok is not None:
      tok.save_pretrained(tmp)
      # the tokenizer may write its own config.json-like files; ours (written by export) must win
      hf = cfg.to_hf()
      hf["_name_or_path"] = name
      hf["torch_dtype"] = cfg.param_dtype
      with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
  return os.path.abspath(output)


def init_hybrid_checkpoint(teacher: str, output: str, *, variant: str, attn_layers=None,
                           attn_fraction: float | None = None, seed: int = 0, dtype: str | None = None) -> str:
  """hybrid_jax teacher checkpoint -> hybrid checkpoint initialised from attention (docs/DESIGN.md §3.3)."""
  import jax

  from hybrid_jax.checkpoint import load_model, read_metadata, save_model
  from hybrid_jax.model.init import attn_layers_for_fraction, hybrid_config, init_from_teacher
  params, tcfg, tok = load_model(teacher, dtype=dtype)
  if (attn_layers is None) == (attn_fraction is None):
    raise ConfigError("give exactly one of --attn-layers and --attn-fraction")
  if attn_layers is None:
    attn_layers = attn_layers_for_fraction(tcfg.num_hidden_layers, attn_fraction)
  cfg = hybrid_config(tcfg, attn_layers, variant)
  hp = init_from_teacher(params, tcfg, cfg, jax.random.PRNGKey(seed))
  meta = read_metadata(teacher, TEACHER_META) or {
      "name_or_path": os.path.abspath(teacher), "config": tcfg.to_hf()}
  return save_model(output, hp, cfg, tokenizer=tok, extra={TEACHER_META: meta})
