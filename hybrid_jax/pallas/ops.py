"""The scan dispatchers: one public function per scan, `impl` (a `ScanImpl` or its string) picking the
implementation and `options` (a `KernelOptions`, None: the defaults) tuning its kernels.

Each has the signature and semantics of its reference in `reference.py`; see `ScanImpl` for what AUTO picks.
"""
from __future__ import annotations

import jax

from hybrid_jax.pallas import multistep, reference, scan, ssd
from hybrid_jax.pallas.options import KernelOptions, ScanImpl, as_impl, resolve

Array = jax.Array


def _training_impl(impl: ScanImpl | str, gpu_choice: ScanImpl) -> ScanImpl:
  """What a training / prefill scan runs: AUTO as the backend has it (`ScanImpl`), anything else as given."""
  impl = as_impl(impl)
  if impl is not ScanImpl.AUTO:
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    return gpu_choice
  if backend == "tpu":
    return ScanImpl.CHUNKED
  return ScanImpl.REFERENCE


def selective_scan(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *,
                   impl: ScanImpl | str = ScanImpl.AUTO, options: KernelOptions | None = None):
  """Mamba-1 selective scan, `reference.selective_scan_ref`'s shapes and results. A single step (l = 1,
  every cached decode step) always takes the reference: it is a few fused elementwise ops, while a scan
  kernel would add launches and time padding (the Pallas kernel pads l to its 32-step chunk)."""
  options = resolve(options)
  impl = _training_impl(impl, options.gpu_mamba)
  if impl is ScanImpl.REFERENCE or x.shape[1] == 1:
    return reference.selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0)
  if impl is ScanImpl.PALLAS:
    return scan.selective_scan_pallas(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0, options=options)
  return scan.selective_scan_chunked(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0)


def ssd_scan(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, impl: ScanImpl | str = ScanImpl.AUTO,
             options: KernelOptions | None = None):
  """Mamba-2 SSD scan, `reference.ssd_scan_ref`'s shapes and results. A single step (l = 1) always takes the
  reference, as in `selective_scan` (the chunked SSD form would run ~10 small matmuls for one step)."""
  options = resolve(options)
  impl = _training_impl(impl, options.gpu_mamba2)
  if impl is ScanImpl.REFERENCE or x.shape[1] == 1:
    return reference.ssd_scan_ref(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)
  if impl is ScanImpl.PALLAS:
    return ssd.ssd_scan_pallas(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)
  return ssd.ssd_scan_chunked(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)


def multistep_scan(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None, *,
                   impl: ScanImpl | str = ScanImpl.AUTO, options: KernelOptions | None = None,
                   interpret: bool | None = None):
  """Speculative-verification update (shapes: `multistep`'s module docstring); returns (y, new checkpoint,
  (x, dt, B)). impl: AUTO (the kernel on GPU, the reference elsewhere), PALLAS (the kernel; interpret mode on
  CPU) or REFERENCE; CHUNKED, which has no form here, takes what AUTO takes (so a model's scan_impl can be
  passed as it is)."""
  impl = as_impl(impl)
  if impl is ScanImpl.CHUNKED:
    impl = ScanImpl.AUTO
  if impl is ScanImpl.REFERENCE or (impl is ScanImpl.AUTO and jax.default_backend() != "gpu"):
    return reference.multistep_scan_ref(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias,
                                        z)
  return multistep.multistep_scan_pallas(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias,
                                         z, interpret=interpret, options=options)
