"""Instruction counts of the verify kernel for sm_90, on a CPU host (no GPU): the numbers docs/KERNELS.md quotes.

  python bench/inspect_verify.py VARIANT BATCH K TILE WARPS --triton-python /path/to/venv/bin/python [--out DIR]
      [--set FAST_MATH=0 ...]
Step 1 (this interpreter, the project's jax): lower the kernel for CUDA and keep the Triton IR that Pallas
emits. Step 2 (`--triton-python`: an interpreter with the PyPI `triton` wheel of the GPU image's version,
3.6; the project's venv does not carry it): compile that IR for GPUTarget("cuda", 90, 32) with num_stages = 1
and no floating-point contraction, as XLA compiles Pallas kernels on the GPU (`--fp-fusion 1`: Triton's own
default), and print registers and the SASS counts (instructions, shuffles, barriers, MUFU, loads).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys


def dump_ttir(variant: str, b: int, k: int, tile: tuple, warps: int, settings: dict, path: str) -> None:
  sys.path.insert(0, os.path.dirname(__file__))
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import bench_kernels as bk
  import jax
  from jax._src.pallas.triton import lowering

  from hybrid_jax import pallas

  lower = lowering.lower_jaxpr_to_triton_module

  def keep_ir(*args, **kw):  # the module Pallas hands to the Triton custom call, as text
    result = lower(*args, **kw)
    with open(path, "w") as f:
      f.write(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = keep_ir
  options = bk.with_options(dict(settings, tile_override=(tile[0], warps, *tile[1:])))
  inputs = bk.verify_inputs(jax.random.PRNGKey(0), variant, b, k)
  f = jax.jit(lambda a: pallas.multistep_scan(**a, impl="pallas", interpret=False, options=options)[:2])
  f.trace(inputs).lower(lowering_platforms=("cuda",))


def compile_and_count(ttir: str, warps: int, out: str, fp_fusion: bool) -> None:
  import triton
  from triton.backends.compiler import GPUTarget

  options = {"num_warps": warps, "num_stages": 1, "enable_fp_fusion": fp_fusion}
  kernel = triton.compile(ttir, target=GPUTarget("cuda", 90, 32), options=options)
  cubin = out + ".cubin"
  with open(cubin, "wb") as f:
    f.write(kernel.asm["cubin"])
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
  usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
  sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
  with open(out + ".sass", "w") as f:
    f.write(sass)
  # every instruction line starts with its address comment; a predicate (@P0, @!UPT) may precede the opcode
  ops = collections.Counter(m.split(".")[0] for m in
                            re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
  print(" ".join(line.strip() for line in usage.splitlines() if "REG" in line))
  print("instructions", sum(ops.values()), " ".join(f"{op} {ops[op]}" for op in
                                                     ("SHFL", "BAR", "MUFU", "LDG", "STG", "STS", "LDS")))
  print("most common:", ", ".join(f"{op} {n}" for op, n in ops.most_common(8)))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("variant", choices=("mamba", "mamba2"))
  ap.add_argument("batch", type=int)
  ap.add_argument("k", type=int)
  ap.add_argument("tile", type=int, help="Mamba-1 state elements / Mamba-2 rows of P per program")
  ap.add_argument("warps", type=int)
  ap.add_argument("--cols", type=int, default=0, help="Mamba-2: columns of N per chunk (default: all of N)")
  ap.add_argument("--set", action="append", default=[], metavar="NAME=0|1",
                  help="a verify-kernel switch (KernelOptions: ACC_Y, FAST_MATH, BITS_BF16, FMA, PTX_RCP, "
                  "LANE_SCALARS) for this compile")
  ap.add_argument("--triton-python", help="interpreter with the triton wheel (step 2)")
  ap.add_argument("--fp-fusion", type=int, default=0, choices=(0, 1),
                  help="let Triton contract a * b + c into FMAs (Triton's default; 0 = as XLA's pipeline compiles "
                  "Pallas kernels on the GPU: no contraction, seen in Nsight Compute on the H200)")
  ap.add_argument("--out", default="/tmp/inspect_verify")
  ap.add_argument("--compile", metavar="TTIR", help=argparse.SUPPRESS)  # step 2, run by --triton-python
  a = ap.parse_args()
  try:
    settings = {n: {"0": False, "1": True}[v] for n, v in (kv.split("=") for kv in a.set)}
  except (ValueError, KeyError):
    ap.error(f"--set takes NAME=0|1, got {a.set}")
  tag = "".join(f"_{n}{int(v)}" for n, v in sorted(settings.items()))
  tile = (a.tile, a.cols) if a.cols else (a.tile,)
  tag += f"_c{a.cols}" if a.cols else ""
  out = os.path.join(a.out, f"{a.variant}_b{a.batch}_k{a.k}_{a.tile}x{a.warps}{tag}")
  if a.compile:
    compile_and_count(a.compile, a.warps, out, bool(a.fp_fusion))
    return
  if not a.triton_python:
    ap.error("--triton-python is needed for the compile step")
  os.makedirs(a.out, exist_ok=True)
  try:
    dump_ttir(a.variant, a.batch, a.k, tile, a.warps, settings, out + ".ttir")
  except ValueError as e:  # an option that KernelOptions does not have, or rejects
    ap.error(str(e))
  argv = [a.variant, str(a.batch), str(a.k), str(a.tile), str(a.warps), "--out", a.out, f"--cols={a.cols}",
          f"--fp-fusion={a.fp_fusion}",
          *(f"--set={kv}" for kv in a.set)]
  subprocess.run([a.triton_python, __file__, *argv, "--compile", out + ".ttir"], check=True)


if __name__ == "__main__":
  main()
