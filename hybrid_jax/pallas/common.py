"""Shared helpers of the Pallas kernels: interpret-mode switch, Triton compiler params, padding."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array


def interpret_mode(platform: str | None = None) -> bool:
  """Pallas interpret mode of the Triton kernels: off when lowering for an explicit platform 'gpu' (on when
  for another: `KernelOptions.platform`); otherwise on CPU (tests), or forced by
  HYBRID_JAX_PALLAS_INTERPRET=1."""
  if platform is not None:
    return platform != "gpu"
  env = os.environ.get("HYBRID_JAX_PALLAS_INTERPRET")
  if env is not None:
    return env not in ("0", "", "false", "False")
  return jax.default_backend() == "cpu"


def compiler_params(num_warps: int = 4, num_stages: int = 1):
  """Triton compiler params across jax versions (CompilerParams in >= 0.6, TritonCompilerParams before)."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def call(kernel, *, out_shape, grid, in_specs, out_specs, num_warps: int = 4, interpret: bool | None = None,
         input_output_aliases: dict[int, int] | None = None):
  """pallas_call with the Triton params on GPU and interpret mode on CPU. input_output_aliases {input index:
  output index}: the output is written over that input's buffer (XLA copies the input first only when the
  caller still needs it)."""
  interpret = interpret_mode() if interpret is None else interpret
  kw = {} if interpret else {"compiler_params": compiler_params(num_warps)}
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        interpret=interpret, input_output_aliases=input_output_aliases or {}, **kw)


def group_tiling(tile: int, g: int, cpg_p: int, n_p: int) -> tuple[int, int]:
  """Mamba-1 programs of about `tile` state elements: (gb whole groups, cb channels of a group) per program;
  gb > 1 only with whole groups (cb == cpg_p), so a group's B/C are loaded once per program. Both are powers
  of two (Triton block sizes; cpg_p and n_p are), rounded down from what `tile` allows."""
  floor_pow2 = lambda v: 1 << (max(1, v).bit_length() - 1)
  if tile >= cpg_p * n_p:
    return min(next_pow2(g), floor_pow2(tile // (cpg_p * n_p))), cpg_p
  return 1, floor_pow2(tile // n_p)


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  """Zero-pad `axis` of x up to `size` (no copy when already that size). Triton tiles must be powers of 2."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


LOG2E = 1.4426950408889634


def softplus(v: Array) -> Array:
  """softplus written with ops every Pallas lowering has (log1p(exp) for v <= 20, v above, as torch)."""
  return jnp.where(v > 20.0, v, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))))


# atanh(t) / t ~ sum_i c_i (t^2)^(3 - i) on t^2 in [0, 1/9]: weighted least squares on Chebyshev nodes,
# reweighted towards the largest relative error (max 1.6e-7 in float64)
_ATANH_OVER_T = (0.17113005261027958, 0.19794733976026668, 0.33338001301264475, 0.9999998354403593)


def fma(a, b, c, ptx: bool = False) -> Array:
  """a * b + c in float32, broadcast. ptx: as one PTX fma.rn.f32 (inline asm: compiled CUDA kernels only).
  XLA's Triton pipeline compiles Pallas kernels without floating-point contraction: on the H200 with jax
  0.11.2 the verify kernel's SASS had no FFMA at all, every a * b + c an FMUL and an FADD (Nsight Compute;
  Triton's own default, which a CPU-side compile uses, contracts them). Otherwise the plain expression."""
  if not ptx:
    return a * b + c
  return _ptx("fma.rn.f32 $0, $1, $2, $3;", a, b, c)


def rcp(x, ptx: bool = False) -> Array:
  """1 / x. ptx: PTX rcp.approx.ftz.f32 (one MUFU op, relative error about 1 ulp): `/` lowers to an
  approximate division that also scales operands beyond 2^126 or below 2^-126, 8 instructions in all; for
  an x known to be in a normal range that guard is dead work."""
  if not ptx:
    return 1.0 / x
  return _ptx("rcp.approx.ftz.f32 $0, $1;", x)


def _ptx(asm: str, *args, dtype=jnp.float32) -> Array:
  """One PTX instruction applied elementwise to the (broadcast) args, all of `dtype` (float32 or int32)."""
  from jax.experimental.pallas import triton as plgpu
  shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in args))
  args = [jnp.broadcast_to(jnp.asarray(v, dtype), shape) for v in args]
  reg = "f" if dtype == jnp.float32 else "r"
  [out] = plgpu.elementwise_inline_asm(asm, args=args, constraints=",".join(["=" + reg] + [reg] * len(args)),
                                       pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, dtype)])
  return out


def lane_id(shape) -> Array:
  """int32 of `shape` holding each thread's lane in its warp (PTX %laneid): one value per thread, so a
  [1, 1] tensor of it differs from thread to thread (Triton takes [1, 1] as replicated; only elementwise
  ops and `shfl` may touch such a value)."""
  return _ptx("mov.u32 $0, %laneid;", jnp.zeros(shape, jnp.int32), dtype=jnp.int32)  # (the input is unused)


def shfl(v: Array, src_lane: int) -> Array:
  """float32 v as lane `src_lane` of this warp holds it (PTX shfl.sync.idx over the whole warp): a value
  computed per lane becomes the same in every thread."""
  bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
  out = _ptx(f"shfl.sync.idx.b32 $0, $1, {int(src_lane)}, 31, -1;", bits, dtype=jnp.int32)
  return jax.lax.bitcast_convert_type(out, jnp.float32)


def ptx_available(interpret: bool | None) -> bool:
  """Whether a compiled (not interpreted) kernel may use inline PTX (`fma`, `rcp`, `lane_id`, `shfl`): not in
  interpret mode (None: `interpret_mode()`), not on ROCm."""
  if interpret_mode() if interpret is None else interpret:
    return False
  try:
    return "rocm" not in jax.devices()[0].client.platform_version.lower()
  except (RuntimeError, AttributeError):  # no device client to ask (a lowering-only trace): assume CUDA
    return True


def softplus_fast(v: Array, ptx: bool = False, ptx_rcp: bool = True) -> Array:
  """softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) in (0, 1], with log1p(e) = 2 atanh(t), t = e / (2 + e)
  <= 1/3: one MUFU ex2, an approximate division and 4 FMAs instead of libdevice exp + log1p (what `softplus`
  lowers to in Triton). atanh(t) / t is a cubic in t^2 on [0, 1/9], fitted for minimal relative error
  (1.6e-7, below the float32 rounding of the rest; the Taylor series needs t^15 for the same).
  Max relative error 2e-6 against float64 on [-30, 30] (the rounding of v log2 e inside exp2). ptx: the
  FMAs and (ptx_rcp) the reciprocal of 2 + e in [2, 3] as PTX (`fma`, `rcp`)."""
  e = jnp.exp2(-jnp.abs(v) * LOG2E)
  t = e * rcp(2.0 + e, ptx=True) if ptx and ptx_rcp else e / (2.0 + e)
  t2 = t * t
  p = _ATANH_OVER_T[0]
  for c in _ATANH_OVER_T[1:]:
    p = fma(p, t2, c, ptx)
  return fma(2.0 * t, p, jnp.maximum(v, 0.0), ptx)

