"""GPU benchmark of the SSM kernels (docs/KERNELS.md): multistep verification and the training scans.

  PYTHONUNBUFFERED=1 python bench/bench_kernels.py [--quick] [--out results.json]

(a) multistep verify for K = 1, 2, 4, 8, 16 against one single-step update, for the 8 Mamba layers of a 50%
    hybrid of Llama-3.2-1B (Mamba-2 state [b, 32, 64, 64]; Mamba-1 d_inner 2048, N 16), batch 1 and 8; time
    per layer (8 layers in one jitted call, each its own state buffer), and bandwidth on the call's bytes
    (inputs + outputs once) against a device-to-device copy measured in the same run.
(b) training scan at l = 2048: forward and forward + backward of reference / pallas / chunked; rel. error vs
    the reference on the same inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from hybrid_jax import pallas
from hybrid_jax.pallas import KernelOptions
from hybrid_jax.pallas import scan as m1
from hybrid_jax.pallas import ssd as m2

BF = jnp.bfloat16
F32 = jnp.float32
LAYERS = 8


def block(x):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def timeit(f, *args, calls: int = 20, reps: int = 5, budget: float = 1.0) -> float:
  """Median over `reps` of the mean time of `calls` back-to-back async calls (seconds per call)."""
  block(f(*args))
  t0 = time.perf_counter()
  block(f(*args))
  one = time.perf_counter() - t0
  calls = max(1, min(calls, int(budget / max(reps, 1) / max(one, 1e-6))))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(*args)
    block(out)
    ts.append((time.perf_counter() - t0) / calls)
  return statistics.median(ts)


def nbytes(tree) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def relerr(a, b) -> float:
  a, b = jnp.asarray(a, F32), jnp.asarray(b, F32)
  return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def copy_ceiling() -> float:
  x = jax.random.normal(jax.random.PRNGKey(0), (256 * 1024 * 1024,), F32)  # 1 GiB
  f = jax.jit(lambda v: v * 1.0001)
  t = timeit(f, x, calls=10)
  return 2 * x.nbytes / t


# ------------------------------------------------------------------------------------------------
def verify_inputs(key, variant: str, b: int, k: int):
  rn = lambda kk, s, dt=BF: jax.random.normal(kk, s, F32).astype(dt)
  ks = jax.random.split(key, 13)
  if variant == "mamba":
    d, n, g = 2048, 16, 128
    return dict(state=rn(ks[0], (b, d, n), F32), cache_x=rn(ks[1], (b, k, d)), cache_dt=rn(ks[2], (b, k, d)),
                cache_B=rn(ks[3], (b, k, g, n)), n_accept=jnp.full((b,), k, jnp.int32), x=rn(ks[4], (b, k, d)),
                dt=rn(ks[5], (b, k, d)), B=rn(ks[6], (b, k, g, n)), C=rn(ks[7], (b, k, g, n)),
                A=-jnp.exp(rn(ks[8], (d, n), F32)), D=rn(ks[9], (d,), F32), dt_bias=rn(ks[10], (d,), F32),
                z=rn(ks[11], (b, k, d)))
  h, p, n, g = 32, 64, 64, 32
  return dict(state=rn(ks[0], (b, h, p, n), F32), cache_x=rn(ks[1], (b, k, h, p)), cache_dt=rn(ks[2], (b, k, h)),
              cache_B=rn(ks[3], (b, k, g, n)), n_accept=jnp.full((b,), k, jnp.int32), x=rn(ks[4], (b, k, h, p)),
              dt=rn(ks[5], (b, k, h)), B=rn(ks[6], (b, k, g, n)), C=rn(ks[7], (b, k, g, n)),
              A=-jnp.exp(rn(ks[8], (h,), F32)), D=rn(ks[9], (h,), F32), dt_bias=rn(ks[10], (h,), F32), z=None)


def multistep_fn(impl, options: KernelOptions | None = None):
  def f(layers):
    return [pallas.multistep_scan(**a, impl=impl, options=options)[:2] for a in layers]
  return jax.jit(f)


REPEAT = 50


def device_loop(step_fn):
  """REPEAT verification calls of all layers inside one jitted fori_loop (each call's checkpoint feeds the
  next call's state), so host dispatch stays out of the per-call time. Returns f(layers) -> carry."""
  def f(layers):
    def body(_, carry):
      states, _ = carry
      outs = step_fn([dict(a, state=s) for a, s in zip(layers, states)])
      return [o[1] for o in outs], [o[0] for o in outs]
    init = ([a["state"] for a in layers], [o[0] for o in jax.eval_shape(step_fn, layers)])
    init = (init[0], [jnp.zeros(o.shape, o.dtype) for o in init[1]])
    return jax.lax.fori_loop(0, REPEAT, body, init)
  return jax.jit(f)


def verify_step(impl, options: KernelOptions | None = None):
  """All layers' verify calls with `options` (None: the library's defaults)."""
  return lambda layers: [pallas.multistep_scan(**a, impl=impl, options=options)[:2] for a in layers]


def with_options(settings: dict, base: KernelOptions | None = None) -> KernelOptions:
  """`base` (None: the defaults) with fields replaced; a name may be the field's or its old capitalised
  switch name (FAST_MATH = fast_math). ValueError for a name that is not a field."""
  fields = {f.name for f in dataclasses.fields(KernelOptions)}
  changes = {}
  for name, value in settings.items():
    if name.lower() not in fields:
      raise ValueError(f"unknown kernel option {name!r}: one of {', '.join(sorted(fields))}")
    changes[name.lower()] = value
  return dataclasses.replace(base or KernelOptions(), **changes)


def parse_switches(spec: str, base: KernelOptions | None = None) -> KernelOptions:
  """A --set value 'NAME=0|1[,NAME=0|1...]' (boolean options: ACC_Y, FAST_MATH, BITS_BF16, FMA, PTX_RCP,
  LANE_SCALARS, any case) applied to `base`. ValueError naming the item for anything else."""
  switches = [f.name for f in dataclasses.fields(KernelOptions) if isinstance(f.default, bool)]
  settings = {}
  for item in spec.split(","):
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or value.strip() not in ("0", "1"):
      raise ValueError(f"--set {spec!r}: expected NAME=0|1[,NAME=0|1...], got {item!r}")
    if name.lower() not in switches:
      raise ValueError(f"--set {spec!r}: {name!r} is not a switch (one of {', '.join(map(str.upper, switches))})")
    settings[name] = value.strip() == "1"
  return with_options(settings, base)


def single_step_loop(variant):
  def step(layers):
    outs = []
    for a in layers:
      if variant == "mamba":
        y, h = pallas.selective_scan_ref(a["x"][:, :1], a["dt"][:, :1], a["A"], a["B"][:, :1], a["C"][:, :1],
                                         a["D"], a["dt_bias"], z=a["z"][:, :1], h0=a["state"])
      else:
        y, h = pallas.ssd_scan_ref(a["x"][:, :1], a["dt"][:, :1], a["A"], a["B"][:, :1], a["C"][:, :1],
                                   a["D"], a["dt_bias"], h0=a["state"])
      outs.append((y, h))
    return outs
  return step


# (tile, warps) candidates of the verify kernel (KernelOptions.tile_override; tile = Mamba-1 state elements /
# Mamba-2 rows of P);
# batches >= 16 (bytes enough for a bandwidth reading) also try larger tiles with more warps.
VERIFY_CONFIGS = {"mamba2": [(1, 1), (4, 4), (8, 4), (16, 4), (32, 4), (8, 1)],
                  "mamba": [(32, 1), (64, 2), (128, 4), (256, 2), (256, 4), (512, 4)]}
VERIFY_CONFIGS_LARGE = {"mamba2": [(8, 1), (16, 2), (16, 4), (32, 4), (32, 8), (64, 8)],
                        "mamba": [(256, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8), (2048, 4)]}


def sweep_verify(sweep_rows, batches=(1, 8)):
  """Time the verify kernel's (tile, warps) candidates at K = 1, 8 for each batch; returns the best per
  (variant, batch) (smallest summed time over the two K)."""
  best = {}
  for variant in VERIFY_CONFIGS:
    for b in batches:
      totals = {}
      for cfg in (VERIFY_CONFIGS_LARGE if b >= 16 else VERIFY_CONFIGS)[variant]:
        total, parts = 0.0, []
        for k in (1, 8):
          t = _verify_time(variant, b, k, KernelOptions(tile_override=cfg))
          sweep_rows.append({"variant": variant, "cfg": cfg, "batch": b, "K": k, "us": t * 1e6})
          total += t
          parts.append(f"K{k} {t * 1e6:.1f}")
        totals[cfg] = total
        print(f"sweep {variant} b={b} (tile, warps) {cfg}: sum {total * 1e6:.1f} us ({', '.join(parts)})")
      best[variant, b] = min(totals, key=totals.get)
      print(f"sweep {variant} b={b}: best {best[variant, b]}")
  for variant in VERIFY_CONFIGS:
    name = "M1_TILES" if variant == "mamba" else "M2_TILES"
    print(f"pick: {name} for batches {list(batches)}: {[best[variant, b] for b in batches]}")
  return best


def _swept_pick(best, variant, b):
  """The sweep's pick for batch b: that batch's, else the largest swept batch below it (else the smallest)."""
  swept = sorted(sb for v, sb in best if v == variant)
  below = [sb for sb in swept if sb <= b]
  return best[variant, below[-1] if below else swept[0]]


def _verify_time(variant, b, k, options: KernelOptions | None = None):
  layers = [verify_inputs(jax.random.PRNGKey(10 * k + i), variant, b, k) for i in range(LAYERS)]
  return timeit(device_loop(verify_step("pallas", options)), layers, calls=3) / LAYERS / REPEAT


def bench_verify(ceiling: float, ks, batches, rows, best=None, with_ref=True, variants=("mamba2", "mamba")):
  for variant in variants:
    for b in batches:
      opts = KernelOptions(tile_override=_swept_pick(best, variant, b)) if best else None
      print(f"verify {variant} b={b}: (tile, warps) = {opts.tile_override if opts else 'library default'}")
      base_layers = [verify_inputs(jax.random.PRNGKey(100 + i), variant, b, 1) for i in range(LAYERS)]
      t_single = timeit(device_loop(single_step_loop(variant)), base_layers, calls=3) / LAYERS / REPEAT
      t_single_k1 = timeit(device_loop(verify_step("pallas", opts)), base_layers, calls=3) / LAYERS / REPEAT
      for k in ks:
        layers = [verify_inputs(jax.random.PRNGKey(10 * k + i), variant, b, k) for i in range(LAYERS)]
        f = multistep_fn("pallas", opts)
        out = f(layers)
        ref = multistep_fn("reference")(layers)
        err = max(max(relerr(o[0], r[0]), relerr(o[1], r[1])) for o, r in zip(out, ref))
        t = timeit(device_loop(verify_step("pallas", opts)), layers, calls=3) / LAYERS / REPEAT
        t_ref = (timeit(device_loop(verify_step("reference")), layers, calls=3) / LAYERS / REPEAT if with_ref
                 else float("nan"))
        byts = nbytes(layers[0]) + nbytes(out[0])
        rows.append(dict(variant=variant, batch=b, K=k, us_per_layer=t * 1e6, us_ref=t_ref * 1e6,
                         us_single_xla=t_single * 1e6, x_single_xla=t / t_single,
                         x_best_1step=t / min(t_single, t_single_k1), x_k1_kernel=t / t_single_k1, MB=byts / 1e6,
                         GBps=byts / t / 1e9, pct_copy=100 * byts / t / ceiling, err=err))
        r = rows[-1]
        print(f"verify {variant:6s} b={b} K={k:2d}: {r['us_per_layer']:8.1f} us/layer (ref {r['us_ref']:8.1f}, "
              f"1-step XLA {r['us_single_xla']:6.1f}) x{r['x_single_xla']:.2f} vs 1-step, x{r['x_k1_kernel']:.2f} "
              f"vs K=1 kernel, {r['MB']:.2f} MB {r['GBps']:.0f} GB/s = {r['pct_copy']:.0f}% copy, err {err:.1e}")


# ------------------------------------------------------------------------------------------------
def scan_inputs(variant, b, l):
  ks = jax.random.split(jax.random.PRNGKey(7), 9)
  rn = lambda kk, s, dt=BF: jax.random.normal(kk, s, F32).astype(dt)
  if variant == "mamba":
    d, n, g = 2048, 16, 128
    return (rn(ks[0], (b, l, d)), rn(ks[1], (b, l, d)), -jnp.exp(rn(ks[2], (d, n), F32)), rn(ks[3], (b, l, g, n)),
            rn(ks[4], (b, l, g, n)), rn(ks[5], (d,), F32), rn(ks[6], (d,), F32)), dict(z=rn(ks[7], (b, l, d)))
  h, p, n, g = 32, 64, 64, 32
  return (rn(ks[0], (b, l, h, p)), rn(ks[1], (b, l, h)), -jnp.exp(rn(ks[2], (h,), F32)), rn(ks[3], (b, l, g, n)),
          rn(ks[4], (b, l, g, n)), rn(ks[5], (h,), F32), rn(ks[6], (h,), F32)), {}


def scan_value_and_grad(fn, kw):
  """(loss, grads of the first six inputs) of a scan: a fixed projection of y plus sum(h). The loss is
  returned too, which keeps the forward kernel live."""
  def loss(*a):
    y, h = fn(*a, **kw)
    return jnp.sum(y.astype(F32) * jnp.cos(jnp.arange(y.shape[-1], dtype=F32))) + jnp.sum(h)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def bench_scan(b, l, rows):
  impls = {"mamba": {"reference": pallas.selective_scan_ref, "pallas": m1.selective_scan_pallas,
                     "chunked": m1.selective_scan_chunked},
           "mamba2": {"reference": pallas.ssd_scan_ref, "pallas": m2.ssd_scan_pallas,
                      "chunked": m2.ssd_scan_chunked}}
  for variant, fns in impls.items():
    args, kw = scan_inputs(variant, b, l)
    res = {}
    for name, fn in fns.items():
      fwd = jax.jit(lambda *a, fn=fn, kw=kw: fn(*a, **kw))
      grad = jax.jit(scan_value_and_grad(fn, kw))
      out, (_, g) = fwd(*args), grad(*args)
      res[name] = (out, g)
      ref_out, ref_g = res["reference"]
      err = max(relerr(out[0], ref_out[0]), relerr(out[1], ref_out[1]))
      gerr = max(relerr(a, r) for a, r in zip(g, ref_g))
      t_f, t_fb = timeit(fwd, *args, calls=3), timeit(grad, *args, calls=3)
      rows.append(dict(variant=variant, impl=name, batch=b, l=l, ms_fwd=t_f * 1e3, ms_fwd_bwd=t_fb * 1e3,
                       err=err, grad_err=gerr))
    base = rows[-3]
    for r in rows[-3:]:
      r["speedup_fwd"], r["speedup_fwd_bwd"] = base["ms_fwd"] / r["ms_fwd"], base["ms_fwd_bwd"] / r["ms_fwd_bwd"]
      print(f"scan {variant:6s} {r['impl']:9s} b={b} l={l}: fwd {r['ms_fwd']:8.2f} ms (x{r['speedup_fwd']:5.1f}) "
            f"fwd+bwd {r['ms_fwd_bwd']:8.2f} ms (x{r['speedup_fwd_bwd']:5.1f}) err {r['err']:.1e} "
            f"grad err {r['grad_err']:.1e}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="")
  ap.add_argument("--skip", default="", help="comma list of: verify,sweep,scan")
  ap.add_argument("--variants", default="mamba2,mamba", help="verify table variants")
  ap.add_argument("--batches", default="1,8", help="verify table batches (K = 1..16; '' to skip)")
  ap.add_argument("--sweep-batches", default="1,8", help="batches of the (tile, warps) sweep")
  ap.add_argument("--ref", action="store_true", help="also time the lax.scan reference of each verify call")
  ap.add_argument("--bw-batches", default="32", help="extra batches (K = 1, 4, 8; no reference timing) where the "
                  "verify kernel's bytes are large enough for a bandwidth reading ('' to skip)")
  ap.add_argument("--scan-batch", type=int, default=2, help="batch of the training scan table (l = 2048)")
  a = ap.parse_args()
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  ceiling = copy_ceiling()
  print(f"copy ceiling: {ceiling / 1e9:.0f} GB/s (read + write)")
  verify, scans = [], []
  sweep = []
  skip = a.skip.split(",")
  if "verify" not in skip:
    best = sweep_verify(sweep, [int(v) for v in a.sweep_batches.split(",")]) if "sweep" not in skip else None
    t0 = time.perf_counter()
    variants = tuple(v for v in a.variants.split(",") if v)
    batches = [int(v) for v in a.batches.split(",") if v]
    if batches:
      bench_verify(ceiling, (1, 2, 4, 8, 16) if not a.quick else (1, 4), batches, verify, best, with_ref=a.ref,
                   variants=variants)
    if a.bw_batches:
      bench_verify(ceiling, (1, 4, 8), [int(v) for v in a.bw_batches.split(",")], verify, best, with_ref=False,
                   variants=variants)
    print(f"[verify table: {time.perf_counter() - t0:.0f} s]")
  if "scan" not in skip:
    t0 = time.perf_counter()
    bench_scan(a.scan_batch, 2048 if not a.quick else 256, scans)
    print(f"[scan table: {time.perf_counter() - t0:.0f} s]")
  print("\n| variant | batch | K | us/layer kernel | us/layer ref | 1-step XLA us | x 1-step XLA | x K=1 kernel "
        "| x best 1-step | MB | GB/s | % copy | err |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in verify:
    print(f"| {r['variant']} | {r['batch']} | {r['K']} | {r['us_per_layer']:.1f} | {r['us_ref']:.1f} | "
          f"{r['us_single_xla']:.1f} | {r['x_single_xla']:.2f} | {r['x_k1_kernel']:.2f} | {r['x_best_1step']:.2f} | "
          f"{r['MB']:.2f} | {r['GBps']:.0f} | {r['pct_copy']:.0f} | {r['err']:.1e} |")
  print("\n| variant | impl | batch | l | fwd ms | x | fwd+bwd ms | x | err | grad err |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in scans:
    print(f"| {r['variant']} | {r['impl']} | {r['batch']} | {r['l']} | {r['ms_fwd']:.2f} | {r['speedup_fwd']:.1f} | "
          f"{r['ms_fwd_bwd']:.2f} | {r['speedup_fwd_bwd']:.1f} | {r['err']:.1e} | {r['grad_err']:.1e} |")
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(dict(copy_GBps=ceiling / 1e9, sweep=sweep, verify=verify, scan=scans), fh, indent=1)


if __name__ == "__main__":
  main()
