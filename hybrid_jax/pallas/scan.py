"""Mamba-1 selective scan: a Pallas (Triton) forward kernel and a chunk-parallel plain-JAX scan.

Both sit behind the signature of `hybrid_jax.model.ssm.selective_scan_ref`. The elementwise parts
(softplus of dt, D * x, the silu(z) gate) stay in XLA, which fuses them; what the kernels compute is the core

    core(delta [b,l,d] f32, x [b,l,d], A [d,N] f32, B, C [b,l,G,N], keep [b,l] f32, h0 [b,d,N] f32)
      -> ys [b,l,d] f32 (= sum_n h_t C_t), hT [b,d,N] f32,   h_t = exp(delta_t A) keep_t h_{t-1} + delta_t x_t B_t.

Kernel layout: channels are viewed as [G, cpg] (cpg = d // G channels share one B/C group), so one program owns
`gb` whole groups of one sequence and keeps their state [gb, cpg, N] in registers for all l steps; each step
loads one row of x / delta / B / C and writes one row of ys. Grid = (b, G / gb), all programs independent.

Backward (custom VJP, `checkpointed_vjp`): the forward kernel also writes the state entering every chunk of
32 steps; the backward is then chunk-parallel plain JAX (a reverse linear scan per chunk, a reverse scan over
chunk boundaries, and the VJP of every chunk's local scan from its checkpoint), sequential depth
~3 * chunk + l / chunk instead of the 2 * l of the step-by-step `lax.scan` VJP.
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
def _scan_kernel(chunk, delta_ref, x_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, ys_ref, ht_ref,
                 starts_ref=None):
  """One program: one sequence, gb groups of cpg channels. Refs carry the whole time axis (length a multiple
  of `chunk`); with starts_ref the state entering every chunk is written too (the backward's checkpoints)."""
  a = a_ref[...]  # [gb, cpg, N]

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

  def one_chunk(c, h):
    if starts_ref is not None:
      starts_ref[c] = h
    return jax.lax.fori_loop(0, chunk, lambda i, hh: step(c * chunk + i, hh), h)

  ht_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0] // chunk, one_chunk, h0_ref[...])


def _tiles(g: int, cpg: int, n: int) -> tuple[int, int, int, int]:
  """(cpg_p, n_p, gb, g_p): power-of-two tile sizes, ~2K state elements per program."""
  cpg_p, n_p = common.next_pow2(cpg), common.next_pow2(n)
  gb = max(1, min(common.next_pow2(g), 2048 // (cpg_p * n_p)))
  return cpg_p, n_p, gb, pl.cdiv(g, gb) * gb


def kernel_core(delta, x, A, B, C, keep, h0, *, interpret: bool | None = None, chunk: int = 32,
                with_starts: bool = False):
  """The core above through the Pallas kernel (forward only). with_starts: also return the state entering
  each chunk of `chunk` steps, [b, ceil(l / chunk), d, N] (checkpoints for the backward)."""
  b, l, d = x.shape
  g, n = B.shape[-2:]
  cpg = d // g
  cpg_p, n_p, gb, g_p = _tiles(g, cpg, n)
  chunk = min(chunk, l) if with_starts else l
  nc = pl.cdiv(l, chunk)
  lp = nc * chunk  # padded steps: delta 0, keep 1 -> the state passes through unchanged

  def chan(v):  # [b, l, d] -> [b, lp, g_p, cpg_p]
    v = v.reshape(*v.shape[:-1], g, cpg)
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, cpg_p), -2, g_p), 1, lp)

  def grp(v):  # [b, l, g, n] -> [b, lp, g_p, n_p]
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, n_p), -2, g_p), 1, lp)

  def tile(v):  # [..., d, N] -> [..., g_p, cpg_p, n_p] (a free reshape when no padding is needed)
    v = v.reshape(*v.shape[:-2], g, cpg, n)
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, n_p), -2, cpg_p), -3, g_p)

  a, h = tile(A.astype(f32)), tile(h0)
  seq = pl.BlockSpec((None, lp, gb, cpg_p), lambda i, j: (i, 0, j, 0))
  grp_spec = pl.BlockSpec((None, lp, gb, n_p), lambda i, j: (i, 0, j, 0))
  state = pl.BlockSpec((None, gb, cpg_p, n_p), lambda i, j: (i, j, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((b, lp, g_p, cpg_p), f32), jax.ShapeDtypeStruct(h.shape, f32)]
  out_specs = [seq, state]
  if with_starts:
    out_shape.append(jax.ShapeDtypeStruct((b, nc, g_p, cpg_p, n_p), f32))
    out_specs.append(pl.BlockSpec((None, nc, gb, cpg_p, n_p), lambda i, j: (i, 0, j, 0, 0)))
  outs = common.call(
      functools.partial(_scan_kernel, chunk),
      out_shape=tuple(out_shape),
      grid=(b, g_p // gb),
      in_specs=[seq, seq, grp_spec, grp_spec, pl.BlockSpec((None, lp, 1, 1), lambda i, j: (i, 0, 0, 0)),
                pl.BlockSpec((gb, cpg_p, n_p), lambda i, j: (j, 0, 0)), state],
      out_specs=tuple(out_specs),
      num_warps=4, interpret=interpret,
  )(chan(delta), chan(x), grp(B), grp(C), common.pad_axis(keep, 1, lp, 1.0).reshape(b, lp, 1, 1), a, h)
  ys = outs[0][:, :l, :g, :cpg].reshape(b, l, d)
  ht = outs[1][:, :g, :cpg, :n].reshape(b, d, n)
  if with_starts:
    return ys, ht, outs[2][:, :, :g, :cpg, :n].reshape(b, nc, d, n)
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
BWD_CHUNK = 32


def _chunks(v, chunk, fill=0.0):
  """[b, l, ...] -> [chunk, b * nc, ...] (time padded with no-op steps)."""
  b, l = v.shape[:2]
  nc = pl.cdiv(l, chunk)
  v = common.pad_axis(v.astype(f32), 1, nc * chunk, fill)
  v = v.reshape(b, nc, chunk, *v.shape[2:])
  return jnp.moveaxis(v, 2, 0).reshape(chunk, b * nc, *v.shape[3:])


def checkpointed_vjp(res, starts, cot, chunk: int):
  """VJP of the core given the state entering every chunk (from the forward kernel).

  With E_c the cotangent of chunk c's end state (= that of chunk c+1's start; g_hT for the last chunk):
  (1) lambda_c = cotangent of start_c from chunk c's own outputs: a reverse linear scan inside every chunk
      (needs no forward states); (2) G_c = lambda_c + P_c * E_c, E_c = G_{c+1}: a reverse scan over chunks;
      dh0 = G_0; (3) input grads: VJP of every chunk's local scan from its known start with cotangents
      (gys_c, E_c), all chunks in parallel. Sequential depth ~3 * chunk + l / chunk."""
  delta, x, A, B, C, keep, h0 = res
  gys, g_ht = cot
  b, l, d = x.shape
  g, n = B.shape[-2:]
  nc = starts.shape[1]
  A = A.astype(f32)
  dl, ks = _chunks(delta, chunk), _chunks(keep, chunk, 1.0)
  cs = jnp.repeat(_chunks(C, chunk), d // g, axis=2)  # [T, m, d, N]
  gy = _chunks(gys, chunk)  # [T, m, d]

  def lam_step(carry, inp):  # carry = a_{t+1} * gbar_{t+1}
    dl_t, k_t, c_t, gy_t = inp
    gbar = gy_t[..., None] * c_t + carry
    return jnp.exp(dl_t[..., None] * A) * k_t[:, None, None] * gbar, None

  lam, _ = jax.lax.scan(lam_step, jnp.zeros((b * nc, d, n), f32), (dl, ks, cs, gy), reverse=True)
  p = jnp.exp(jnp.sum(dl, axis=0)[..., None] * A) * jnp.prod(ks, axis=0)[:, None, None]
  lam, p = lam.reshape(b, nc, d, n).swapaxes(0, 1), p.reshape(b, nc, d, n).swapaxes(0, 1)

  def g_step(e, inp):  # e = cotangent of this chunk's end; emits it, carries the start's
    lam_c, p_c = inp
    return lam_c + p_c * e, e

  dh0, ends = jax.lax.scan(g_step, g_ht.astype(f32), (lam, p), reverse=True)
  ends = ends.swapaxes(0, 1).reshape(b * nc, d, n)
  st = jax.lax.stop_gradient(starts.reshape(b * nc, d, n))

  def local(delta, x, A, B, C, keep):
    dl, xs, ks = _chunks(delta, chunk), _chunks(x, chunk), _chunks(keep, chunk, 1.0)
    bs = jnp.repeat(_chunks(B, chunk), d // g, axis=2)
    cs = jnp.repeat(_chunks(C, chunk), d // g, axis=2)
    return _local_scan(dl, xs, A.astype(f32), bs, cs, ks, st)

  _, vjp = jax.vjp(local, delta, x, A, B, C, keep)
  grads = vjp((ends, gy))
  return (*grads, dh0.astype(h0.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas_core(delta, x, A, B, C, keep, h0, interpret):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret)


def _pallas_core_fwd(delta, x, A, B, C, keep, h0, interpret):
  ys, ht, starts = kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, chunk=BWD_CHUNK,
                               with_starts=True)
  return (ys, ht), ((delta, x, A, B, C, keep, h0), starts)


def _pallas_core_bwd(interpret, res, cot):
  return checkpointed_vjp(res[0], res[1], cot, min(BWD_CHUNK, res[0][1].shape[1]))  # as in the forward


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
