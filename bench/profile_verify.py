"""GPU time of the verify kernel itself vs the wall time per call (bench_kernels' device loop), from a trace.

  python bench/profile_verify.py [--out DIR]
For each (variant, batch, K) it times the device loop as bench_kernels does, then traces one run of it and
sums the GPU time of every kernel on the GPU timeline: `busy` = kernel time per layer and call, `wall` =
the loop's time per layer and call; wall - busy is launch and dependency latency between kernels, which no
change inside the kernel can remove. The single-step XLA update (K = 1 reference) is traced the same way.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels as bk
import profile_summary

from hybrid_jax.pallas import KernelOptions


def gpu_time_us(trace_dir: str) -> tuple[float, dict]:
  """Total GPU kernel time (us) on the busiest stream line of the trace, and its four largest kernel kinds."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  per_line, _ = profile_summary.device_lines(profile_summary.load_events(path))
  streams = [c for line, c in per_line.items() if "XLA" not in line]  # the XLA lines repeat the kernels
  if not streams:  # no GPU timeline (a CPU run): nothing to split
    return 0.0, {}
  busiest = max(streams, key=lambda c: sum(c.values()))
  return float(sum(busiest.values())), dict(busiest.most_common(4))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="/tmp/prof_verify")
  ap.add_argument("--ks", default="1,2,4,8")
  ap.add_argument("--ab", action="store_true", help="also the kernel with libdevice exp/log1p for the "
                  "per-step scalars (KernelOptions(fast_math=False)), next to the default")
  a = ap.parse_args()
  ks = [int(k) for k in a.ks.split(",")]
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  rows = []
  for variant in ("mamba2", "mamba"):
    for b in (1, 8):
      cases = [("1-step XLA", 1, bk.single_step_loop(variant))]
      for k in ks:
        cases.append((f"kernel K={k}", k, bk.verify_step("pallas")))
        if a.ab:
          libdevice = bk.verify_step("pallas", KernelOptions(fast_math=False))
          cases.append((f"libdevice K={k}", k, libdevice))
      for name, k, step in cases:
        layers = [bk.verify_inputs(jax.random.PRNGKey(10 * k + i), variant, b, k) for i in range(bk.LAYERS)]
        fn = bk.device_loop(step)
        calls = bk.LAYERS * bk.REPEAT
        wall = bk.timeit(fn, layers, calls=3) / calls * 1e6
        d = os.path.join(a.out, f"{variant}_b{b}_{name.replace(' ', '_').replace('=', '').replace('-', '_')}")
        jax.block_until_ready(fn(layers))
        with jax.profiler.trace(d, create_perfetto_trace=True):
          jax.block_until_ready(fn(layers))
        busy, split = gpu_time_us(d)
        busy /= calls
        rows.append((variant, b, name, wall, busy))
        top = ", ".join(f"{kname} {us / calls:.2f}" for kname, us in split.items())
        print(f"{variant:6s} b={b} {name:12s}: wall {wall:6.2f} us/call, GPU busy {busy:6.2f} us/call ({top})")
  print("\n| variant | batch | what | wall us / layer-call | GPU kernel us / layer-call | gap us | wall / 1-step |")
  print("|---|---|---|---|---|---|---|")
  one = {(v, b): wall for v, b, name, wall, _ in rows if name == "1-step XLA"}
  for v, b, name, wall, busy in rows:
    print(f"| {v} | {b} | {name} | {wall:.2f} | {busy:.2f} | {wall - busy:.2f} | {wall / one[v, b]:.2f} |")


if __name__ == "__main__":
  main()
