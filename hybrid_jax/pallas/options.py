"""What picks a scan implementation (`ScanImpl`) and how its kernels are tuned (`KernelOptions`).

Both are plain values passed to the dispatchers in `hybrid_jax.pallas.ops` (and down to the kernels as static
arguments), so two options trace two programs and nothing in the package changes state at run time.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax


class ScanImpl(str, enum.Enum):
  """Which implementation a scan dispatcher runs (a str enum: `ScanImpl("pallas")` converts a config string).

  AUTO: on GPU and on TPU the per-variant pick of `KernelOptions` (gpu_mamba / gpu_mamba2, tpu_mamba /
  tpu_mamba2), elsewhere REFERENCE. REFERENCE: the sequential `lax.scan`. PALLAS: the Pallas forward kernels,
  Triton on GPU (interpret mode on CPU), Mosaic on TPU. CHUNKED: chunk-parallel plain JAX (any backend).
  The platform is `KernelOptions.platform`, or the default backend."""
  AUTO = "auto"
  REFERENCE = "reference"
  PALLAS = "pallas"
  CHUNKED = "chunked"


def as_impl(impl: ScanImpl | str, what: str = "scan impl") -> ScanImpl:
  """`impl` as a ScanImpl; a one-line ValueError for anything else."""
  try:
    return ScanImpl(impl)
  except ValueError:
    raise ValueError(f"{what} must be one of {'|'.join(v.value for v in ScanImpl)}, got {impl!r}") from None


# Multistep verification tiling: (tile, warps) per program, by batch size (tile = Mamba-1 state elements, gb
# groups x cb channels x N, or Mamba-2 rows of P, x N); the first entry whose max_batch >= b applies. Picked
# on an H200 by the sweeps in bench/ (docs/KERNELS.md): at small batch the chain of per-step work (softplus,
# exp, the reduction over N) is computed by every thread, so fewer, fuller threads lose to latency and more
# threads pay that overhead more often; the layouts Triton picks also decide whether a step's B/C need a
# shuffle. Mamba-2's state is held in chunks of N columns: Triton lays a chunk's contiguous columns over the
# lanes, so a 32-column chunk reduces C.h over 8 lanes where the whole row of 64 takes 16 (more shuffles)
# and a 16-column chunk needs 16 B/C values per thread and step (registers). (Cutting a program's tile into
# parts, the next part's loads in flight while a part computes, was slower at every tile tried.) Mamba-1
# above batch 16 is a bandwidth regime: (2048, 4) reads 65-76% of copy at batch 128-256 where (512, 4) read
# 58-67%; at batch 12 (1024, 8) beats (512, 4) (K = 8 7.7 vs 9.4 us), at 16 it is level or better.
M1_TILES = ((2, 256, 4), (16, 1024, 8), (1 << 30, 2048, 4))  # (max_batch, tile elements, warps)
M2_TILES = ((2, 8, 4, 64), (1 << 30, 32, 4, 32))  # (max_batch, rows of P, warps, columns of N per chunk)


PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Tuning of the kernels; the defaults are the library's measured picks (docs/KERNELS.md). Frozen and
  hashable: a static argument of the jitted / custom-VJP functions. Fields by kernel:

  Dispatch (ScanImpl.AUTO on GPU): gpu_mamba / gpu_mamba2, chosen by bench/bench_kernels.py on an H100 (seq
  2048, forward + backward; Mamba-2's kernels run the forward of a prefill, and under differentiation the
  chunked form runs forward and backward, so its training cost is the chunked form's). On TPU: tpu_mamba /
  tpu_mamba2, picked without a TPU timing (none has been taken yet): Mamba-1 the Mosaic kernel (`tpu_scan`:
  the state stays on chip, where the chunked form is element-wise scans through memory), Mamba-2 the chunked
  SSD form, whose matmuls are MXU work (the Mosaic kernel runs Mamba-2 as element-wise vector work).

  platform: the platform the programs are built for, None: `jax.default_backend()`; 'gpu' or 'tpu' (or
  'cuda' / 'rocm', read as 'gpu') to lower for a platform other than the host's, e.g. `jax.export` for TPU
  from a CPU host: dispatch picks as on that platform and its kernels lower for it (not interpret mode).
  mesh: the `jax.sharding.Mesh` (or AbstractMesh) of a program sharded over several devices, None for
  none. XLA cannot partition a Mosaic kernel, so on TPU the kernels then run per shard (`partition`): the
  batch over batch_axes, channels over channel_axes, where those mesh axes divide. The Triton kernels are left
  to XLA's partitioner as without a mesh.

  Mamba-1 training scan (`scan`): fwd_tile / fwd_warps and bwd_tile / bwd_warps, state elements per program
  and warps of the forward and the backward kernel (programs own gb whole groups, or cb channels of one group
  when a group is larger; the backward at 512: H200, batch 2, l 2048, 128 groups of 16 channels, fwd+bwd 5.18
  ms against 5.43 / 7.00 / 7.73 at 256 / 1024 / 2048). bwd_impl, the backward of ScanImpl.PALLAS: 'kernel'
  (reverse time in one Pallas kernel) or 'chunked' (chunk-parallel plain JAX); fwd+bwd 5.18 against 10.83
  ms, same gradient error. bwd_chunk: steps between the forward's state checkpoints.

  Multistep verification (`multistep`): m1_tiles / m2_tiles, the tiling tables by batch size (above);
  tile_override, (tile, warps[, Mamba-2 columns per chunk]) for both variants at every batch (the sweeps).
  acc_y: power-of-2 K gathers y in registers and stores it once (False: a store per step). fast_math: the
  per-step scalars with MUFU ex2 and a short series (`common.softplus_fast`, exp2 of delta * A log2 e) instead
  of libdevice exp / log1p: every thread computes them, so they were 17% of the Mamba-2 and 42% of the Mamba-1
  kernel's instructions at batch 8, K = 8. bits_bf16: bfloat16 step inputs -> float32 as integer ops on the
  bits (Triton's conversion takes two instructions, PRMT and SHF, for every other value of a packed pair; this
  one for each). fma: every a * b + c as an explicit FMA in the compiled kernel (`common.fma`: XLA's Triton
  pipeline does not contract them). ptx_rcp: softplus_fast's reciprocal of 2 + e in [2, 3] as one MUFU op
  (`common.rcp`) instead of the guarded division: 6% fewer instructions (Mamba-2 batch 8, K = 8), same error.
  lane_scalars: Mamba-2's per-step scalars one step per lane, broadcast by warp shuffles (compiled CUDA only;
  interpret mode runs the per-thread form): batch 8, K = 8 1664 -> 1304 instructions per warp, 8.07 -> 7.69
  us on an H200, same error.

  Mamba-2 training scan (`ssd`, ScanImpl.PALLAS): ssd_chunk / ssd_warps, steps per chunk (a power of two,
  at least 16) and warps of the two chunk kernels; H100, batch 4, l 2048, 32 heads, P = N = 64, forward 0.42
  ms at (128, 8) against 0.52 at (64, 4) and 0.96 for the chunked form in XLA. ssd_tf32: True, the kernels'
  matmuls take TF32 inputs on GPU (relative error 1e-3 against the float32 reference at that shape, below the
  bf16 rounding of y; mamba_ssm's kernels round those operands to bf16; the timing above); False, float32
  products; None, as JAX's default matmul precision has it, like XLA's own matmuls (TF32 on GPU unless
  `jax_default_matmul_precision` asks for more).
  """
  gpu_mamba: ScanImpl = ScanImpl.PALLAS
  gpu_mamba2: ScanImpl = ScanImpl.PALLAS
  tpu_mamba: ScanImpl = ScanImpl.PALLAS
  tpu_mamba2: ScanImpl = ScanImpl.CHUNKED
  platform: str | None = None
  mesh: Any = None
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  channel_axes: tuple[str, ...] = ("tensor",)
  fwd_tile: int = 2048
  fwd_warps: int = 4
  bwd_tile: int = 512
  bwd_warps: int = 4
  bwd_impl: str = "kernel"
  bwd_chunk: int = 32
  m1_tiles: tuple[tuple[int, ...], ...] = M1_TILES
  m2_tiles: tuple[tuple[int, ...], ...] = M2_TILES
  tile_override: tuple[int, ...] | None = None
  acc_y: bool = True
  fast_math: bool = True
  bits_bf16: bool = True
  fma: bool = True
  ptx_rcp: bool = True
  lane_scalars: bool = True
  ssd_chunk: int = 128
  ssd_warps: int = 8
  ssd_tf32: bool | None = None

  def __post_init__(self):
    for name in ("gpu_mamba", "gpu_mamba2", "tpu_mamba", "tpu_mamba2"):
      impl = as_impl(getattr(self, name), f"KernelOptions.{name}")
      if impl is ScanImpl.AUTO:
        raise ValueError(f"KernelOptions.{name} must be reference|pallas|chunked, got 'auto'")
      object.__setattr__(self, name, impl)
    if self.platform is not None:
      platform = {"cuda": "gpu", "rocm": "gpu"}.get(self.platform, self.platform)
      if platform not in PLATFORMS:
        raise ValueError(f"KernelOptions.platform must be {'|'.join(PLATFORMS)}|cuda|rocm or None, "
                         f"got {self.platform!r}")
      object.__setattr__(self, "platform", platform)
    if self.bwd_impl not in ("kernel", "chunked"):
      raise ValueError(f"KernelOptions.bwd_impl must be 'kernel' or 'chunked', got {self.bwd_impl!r}")
    for name in ("fwd_tile", "fwd_warps", "bwd_tile", "bwd_warps", "bwd_chunk", "ssd_warps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"KernelOptions.{name} must be positive, got {getattr(self, name)!r}")
    chunk = int(self.ssd_chunk)
    if chunk < 16 or chunk & (chunk - 1):
      raise ValueError(f"KernelOptions.ssd_chunk must be a power of two of at least 16, got {self.ssd_chunk!r}")
    # lists (from a command line or a config file) become tuples: the options stay hashable
    for name in ("batch_axes", "channel_axes"):
      object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
    for name in ("m1_tiles", "m2_tiles"):
      object.__setattr__(self, name, tuple(tuple(int(v) for v in entry) for entry in getattr(self, name)))
    if self.tile_override is not None:
      object.__setattr__(self, "tile_override", tuple(int(v) for v in self.tile_override))

  def target(self) -> str:
    """The platform the programs are built for: `platform`, or the default backend ('cpu', 'gpu', 'tpu')."""
    return self.platform or jax.default_backend()


DEFAULT = KernelOptions()


def resolve(options: KernelOptions | None) -> KernelOptions:
  """`options`, or the defaults for None."""
  return DEFAULT if options is None else options
