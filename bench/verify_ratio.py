"""The acceptance ratio of the verify kernel, robustly: K-step verify time / one XLA single-step update.

  python bench/verify_ratio.py [--seeds 4] [--batches 1,8]
Each case (1-step XLA, kernel K = 1, 2, 4, 8) is compiled once (bench_kernels' device loop over 8 layers x 50
calls) and timed on several input seeds, the cases interleaved seed by seed so that clock drift hits all of
them alike; prints the median and range over seeds of us per layer and call, and the ratio of medians.
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
  ap.add_argument("--tiles-mamba2", default="", help="extra (rows x warps) to time, e.g. 64x4,64x8")
  ap.add_argument("--tiles-mamba", default="", help="extra (elements x warps) to time, e.g. 1024x4")
  a = ap.parse_args()
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  ks = [int(k) for k in a.ks.split(",")]
  print("| variant | batch | what | median us | min-max us | x 1-step (medians) |\n|---|---|---|---|---|---|")
  for variant in a.variants.split(","):
    extra = getattr(a, f"tiles_{variant}")
    tiles = [tuple(int(v) for v in t.split("x")) for t in extra.split(",")] if extra else []
    for b in [int(v) for v in a.batches.split(",")]:
      cases = [("1-step XLA", 1, bk.device_loop(bk.single_step_loop(variant)))]
      cases += [(f"kernel K={k}", k, bk.device_loop(bk.verify_step("pallas"))) for k in ks]
      tiled = lambda t: bk.device_loop(bk.with_setting("TILE_OVERRIDE", t, bk.verify_step("pallas")))
      cases += [(f"tile {t[0]}x{t[1]} K={k}", k, tiled(t)) for t in tiles for k in ks]
      times = {name: [] for name, _, _ in cases}
      for seed in range(a.seeds):
        for name, k, fn in cases:
          layers = [bk.verify_inputs(jax.random.PRNGKey(1000 * seed + 10 * k + i), variant, b, k)
                    for i in range(bk.LAYERS)]
          times[name].append(bk.timeit(fn, layers, calls=3) / (bk.LAYERS * bk.REPEAT) * 1e6)
      one = statistics.median(times["1-step XLA"])
      for name, _, _ in cases:
        t = times[name]
        print(f"| {variant} | {b} | {name} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
              f"{statistics.median(t) / one:.2f} |", flush=True)


if __name__ == "__main__":
  main()
