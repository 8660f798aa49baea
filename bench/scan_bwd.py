"""Mamba-1 training scan on the GPU: the backward kernel (KernelOptions.bwd_impl 'kernel') against the
chunk-parallel JAX backward ('chunked'), over program tiles; forward-only rows for the forward kernel's tiles.

  python3 bench/scan_bwd.py [--batch 2] [--seq-len 2048] [--tiles 256,512,1024,2048]

Every case is checked against the lax.scan reference (outputs and the gradients of all inputs) and printed
with its time and speedup over the reference (bench_kernels.scan_inputs: d 2048, N 16, 128 groups, bf16
inputs).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_kernels as bk

from hybrid_jax import pallas
from hybrid_jax.pallas import KernelOptions, scan


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--tiles", default="256,512,1024,2048")
  a = ap.parse_args()
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
  args, kw = bk.scan_inputs("mamba", a.batch, a.seq_len)
  tiles = [int(t) for t in a.tiles.split(",")]

  def fwd_of(fn):
    return lambda *x: fn(*x, **kw)

  ref_fwd = jax.jit(fwd_of(pallas.selective_scan_ref))
  ref_grad = jax.jit(bk.scan_value_and_grad(pallas.selective_scan_ref, kw))
  ref_out, (_, ref_g) = ref_fwd(*args), ref_grad(*args)
  t_ref_f, t_ref_fb = bk.timeit(ref_fwd, *args, calls=3), bk.timeit(ref_grad, *args, calls=3)
  print(f"batch {a.batch}, l {a.seq_len}; reference fwd {t_ref_f * 1e3:.2f} ms, "
        f"fwd+bwd {t_ref_fb * 1e3:.2f} ms\n")
  print("| case | fwd ms | x ref | fwd+bwd ms | x ref | err | grad err |\n|---|---|---|---|---|---|---|")
  cases = [("fwd tile 2048, bwd chunked", KernelOptions(fwd_tile=2048, bwd_impl="chunked"), True)]
  cases += [(f"fwd tile 2048, bwd kernel tile {t}", KernelOptions(fwd_tile=2048, bwd_impl="kernel", bwd_tile=t),
             True) for t in tiles]
  cases += [(f"fwd tile {t}", KernelOptions(fwd_tile=t), False) for t in tiles if t != 2048]
  for name, options, with_grad in cases:
    pallas_scan = functools.partial(scan.selective_scan_pallas, options=options)  # forward and backward alike
    try:
      fwd = jax.jit(fwd_of(pallas_scan))
      out = fwd(*args)
      err = max(bk.relerr(out[0], ref_out[0]), bk.relerr(out[1], ref_out[1]))
      t_f = bk.timeit(fwd, *args, calls=3)
      fb, gerr = "- | -", "-"
      if with_grad:
        grad = jax.jit(bk.scan_value_and_grad(pallas_scan, kw))
        _, g = grad(*args)
        gerr = f"{max(bk.relerr(x, r) for x, r in zip(g, ref_g)):.1e}"
        t_fb = bk.timeit(grad, *args, calls=3)
        fb = f"{t_fb * 1e3:.2f} | {t_ref_fb / t_fb:.1f}"
      print(f"| {name} | {t_f * 1e3:.2f} | {t_ref_f / t_f:.1f} | {fb} | {err:.1e} | {gerr} |", flush=True)
    except Exception as e:  # noqa: BLE001 -- a failing case is reported, the others still run
      print(f"| {name} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)


if __name__ == "__main__":
  main()
