"""Run the verify kernel alone a few times, for Nsight Compute (stall reasons, memory, occupancy):

  ncu --clock-control none -k regex:lambda --launch-skip 3 --launch-count 1 --section WarpStateStats ... \
      python3 bench/ncu_verify.py mamba2 8 8
One process per (variant, batch, K): 8 calls of one jitted kernel call on fixed inputs (the first ones
compile and warm up), each waited for, so the profiled launch is the kernel alone.
"""
from __future__ import annotations

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels as bk

from hybrid_jax import pallas


def main() -> None:
  variant, b, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  inputs = bk.verify_inputs(jax.random.PRNGKey(0), variant, b, k)
  f = jax.jit(lambda a: pallas.multistep_scan(**a, impl="pallas")[:2])
  for _ in range(8):
    jax.block_until_ready(f(inputs))
  print("ran", variant, b, k)


if __name__ == "__main__":
  main()
