"""Mamba-2 SSD scan: Pallas (Triton) chunk kernels and the chunked matmul formulation in plain JAX.

Both sit behind the signature of `reference.ssd_scan_ref`; the D * x term stays in XLA. Core:

    core(delta [b,l,H] f32, x [b,l,H,P], A [H] f32, B, C [b,l,G,N], keep [b,l] f32, h0 [b,H,P,N] f32)
      -> ys [b,l,H,P] f32 (= h_t C_t), hT [b,H,P,N] f32,   h_t = exp(delta_t A) keep_t h_{t-1} + delta_t x_t B_t^T.

Chunked ("SSD" of the Mamba-2 paper): split time into chunks of T steps. Inside a chunk
y = (L o C B^T) (delta x) with L[t, s] = exp(sum_{s<r<=t} log a_r) (zero across a reset): matmuls only. Each
chunk's end state from a zero start is one more matmul; the states at the chunk starts follow from those in
closed form, one matmul over chunks with the decay between every pair of chunks (no sequential loop); their
effect on y is a last matmul.

`chunked_core` is all of it in XLA. `kernel_core` runs the per-chunk work in two Pallas kernels of one
program per (sequence, chunk, head): the chunk's end state, then y (C B^T, the masked decay and both matmuls),
so the [T, T] matrices never leave the chip; only the closed form over chunks stays in XLA. Differentiated
(custom VJP), the chunked form runs instead: its backward needs its forward's intermediates.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.pallas import common
from hybrid_jax.pallas.options import KernelOptions, resolve

Array = jax.Array
f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Shared pieces of both forms
def _split_time(v, chunk):
  """[b, l, ...] -> [b, nc, T, ...], time zero-padded to whole chunks."""
  b, l = v.shape[:2]
  nc = pl.cdiv(l, chunk)
  return common.pad_axis(v, 1, nc * chunk).reshape(b, nc, chunk, *v.shape[2:])


def _chunks(delta, A, keep, chunk):
  """Per-step terms of the chunked form, time split as [b, nc, T, ...] (padded steps: delta 0, no reset):
  dl [b,c,T,H], cum [b,c,T,H] (running sum of delta A inside the chunk), seg [b,c,T] (resets seen so far
  inside the chunk: steps with equal seg are connected)."""
  dl = _split_time(delta.astype(f32), chunk)
  seg = jnp.cumsum(_split_time(1.0 - keep.astype(f32), chunk), axis=2)
  cum = jnp.cumsum(dl * A.astype(f32), axis=2)
  return dl, cum, seg


def _chunk_decays(cum, seg):
  """to_end [b,c,T,H]: decay from step t to the chunk's end; from_start [b,c,T,H]: from the chunk's start to
  step t (both 0 across a reset). where() before exp: masked entries become exp(-inf) = 0 with a zero gradient."""
  to_end = jnp.exp(jnp.where((seg[:, :, -1:] == seg)[..., None], cum[:, :, -1:] - cum, -jnp.inf))
  from_start = jnp.exp(jnp.where((seg == 0)[..., None], cum, -jnp.inf))
  return to_end, from_start


def _chunk_starts(h0, s_local, cum, seg):
  """States at the chunk starts [b,c,H,P,N] and the final state, from each chunk's end state from a zero start
  s_local [b,c,H,P,N]: start_c = W[c,0] h0 + sum_{j<c} W[c,j+1] s_j, W[c,j] the decay over the chunks between
  (exp of a difference of running sums of each chunk's total log-decay; 0 across a reset). One matmul over
  chunks instead of a sequential loop over them."""
  nc = seg.shape[1]
  log_decay = cum[:, :, -1]  # [b,c,H] the whole chunk's log-decay without resets
  has_reset = (seg[:, :, -1] > 0).astype(f32)  # [b,c]
  excl = lambda v: jnp.concatenate([jnp.zeros_like(v[:, :1]), jnp.cumsum(v, axis=1)], axis=1)  # [b,c+1,...]
  g, r = excl(log_decay), excl(has_reset)  # g_c = sum_{k<c}
  idx = jnp.arange(nc + 1)
  ok = (idx[:, None] >= idx[None, :]) & (r[:, :, None] == r[:, None, :])  # [b,c+1,j+1]
  w = jnp.exp(jnp.where(ok[..., None], g[:, :, None] - g[:, None, :], -jnp.inf))  # [b,c+1,j+1,H]
  starts = (jnp.einsum("bcjh,bjhpn->bchpn", w[:, :, 1:], s_local, precision=HIGHEST)
            + w[:, :, 0, :, None, None] * h0.astype(f32)[:, None])
  return starts[:, :nc], starts[:, nc]


# ------------------------------------------------------------------------------------------------
# Chunked matmul formulation, plain JAX
def chunked_core(delta, x, A, B, C, keep, h0, *, chunk: int = 64):
  b, l, nh, p = x.shape
  hpg = nh // B.shape[-2]
  chunk = min(chunk, l)
  dl, cum, seg = _chunks(delta, A, keep, chunk)
  xs, bs, cs = (_split_time(v.astype(f32), chunk) for v in (x, B, C))  # [b,c,T,H,P], [b,c,T,G,N]
  t_idx = jnp.arange(chunk)
  same = (seg[:, :, :, None] == seg[:, :, None, :]) & (t_idx[:, None] >= t_idx[None, :])  # [b,c,T,S]
  L = jnp.exp(jnp.where(same[..., None], cum[:, :, :, None, :] - cum[:, :, None, :, :], -jnp.inf))  # [b,c,T,S,H]
  cb = jnp.repeat(jnp.einsum("bctgn,bcsgn->bcgts", cs, bs, precision=HIGHEST), hpg, axis=2)  # [b,c,H,T,S]
  u = dl[..., None] * xs  # delta x [b,c,T,H,P]
  y_diag = jnp.einsum("bchts,bctsh,bcshp->bcthp", cb, L, u, precision=HIGHEST)
  to_end, from_start = _chunk_decays(cum, seg)
  s_local = jnp.einsum("bcth,bcthp,bcthn->bchpn", to_end, u, jnp.repeat(bs, hpg, axis=3), precision=HIGHEST)
  starts, h_end = _chunk_starts(h0, s_local, cum, seg)
  y_off = jnp.einsum("bcth,bcthn,bchpn->bcthp", from_start, jnp.repeat(cs, hpg, axis=3), starts, precision=HIGHEST)
  ys = y_diag + y_off
  return ys.reshape(b, -1, nh, p)[:, :l], h_end


# ------------------------------------------------------------------------------------------------
# Pallas chunk kernels
def _state_kernel(x_ref, b_ref, wend_ref, s_ref, *, precision):
  """One program: one sequence, one chunk of T steps, one head. s_ref [P, N] = the chunk's end state from a
  zero start = (x * wend)^T B, wend_t = delta_t times the decay from t to the chunk's end."""
  xw = x_ref[...].astype(f32) * wend_ref[...][:, None]  # [T, P]
  s_ref[...] = jax.lax.dot_general(xw, b_ref[...].astype(f32), (((0,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=f32)


def _output_kernel(x_ref, b_ref, c_ref, dl_ref, cum_ref, seg_ref, fs_ref, st_ref, y_ref, *, precision):
  """One program: one sequence, one chunk of T steps, one head. y_ref [T, P] = (L o C B^T) (delta x) + the
  chunk start state's part, from_start_t (C_t . start); L is the masked decay inside the chunk."""
  x = x_ref[...].astype(f32)  # [T, P]
  bm, cm = b_ref[...].astype(f32), c_ref[...].astype(f32)  # [T, N]
  cum, seg = cum_ref[...], seg_ref[...]  # [T]
  t = x.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)
  same = (rows >= cols) & (seg[:, None] == seg[None, :])
  decay = jnp.exp(jnp.where(same, cum[:, None] - cum[None, :], -jnp.inf))
  dot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                                               preferred_element_type=f32)
  cb = dot(cm, bm, ((1,), (1,)))  # [T, T]
  y = dot(cb * decay * dl_ref[...][None, :], x, ((1,), (0,)))
  c_start = dot(cm, st_ref[...], ((1,), (1,)))  # [T, P]
  y_ref[...] = y + fs_ref[...][:, None] * c_start


def kernel_core(delta, x, A, B, C, keep, h0, *, chunk: int = 128, num_warps: int = 8, tf32: bool | None = None,
                interpret: bool | None = None):
  """`chunked_core` with the per-chunk work in two Pallas kernels (same arguments and results): the chunks'
  end states, then (after the closed form over chunks, in XLA) y. The [T, T] matrices never leave the chip.
  Triton tiles are powers of two of at least 16: the chunk, P and N are padded up to that (zeros, no-op steps).
  tf32: True, the matmuls take TF32 inputs on GPU; False, float32 products; None, as JAX's default matmul
  precision has it (TF32 on GPU unless `jax_default_matmul_precision` asks for more). Interpret mode computes
  them in float32 either way."""
  b, l, nh, p = x.shape
  g, n = B.shape[-2:]
  hpg = nh // g
  chunk = max(16, min(chunk, common.next_pow2(l)))
  p_p, n_p = max(16, common.next_pow2(p)), max(16, common.next_pow2(n))
  dl, cum, seg = _chunks(delta, A, keep, chunk)
  nc = dl.shape[1]
  to_end, from_start = _chunk_decays(cum, seg)
  lp = nc * chunk
  flat = lambda v: v.reshape(b, lp, *v.shape[3:])  # [b, nc, T, ...] -> [b, lp, ...]
  xs = common.pad_axis(common.pad_axis(x, 1, lp), -1, p_p)  # [b, lp, H, P_p]
  bs, cs = (common.pad_axis(common.pad_axis(v, 1, lp), -1, n_p) for v in (B, C))  # [b, lp, G, N_p]
  grid = (b, nc, nh)
  precision = None if tf32 is None else jax.lax.Precision.DEFAULT if tf32 else jax.lax.Precision.HIGHEST
  per_head = pl.BlockSpec((None, chunk, None), lambda i, c, hh: (i, c, hh))
  group = pl.BlockSpec((None, chunk, None, n_p), lambda i, c, hh: (i, c, hh // hpg, 0))
  rows_p = pl.BlockSpec((None, chunk, None, p_p), lambda i, c, hh: (i, c, hh, 0))
  state = pl.BlockSpec((None, None, None, p_p, n_p), lambda i, c, hh: (i, c, hh, 0, 0))
  s_local = common.call(
      functools.partial(_state_kernel, precision=precision),
      out_shape=jax.ShapeDtypeStruct((b, nc, nh, p_p, n_p), f32), grid=grid,
      in_specs=[rows_p, group, per_head], out_specs=state, num_warps=num_warps, interpret=interpret,
  )(xs, bs, flat(to_end * dl))
  starts, h_end = _chunk_starts(common.pad_axis(common.pad_axis(h0, -1, n_p), -2, p_p), s_local, cum, seg)
  ys = common.call(
      functools.partial(_output_kernel, precision=precision),
      out_shape=jax.ShapeDtypeStruct((b, lp, nh, p_p), f32), grid=grid,
      in_specs=[rows_p, group, group, per_head, per_head, pl.BlockSpec((None, chunk), lambda i, c, hh: (i, c)),
                per_head, state],
      out_specs=rows_p, num_warps=num_warps, interpret=interpret,
  )(xs, bs, cs, flat(dl), flat(cum), seg.reshape(b, lp), flat(from_start), starts)
  return ys[:, :l, :, :p], h_end[:, :, :p, :n]


# ------------------------------------------------------------------------------------------------
# custom VJP: the kernels forward; under differentiation the chunked form forward and backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _pallas_core(delta, x, A, B, C, keep, h0, interpret, options):
  return kernel_core(delta, x, A, B, C, keep, h0, chunk=options.ssd_chunk, num_warps=options.ssd_warps,
                     tf32=options.ssd_tf32, interpret=interpret)


def _pallas_core_fwd(delta, x, A, B, C, keep, h0, interpret, options):
  # the backward needs the chunked form's intermediates: computing them is its forward, so the kernels would
  # only add their own cost
  return jax.vjp(chunked_core, delta, x, A, B, C, keep, h0)


def _pallas_core_bwd(interpret, options, vjp, cot):
  return vjp(cot)


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def _front(core, x, dt, A, B, C, D, dt_bias, reset, h0):
  b, l, nh, p = x.shape
  n = B.shape[-1]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h0 = jnp.zeros((b, nh, p, n), f32) if h0 is None else h0.astype(f32)
  ys, ht = core(delta, x, A.astype(f32), B, C, keep, h0)
  y = ys + x.astype(f32) * D.astype(f32)[:, None]
  return y.astype(x.dtype), ht


def ssd_scan_pallas(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, interpret: bool | None = None,
                    options: KernelOptions | None = None):
  """`ssd_scan_ref` with the Pallas chunk kernels forward (tuning: `KernelOptions.ssd_*`); differentiated, the
  chunked form in plain JAX forward and backward."""
  interp = common.interpret_mode() if interpret is None else interpret
  options = resolve(options)
  return _front(lambda *a: _pallas_core(*a, interp, options), x, dt, A, B, C, D, dt_bias, reset, h0)


def ssd_scan_chunked(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, chunk: int = 64):
  """`ssd_scan_ref` as the chunked matmul (SSD) formulation in plain JAX."""
  return _front(functools.partial(chunked_core, chunk=chunk), x, dt, A, B, C, D, dt_bias, reset, h0)
