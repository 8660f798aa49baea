"""Mamba-2 SSD scan: a Pallas (Triton) forward kernel and the chunked matmul formulation in plain JAX.

Both sit behind the signature of `reference.ssd_scan_ref`; the D * x term stays in XLA. Core:

    core(delta [b,l,H] f32, x [b,l,H,P], A [H] f32, B, C [b,l,G,N], keep [b,l] f32, h0 [b,H,P,N] f32)
      -> ys [b,l,H,P] f32 (= h_t C_t), hT [b,H,P,N] f32,   h_t = exp(delta_t A) keep_t h_{t-1} + delta_t x_t B_t^T.

Kernel: one program per (sequence, head, block of bp rows of P) keeps its [bp, N] slice of the state in
registers for all l steps (rows of P never interact). Backward (custom VJP): the VJP of `chunked_core`.

Chunked formulation (impl 'chunked', "SSD" of the Mamba-2 paper): split time into chunks of T; inside a chunk
y = (L o C B^T) (delta x) with L[t, s] = exp(sum_{s<r<=t} log a_r) (masked across resets), matmuls only;
chunk end-states by one matmul per chunk; a short sequential scan over l / T chunk states; their effect on y by
one more matmul.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.pallas import common

Array = jax.Array
f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Pallas forward kernel
def _ssd_kernel(delta_ref, x_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, ys_ref, ht_ref):
  """One program: one sequence, one head, bp rows of the head's [P, N] state."""
  a = a_ref[...]  # [1, 1]
  length = x_ref.shape[0]

  def step(t, h):
    dl = delta_ref[t]  # [1, 1]
    xt = x_ref[t].astype(f32)  # [bp, 1]
    bt = b_ref[t].astype(f32)  # [1, N]
    ct = c_ref[t].astype(f32)
    h = (jnp.exp(dl * a) * keep_ref[t]) * h + (dl * xt) * bt
    ys_ref[t] = jnp.sum(h * ct, axis=-1, keepdims=True)
    return h

  ht_ref[...] = jax.lax.fori_loop(0, length, step, h0_ref[...])


def kernel_core(delta, x, A, B, C, keep, h0, *, bp: int = 16, interpret: bool | None = None):
  b, l, nh, p = x.shape
  g, n = B.shape[-2:]
  hpg = nh // g
  n_p = common.next_pow2(n)
  bp = min(bp, common.next_pow2(p))
  p_p = pl.cdiv(p, bp) * bp
  xs = common.pad_axis(x, -1, p_p)[..., None]  # [b, l, H, P_p, 1]
  bs = common.pad_axis(B, -1, n_p)[:, :, :, None, :]  # [b, l, G, 1, N_p]
  cs = common.pad_axis(C, -1, n_p)[:, :, :, None, :]
  h = common.pad_axis(common.pad_axis(h0, -1, n_p), -2, p_p)
  scal = lambda: pl.BlockSpec((None, l, None, 1, 1), lambda i, hh, j: (i, 0, hh, 0, 0))
  rows = pl.BlockSpec((None, l, None, bp, 1), lambda i, hh, j: (i, 0, hh, j, 0))
  grp = pl.BlockSpec((None, l, None, 1, n_p), lambda i, hh, j: (i, 0, hh // hpg, 0, 0))
  state = pl.BlockSpec((None, None, bp, n_p), lambda i, hh, j: (i, hh, j, 0))
  ys, ht = common.call(
      _ssd_kernel,
      out_shape=(jax.ShapeDtypeStruct((b, l, nh, p_p, 1), f32), jax.ShapeDtypeStruct(h.shape, f32)),
      grid=(b, nh, p_p // bp),
      in_specs=[scal(), rows, grp, grp, pl.BlockSpec((None, l, None, 1, 1), lambda i, hh, j: (i, 0, 0, 0, 0)),
                pl.BlockSpec((None, 1, 1), lambda i, hh, j: (hh, 0, 0)), state],
      out_specs=(rows, state),
      num_warps=4, interpret=interpret,
  )(delta[..., None, None], xs, bs, cs, keep.reshape(b, l, 1, 1, 1), A.astype(f32).reshape(nh, 1, 1), h)
  return ys[:, :, :, :p, 0], ht[:, :, :p, :n]


# ------------------------------------------------------------------------------------------------
# Chunked matmul formulation
def chunked_core(delta, x, A, B, C, keep, h0, *, chunk: int = 64):
  b, l, nh, p = x.shape
  g = B.shape[-2]
  hpg = nh // g
  chunk = min(chunk, l)
  nc = pl.cdiv(l, chunk)
  lp = nc * chunk

  def prep(v, fill=0.0):  # [b, l, ...] -> [b, nc, T, ...]; padded steps are no-ops (delta 0, no reset)
    v = common.pad_axis(v.astype(f32), 1, lp, fill)
    return v.reshape(b, nc, chunk, *v.shape[2:])

  dl, xs = prep(delta), prep(x)  # [b,c,T,H], [b,c,T,H,P]
  bs, cs = prep(B), prep(C)  # [b,c,T,G,N]
  reset = prep(1.0 - keep)  # [b,c,T]
  seg = jnp.cumsum(reset, axis=2)  # segment index inside the chunk; 0 = still connected to the chunk start
  loga = dl * A.astype(f32)  # [b,c,T,H]
  cum = jnp.cumsum(loga, axis=2)
  t_idx = jnp.arange(chunk)
  causal = t_idx[:, None] >= t_idx[None, :]
  same = (seg[:, :, :, None] == seg[:, :, None, :]) & causal  # [b,c,T,S]
  diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [b,c,T,S,H]
  # where() before exp: masked entries become exp(-inf) = 0 with zero gradient (no inf * 0 = nan)
  L = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))
  cb = jnp.einsum("bctgn,bcsgn->bcgts", cs, bs, precision=HIGHEST)  # [b,c,G,T,S]
  cb = jnp.repeat(cb, hpg, axis=2)  # [b,c,H,T,S]
  u = dl[..., None] * xs  # delta x [b,c,T,H,P]
  y_diag = jnp.einsum("bchts,bctsh,bcshp->bcthp", cb, L, u, precision=HIGHEST)  # intra-chunk
  # chunk end-states from a zero start: sum_s exp(cum_T - cum_s) [no reset after s] u_s B_s^T
  to_end = jnp.exp(jnp.where((seg[:, :, -1:] == seg)[..., None], cum[:, :, -1:] - cum, -jnp.inf))  # [b,c,T,H]
  bh = jnp.repeat(bs, hpg, axis=3)  # [b,c,T,H,N]
  ch = jnp.repeat(cs, hpg, axis=3)
  s_local = jnp.einsum("bcth,bcthp,bcthn->bchpn", to_end, u, bh, precision=HIGHEST)
  # decay of the chunk start state to step t (0 after a reset in the chunk)
  from_start = jnp.exp(jnp.where((seg == 0)[..., None], cum, -jnp.inf))  # [b,c,T,H]

  def carry(h, inp):
    p_c, s_c = inp
    return p_c[:, :, None, None] * h + s_c, h

  h_end, starts = jax.lax.scan(carry, h0.astype(f32),
                               (from_start[:, :, -1].swapaxes(0, 1), s_local.swapaxes(0, 1)))
  starts = starts.swapaxes(0, 1)  # [b,c,H,P,N]
  y_off = jnp.einsum("bcth,bcthn,bchpn->bcthp", from_start, ch, starts, precision=HIGHEST)
  ys = (y_diag + y_off).reshape(b, lp, nh, p)[:, :l]
  return ys, h_end


# ------------------------------------------------------------------------------------------------
# custom VJP: Pallas forward, chunked backward
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas_core(delta, x, A, B, C, keep, h0, interpret):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret)


def _pallas_core_fwd(delta, x, A, B, C, keep, h0, interpret):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret), (delta, x, A, B, C, keep, h0)


def _pallas_core_bwd(interpret, res, cot):
  _, vjp = jax.vjp(chunked_core, *res)
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


def ssd_scan_pallas(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, interpret: bool | None = None):
  """`ssd_scan_ref` with the Pallas kernel forward and the chunked-JAX backward."""
  interp = common.interpret_mode() if interpret is None else interpret
  return _front(lambda *a: _pallas_core(*a, interp), x, dt, A, B, C, D, dt_bias, reset, h0)


def ssd_scan_chunked(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, chunk: int = 64):
  """`ssd_scan_ref` as the chunked matmul (SSD) formulation in plain JAX."""
  return _front(functools.partial(chunked_core, chunk=chunk), x, dt, A, B, C, D, dt_bias, reset, h0)
