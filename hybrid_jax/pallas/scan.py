"""Mamba-1 selective scan: a Pallas (Triton) forward kernel and a chunk-parallel plain-JAX scan.

Both sit behind the signature of `hybrid_jax.model.ssm.selective_scan_ref`. The elementwise parts
(softplus of dt, D * x, the silu(z) gate) stay in XLA, which fuses them; what the kernels compute is the core

    core(delta [b,l,d] f32, x [b,l,d], A [d,N] f32, B, C [b,l,G,N], keep [b,l] f32, h0 [b,d,N] f32)
      -> ys [b,l,d] f32 (= sum_n h_t C_t), hT [b,d,N] f32,   h_t = exp(delta_t A) keep_t h_{t-1} + delta_t x_t B_t.

Kernel layout: channels are viewed as [G, cpg] (cpg = d // G channels share one B/C group), so one program owns
`gb` whole groups of one sequence and keeps their state [gb, cpg, N] in registers for all l steps; each step
loads one row of x / delta / B / C and writes one row of ys. Grid = (b, G / gb), all programs independent.

Backward (custom VJP): the VJP of the chunk-parallel JAX scan (`chunked_core`), recomputed from the inputs.
Its sequential depth is ~2 * chunk + l / chunk steps instead of l, so it is far cheaper than the VJP of the
step-by-step `lax.scan`, and it needs no saved per-step states from the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.pallas import common

Array = jax.Array
f32 = jnp.float32


# ------------------------------------------------------------------------------------------------
# Pallas forward kernel
def _scan_kernel(delta_ref, x_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, ys_ref, ht_ref):
  """One program: one sequence, gb groups of cpg channels. Refs carry the whole time axis."""
  a = a_ref[...]  # [gb, cpg, N]
  length = x_ref.shape[0]

  def step(t, h):
    dl = delta_ref[t]  # [gb, cpg]
    xt = x_ref[t].astype(f32)
    bt = b_ref[t].astype(f32)  # [gb, N]
    ct = c_ref[t].astype(f32)
    kt = keep_ref[t]  # [1, 1]
    decay = jnp.exp(dl[:, :, None] * a) * kt[:, :, None]
    h = decay * h + (dl * xt)[:, :, None] * bt[:, None, :]
    ys_ref[t] = jnp.sum(h * ct[:, None, :], axis=-1)
    return h

  ht_ref[...] = jax.lax.fori_loop(0, length, step, h0_ref[...])


def _tiles(g: int, cpg: int, n: int) -> tuple[int, int, int, int]:
  """(cpg_p, n_p, gb, g_p): power-of-two tile sizes, ~2K state elements per program."""
  cpg_p, n_p = common.next_pow2(cpg), common.next_pow2(n)
  gb = max(1, min(common.next_pow2(g), 2048 // (cpg_p * n_p)))
  return cpg_p, n_p, gb, pl.cdiv(g, gb) * gb


def kernel_core(delta, x, A, B, C, keep, h0, *, interpret: bool | None = None):
  """The core above through the Pallas kernel (forward only)."""
  b, l, d = x.shape
  g, n = B.shape[-2:]
  cpg = d // g
  cpg_p, n_p, gb, g_p = _tiles(g, cpg, n)

  def chan(v):  # [..., d] -> [..., g_p, cpg_p]
    v = v.reshape(*v.shape[:-1], g, cpg)
    return common.pad_axis(common.pad_axis(v, -1, cpg_p), -2, g_p)

  def grp(v):  # [b, l, g, n] -> [b, l, g_p, n_p]
    return common.pad_axis(common.pad_axis(v, -1, n_p), -2, g_p)

  def tile(v):  # [..., d, N] -> [..., g_p, cpg_p, n_p] (a free reshape when no padding is needed)
    v = v.reshape(*v.shape[:-2], g, cpg, n)
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, n_p), -2, cpg_p), -3, g_p)

  a, h = tile(A.astype(f32)), tile(h0)
  seq = pl.BlockSpec((None, l, gb, cpg_p), lambda i, j: (i, 0, j, 0))
  grp_spec = pl.BlockSpec((None, l, gb, n_p), lambda i, j: (i, 0, j, 0))
  state = pl.BlockSpec((None, gb, cpg_p, n_p), lambda i, j: (i, j, 0, 0))
  ys, ht = common.call(
      _scan_kernel,
      out_shape=(jax.ShapeDtypeStruct((b, l, g_p, cpg_p), f32), jax.ShapeDtypeStruct(h.shape, f32)),
      grid=(b, g_p // gb),
      in_specs=[seq, seq, grp_spec, grp_spec, pl.BlockSpec((None, l, 1, 1), lambda i, j: (i, 0, 0, 0)),
                pl.BlockSpec((gb, cpg_p, n_p), lambda i, j: (j, 0, 0)), state],
      out_specs=(seq, state),
      num_warps=4, interpret=interpret,
  )(chan(delta), chan(x), grp(B), grp(C), keep.reshape(b, l, 1, 1), a, h)
  ys = ys[:, :, :g, :cpg].reshape(b, l, d)
  ht = ht[:, :g, :cpg, :n].reshape(b, d, n)
  return ys, ht


# ------------------------------------------------------------------------------------------------
# Chunk-parallel plain-JAX scan (impl 'chunked', and the backward of the kernel)
def _local_scan(delta, x, A, B, C, keep, h_start):
  """Sequential scan inside each chunk, all chunks at once. Inputs [T, m, ...] (m = b * chunks)."""

  def step(h, inp):
    dl, xt, bt, ct, kt = inp
    h = jnp.exp(dl[..., None] * A) * kt[:, None, None] * h + (dl * xt)[..., None] * bt
    return h, jnp.sum(h * ct, axis=-1)

  return jax.lax.scan(step, h_start, (delta, x, B, C, keep))


def chunked_core(delta, x, A, B, C, keep, h0, *, chunk: int = 32):
  """Same core as `kernel_core`, as a two-level scan: (1) every chunk from a zero state in parallel, (2) a
  short sequential scan over chunk end-states (h_end = P * h_start + S_local), (3) every chunk again from its
  true start state, emitting ys. Depth 2 * chunk + l / chunk; differentiable by plain JAX AD."""
  b, l, d = x.shape
  g, n = B.shape[-2:]
  chunk = min(chunk, l)
  nc = pl.cdiv(l, chunk)
  lp = nc * chunk

  def prep(v, fill=0.0):  # [b, l, ...] -> [chunk, b * nc, ...] (time padded with no-op steps)
    v = common.pad_axis(v.astype(f32), 1, lp, fill)
    v = v.reshape(b, nc, chunk, *v.shape[2:])
    return jnp.moveaxis(v, 2, 0).reshape(chunk, b * nc, *v.shape[3:])

  # padded steps: delta = 0 (decay 1, no input), keep = 1: the state passes through unchanged
  dl, xs, ks = prep(delta), prep(x), prep(keep, 1.0)
  bs = jnp.repeat(prep(B), d // g, axis=2)  # [chunk, m, d, N]
  cs = jnp.repeat(prep(C), d // g, axis=2)
  A = A.astype(f32)
  zero = jnp.zeros((b * nc, d, n), f32)
  s_local, _ = _local_scan(dl, xs, A, bs, cs, ks, zero)  # [m, d, N]
  # decay over a whole chunk: prod_t exp(delta_t A) keep_t
  p = jnp.exp(jnp.sum(dl, axis=0)[..., None] * A) * jnp.prod(ks, axis=0)[:, None, None]
  s_local, p = s_local.reshape(b, nc, d, n), p.reshape(b, nc, d, n)

  def carry(h, inp):
    p_c, s_c = inp
    return p_c * h + s_c, h  # emits the start state of chunk c

  h_end, starts = jax.lax.scan(carry, h0.astype(f32), (p.swapaxes(0, 1), s_local.swapaxes(0, 1)))
  starts = starts.swapaxes(0, 1).reshape(b * nc, d, n)
  _, ys = _local_scan(dl, xs, A, bs, cs, ks, starts)  # [chunk, m, d]
  ys = jnp.moveaxis(ys.reshape(chunk, b, nc, d), 0, 2).reshape(b, lp, d)[:, :l]
  return ys, h_end


# ------------------------------------------------------------------------------------------------
# custom VJP: Pallas forward, chunked-JAX backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas_core(delta, x, A, B, C, keep, h0, interpret):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret)


def _pallas_core_fwd(delta, x, A, B, C, keep, h0, interpret):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret), (delta, x, A, B, C, keep, h0)


def _pallas_core_bwd(interpret, res, cot):
  _, vjp = jax.vjp(chunked_core, *res)
  return vjp(cot)


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def _front(core, x, dt, A, B, C, D, dt_bias, z, reset, h0):
  """Shared elementwise prologue/epilogue around a core (XLA fuses these)."""
  b, l, d = x.shape
  n = B.shape[-1]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h0 = jnp.zeros((b, d, n), f32) if h0 is None else h0.astype(f32)
  ys, ht = core(delta, x, A.astype(f32), B, C, keep, h0)
  y = ys + x.astype(f32) * D.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return y.astype(x.dtype), ht


def selective_scan_pallas(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *,
                          interpret: bool | None = None):
  """`selective_scan_ref` with the Pallas kernel forward and a chunk-parallel recompute backward."""
  interp = common.interpret_mode() if interpret is None else interpret
  core = lambda *a: _pallas_core(*a, interp)
  return _front(core, x, dt, A, B, C, D, dt_bias, z, reset, h0)


def selective_scan_chunked(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *, chunk: int = 32):
  """`selective_scan_ref` as the chunk-parallel plain-JAX scan (any backend, plain AD)."""
  return _front(functools.partial(chunked_core, chunk=chunk), x, dt, A, B, C, D, dt_bias, z, reset, h0)
