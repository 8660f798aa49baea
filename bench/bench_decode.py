"""Greedy decoding speed, end to end, beside Hugging Face transformers. Meant for one GPU; `--tiny` is a CPU
smoke test.

Every model of a shape gets random weights in --dtype (bfloat16); the transformers rows load the hybrid_jax
teacher's own weights (converted with hybrid_jax.convert.params_to_hf). No EOS: every row generates exactly
the case's number of new tokens from random prompt tokens.

Shapes (--shapes): 135m = SmolLM2-135M (vocab 49152, D 576, F 1536, 30 layers, 9 heads, 3 kv heads, tied),
  1b = Llama-3.2-1B (vocab 128256, D 2048, F 8192, 16 layers, 32 heads, 8 kv heads, tied, rope llama3).
Models (--only): teacher (hybrid_jax, all attention), h50-mamba / h50-mamba2 (every 2nd layer keeps attention,
  the others Mamba-1 / Mamba-2), h25-mamba / h25-mamba2 (every 4th layer keeps attention), hf-eager
  (LlamaForCausalLM.generate, dynamic cache, eager), hf-static (cache_implementation="static": generate
  runs the decode forward through torch.compile, inductor + CUDA graphs, fullgraph).
Cases (--cases): b1 = batch 1, prompt 128, 256 new tokens; b64 = batch 64, prompt 2048, 512 new tokens;
  --custom B:P:N adds more; --max-batch adds "max": prompt 2048, 512 new tokens at the largest batch that fits
  (hybrid_jax models: device memory of prefill + decode predicted from XLA's memory analysis at two batch
  sizes, then run, 10% smaller after an out-of-memory error).

Per row:
  tok/s      decode throughput: batch x (new - 1) / decode time (the loop after the prefill)
  e2e tok/s  batch x new / (prefill + decode)
  ms/step    decode time / (new - 1)
  ttft ms    prefill of the prompts and the first token
  compile s  hybrid_jax: ahead-of-time compilation of prefill + decode loop; transformers: the first generate
             call minus a later one (torch.compile for hf-static; warm-up only for hf-eager)
  bound ms   bytes per step / device bandwidth, where bytes per step = every weight once (an untied embedding
             table is only gathered: not counted) + the valid KV prefix of each attention layer (its mean over
             the decode, prompt + new / 2 tokens) + each Mamba layer's conv and SSM state read and written,
             and bandwidth = a device copy (x + 1 over --copy-mib MiB, read + write) measured in this run
  frac       bound / measured ms per step (1 = at the memory roofline)
  agree      transformers rows: leading new tokens of row 0 equal to the hybrid_jax teacher's (bf16 ties on
             random weights can end it early; 0 would mean different weights or numerics)
Times are the best of --repeats calls after a warm-up. Results go to --out (JSON, rewritten after each row).

  python bench/bench_decode.py --tiny --out /tmp/decode.json              # CPU smoke test
  python bench/bench_decode.py --shapes 135m --cases b1 --out b1.json
  python bench/bench_decode.py --shapes 1b --only teacher,h50-mamba2,hf-static --cases b64
  python bench/bench_decode.py --shapes 135m --only teacher,h50-mamba,h25-mamba --cases '' --max-batch
  python bench/bench_decode.py --bounds --shapes 1b --cases b1,b64      # bytes per step; no device needed
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

# transformers shares the GPU: JAX allocates on demand instead of taking 75% at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.decode.generate import decode_loop, prefill
from hybrid_jax.model import hybrid

_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")
SHAPES = {
    "135m": {**dict(zip(_LLAMA_KEYS, (49152, 576, 1536, 30, 9, 3))), "rope_theta": 100000.0,
             "tie_word_embeddings": True, "max_position_embeddings": 8192},
    "1b": {**dict(zip(_LLAMA_KEYS, (128256, 2048, 8192, 16, 32, 8))), "rope_theta": 500000.0,
           "tie_word_embeddings": True, "rope_type": "llama3", "rope_factor": 32.0,
           "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_position": 8192,
           "max_position_embeddings": 131072},
    "tiny": {**dict(zip(_LLAMA_KEYS, (512, 64, 128, 4, 4, 2))), "rope_theta": 500000.0,
             "tie_word_embeddings": True, "rope_type": "llama3", "rope_factor": 8.0,
             "rope_original_max_position": 64, "max_position_embeddings": 1024},
}
CASES = {"b1": (1, 128, 256), "b64": (64, 2048, 512)}
TINY_CASES = {"b1": (1, 16, 12), "b64": (4, 32, 12)}
MAX_CASE, TINY_MAX_CASE = (2048, 512), (32, 12)  # (prompt, new) of the "max" case
MODELS = ("teacher", "h50-mamba", "h50-mamba2", "h25-mamba", "h25-mamba2", "hf-eager", "hf-static")


def model_cfg(shape: str, model: str, dtype: str) -> ModelConfig:
  """hybrid_jax config of a model name (hf-* rows use the teacher's)."""
  cfg = ModelConfig(**SHAPES[shape], rms_norm_eps=1e-5, dtype=dtype, param_dtype=dtype)
  if not model.startswith("h") or model.startswith("hf-"):
    return cfg
  share, variant = model[1:].split("-")
  every = 100 // int(share)
  ssm = SSMConfig(variant="mamba2", d_state=cfg.head_dim) if variant == "mamba2" else SSMConfig()
  return cfg.replace(attn_layers=tuple(range(every - 1, cfg.num_hidden_layers, every)), ssm=ssm)


def is_oom(e: Exception) -> bool:
  msg = str(e).lower()
  return "resource_exhausted" in msg or "out of memory" in msg or "outofmemory" in type(e).__name__.lower()


def first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ------------------------------------------------------------------------------------------------
# Bandwidth bound
def bounds_table(shapes: list[str], models: list[str], cases: dict, dtype: str) -> str:
  """Markdown: per shape, case and model, the bytes of one decode step (`step_bytes` at the mean context) and
  the teacher's bytes over the model's, i.e. the largest speed-up over the teacher a step that is bound by
  memory bandwidth can show (both at the same fraction of the bandwidth)."""
  lines = ["| shape | case | model | weights GB | cache + state GB | step GB | teacher / model |", "|---" * 7 + "|"]
  for shape in shapes:
    for case, (b, p, n) in cases.items():
      total = {}
      for name in dict.fromkeys(["teacher", *models]):
        cfg = model_cfg(shape, name, dtype)
        params = jax.eval_shape(lambda cfg=cfg: hybrid.init_params(cfg, jax.random.PRNGKey(0)))
        w, c = step_bytes(cfg, params, b, p + n / 2)
        total[name] = w + c
        if name in models:
          lines.append(f"| {shape} | {case} | {name} | {w / 1e9:.2f} | {c / 1e9:.2f} | {(w + c) / 1e9:.2f} | "
                       f"{total['teacher'] / (w + c):.2f} |")
  return "\n".join(lines)


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
  """Bytes/s of a device copy (read + write of `mib` MiB)."""
  x = jnp.zeros((mib * (1 << 20) // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  jax.block_until_ready(f(x))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t)
  del x
  return 2 * mib * (1 << 20) / best


def step_bytes(cfg: ModelConfig, params: dict, batch: int, ctx: float) -> tuple[int, int]:
  """(weight bytes, cache bytes) one decode step must move at mean context ctx (module docstring)."""
  weights = sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))
  if not cfg.tie_word_embeddings:
    weights -= int(params["embed_tokens"].size) * params["embed_tokens"].dtype.itemsize
  cache = jax.eval_shape(lambda: hybrid.init_cache(cfg, batch, 1))
  per_token, state = 0, 0
  for i, lc in enumerate(cache.layers):
    nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(lc))
    if cfg.is_attention(i):
      per_token += nbytes  # k and v of one position
    else:
      state += 2 * nbytes  # read and written
  return weights, int(per_token * ctx) + state


# ------------------------------------------------------------------------------------------------
# hybrid_jax
def jax_inputs(cfg: ModelConfig, batch: int, prompt: int, seed: int = 0):
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  return tokens, jnp.asarray(tokens), jnp.zeros((batch,), jnp.int32)


def decode_statics(new: int) -> dict:
  return {"max_new_tokens": new, "temperature": 0.0, "top_k": 0, "top_p": 1.0}


def compile_pair(params, cfg: ModelConfig, tokens, offsets, new: int, pack: bool = True):
  """Ahead-of-time compiled (prefill, decode_loop) for these shapes; arguments may be ShapeDtypeStructs."""
  pf = prefill.lower(params, cfg, tokens, offsets, max_len=tokens.shape[1] + new).compile()
  last, cache = jax.eval_shape(lambda p, t, o: prefill(p, cfg, t, o, tokens.shape[1] + new), params, tokens,
                               offsets)
  key, eos = jax.random.PRNGKey(0), jnp.zeros((0,), jnp.int32)
  dl = decode_loop.lower(params, cfg, last, cache, key, eos, **decode_statics(new), pack=pack).compile()
  return pf, dl


def run_jax(params, cfg: ModelConfig, batch: int, prompt: int, new: int, repeats: int,
            profile_dir: str | None = None, pack: bool = True) -> dict:
  _, tokens, offsets = jax_inputs(cfg, batch, prompt)
  t0 = time.perf_counter()
  pf, dl = compile_pair(params, cfg, tokens, offsets, new, pack)
  compile_s = time.perf_counter() - t0
  key, eos = jax.random.PRNGKey(0), jnp.zeros((0,), jnp.int32)
  best_pf = best_dec = float("inf")
  out = None
  for i in range(repeats + 1):  # the first is a warm-up
    t = time.perf_counter()
    last, cache = jax.block_until_ready(pf(params, tokens, offsets))
    t_pf = time.perf_counter() - t
    t = time.perf_counter()
    out, _, cache = jax.block_until_ready(dl(params, last, cache, key, eos))  # the cache is donated
    t_dec = time.perf_counter() - t
    if i > 0:
      best_pf, best_dec = min(best_pf, t_pf), min(best_dec, t_dec)
    del cache
  if profile_dir:  # one more prefill + decode call, traced (bench/profile_summary.py reads it)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      last, cache = jax.block_until_ready(pf(params, tokens, offsets))
      jax.block_until_ready(dl(params, last, cache, key, eos))
  return {"compile_s": compile_s, "ttft_s": best_pf, "decode_s": best_dec,
          "first_tokens": np.asarray(out[0, :32]).tolist()}


def memory_need(params, cfg: ModelConfig, batch: int, prompt: int, new: int) -> int:
  """Device bytes of prefill + decode at this batch (XLA's memory analysis; the larger of the two calls)."""
  tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
  offsets = jax.ShapeDtypeStruct((batch,), jnp.int32)
  need = 0
  for c in compile_pair(params, cfg, tokens, offsets, new):
    m = c.memory_analysis()
    need = max(need, m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)
  return int(need)


def device_memory_limit(override_gib: float) -> int | None:
  if override_gib > 0:
    return int(override_gib * (1 << 30))
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def largest_batch(params, cfg: ModelConfig, prompt: int, new: int, limit: int, b0: int) -> tuple[int, dict]:
  """Batch predicted to fill `limit` bytes: need(b) is linear in b, measured at b0 and 2 b0."""
  n1, n2 = memory_need(params, cfg, b0, prompt, new), memory_need(params, cfg, 2 * b0, prompt, new)
  per_row = max((n2 - n1) / b0, 1.0)
  fixed = n1 - per_row * b0
  batch = int((0.95 * limit - fixed) / per_row)
  batch = batch // 8 * 8 if batch >= 8 else max(batch, 1)
  return batch, {"mem_fixed_bytes": int(fixed), "mem_per_row_bytes": int(per_row), "mem_limit_bytes": limit}


# ------------------------------------------------------------------------------------------------
# transformers
def hf_available() -> str | None:
  """None if transformers + torch can run here, else why not."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:
    return f"not installed ({e.name})"
  import torch
  if jax.default_backend() == "gpu" and not torch.cuda.is_available():
    return "torch has no CUDA here (a CPU run beside a GPU would not compare)"
  return None


def hf_model(cfg: ModelConfig, params: dict):
  """LlamaForCausalLM (sdpa attention) on the torch device holding the teacher's weights."""
  import torch
  from transformers import AutoModelForCausalLM, LlamaConfig

  from hybrid_jax.convert import params_to_hf
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.param_dtype]
  hf = cfg.to_hf()
  hf.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
  config = LlamaConfig(**hf)
  prev = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
  finally:
    torch.set_default_dtype(prev)
  state = {}
  for name, a in params_to_hf(params, cfg).items():
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16) \
        if a.dtype.name == "bfloat16" else torch.from_numpy(np.array(a))
    state[name] = t.to(device=device, dtype=dtype)
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
    raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, "
                       f"unexpected {unexpected}")
  head, embed = model.lm_head.weight, model.model.embed_tokens.weight
  if cfg.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
    raise RuntimeError("LlamaForCausalLM did not tie its head to the embedding")
  model.eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model, device


def release_torch() -> None:
  """Frees the device memory of deleted torch models (compiled graphs and CUDA-graph pools included)."""
  import torch
  torch.compiler.reset()
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def run_hf(model, device: str, tokens: np.ndarray, new: int, static: bool, repeats: int) -> dict:
  import torch
  ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
  kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
  if static:
    from transformers import CompileConfig
    cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
    cc._compile_all_devices = device != "cuda"  # transformers' own switch to compile off-GPU (smoke test)
    kw.update(cache_implementation="static", compile_config=cc)

  def gen(n: int):
    if device == "cuda":
      torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(ids, max_new_tokens=n, **kw)
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t, out

  t_first, out = gen(new)  # compiles (static)
  if out.shape[1] != ids.shape[1] + new:
    raise RuntimeError(f"generate stopped after {out.shape[1] - ids.shape[1]} of {new} tokens")
  full = min(gen(new)[0] for _ in range(repeats))
  ttft = min(gen(1)[0] for _ in range(repeats))  # prefill only: the compiled decode forward never runs
  return {"compile_s": max(t_first - full, 0.0), "ttft_s": ttft, "decode_s": max(full - ttft, 1e-9),
          "first_tokens": out[0, ids.shape[1]:ids.shape[1] + 32].tolist()}


# ------------------------------------------------------------------------------------------------
def finish_row(row: dict, cfg: ModelConfig, params: dict, bandwidth: float) -> dict:
  b, p, n = row["batch"], row["prompt"], row["new_tokens"]
  steps = max(n - 1, 1)
  weights, cache = step_bytes(cfg, params, b, p + n / 2)
  ms = 1e3 * row["decode_s"] / steps
  bound = 1e3 * (weights + cache) / bandwidth
  row.update(tok_s=b * steps / row["decode_s"], e2e_tok_s=b * n / (row["ttft_s"] + row["decode_s"]),
             ms_per_step=ms, ttft_ms=1e3 * row["ttft_s"], weight_bytes=weights, cache_bytes_per_step=cache,
             bandwidth_GBs=bandwidth / 1e9, bound_ms=bound, bound_frac=bound / ms)
  return row


def fmt(row: dict) -> str:
  head = f"{row['shape']:>5} {row['case']:>8} {row['model']:>11} b={row['batch']:<4}"
  if row.get("status", "ok") != "ok":
    return f"{head} {row['status']}"
  agree = f" agree {row['agree']}" if "agree" in row else ""
  return (f"{head} {row['tok_s']:10.1f} tok/s  e2e {row['e2e_tok_s']:10.1f}  "
          f"{row['ms_per_step']:8.3f} ms/step  ttft {row['ttft_ms']:9.1f} ms  "
          f"compile {row['compile_s']:6.1f} s  bound {row['bound_ms']:7.3f} ms "
          f"(frac {row['bound_frac']:.2f}){agree}")


def markdown(rows: list[dict]) -> str:
  lines = [("| shape | case | model | batch | tok/s | e2e tok/s | ms/step | TTFT ms | compile s | bound ms "
            "| frac |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("status", "ok") != "ok":
      lines.append(f"| {r['shape']} | {r['case']} | {r['model']} | {r['batch']} | {r['status']} |||||||")
      continue
    lines.append(f"| {r['shape']} | {r['case']} | {r['model']} | {r['batch']} | {r['tok_s']:.1f} | "
                 f"{r['e2e_tok_s']:.1f} | {r['ms_per_step']:.3f} | {r['ttft_ms']:.1f} | "
                 f"{r['compile_s']:.1f} | "
                 f"{r['bound_ms']:.3f} | {r['bound_frac']:.2f} |")
  return "\n".join(lines)


def agree_len(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny shape and cases on CPU (transformers too)")
  ap.add_argument("--shapes", default="135m,1b", help="comma list of 135m, 1b")
  ap.add_argument("--cases", default="b1,b64", help="comma list of b1, b64 ('' for none)")
  ap.add_argument("--custom", action="append", default=[], metavar="B:P:N",
                  help="an extra case: batch B, prompt P, N new tokens (repeatable)")
  ap.add_argument("--only", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
  ap.add_argument("--max-batch", action="store_true", help="add the 'max' case (hybrid_jax models)")
  ap.add_argument("--mem-limit-gib", type=float, default=0,
                  help="device memory for --max-batch (default: the device's limit; needed on CPU)")
  ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (best kept), after a warm-up")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth probe")
  ap.add_argument("--budget-s", type=float, default=0,
                  help="start no new row after this many seconds (0: no limit)")
  ap.add_argument("--out", help="JSON file of all rows (rewritten after each)")
  ap.add_argument("--bounds", action="store_true",
                  help="print only the bytes each decode step must move, per model, and the teacher's bytes over "
                  "each model's: the speed-up a memory-bound step allows (no device needed)")
  ap.add_argument("--no-pack", action="store_true",
                  help="decode with the checkpoint's own layout, not hybrid_jax.model.hybrid.pack_params's")
  ap.add_argument("--decode-attention", default="xla", choices=("xla", "pallas"),
                  help="ModelConfig.decode_attention of the hybrid_jax rows: the einsums or the one-kernel "
                  "Pallas attention over the cache")
  ap.add_argument("--profile", metavar="DIR",
                  help="trace one more call of each hybrid_jax row into DIR/SHAPE-MODEL-CASE (perfetto; summarise "
                  "with bench/profile_summary.py)")
  args = ap.parse_args(argv)
  shapes = [s for s in args.shapes.split(",") if s]
  models = [m for m in args.only.split(",") if m]
  cases = dict(TINY_CASES if args.tiny else CASES)
  bad = [m for m in models if m not in MODELS] + [s for s in shapes if s not in SHAPES] + \
      [c for c in args.cases.split(",") if c and c not in cases]
  if bad:
    print(f"error: unknown shape, case or model: {', '.join(bad)}", file=sys.stderr)
    return 2
  cases = {c: cases[c] for c in args.cases.split(",") if c}
  for spec in args.custom:
    try:
      b, p, n = (int(x) for x in spec.split(":"))
    except ValueError:
      print(f"error: --custom {spec!r}: expected B:P:N", file=sys.stderr)
      return 2
    cases[f"b{b}-p{p}-n{n}"] = (b, p, n)
  if args.tiny:
    shapes, args.dtype, args.copy_mib, args.repeats = ["tiny"], "float32", 64, min(args.repeats, 2)
  if args.bounds:
    print(bounds_table(shapes, [m for m in models if not m.startswith("hf-")], cases, args.dtype))
    return 0
  start = time.perf_counter()
  over = lambda: args.budget_s > 0 and time.perf_counter() - start > args.budget_s
  print(f"devices: {jax.devices()}")
  hf_skip = hf_available() if any(m.startswith("hf-") for m in models) else None
  if hf_skip:
    print(f"transformers rows skipped: {hf_skip}")
  bandwidth = copy_bandwidth(args.copy_mib)
  print(f"device copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
  if jax.config.jax_compilation_cache_dir:
    print("note: a persistent compilation cache is on; compile times may be cache loads")
  rows: list[dict] = []

  def save():
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": str(jax.devices()[0]), "bandwidth_GBs": bandwidth / 1e9,
                   "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, f, indent=2)

  def emit(row):
    rows.append(row)
    print(fmt(row), flush=True)
    save()

  # transformers first, for every shape: torch frees its memory before JAX's allocator grows (and keeps) its
  # own
  hf_models = [m for m in models if m.startswith("hf-")]
  for shape in shapes if hf_models else []:
    tcfg = model_cfg(shape, "teacher", args.dtype)
    tparams = hybrid.init_params(tcfg, jax.random.PRNGKey(0))  # the same weights as the teacher's rows
    for name in hf_models:
      base = {"shape": shape, "model": name}
      if hf_skip:
        for case, (b, p, n) in cases.items():
          emit(dict(base, case=case, batch=b, prompt=p, new_tokens=n, status=f"skipped: {hf_skip}"))
        continue
      model = device = None
      for case, (b, p, n) in cases.items():
        row = dict(base, case=case, batch=b, prompt=p, new_tokens=n)
        if over():
          emit(dict(row, status="skipped: --budget-s spent"))
          continue
        try:
          if model is None:
            model, device = hf_model(tcfg, tparams)
          row.update(run_hf(model, device, jax_inputs(tcfg, b, p)[0], n, name == "hf-static", args.repeats))
          emit(finish_row(row, tcfg, tparams, bandwidth))
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
          emit(dict(row, status=f"error: {first_line(e)}"))
      del model
      release_torch()
    del tparams

  teacher_tokens: dict = {}
  for shape in shapes:
    for name in [m for m in models if not m.startswith("hf-")]:
      cfg = model_cfg(shape, name, args.dtype).replace(decode_attention=args.decode_attention)
      params = hybrid.init_params(cfg, jax.random.PRNGKey(0 if name == "teacher" else 1))
      plan = list(cases.items())
      if args.max_batch:
        plan.append(("max", None))
      for case, spec in plan:
        row = {"shape": shape, "model": name, "case": case, "packed": not args.no_pack,
               "decode_attention": args.decode_attention}
        if over():
          emit(dict(row, batch=spec[0] if spec else 0, status="skipped: --budget-s spent"))
          continue
        try:
          if spec is None:
            p, n = TINY_MAX_CASE if args.tiny else MAX_CASE
            limit = device_memory_limit(args.mem_limit_gib)
            if limit is None:
              emit(dict(row, batch=0, status="skipped: no device memory limit known (give --mem-limit-gib)"))
              continue
            b, mem = largest_batch(params, cfg, p, n, limit, 4 if args.tiny else 64)
            row.update(mem)
          else:
            b, p, n = spec
          trace = args.profile and os.path.join(args.profile, f"{shape}-{name}-{case}")
          for attempt in range(4):
            try:
              row.update(batch=b, prompt=p, new_tokens=n, **run_jax(params, cfg, b, p, n, args.repeats, trace,
                                                                 not args.no_pack))
              break
            except Exception as e:
              if spec is not None or not is_oom(e) or attempt == 3 or b <= 8:
                raise
              b = int(b * 0.9) // 8 * 8
          if name == "teacher":
            teacher_tokens[shape, case] = row["first_tokens"]
          emit(finish_row(row, cfg, params, bandwidth))
        except Exception as e:  # noqa: BLE001
          emit(dict(row, batch=row.get("batch", spec[0] if spec else 0), status=f"error: {first_line(e)}"))
      del params
      gc.collect()
  for r in rows:  # transformers vs the hybrid_jax teacher on the same prompts and weights
    if r["model"].startswith("hf-") and "first_tokens" in r and (r["shape"], r["case"]) in teacher_tokens:
      r["agree"] = agree_len(r["first_tokens"], teacher_tokens[r["shape"], r["case"]])
  save()
  print("\n" + markdown(rows))
  for r in rows:
    if "agree" in r:
      print(f"{r['shape']} {r['case']} {r['model']}: the first {r['agree']} new tokens of row 0 equal the "
            "teacher's")
  print(f"total {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
