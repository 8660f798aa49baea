"""Mamba-1 selective scan and Mamba-2 SSD scan as TPU (Mosaic) Pallas kernels.

Same signatures and semantics as the lax.scan references (`selective_scan_ref`, `ssd_scan_ref`) and the
Triton kernels of `scan.py` / `ssd.py`. The elementwise prologue and epilogue (softplus, D x, the silu(z)
gate) stay in XLA; the kernel computes the core

    h_t = exp(delta_t A) keep_t h_{t-1} + u_t B_t,   ys_t = sum_n h_t C_t,   u = delta x   (fp32).

Layout, "channels on lanes": a sequence's state is held transposed, [N_p, channels], N on sublanes (padded to
a multiple of 8) and channels on the 128 lanes, so a step is dense vector work at any N (N = 16 on the lanes
would leave 7 of 8 lanes idle). Mamba-2 is the same scan with one channel per (head, row of P): delta and A
repeated over P, so its decay exp(delta A) is one row broadcast over N. Channels are grouped [G_p, cpg_p] (the
cpg channels of one B/C group, padded to a power of two) and a program owns `lanes` channels (a power of two
>= 128): gb = lanes / cpg_p whole groups, or part of one group (gb = 1). B and C enter as [T * N_p, gb] per
block of T steps (row t * N_p + n: step t, state n; the program's groups on lanes) and are expanded to the
channels once per block by one MXU matmul with the 0/1 matrix E [gb, lanes], E[g, c] = (lane c is in group g):
rows t * N_p ... t * N_p + N_p - 1 of the product hold step t's B (or C) for every lane (exact: one nonzero
term per output; fp32 at HIGHEST precision, bf16 with fp32 accumulation).

Grid (b, channel blocks, time blocks) with semantics (parallel, parallel, arbitrary): the state stays in a
VMEM scratch across the time blocks of one (sequence, channel block), and in vregs within a block, whose steps
(unrolled by 8) each load one row of delta / u / keep and store one row of ys. Padding: channels, groups, N
and time are zero-padded (padded steps: delta 0, keep 1, so the state passes through) and sliced off.

Backward (custom VJP, plain JAX): Mamba-1: the kernel also writes the state entering every `ckpt_chunk` steps
and `scan.checkpointed_vjp` (chunk-parallel) runs from those; Mamba-2: the VJP of `ssd.chunked_core` (the
chunked matmul form: MXU work on TPU).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrid_jax.pallas import common, scan, ssd

Array = jax.Array
f32 = jnp.float32
SUBLANES, LANES = 8, 128


@dataclasses.dataclass(frozen=True)
class TpuScanOptions:
  """Block sizes of the TPU scan kernels (the defaults keep a program's VMEM near 6 MiB)."""
  time_block: int = 64  # steps per grid step on the sequential axis (a multiple of ckpt_chunk)
  lane_block: int = 0  # channels per program (a power of two >= 128); 0: the most within state_tile
  state_tile: int = 8192  # state elements per program when lane_block is 0 (8 vregs of float32)
  ckpt_chunk: int = 32  # Mamba-1: steps between the state checkpoints of the backward (a multiple of 8)
  block_shift: int = 0  # tests only: the step inputs are read from the time block this many later (wrong)

  def __post_init__(self):
    if self.ckpt_chunk <= 0 or self.ckpt_chunk % SUBLANES:
      raise ValueError(f"TpuScanOptions.ckpt_chunk must be a positive multiple of 8, got {self.ckpt_chunk}")
    if self.time_block <= 0 or self.time_block % self.ckpt_chunk:
      raise ValueError(f"TpuScanOptions.time_block must be a positive multiple of ckpt_chunk "
                       f"({self.ckpt_chunk}), got {self.time_block}")
    check_lanes("TpuScanOptions", self.lane_block, self.state_tile)


def check_lanes(owner: str, lane_block: int, state_tile: int) -> None:
  """The lane options shared by the TPU kernels' option classes (owner names the class in the error)."""
  if lane_block and (lane_block < LANES or lane_block & (lane_block - 1)):
    raise ValueError(f"{owner}.lane_block must be 0 or a power of two >= 128, got {lane_block}")
  if state_tile < LANES * SUBLANES:
    raise ValueError(f"{owner}.state_tile must be >= {LANES * SUBLANES}, got {state_tile}")


def _round_up(v: int, m: int) -> int:
  return -(-v // m) * m


class ChannelLayout:
  """The TPU kernels' padded channel layout of `d` channels in g groups of B/C with N states: channels as
  [g_p, cpg_p] flattened to d_p lanes, programs of `lanes` channels (`blocks` of them), gb groups per program
  (blocks_per_group programs per group when a group is wider than a program), N padded to n_p."""

  def __init__(self, d: int, g: int, n: int, lane_block: int, state_tile: int):
    if g <= 0 or d % g:
      raise ValueError(f"B/C groups ({g}) must divide the channels ({d})")
    self.d, self.g, self.n, self.cpg = d, g, n, d // g
    self.cpg_p, self.n_p = common.next_pow2(self.cpg), _round_up(n, SUBLANES)
    if lane_block:
      self.lanes = lane_block
    else:  # the fewest padded channels among the widths within state_tile, then the widest
      widest = max(LANES, 1 << ((state_tile // self.n_p).bit_length() - 1))
      widths = [LANES << i for i in range((widest // LANES).bit_length())]
      self.lanes = min(widths, key=lambda w: (self._padded(w), -w))
    self.gb = max(1, self.lanes // self.cpg_p)
    self.d_p = self._padded(self.lanes)  # a multiple of lanes (both powers of two, or gb whole groups)
    self.g_p = self.d_p // self.cpg_p
    self.blocks = self.d_p // self.lanes
    self.blocks_per_group = max(1, self.cpg_p // self.lanes)

  def _padded(self, lanes: int) -> int:  # d_p for programs of `lanes` channels
    return _round_up(self.g, max(1, lanes // self.cpg_p)) * self.cpg_p

  def chan(self, v: Array) -> Array:  # [..., d] -> [..., d_p]
    v = v.reshape(*v.shape[:-1], self.g, self.cpg)
    v = common.pad_axis(common.pad_axis(v, -1, self.cpg_p), -2, self.g_p)
    return v.reshape(*v.shape[:-2], self.d_p)

  def unchan(self, v: Array) -> Array:  # [..., d_p] -> [..., d]
    v = v.reshape(*v.shape[:-1], self.g_p, self.cpg_p)[..., :self.g, :self.cpg]
    return v.reshape(*v.shape[:-2], self.d)

  def state(self, v: Array) -> Array:  # [..., d, N] -> [..., n_p, d_p] (transposed: channels on lanes)
    return self.chan(jnp.swapaxes(common.pad_axis(v, -1, self.n_p), -1, -2))

  def unstate(self, v: Array) -> Array:  # [..., n_p, d_p] -> [..., d, N]
    return jnp.swapaxes(self.unchan(v)[..., :self.n, :], -1, -2)

  def groups(self, v: Array, steps: int, dtype) -> Array:
    """[b, l, g, N] -> [b, g_p / gb, steps * n_p, gb] (time padded to `steps`): a program's block of rows
    holds its gb groups' values, step-major."""
    b = v.shape[0]
    v = common.pad_axis(common.pad_axis(v.astype(dtype), -1, self.n_p), -2, self.g_p)
    v = common.pad_axis(v, 1, steps)
    v = v.reshape(b, steps, self.g_p // self.gb, self.gb, self.n_p).transpose(0, 2, 1, 4, 3)
    return v.reshape(b, self.g_p // self.gb, steps * self.n_p, self.gb)

  def expander(self, dtype) -> Array:
    """E [gb, lanes]: E[g, c] = 1 where lane c of a program belongs to its g-th group."""
    lane_group = np.arange(self.lanes) // self.cpg_p if self.gb > 1 else np.zeros(self.lanes, np.int64)
    return jnp.asarray(lane_group[None, :] == np.arange(self.gb)[:, None], dtype)

  def group_block(self, j):  # program j's block of groups (an index into groups()' second axis)
    return j // self.blocks_per_group if self.blocks_per_group > 1 else j


def expand_groups(v: Array, e: Array) -> Array:
  """[rows, gb] (a step's groups per row) -> [rows, lanes] (each lane its group's value), in a kernel."""
  if e.shape[0] == 1:  # one group for every lane: a broadcast
    return v.astype(f32) * e.astype(f32)
  precision = jax.lax.Precision.HIGHEST if v.dtype == f32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot(v, e, precision=precision, preferred_element_type=f32)


def resolve_interpret(interpret: bool | None, platform: str | None = None) -> bool:
  """Interpret mode (None: off when lowering for TPU, the explicit `platform` or else the default backend; on
  elsewhere): the kernels compile for TPU only."""
  if interpret is not None:
    return bool(interpret)
  return (platform or jax.default_backend()) != "tpu"


def tpu_call(kernel, *, interpret: bool, semantics, **kw):
  """pallas_call for the Mosaic lowering; interpret mode is Pallas's TPU interpreter (TPU memory spaces,
  dimension semantics and block bounds simulated on CPU) where this jax has it."""
  mode = False
  if interpret:
    mode = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  return pl.pallas_call(kernel, interpret=mode,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=tuple(semantics)), **kw)


# ------------------------------------------------------------------------------------------------
# The scan kernel (both variants)
def _scan_kernel(ckpt, n_p, delta_ref, u_ref, keep_ref, a_ref, e_ref, b_ref, c_ref, h0_ref, ys_ref, ht_ref,
                 *rest):
  """One program: one sequence, `lanes` channels, one block of T steps (grid axis 2, in order). delta, u
  [T, lanes]; keep [T, 1]; a [N_p or 1, lanes]; B, C [T * N_p, gb]; state [N_p, lanes]. With a starts output,
  the state entering every `ckpt` steps is written too."""
  *starts, h_scr, bx_scr, cx_scr = rest
  t_block = pl.program_id(2)

  @pl.when(t_block == 0)
  def _():
    h_scr[...] = h0_ref[...]

  e = e_ref[...]
  bx_scr[...] = expand_groups(b_ref[...], e)  # [T * N_p, lanes]
  cx_scr[...] = expand_groups(c_ref[...], e)
  a = a_ref[...]

  def step(t, h):  # one row of each step input, N_p rows of the expanded B / C
    at = pl.multiple_of(t * n_p, SUBLANES)
    decay = jnp.exp(delta_ref[pl.ds(t, 1), :] * a) * keep_ref[pl.ds(t, 1), :]  # [N_p or 1, lanes]
    h = decay * h + u_ref[pl.ds(t, 1), :] * bx_scr[pl.ds(at, n_p), :]
    ys_ref[pl.ds(t, 1), :] = jnp.sum(h * cx_scr[pl.ds(at, n_p), :], axis=0, keepdims=True)
    return h

  def chunk(c, h):
    if starts:
      starts[0][c] = h
    return jax.lax.fori_loop(0, ckpt, lambda i, hh: step(c * ckpt + i, hh), h, unroll=SUBLANES)

  h = jax.lax.fori_loop(0, delta_ref.shape[0] // ckpt, chunk, h_scr[...])
  h_scr[...] = h

  @pl.when(t_block == pl.num_programs(2) - 1)
  def _():
    ht_ref[...] = h


# VMEM a scan program may use: below the default scoped limit of the smallest TPU VMEM (16 MiB on v5e), with
# room for Mosaic's own scratch. The time block shrinks (by checkpoint chunks) until a program fits.
VMEM_BUDGET = 12 << 20


def checkpoint_chunk(l: int, options: TpuScanOptions) -> int:
  """Steps between the Mamba-1 state checkpoints for l steps (a multiple of 8)."""
  return min(options.ckpt_chunk, _round_up(l, SUBLANES))


def _vmem_bytes(lay: ChannelLayout, T: int, ckpt: int, group_bytes: int, with_starts: bool) -> int:
  """A scan program's VMEM at T steps per block: scratch and double-buffered blocks, in (8, 128) tiles."""
  tiles = lambda r, c, size=4: _round_up(r, SUBLANES) * _round_up(c, LANES) * size
  state = tiles(lay.n_p, lay.lanes)
  return (2 * tiles(T * lay.n_p, lay.lanes)  # the expanded B and C
          + 2 * 2 * tiles(T * lay.n_p, lay.gb, group_bytes)  # B and C blocks
          + 2 * 3 * tiles(T, lay.lanes) + 2 * tiles(T, 1)  # delta, u, ys; keep
          + (2 * (T // ckpt) * state if with_starts else 0) + 7 * state)  # starts; h, h0, hT, A


def time_block(l: int, ckpt: int, lay: ChannelLayout, options: TpuScanOptions, group_bytes: int,
               with_starts: bool) -> int:
  """Steps per time block: options.time_block, no more than the (padded) sequence, and within VMEM_BUDGET
  (a multiple of ckpt, at least ckpt)."""
  T = ckpt * max(1, min(options.time_block // ckpt, pl.cdiv(l, ckpt)))
  while T > ckpt and _vmem_bytes(lay, T, ckpt, group_bytes, with_starts) > VMEM_BUDGET:
    T -= ckpt
  return T


def _scan(lay: ChannelLayout, delta, u, keep, a, B, C, h0, *, interpret, options, with_starts):
  """delta, u [b, l, d] f32 per channel; keep [b, l]; a [rows, d_p] (rows: N_p, or 1 for a per-channel
  decay); B, C [b, l, g, N]; h0 [b, N_p, d_p]. Returns ys [b, l, d] f32, the final state [b, N_p, d_p] and
  (with_starts) the states entering each checkpoint chunk [b, l_p / ckpt, N_p, d_p]."""
  b, l, _ = delta.shape
  gdtype = jnp.bfloat16 if B.dtype == jnp.bfloat16 and C.dtype == jnp.bfloat16 else f32
  ckpt = checkpoint_chunk(l, options)
  T = time_block(l, ckpt, lay, options, jnp.dtype(gdtype).itemsize, with_starts)
  l_p = _round_up(l, T)
  nt, n_p, lanes = l_p // T, lay.n_p, lay.lanes
  rows = lambda v: common.pad_axis(lay.chan(v), 1, l_p)
  shift = options.block_shift
  tin = (lambda t: (t + shift) % nt) if shift else (lambda t: t)
  step_spec = pl.BlockSpec((None, T, lanes), lambda i, j, t: (i, tin(t), j))
  state_spec = pl.BlockSpec((None, n_p, lanes), lambda i, j, t: (i, 0, j))
  group_spec = pl.BlockSpec((None, None, T * n_p, lay.gb), lambda i, j, t: (i, lay.group_block(j), tin(t), 0))
  in_specs = [step_spec, step_spec, pl.BlockSpec((None, T, 1), lambda i, j, t: (i, tin(t), 0)),
              pl.BlockSpec((a.shape[0], lanes), lambda i, j, t: (0, j)),
              pl.BlockSpec((lay.gb, lanes), lambda i, j, t: (0, 0)), group_spec, group_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct((b, l_p, lay.d_p), f32), jax.ShapeDtypeStruct((b, n_p, lay.d_p), f32)]
  out_specs = [pl.BlockSpec((None, T, lanes), lambda i, j, t: (i, t, j)), state_spec]
  if with_starts:
    out_shape.append(jax.ShapeDtypeStruct((b, l_p // ckpt, n_p, lay.d_p), f32))
    out_specs.append(pl.BlockSpec((None, T // ckpt, n_p, lanes), lambda i, j, t: (i, t, 0, j)))
  outs = tpu_call(
      functools.partial(_scan_kernel, ckpt, n_p),
      interpret=interpret, semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
      out_shape=tuple(out_shape), grid=(b, lay.blocks, nt), in_specs=in_specs, out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((n_p, lanes), f32), pltpu.VMEM((T * n_p, lanes), f32),
                      pltpu.VMEM((T * n_p, lanes), f32)],
  )(rows(delta), rows(u), common.pad_axis(keep, 1, l_p, 1.0)[..., None], a, lay.expander(gdtype),
    lay.groups(B, l_p, gdtype), lay.groups(C, l_p, gdtype), h0)
  ys = lay.unchan(outs[0][:, :l])
  if with_starts:
    return ys, outs[1], outs[2][:, :pl.cdiv(l, ckpt)]
  return ys, outs[1]


# ------------------------------------------------------------------------------------------------
# Mamba-1
def m1_kernel_core(delta, x, A, B, C, keep, h0, *, interpret: bool | None = None,
                   options: TpuScanOptions = TpuScanOptions(), with_starts: bool = False):
  """The core of `scan.kernel_core` (same arguments and results) through the TPU kernel. with_starts: also
  the state entering each chunk of ckpt = checkpoint_chunk(l) steps, [b, ceil(l / ckpt), d, N]."""
  d = x.shape[-1]
  g, n = B.shape[-2:]
  lay = ChannelLayout(d, g, n, options.lane_block, options.state_tile)
  outs = _scan(lay, delta, delta * x.astype(f32), keep, lay.state(A.astype(f32)), B, C, lay.state(h0),
               interpret=resolve_interpret(interpret), options=options, with_starts=with_starts)
  return (outs[0], *(lay.unstate(v) for v in outs[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _m1_core(delta, x, A, B, C, keep, h0, interpret, options):
  return m1_kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, options=options)


def _m1_core_fwd(delta, x, A, B, C, keep, h0, interpret, options):
  ys, ht, starts = m1_kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, options=options,
                                  with_starts=True)
  return (ys, ht), ((delta, x, A, B, C, keep, h0), starts)


def _m1_core_bwd(interpret, options, res, cot):
  inputs, starts = res
  return scan.checkpointed_vjp(inputs, starts, cot, checkpoint_chunk(inputs[1].shape[1], options))


_m1_core.defvjp(_m1_core_fwd, _m1_core_bwd)


def selective_scan_tpu(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *,
                       interpret: bool | None = None, options: TpuScanOptions | None = None):
  """`selective_scan_ref` (same arguments and results) with the TPU kernel forward and the chunk-parallel
  JAX backward from the kernel's state checkpoints."""
  b, l, d = x.shape
  n = B.shape[-1]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h0 = jnp.zeros((b, d, n), f32) if h0 is None else h0.astype(f32)
  ys, ht = _m1_core(delta, x, A.astype(f32), B, C, keep, h0, resolve_interpret(interpret),
                    options or TpuScanOptions())
  y = ys + x.astype(f32) * D.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return y.astype(x.dtype), ht


# ------------------------------------------------------------------------------------------------
# Mamba-2
def m2_kernel_core(delta, x, A, B, C, keep, h0, *, interpret: bool | None = None,
                   options: TpuScanOptions = TpuScanOptions()):
  """The core of `ssd.kernel_core` (same arguments and results) through the TPU kernel: channel h * P + p."""
  b, l, nh, p = x.shape
  g, n = B.shape[-2:]
  lay = ChannelLayout(nh * p, g, n, options.lane_block, options.state_tile)
  per_channel = lambda v: jnp.repeat(v, p, axis=-1)  # [..., H] -> [..., H * P]
  delta_c = per_channel(delta)
  u = delta_c * x.astype(f32).reshape(b, l, nh * p)
  a = lay.chan(per_channel(A.astype(f32)))[None]  # [1, d_p]: one decay per channel, shared by its N states
  ys, ht = _scan(lay, delta_c, u, keep, a, B, C, lay.state(h0.reshape(b, nh * p, n)),
                 interpret=resolve_interpret(interpret), options=options, with_starts=False)
  return ys.reshape(b, l, nh, p), lay.unstate(ht).reshape(b, nh, p, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _m2_core(delta, x, A, B, C, keep, h0, interpret, options):
  return m2_kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, options=options)


def _m2_core_fwd(delta, x, A, B, C, keep, h0, interpret, options):
  out = m2_kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, options=options)
  return out, (delta, x, A, B, C, keep, h0)


def _m2_core_bwd(interpret, options, res, cot):
  _, vjp = jax.vjp(ssd.chunked_core, *res)
  return vjp(cot)


_m2_core.defvjp(_m2_core_fwd, _m2_core_bwd)


def ssd_scan_tpu(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, interpret: bool | None = None,
                 options: TpuScanOptions | None = None):
  """`ssd_scan_ref` (same arguments and results) with the TPU kernel forward and the chunked-JAX backward."""
  b, l, nh, p = x.shape
  n = B.shape[-1]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h0 = jnp.zeros((b, nh, p, n), f32) if h0 is None else h0.astype(f32)
  ys, ht = _m2_core(delta, x, A.astype(f32), B, C, keep, h0, resolve_interpret(interpret),
                    options or TpuScanOptions())
  y = ys + x.astype(f32) * D.astype(f32)[:, None]
  return y.astype(x.dtype), ht
