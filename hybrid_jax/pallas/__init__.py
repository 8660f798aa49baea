"""The kernels: the SSM scans (lax.scan references, Pallas kernels and chunked plain-JAX forms, behind one
dispatcher each) and attention over a KV cache.

  selective_scan (Mamba-1), ssd_scan (Mamba-2): training / prefill scans; multistep_scan: the
  speculative-verification update. `impl` (ScanImpl) picks the implementation, `options` (KernelOptions)
  tunes the kernels; both are plain values.

impl 'pallas'  : Pallas forward kernels, Triton-lowered (interpret mode on CPU), on TPU the Mosaic ones
                 (tpu_scan, tpu_multistep); backward: Mamba-1 a Pallas kernel (TPU: chunk-parallel JAX) from
                 the forward's chunk checkpoints, Mamba-2 the VJP of the chunked SSD form (on GPU the
                 chunked form also runs the forward when differentiated).
impl 'chunked' : plain-JAX chunked scans (Mamba-1: two-level scan; Mamba-2: SSD matmul form), any backend.
impl 'auto'    : on GPU the kernels, as measured on an H100 (docs/KERNELS.md; KernelOptions.gpu_mamba /
                 gpu_mamba2); on TPU KernelOptions.tpu_mamba / tpu_mamba2 (the
                 Mosaic kernel / the chunked SSD form, not timed on a TPU yet); elsewhere the reference.
KernelOptions.platform: lower for a platform other than the host's (e.g. exporting for TPU from a CPU host).
decode_attention: attention of a few new queries over a KV cache in one kernel (ModelConfig.decode_attention).
This package imports nothing else of hybrid_jax.
"""
from hybrid_jax.pallas.multistep import multistep_scan_pallas
from hybrid_jax.pallas.ops import multistep_scan, selective_scan, ssd_scan
from hybrid_jax.pallas.options import KernelOptions, ScanImpl
from hybrid_jax.pallas.reference import multistep_scan_ref, selective_scan_ref, ssd_scan_ref
from hybrid_jax.pallas.scan import selective_scan_chunked, selective_scan_pallas
from hybrid_jax.pallas.ssd import ssd_scan_chunked, ssd_scan_pallas

__all__ = ["KernelOptions", "ScanImpl", "multistep_scan", "multistep_scan_pallas", "multistep_scan_ref",
           "selective_scan", "selective_scan_chunked", "selective_scan_pallas", "selective_scan_ref",
           "ssd_scan", "ssd_scan_chunked", "ssd_scan_pallas", "ssd_scan_ref"]
