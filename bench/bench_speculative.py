"""Speculative decoding benchmark (docs/DESIGN.md §5). Meant for a GPU; `--tiny` runs a small smoke version on CPU.

Part A (only with --target DIR [--draft D ...]): real checkpoints. End-to-end tokens/s of plain greedy decoding
  vs speculative decoding for each draft (a checkpoint, 'ngram' or 'self:LAYERS') and k (an integer or 'auto'),
  the measured mean accepted length, the measured speedup, and whether the output equals plain greedy's.
Part B (--parts b; random weights, shapes of Llama-3.2-1B / 3B with 50% of the layers Mamba): the cost of one
  verification call of k+1 tokens against one plain decode step (both MEASURED), and speedups PROJECTED from
  them at an assumed per-token acceptance alpha (expected tokens per round (1 - alpha^(k+1)) / (1 - alpha)):
      projected speedup = E[tokens per round] * t_step / (t_verify(k) + k * t_draft_step)
  plus the zero-cost-draft bound E[tokens] * t_step / t_verify(k).
Part C (--parts c, the default; same random-weight targets): MEASURED end-to-end speedups at a controlled
  acceptance. A random draft accepts nothing, so `controlled_acceptance_hook` rewrites each draft proposal to
  the target's greedy continuation with probability alpha (else a wrong token); the draft model still runs in
  full (its real cost). Per (size, variant, batch): one plain greedy `generate` (the baseline, best of
  --repeats); per k one compilation of the speculative loop, reused for every alpha (hook_args is traced):
  a run at alpha = 0 gives the continuation as the speculative path's own verifier emits it (bf16 argmax ties
  can differ between the plain and the verify path of a random model; `plain_match` reports how often), then
  each alpha is timed. Reported: tokens/s plain and speculative (wall time of the whole API call, compile
  excluded), speedup, the MEASURED mean accepted length per round vs its i.i.d. expectation sum_{i<=k} alpha^i,
  and whether the output equals the continuation (`exact`).

  python bench/bench_speculative.py --tiny                       # CPU smoke test (parts B and C)
  python bench/bench_speculative.py --sizes 1b,3b --variants mamba2,mamba --batches 1,8 --json out.json
  python bench/bench_speculative.py --parts b --sizes 1b --ks 1,2,4,8,16   # verify cost per k
  python bench/bench_speculative.py --target DIR --draft DIR --ks 2,4,8
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.decode.generate import generate
from hybrid_jax.decode.speculative import controlled_acceptance_hook, speculative_generate
from hybrid_jax.model import hybrid

# (hidden, ffn, layers, heads, kv heads, vocab)
SHAPES = {"1b": (2048, 8192, 16, 32, 8, 128256), "3b": (3072, 8192, 28, 24, 8, 128256),
          "tiny": (64, 128, 4, 4, 2, 256)}


def draft_shape(args, size: str) -> tuple:
  """An all-attention Llama of the target's vocabulary: --draft-layers x --draft-hidden (ffn 8/3 x hidden,
  head dim 64, 4 query heads per kv head)."""
  vocab = SHAPES[size][-1]
  if size == "tiny":
    return (32, 64, 1, 4, 2, vocab)
  d = args.draft_hidden
  heads = max(1, d // 64)
  return (d, -(-8 * d // 3 // 256) * 256, args.draft_layers, heads, max(1, heads // 4), vocab)


def make_cfg(shape, variant: str | None, dtype: str) -> ModelConfig:
  d, f, n, h, kv, v = shape
  kw = {"vocab_size": v, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": n,
        "num_attention_heads": h, "num_key_value_heads": kv, "rope_theta": 500000.0, "dtype": dtype,
        "param_dtype": dtype, "max_position_embeddings": 131072}
  if variant:
    hd = d // h
    ssm = SSMConfig(variant="mamba2", d_state=hd) if variant == "mamba2" else SSMConfig(variant="mamba")
    kw.update(attn_layers=tuple(range(1, n, 2)), ssm=ssm)  # 50%: every other layer keeps attention
  return ModelConfig(**kw)


def models(args, size: str, variant: str):
  tcfg = make_cfg(SHAPES[size], variant, args.dtype)
  dcfg = make_cfg(draft_shape(args, size), None, args.dtype)
  return (tcfg, hybrid.init_params(tcfg, jax.random.PRNGKey(0)), dcfg,
          hybrid.init_params(dcfg, jax.random.PRNGKey(1)))


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
  cache = hybrid.init_cache(cfg, batch, ctx + iters + 1).replace(pos=jnp.full((batch,), ctx, jnp.int32))

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
  cache = hybrid.init_cache(cfg, batch, ctx + iters * keep + k + 2).replace(pos=jnp.full((batch,), ctx, jnp.int32))
  cache = hybrid.speculative_cache(cfg, cache, k)

  @jax.jit
  def run(params, cache):
    def body(_, carry):
      toks, c = carry
      pos = c.pos
      logits, c = hybrid.forward(params, cfg, toks, cache=c, speculative="commit")
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), c.replace(pos=pos + keep)  # roll back to keep
    return jax.lax.fori_loop(0, iters, body, (jnp.ones((batch, k + 1), jnp.int32), cache))
  return timeit(run, params, cache) / iters


def end_to_end(tparams, tcfg, dparams, dcfg, prompts, max_new: int, k: int | str | None
               ) -> tuple[float, dict, list]:
  """MEASURED generated tokens/s (second call; the first compiles), the speculative stats, the tokens."""
  if k is None:
    fn = lambda: generate(tparams, tcfg, prompts, max_new, eos_ids=())
  else:
    fn = lambda: speculative_generate(tparams, tcfg, dparams, dcfg, prompts, max_new, k, eos_ids=())
  fn()
  t = time.perf_counter()
  res = fn()
  dt = time.perf_counter() - t
  toks, stats = (res, {}) if k is None else res
  return sum(len(s) for s in toks) / dt, stats, toks


def first_difference(tparams, tcfg, prompts, plain: list, spec: list) -> str:
  """Where speculative output first leaves plain greedy, and the target's top-2 logit margin there on the
  plain prefix (one full-sequence forward): a margin near the logits' rounding says a near-tie decided by the
  order of floating-point sums (a verify call's matmuls have K + 1 rows, a decode step's one), not a wrong
  accept."""
  for prompt, a, b in zip(prompts, plain, spec):
    i = next((j for j, (u, v) in enumerate(zip(a, b)) if u != v), None)
    if i is None:
      continue
    logits, _ = hybrid.forward(tparams, tcfg, jnp.asarray([list(prompt) + list(a[:i])], jnp.int32))
    top2 = np.sort(np.asarray(logits[0, -1], np.float32))[-2:]
    return f"first at new token {i} of {len(a)}: top-2 margin {top2[1] - top2[0]:.4f} ({tcfg.compute_dtype})"
  return "same tokens"


def expected_tokens(alpha: float, k: int) -> float:
  return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def part_b(args, size: str, variant: str, batch: int) -> dict:
  tcfg, tparams, dcfg, dparams = models(args, size, variant)
  ctx, iters = args.ctx, args.iters
  ds = draft_shape(args, size)
  print(f"\n== Part B: {size}-shaped 50% hybrid ({variant}), random weights, batch {batch}, context {ctx}, "
        f"{args.dtype}; draft: {ds[2]}-layer D={ds[0]} Llama ==")
  t_step = plain_step_time(tparams, tcfg, batch, ctx, iters)
  t_draft = plain_step_time(dparams, dcfg, batch, ctx, iters)
  print(f"MEASURED  target decode step {t_step * 1e3:8.3f} ms | draft decode step {t_draft * 1e3:8.3f} ms "
        f"(ratio {t_draft / t_step:.3f})")
  rows = []
  print(f"{'k':>3} {'verify ms':>10} {'/step':>7} | PROJECTED speedup at alpha = "
        + " ".join(f"{a:>5}" for a in args.alphas) + " | zero-cost-draft bound at the same alphas")
  for k in args.ks:
    t_ver = verify_step_time(tparams, tcfg, batch, ctx, iters, k)
    proj = [expected_tokens(a, k) * t_step / (t_ver + k * t_draft) for a in args.alphas]
    bound = [expected_tokens(a, k) * t_step / t_ver for a in args.alphas]
    rows.append({"k": k, "verify_s": t_ver, "verify_over_step": t_ver / t_step, "projected": proj,
                 "bound": bound})
    print(f"{k:>3} {t_ver * 1e3:10.3f} {t_ver / t_step:7.2f} | {'':>28}" + " ".join(f"{p:5.2f}" for p in proj)
          + " | " + " ".join(f"{p:5.2f}" for p in bound))
  return {"size": size, "variant": variant, "batch": batch, "ctx": ctx, "step_s": t_step,
          "draft_step_s": t_draft, "verify": rows}


def _wall(fn, repeats: int):
  """(best wall seconds of fn() over `repeats` calls, the last result)."""
  best, res = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    res = fn()
    best = min(best, time.perf_counter() - t)
  return best, res


def part_c(args, size: str, variant: str, batch: int, deadline: float, sink: list, save) -> None:
  """Controlled-acceptance end-to-end runs (module docstring); appends one row per (k, alpha) to sink and
  calls save() after every k (a run cut off by a time limit keeps what it measured)."""
  if time.perf_counter() > deadline:
    print(f"SKIPPED part C {size} {variant} batch {batch}: past --budget-s")
    sink.append({"size": size, "variant": variant, "batch": batch, "k": None, "skipped": True})
    return
  tcfg, tparams, dcfg, dparams = models(args, size, variant)
  ds = draft_shape(args, size)
  n = args.max_new
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, tcfg.vocab_size, (batch, args.prompt_len)).tolist()
  print(f"\n== Part C: {size}-shaped 50% hybrid ({variant}), random weights, batch {batch}, prompt "
        f"{args.prompt_len}, {n} new tokens, {args.dtype}; draft {ds[2]}-layer D={ds[0]} ffn {ds[1]} Llama ==")
  plain = lambda: generate(tparams, tcfg, prompts, n, eos_ids=())
  t0 = time.perf_counter()
  want = plain()
  t_compile_plain = time.perf_counter() - t0
  t_plain, _ = _wall(plain, args.repeats)
  tps_plain = batch * n / t_plain
  t_draft = plain_step_time(dparams, dcfg, batch, args.prompt_len + n // 2, args.iters)
  t_step = t_plain / n  # per generated token incl. the prefill: an upper bound on the decode step
  print(f"MEASURED plain greedy: {tps_plain:.1f} tok/s ({t_step * 1e3:.3f} ms per step incl. prefill; compile "
        f"{t_compile_plain - t_plain:.1f} s) | draft decode step {t_draft * 1e3:.3f} ms (ratio "
        f"{t_draft / t_step:.3f})")
  base = {"size": size, "variant": variant, "batch": batch, "max_new": n, "prompt_len": args.prompt_len,
          "draft_shape": ds, "plain_tps": tps_plain, "plain_step_s": t_step, "draft_step_s": t_draft}
  cont0 = jnp.asarray(want, jnp.int32)  # [b, n] (no EOS: every row has n tokens)
  for k in args.ks:
    if time.perf_counter() > deadline:
      print(f"SKIPPED k={k} and later: past --budget-s")
      sink.append(dict(base, k=k, skipped=True))
      continue
    spec = lambda cont, alpha, k=k: speculative_generate(
        tparams, tcfg, dparams, dcfg, prompts, n, k, eos_ids=(), draft_hook=controlled_acceptance_hook,
        hook_args=(cont, jnp.float32(alpha)))
    t0 = time.perf_counter()
    got0, st0 = spec(cont0, 0.0)  # compiles; alpha 0: every round emits the verifier's own token
    t_compile = time.perf_counter() - t0 - st0["seconds"]
    plain_match = float(np.mean([g == w for g, w in zip(got0, want)]))
    cont = jnp.asarray(got0, jnp.int32)
    for alpha in [0.0, *args.alphas]:
      t, (got, st) = _wall(functools.partial(spec, cont, alpha), args.repeats)
      tps = batch * n / t
      exp_acc = sum(alpha ** i for i in range(1, k + 1))
      row = dict(base, k=k, alpha=alpha, spec_tps=tps, speedup=tps / tps_plain,
                 accepted_per_round=st["accepted_per_step"], expected_accepted=exp_acc,
                 acceptance_rate=st["acceptance_rate"], rounds=st["rounds"],
                 exact=float(np.mean([g == c for g, c in zip(got, np.asarray(cont).tolist())])),
                 plain_match=plain_match, compile_s=t_compile)
      sink.append(row)
      print(f"MEASURED k={k} alpha={alpha:.2f}: {tps:9.1f} tok/s  speedup {tps / tps_plain:5.2f}  accepted/round "
            f"{st['accepted_per_step']:.2f} (i.i.d. {exp_acc:.2f})  exact {row['exact']:.2f}  plain_match "
            f"{plain_match:.2f}  compile {t_compile:.1f} s")
    save()


def markdown(rows: list) -> str:
  head = ("| size | variant | batch | K | alpha | plain tok/s | spec tok/s | speedup | accepted/round (measured) "
          "| i.i.d. expectation | exact | compile s |")
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    if r.get("skipped"):
      lines.append(f"| {r['size']} | {r['variant']} | {r['batch']} | {r['k']} | skipped (budget) |" + " |" * 7)
      continue
    lines.append(f"| {r['size']} | {r['variant']} | {r['batch']} | {r['k']} | {r['alpha']:.2f} | "
                 f"{r['plain_tps']:.1f} | {r['spec_tps']:.1f} | {r['speedup']:.2f} | "
                 f"{r['accepted_per_round']:.2f} | {r['expected_accepted']:.2f} | {r['exact']:.2f} | "
                 f"{r['compile_s']:.1f} |")
  best = {}
  for r in rows:
    if not r.get("skipped") and r["alpha"] > 0:
      key = (r["size"], r["variant"], r["batch"], r["alpha"])
      if key not in best or r["speedup"] > best[key]["speedup"]:
        best[key] = r
  lines += ["", "Best K per alpha:", "| size | variant | batch | alpha | best K | speedup | accepted/round |",
            "|" + "---|" * 7]
  lines += [f"| {s} | {v} | {b} | {a:.2f} | {r['k']} | {r['speedup']:.2f} | {r['accepted_per_round']:.2f} |"
            for (s, v, b, a), r in best.items()]
  return "\n".join(lines)


def part_a(args) -> dict:
  from hybrid_jax.checkpoint import load_model
  from hybrid_jax.decode.speculative import resolve_draft
  tparams, tcfg, tok = load_model(args.target)
  if args.target_dtype:  # e.g. float32: the same model with less rounding, to tell near-ties from wrong accepts
    tcfg = tcfg.replace(dtype=args.target_dtype, param_dtype=args.target_dtype)
    tparams = jax.tree.map(lambda x: x.astype(args.target_dtype), tparams)
  texts = ["Explain how a state space model differs from attention.", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime.", "What is the capital of France?"]
  batch = max(args.batches)
  if tok is not None:  # as a chat user would send them: the model's chat template (a distilled chat model)
    from hybrid_jax.decode.generate import chat_ids
    prompts = [chat_ids(tok, [{"role": "user", "content": t}]) for t in texts]
  else:
    prompts = [list(range(1, args.prompt_len + 1))]
  # batch 1 (the latency case speculation is for): each prompt on its own, totals over all of them.
  groups = [[p] for p in prompts] if batch == 1 else [(prompts * batch)[:batch]]
  print(f"\n== Part A: target {args.target}, batch {len(groups[0])}, {len(groups)} prompt group(s), "
        f"{args.max_new} new tokens each (no EOS stop), {tcfg.compute_dtype} ==")

  def run_all(dparams, dcfg, k):
    n_tok, secs, calls, acc, prop, outs = 0, 0.0, 0, 0.0, 0.0, []
    for g in groups:
      tps, st, toks = end_to_end(tparams, tcfg, dparams, dcfg, g, args.max_new, k)
      outs.append(toks)
      n = len(g) * args.max_new
      n_tok, secs = n_tok + n, secs + n / tps
      if st:
        calls += st["target_calls"]
        acc += st["accepted_per_step"] * st["target_calls"]
        prop += st["acceptance_rate"] * st["target_calls"]
    stats = {"target_calls": calls, "accepted_per_step": acc / calls, "acceptance_rate": prop / calls} if calls else {}
    return n_tok / secs, stats, outs

  tps_plain, _, plain_out = run_all(None, None, None)
  print(f"MEASURED plain greedy: {tps_plain:.1f} tok/s")
  rows = []
  for spec in args.draft or [args.target]:
    dparams, dcfg = resolve_draft(spec, tparams, tcfg)
    for k in args.ks:
      tps, st, out = run_all(dparams, dcfg, k)
      same = out == plain_out
      where = "" if same else first_difference(tparams, tcfg, [p for g in groups for p in g],
                                               [t for o in plain_out for t in o], [t for o in out for t in o])
      rows.append(dict(st, draft=spec, k=k, tps=tps, speedup=tps / tps_plain, same_as_plain=same,
                       difference=where))
      print(f"MEASURED draft {spec} k={k!s:>4}: {tps:8.1f} tok/s  speedup {tps / tps_plain:5.2f}  accepted/step "
            f"{st['accepted_per_step']:.2f}  acceptance {st['acceptance_rate']:.2f}  target calls "
            f"{st['target_calls']}  output {'= plain greedy' if same else 'DIFFERS from plain greedy: ' + where}")
  return {"target": args.target, "dtype": str(tcfg.compute_dtype), "plain_tps": tps_plain, "rows": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="small shapes, few iterations: a CPU smoke test")
  ap.add_argument("--target", help="checkpoint dir of a distilled hybrid (part A)")
  ap.add_argument("--draft", action="append",
                  help="part A's draft: a checkpoint dir, 'ngram' (prompt lookup) or 'self:0,1,2' (the target's "
                       "own layers); repeatable (default: the target itself)")
  ap.add_argument("--parts", default="c", help="random-weight parts: comma list of b (verify cost), c (measured "
                                               "end-to-end at controlled acceptance)")
  ap.add_argument("--sizes", default="1b,3b", help="target shapes: comma list of 1b,3b ('' to skip B and C)")
  ap.add_argument("--variants", default="mamba2,mamba", help="comma list of mamba2,mamba")
  ap.add_argument("--batches", default="1", help="comma list of batch sizes")
  ap.add_argument("--ks", default="1,2,3,4,6,8")
  ap.add_argument("--alphas", default="0.7,0.8,0.9", help="per-token acceptance of part C (projected in B)")
  ap.add_argument("--draft-layers", type=int, default=2, help="draft Llama depth (parts B, C)")
  ap.add_argument("--draft-hidden", type=int, default=768, help="draft Llama width (ffn 8/3 x, head dim 64)")
  ap.add_argument("--ctx", type=int, default=512, help="part B: context length the decode/verify steps run at")
  ap.add_argument("--iters", type=int, default=32, help="steps per timed loop")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--max-new", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=2, help="part C: timed calls per point (best is kept)")
  ap.add_argument("--budget-s", type=float, default=0, help="part C: skip further k once this many seconds "
                                                            "have passed (0: no limit)")
  ap.add_argument("--dtype", default="bfloat16", help="random-weight dtype (part A keeps the checkpoint's)")
  ap.add_argument("--target-dtype", default="",
                  help="part A: run the checkpoint in this dtype (float32 also makes matmuls full precision)")
  ap.add_argument("--json", help="write the results here (rewritten after every part-C model)")
  args = ap.parse_args(argv)
  args.ks = [x if x == "auto" else int(x) for x in args.ks.split(",") if x]
  args.alphas = [float(x) for x in args.alphas.split(",") if x]
  args.batches = [int(x) for x in args.batches.split(",") if x]
  sizes, variants = [s for s in args.sizes.split(",") if s], [v for v in args.variants.split(",") if v]
  parts = set(args.parts.split(","))
  if args.tiny:
    sizes, args.ks, args.iters, args.ctx, args.max_new, args.prompt_len = ["tiny"], [1, 2, 4], 4, 16, 24, 8
    args.dtype, args.repeats = "float32", 1
  start = time.perf_counter()
  deadline = start + args.budget_s if args.budget_s > 0 else float("inf")
  print(f"devices: {jax.devices()}")
  results: dict = {"args": vars(args), "part_b": [], "part_c": []}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)

  for size in sizes:
    for variant in variants:
      for batch in args.batches:
        if "b" in parts:
          results["part_b"].append(part_b(args, size, variant, batch))
        if "c" in parts:
          part_c(args, size, variant, batch, deadline, results["part_c"], save)
        save()
  if results["part_c"]:
    print("\n" + markdown(results["part_c"]))
  if args.target:
    precision = "highest" if args.target_dtype == "float32" else None  # no TF32 matmuls in a float32 check
    with jax.default_matmul_precision(precision):
      results["part_a"] = part_a(args)
  print(f"total {time.perf_counter() - start:.1f} s")
  save()


if __name__ == "__main__":
  main()
