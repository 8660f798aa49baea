"""Pallas kernels of the SSM scans, registered with `hybrid_jax.model.ssm` at import.

impl 'pallas'  : Triton-lowered Pallas forward kernels (interpret mode on CPU); backward: Mamba-1 a Pallas kernel
                 from the forward's chunk checkpoints, Mamba-2 the VJP of the chunked SSD form.
impl 'chunked' : plain-JAX chunked scans (Mamba-1: two-level scan; Mamba-2: SSD matmul form), any backend.
impl 'auto'    : on GPU the faster of the two per variant as measured on an H100 (docs/KERNELS.md);
                 on TPU 'chunked' (the kernels here use the Triton lowering); elsewhere the reference.
`multistep.multistep_scan` is the speculative-verification kernel (not dispatched through ssm).
"""
from __future__ import annotations

import jax

from hybrid_jax.model import ssm
from hybrid_jax.pallas.multistep import multistep_scan, multistep_scan_ref  # noqa: F401
from hybrid_jax.pallas.scan import selective_scan_chunked, selective_scan_pallas
from hybrid_jax.pallas.ssd import ssd_scan_chunked, ssd_scan_pallas

# Chosen by bench/bench_kernels.py on an H100 (seq 2048, forward + backward): see docs/KERNELS.md.
GPU_CHOICE = {"mamba": "pallas", "mamba2": "chunked"}
_FNS = {"mamba": {"pallas": selective_scan_pallas, "chunked": selective_scan_chunked},
        "mamba2": {"pallas": ssd_scan_pallas, "chunked": ssd_scan_chunked}}


def _auto(variant: str):
  def fn(*args, **kw):
    backend = jax.default_backend()
    if backend == "gpu":
      return _FNS[variant][GPU_CHOICE[variant]](*args, **kw)
    if backend == "tpu":
      return _FNS[variant]["chunked"](*args, **kw)
    ref = ssm.selective_scan_ref if variant == "mamba" else ssm.ssd_scan_ref
    return ref(*args, **kw)
  return fn


for _variant, _impls in _FNS.items():
  for _impl, _fn in _impls.items():
    ssm.register(_impl, _variant, _fn)
  ssm.register("auto", _variant, _auto(_variant))
