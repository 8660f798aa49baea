"""The acceptance ratio of the verify kernel, robustly: K-step verify time / one XLA single-step update.

  python bench/verify_ratio.py [--seeds 4] [--batches 1,8]
Each case (1-step XLA, kernel K = 1, 2, 4, 8) is compiled once (bench_kernels' device loop over 8 layers x 50
calls) and timed on several input seeds, the cases interleaved seed by seed so that clock drift hits all of
them alike; prints the median and range over seeds of us per layer and call, the ratio of medians, and the
kernel's relative error against the lax.scan reference (seed 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels as bk


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, default=4)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--ks", default="1,2,4,8")
  ap.add_argument("--variants", default="mamba2,mamba")
  ap.add_argument("--tiles-mamba2", default="",
                  help="extra (rows x warps [x columns of N per chunk]) to time, e.g. 64x4,32x4x32")
  ap.add_argument("--tiles-mamba", default="", help="extra (elements x warps) to time, e.g. 1024x4")
  ap.add_argument("--set", action="append", default=[], metavar="NAME=0|1[,NAME=0|1]",
                  help="also time the library and extra tiles with the verify kernel's switches set (KernelOptions: "
                  "ACC_Y, FAST_MATH, BITS_BF16, FMA, PTX_RCP, LANE_SCALARS)")
  ap.add_argument("--bandwidth", action="store_true",
                  help="also print each case's bytes (step inputs, state, y, checkpoint) over its time, in %% of the "
                  "copy ceiling measured first")
  a = ap.parse_args()
  try:
    switch_sets = [(kv, bk.parse_switches(kv)) for kv in a.set]
  except ValueError as e:
    ap.error(str(e))
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  ceiling = bk.copy_ceiling() if a.bandwidth else None
  if ceiling:
    print(f"copy ceiling: {ceiling / 1e9:.0f} GB/s (read + write)")
  ks = [int(k) for k in a.ks.split(",")]
  print("| variant | batch | what | median us | min-max us | x 1-step (medians) | rel. err |\n"
        "|---|---|---|---|---|---|---|")
  step = bk.verify_step("pallas")
  tiled = lambda t, base=None: bk.verify_step("pallas", bk.with_options({"tile_override": t}, base))
  for variant in a.variants.split(","):
    extra = getattr(a, f"tiles_{variant}")
    tiles = [tuple(int(v) for v in t.split("x")) for t in extra.split(",")] if extra else []
    for b in [int(v) for v in a.batches.split(",")]:
      cases = [("1-step XLA", 1, bk.single_step_loop(variant))]
      cases += [(f"kernel K={k}", k, step) for k in ks]
      cases += [(f"tile {'x'.join(map(str, t))} K={k}", k, tiled(t)) for t in tiles for k in ks]
      for kv, opts in switch_sets:  # the switches (NAME=0|1[,...]) at the library's tiles and at each extra tile
        cases += [(f"{kv} K={k}", k, bk.verify_step("pallas", opts)) for k in ks]
        cases += [(f"tile {'x'.join(map(str, t))} {kv} K={k}", k, tiled(t, opts)) for t in tiles for k in ks]
      loops = {name: bk.device_loop(fn) for name, _, fn in cases}
      times = {name: [] for name, _, _ in cases}
      errs, refs, nbytes = {}, {}, {}  # refs: the reference's outputs per K (seed 0), shared by that K's cases
      for seed in range(a.seeds):
        for name, k, fn in cases:
          layers = [bk.verify_inputs(jax.random.PRNGKey(1000 * seed + 10 * k + i), variant, b, k)
                    for i in range(bk.LAYERS)]
          if seed == 0 and name != "1-step XLA":  # the kernel's y and checkpoint against the lax.scan reference
            if k not in refs:
              refs[k] = jax.jit(bk.verify_step("reference"))(layers)
            out = jax.jit(fn)(layers)
            errs[name] = max(max(bk.relerr(o[0], r[0]), bk.relerr(o[1], r[1])) for o, r in zip(out, refs[k]))
            nbytes[name] = bk.nbytes(layers[0]) + bk.nbytes(out[0])
          times[name].append(bk.timeit(loops[name], layers, calls=3) / (bk.LAYERS * bk.REPEAT) * 1e6)
      one = statistics.median(times["1-step XLA"])
      for name, _, _ in cases:
        t = times[name]
        med = statistics.median(t)
        err = f"{errs[name]:.1e}" if name in errs else "-"
        bw = ""
        if ceiling and name in nbytes:
          gbps = nbytes[name] / med / 1e3  # bytes per us -> GB/s
          bw = f" {gbps:.0f} GB/s = {100 * gbps * 1e9 / ceiling:.0f}% copy |"
        print(f"| {variant} | {b} | {name} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {med / one:.2f} | {err} |{bw}",
              flush=True)


if __name__ == "__main__":
  main()
