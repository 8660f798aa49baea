"""The scan dispatchers: one public function per scan, `impl` (a `ScanImpl` or its string) picking the
implementation and `options` (a `KernelOptions`, None: the defaults) tuning its kernels.

Each has the signature and semantics of its reference in `reference.py`; see `ScanImpl` for what AUTO picks.
The platform they pick for is `KernelOptions.platform` (None: the default backend): PALLAS runs the Triton
kernels there (interpret mode where that is not a GPU) and the Mosaic kernels (`tpu_scan`, `tpu_multistep`)
on TPU.
"""
from __future__ import annotations

import jax

from hybrid_jax.pallas import common, multistep, partition, reference, scan, ssd, tpu_multistep, tpu_scan
from hybrid_jax.pallas.options import KernelOptions, ScanImpl, as_impl, resolve

Array = jax.Array


def _training_impl(impl: ScanImpl | str, target: str, gpu_choice: ScanImpl, tpu_choice: ScanImpl) -> ScanImpl:
  """What a training / prefill scan runs: AUTO as the target platform has it (`ScanImpl`), anything else as
  given."""
  impl = as_impl(impl)
  if impl is not ScanImpl.AUTO:
    return impl
  return {"gpu": gpu_choice, "tpu": tpu_choice}.get(target, ScanImpl.REFERENCE)


# The TPU kernels' arguments and results as `partition.per_shard` splits them over a mesh, in the dispatchers'
# argument order (b batch, c channel or Mamba-2 head, g B/C group; l and k time, n state, p a head's rows)
M1_SCAN_LAYOUT = (("blc", "blc", "cn", "blgn", "blgn", "c", "c", "blc", "bl", "bcn"), ("blc", "bcn"))
M2_SCAN_LAYOUT = (("blcp", "blc", "c", "blgn", "blgn", "c", "c", "bl", "bcpn"), ("blcp", "bcpn"))
M1_VERIFY_LAYOUT = (("bcn", "bkc", "bkc", "bkgn", "b", "bkc", "bkc", "bkgn", "bkgn", "cn", "c", "c", "bkc"),
                    ("bkc", "bcn"))
M2_VERIFY_LAYOUT = (("bcpn", "bkcp", "bkc", "bkgn", "b", "bkcp", "bkc", "bkgn", "bkgn", "c", "c", "c",
                     "bkcp"), ("bkcp", "bcpn"))


def _per_shard(run, options: KernelOptions, args, layouts, out_layouts):
  """run(*args) per shard of options.mesh (`partition.per_shard`; layouts there), or as it is without one."""
  return partition.per_shard(run, options.mesh, options.batch_axes, options.channel_axes, args, layouts,
                             out_layouts)


def selective_scan(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *,
                   impl: ScanImpl | str = ScanImpl.AUTO, options: KernelOptions | None = None):
  """Mamba-1 selective scan, `reference.selective_scan_ref`'s shapes and results. A single step (l = 1,
  every cached decode step) always takes the reference: it is a few fused elementwise ops, while a scan
  kernel would add launches and time padding (the Pallas kernel pads l to its 32-step chunk)."""
  options = resolve(options)
  target = options.target()
  impl = _training_impl(impl, target, options.gpu_mamba, options.tpu_mamba)
  if impl is ScanImpl.REFERENCE or x.shape[1] == 1:
    return reference.selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0)
  if impl is ScanImpl.PALLAS and target == "tpu":
    interpret = tpu_scan.resolve_interpret(None, options.platform)
    run = lambda *a: tpu_scan.selective_scan_tpu(*a, interpret=interpret)
    return _per_shard(run, options, (x, dt, A, B, C, D, dt_bias, z, reset, h0), *M1_SCAN_LAYOUT)
  if impl is ScanImpl.PALLAS:
    return scan.selective_scan_pallas(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0, options=options)
  return scan.selective_scan_chunked(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0)


def ssd_scan(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, impl: ScanImpl | str = ScanImpl.AUTO,
             options: KernelOptions | None = None):
  """Mamba-2 SSD scan, `reference.ssd_scan_ref`'s shapes and results. A single step (l = 1) always takes the
  reference, as in `selective_scan` (the chunked SSD form would run ~10 small matmuls for one step)."""
  options = resolve(options)
  target = options.target()
  impl = _training_impl(impl, target, options.gpu_mamba2, options.tpu_mamba2)
  if impl is ScanImpl.REFERENCE or x.shape[1] == 1:
    return reference.ssd_scan_ref(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)
  if impl is ScanImpl.PALLAS and target == "tpu":
    interpret = tpu_scan.resolve_interpret(None, options.platform)
    run = lambda *a: tpu_scan.ssd_scan_tpu(*a, interpret=interpret)
    return _per_shard(run, options, (x, dt, A, B, C, D, dt_bias, reset, h0), *M2_SCAN_LAYOUT)
  if impl is ScanImpl.PALLAS:
    return ssd.ssd_scan_pallas(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0,
                               interpret=common.interpret_mode(options.platform), options=options)
  return ssd.ssd_scan_chunked(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)


def multistep_scan(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None, *,
                   impl: ScanImpl | str = ScanImpl.AUTO, options: KernelOptions | None = None,
                   interpret: bool | None = None):
  """Speculative-verification update (shapes: `multistep`'s module docstring); returns (y, new checkpoint,
  (x, dt, B)). impl: AUTO (the kernel on GPU and on TPU, the reference elsewhere), PALLAS (the Mosaic kernel
  on TPU, else the Triton kernel, in interpret mode off GPU) or REFERENCE; CHUNKED, which has no form here,
  takes what AUTO takes (so a model's scan_impl can be passed as it is). interpret None: as the platform
  has it."""
  impl = as_impl(impl)
  if impl is ScanImpl.CHUNKED:
    impl = ScanImpl.AUTO
  options = resolve(options)
  target = options.target()
  if impl is ScanImpl.REFERENCE or (impl is ScanImpl.AUTO and target not in ("gpu", "tpu")):
    return reference.multistep_scan_ref(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias,
                                        z)
  if target == "tpu":
    interpret = tpu_scan.resolve_interpret(interpret, options.platform)
    run = lambda *a: tpu_multistep.multistep_scan_tpu(*a, interpret=interpret)[:2]
    args = (state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z)
    y, ckpt = _per_shard(run, options, args, *(M1_VERIFY_LAYOUT if state.ndim == 3 else M2_VERIFY_LAYOUT))
    return y, ckpt, (x, dt, B)
  return multistep.multistep_scan_pallas(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias,
                                         z, interpret=interpret, options=options)
