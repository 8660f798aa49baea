"""Speculative decoding benchmark (SPEC section 4). Meant for a GPU; `--tiny` runs a small smoke version on CPU.

Part A (only with --target DIR [--draft DIR]): real checkpoints. End-to-end tokens/s of plain greedy decoding
  vs speculative decoding for each k, the measured mean accepted length and the measured speedup.
Part B (random weights, shapes of Llama-3.2-1B / 3B with 50% of the layers Mamba): the figure of merit is the
  cost of one verification call of k+1 tokens (k = 1..16) against one plain decode step (both MEASURED).
  Random weights accept ~nothing, so speedups are PROJECTED from those measured times at an assumed per-token
  acceptance rate alpha (expected tokens per round = (1 - alpha^(k+1)) / (1 - alpha), the i.i.d. model of
  Leviathan et al.) and the measured draft step cost:
      projected speedup = E[tokens per round] * t_step / (t_verify(k) + k * t_draft_step)
  plus the zero-cost-draft bound E[tokens] * t_step / t_verify(k). The end-to-end run with the random draft
  (acceptance ~0: the overhead floor) and with draft == target (every proposal accepted, full-cost draft) are
  measured too.

  python bench/bench_speculative.py --tiny                       # CPU smoke test
  python bench/bench_speculative.py --sizes 1b,3b --variant mamba2
  python bench/bench_speculative.py --target DIR --draft DIR --ks 2,4,8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax.config import ModelConfig, SSMConfig  # noqa: E402
from hybrid_jax.decode import verify  # noqa: E402
from hybrid_jax.decode.generate import generate  # noqa: E402
from hybrid_jax.decode.speculative import speculative_generate  # noqa: E402
from hybrid_jax.model import hybrid  # noqa: E402
from hybrid_jax.model.cache import init_cache  # noqa: E402

# (hidden, ffn, layers, heads, kv heads, vocab)
SHAPES = {"1b": (2048, 8192, 16, 32, 8, 128256), "3b": (3072, 8192, 28, 24, 8, 128256),
          "tiny": (64, 128, 4, 4, 2, 256)}
# Draft per target shape: a narrower/shallower all-attention Llama of the same vocabulary.
DRAFTS = {"1b": (2048, 8192, 2, 32, 8, 128256), "3b": (2048, 8192, 16, 32, 8, 128256),
          "tiny": (32, 64, 1, 4, 2, 256)}


def make_cfg(shape, variant: str | None, dtype: str) -> ModelConfig:
  d, f, n, h, kv, v = shape
  kw = dict(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n, num_attention_heads=h,
            num_key_value_heads=kv, rope_theta=500000.0, dtype=dtype, param_dtype=dtype,
            max_position_embeddings=131072)
  if variant:
    hd = d // h
    ssm = SSMConfig(variant="mamba2", d_state=hd) if variant == "mamba2" else SSMConfig(variant="mamba")
    kw.update(attn_layers=tuple(range(1, n, 2)), ssm=ssm)  # 50%: every other layer keeps attention
  return ModelConfig(**kw)


def timeit(fn, *args, repeats: int = 3) -> float:
  """Best wall time of fn(*args) (after one warm-up / compile call), seconds."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def plain_step_time(params, cfg, batch: int, ctx: int, iters: int) -> float:
  """MEASURED seconds per ordinary one-token decode step at context ctx."""
  cache = init_cache(cfg, batch, ctx + iters + 1).replace(pos=jnp.full((batch,), ctx, jnp.int32))

  @jax.jit
  def run(params, cache):
    def body(_, carry):  # the argmax feeds the next step, and the whole cache is returned: nothing is dead code
      tok, c = carry
      logits, c = hybrid.forward(params, cfg, tok, cache=c)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), c
    return jax.lax.fori_loop(0, iters, body, (jnp.ones((batch, 1), jnp.int32), cache))
  return timeit(run, params, cache) / iters


def verify_step_time(params, cfg, batch: int, ctx: int, iters: int, k: int) -> float:
  """MEASURED seconds per verification call of k+1 tokens (Mamba layers replay ~half the cached steps)."""
  keep = max(1, (k + 1) // 2)
  cache = init_cache(cfg, batch, ctx + iters * keep + k + 2).replace(pos=jnp.full((batch,), ctx, jnp.int32))
  cache = verify.to_spec_cache(cfg, cache, k)

  @jax.jit
  def run(params, cache):
    def body(_, carry):
      toks, c = carry
      pos = c.pos
      logits, c = verify.spec_forward(params, cfg, toks, c, commit=True)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), c.replace(pos=pos + keep)  # roll back to keep
    return jax.lax.fori_loop(0, iters, body, (jnp.ones((batch, k + 1), jnp.int32), cache))
  return timeit(run, params, cache) / iters


def end_to_end(tparams, tcfg, dparams, dcfg, prompts, max_new: int, k: int | None) -> tuple[float, dict]:
  """MEASURED generated tokens/s (second call; the first compiles), and the speculative stats."""
  if k is None:
    fn = lambda: generate(tparams, tcfg, prompts, max_new, eos_ids=())
  else:
    fn = lambda: speculative_generate(tparams, tcfg, dparams, dcfg, prompts, max_new, k, eos_ids=())
  fn()
  t = time.perf_counter()
  res = fn()
  dt = time.perf_counter() - t
  toks, stats = (res, {}) if k is None else res
  return sum(len(s) for s in toks) / dt, stats


def expected_tokens(alpha: float, k: int) -> float:
  return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def part_b(args, size: str) -> dict:
  shape = SHAPES[size]
  tcfg = make_cfg(shape, args.variant, args.dtype)
  dcfg = make_cfg(DRAFTS[size], None, args.dtype)
  init = jax.jit(hybrid.init_params, static_argnums=(0,))
  tparams, dparams = init(tcfg, jax.random.PRNGKey(0)), init(dcfg, jax.random.PRNGKey(1))
  b, ctx, iters = args.batch, args.ctx, args.iters
  print(f"\n== Part B: {size}-shaped 50% hybrid ({args.variant}), random weights, batch {b}, context {ctx}, "
        f"{args.dtype}; draft: {DRAFTS[size][2]}-layer D={DRAFTS[size][0]} Llama ==")
  t_step = plain_step_time(tparams, tcfg, b, ctx, iters)
  t_draft = plain_step_time(dparams, dcfg, b, ctx, iters)
  print(f"MEASURED  target decode step {t_step * 1e3:8.3f} ms | draft decode step {t_draft * 1e3:8.3f} ms "
        f"(ratio {t_draft / t_step:.3f})")
  rows = []
  print(f"{'k':>3} {'verify ms':>10} {'/step':>7} | PROJECTED speedup at alpha = "
        + " ".join(f"{a:>5}" for a in args.alphas) + " | zero-cost-draft bound at the same alphas")
  for k in args.ks:
    t_ver = verify_step_time(tparams, tcfg, b, ctx, iters, k)
    proj = [expected_tokens(a, k) * t_step / (t_ver + k * t_draft) for a in args.alphas]
    bound = [expected_tokens(a, k) * t_step / t_ver for a in args.alphas]
    rows.append(dict(k=k, verify_s=t_ver, verify_over_step=t_ver / t_step, projected=proj, bound=bound))
    print(f"{k:>3} {t_ver * 1e3:10.3f} {t_ver / t_step:7.2f} | {'':>28}" + " ".join(f"{p:5.2f}" for p in proj)
          + " | " + " ".join(f"{p:5.2f}" for p in bound))
  e2e = {}
  if args.e2e_k:
    k = args.e2e_k
    prompts = [list(range(1, args.prompt_len + 1))] * b
    tps_plain, _ = end_to_end(tparams, tcfg, None, None, prompts, args.max_new, None)
    tps_rand, st_rand = end_to_end(tparams, tcfg, dparams, dcfg, prompts, args.max_new, k)
    tps_self, st_self = end_to_end(tparams, tcfg, tparams, tcfg, prompts, args.max_new, k)
    print(f"MEASURED end-to-end (k={k}, {args.max_new} new tokens): plain {tps_plain:.1f} tok/s | random draft "
          f"{tps_rand:.1f} tok/s (accepted/step {st_rand['accepted_per_step']:.2f}) | draft == target "
          f"{tps_self:.1f} tok/s (accepted/step {st_self['accepted_per_step']:.2f})")
    e2e = dict(k=k, plain_tps=tps_plain, random_draft_tps=tps_rand, self_draft_tps=tps_self,
               random_draft_stats=st_rand, self_draft_stats=st_self)
  return dict(size=size, variant=args.variant, batch=b, ctx=ctx, step_s=t_step, draft_step_s=t_draft,
              verify=rows, end_to_end=e2e)


def part_a(args) -> dict:
  from hybrid_jax.checkpoint import load_model
  tparams, tcfg, tok = load_model(args.target)
  dparams, dcfg, _ = load_model(args.draft) if args.draft else (tparams, tcfg, None)
  texts = ["Explain how a state space model differs from attention.", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime.", "What is the capital of France?"]
  if tok is not None:
    prompts = [tok.encode(t) for t in texts][:args.batch]
  else:
    prompts = [list(range(1, args.prompt_len + 1))] * args.batch
  print(f"\n== Part A: target {args.target}, draft {args.draft or '(the target itself)'}, batch {len(prompts)} ==")
  tps_plain, _ = end_to_end(tparams, tcfg, None, None, prompts, args.max_new, None)
  print(f"MEASURED plain greedy: {tps_plain:.1f} tok/s")
  rows = []
  for k in args.ks:
    tps, st = end_to_end(tparams, tcfg, dparams, dcfg, prompts, args.max_new, k)
    rows.append(dict(st, tps=tps, speedup=tps / tps_plain))
    print(f"MEASURED k={k:>2}: {tps:8.1f} tok/s  speedup {tps / tps_plain:5.2f}  accepted/step "
          f"{st['accepted_per_step']:.2f}  acceptance {st['acceptance_rate']:.2f}  target calls {st['target_calls']}")
  return dict(target=args.target, draft=args.draft, plain_tps=tps_plain, rows=rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="small shapes, few iterations: a CPU smoke test")
  ap.add_argument("--target", help="checkpoint dir of a distilled hybrid (part A)")
  ap.add_argument("--draft", help="checkpoint dir of its draft (part A; default: the target itself)")
  ap.add_argument("--sizes", default="1b,3b", help="part B shapes: comma list of 1b,3b ('' to skip)")
  ap.add_argument("--variant", default="mamba2", choices=["mamba", "mamba2"])
  ap.add_argument("--ks", default="1,2,4,8,12,16")
  ap.add_argument("--alphas", default="0.6,0.8,0.9")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--ctx", type=int, default=512, help="context length the decode/verify steps run at")
  ap.add_argument("--iters", type=int, default=32, help="steps per timed loop")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--max-new", type=int, default=128)
  ap.add_argument("--e2e-k", type=int, default=4, help="k of the part-B end-to-end runs (0: skip them)")
  ap.add_argument("--dtype", default="bfloat16", help="part B compute/param dtype (part A keeps the checkpoint's)")
  ap.add_argument("--json", help="write the results here")
  args = ap.parse_args(argv)
  args.ks = [int(x) for x in args.ks.split(",") if x]
  args.alphas = [float(x) for x in args.alphas.split(",") if x]
  sizes = [s for s in args.sizes.split(",") if s]
  if args.tiny:
    sizes, args.ks, args.iters, args.ctx, args.max_new, args.prompt_len = ["tiny"], [1, 2, 4], 4, 16, 12, 8
    args.dtype = "float32"
  print(f"devices: {jax.devices()}")
  results = {"part_b": [part_b(args, s) for s in sizes]}
  if args.target:
    results["part_a"] = part_a(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
