"""Mamba-1 selective scan: a Pallas (Triton) forward kernel and a chunk-parallel plain-JAX scan.

Both sit behind the signature of `reference.selective_scan_ref`. The elementwise parts
(softplus of dt, D * x, the silu(z) gate) stay in XLA, which fuses them; what the kernels compute is the core

    core(delta [b,l,d] f32, x [b,l,d], A [d,N] f32, B, C [b,l,G,N], keep [b,l] f32, h0 [b,d,N] f32)
      -> ys [b,l,d] f32 (= sum_n h_t C_t), hT [b,d,N] f32,   h_t = exp(delta_t A) keep_t h_{t-1} + delta_t x_t B_t.

Kernel layout: channels are viewed as [G, cpg] (cpg = d // G channels share one B/C group), so one program
owns `gb` whole groups of one sequence, or `cb` channels of one group when a group exceeds the tile, and keeps
that state in registers for all l steps; each step loads one row of x / delta / B / C and writes one row of
ys. Grid = (b, group blocks, channel blocks), all programs independent.

Backward (custom VJP): the forward kernel also writes the state entering every chunk of 32 steps
(`KernelOptions.bwd_chunk`). `KernelOptions.bwd_impl` picks what runs from there: 'kernel' (`kernel_core_bwd`, the default): one Pallas kernel walks the chunks in
reverse, recomputing each chunk's states from its checkpoint into a per-program scratch and then stepping back
through it; 'chunked' (`checkpointed_vjp`): chunk-parallel plain JAX (a reverse linear scan per chunk, a
reverse scan over chunk boundaries, and the VJP of every chunk's local scan from its checkpoint), sequential
depth ~3 * chunk + l / chunk instead of the 2 * l of the step-by-step `lax.scan` VJP.
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


# ------------------------------------------------------------------------------------------------
# Pallas forward kernel
def _scan_kernel(chunk, delta_ref, x_ref, b_ref, c_ref, keep_ref, a_ref, h0_ref, ys_ref, ht_ref,
                 starts_ref=None):
  """One program: one sequence, gb groups x cb channels. Refs carry the whole time axis (length a multiple
  of `chunk`); with starts_ref the state entering every chunk is written too (the backward's checkpoints)."""
  a = a_ref[...]  # [gb, cb, N]

  def step(t, h):
    dl = delta_ref[t]  # [gb, cb]
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


# State elements per program and warps of both kernels: KernelOptions.fwd_tile / fwd_warps, bwd_tile /
# bwd_warps. Channels of one group are independent in the forward; the backward sums dB / dC over the channel
# blocks of a group outside the kernel.


class _Layout:
  """The kernels' padded layout of one call: channels as [g_p, cpg_p], N as n_p, time as lp = nc * chunk
  (padded steps: delta 0, keep 1, so the state passes through unchanged); programs (b, g_p / gb,
  cpg_p / cb)."""

  def __init__(self, b: int, l: int, d: int, g: int, n: int, chunk: int, tile: int):
    self.b, self.l, self.d, self.g, self.n = b, l, d, g, n
    self.cpg = d // g
    self.cpg_p, self.n_p = common.next_pow2(self.cpg), common.next_pow2(n)
    self.gb, self.cb = common.group_tiling(tile, g, self.cpg_p, self.n_p)
    self.g_p = pl.cdiv(g, self.gb) * self.gb
    self.grid = (b, self.g_p // self.gb, self.cpg_p // self.cb)
    self.chunk, self.nc = chunk, pl.cdiv(l, chunk)
    self.lp = self.nc * chunk

  def chan(self, v):  # [b, l, d] -> [b, lp, g_p, cpg_p]
    v = v.reshape(*v.shape[:-1], self.g, self.cpg)
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, self.cpg_p), -2, self.g_p), 1, self.lp)

  def grp(self, v):  # [b, l, g, n] -> [b, lp, g_p, n_p]
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, self.n_p), -2, self.g_p), 1, self.lp)

  def tile(self, v):  # [..., d, N] -> [..., g_p, cpg_p, n_p] (a free reshape when no padding is needed)
    v = v.reshape(*v.shape[:-2], self.g, self.cpg, self.n)
    return common.pad_axis(common.pad_axis(common.pad_axis(v, -1, self.n_p), -2, self.cpg_p), -3, self.g_p)

  def keep(self, keep):  # [b, l] -> [b, lp, 1, 1]
    return common.pad_axis(keep, 1, self.lp, 1.0).reshape(self.b, self.lp, 1, 1)

  def unchan(self, v):  # [b, lp, g_p, cpg_p] -> [b, l, d]
    return v[:, :self.l, :self.g, :self.cpg].reshape(self.b, self.l, self.d)

  def untile(self, v):  # [..., g_p, cpg_p, n_p] -> [..., d, N]
    return v[..., :self.g, :self.cpg, :self.n].reshape(*v.shape[:-3], self.d, self.n)

  # BlockSpecs over the grid (i = sequence, j = group block, c = channel block)
  def seq(self):
    return pl.BlockSpec((None, self.lp, self.gb, self.cb), lambda i, j, c: (i, 0, j, c))

  def seq_grp(self):
    return pl.BlockSpec((None, self.lp, self.gb, self.n_p), lambda i, j, c: (i, 0, j, 0))

  def seq_keep(self):
    return pl.BlockSpec((None, self.lp, 1, 1), lambda i, j, c: (i, 0, 0, 0))

  def a(self):
    return pl.BlockSpec((self.gb, self.cb, self.n_p), lambda i, j, c: (j, c, 0))

  def state(self):
    return pl.BlockSpec((None, self.gb, self.cb, self.n_p), lambda i, j, c: (i, j, c, 0))

  def steps_state(self, steps):  # [b, steps, g_p, cpg_p, n_p]
    return pl.BlockSpec((None, steps, self.gb, self.cb, self.n_p), lambda i, j, c: (i, 0, j, c, 0))


def kernel_core(delta, x, A, B, C, keep, h0, *, interpret: bool | None = None, chunk: int = 32,
                with_starts: bool = False, options: KernelOptions | None = None):
  """The core above through the Pallas kernel (forward only). with_starts: also return the state entering
  each chunk of `chunk` steps, [b, ceil(l / chunk), d, N] (checkpoints for the backward). options: the
  program tile and warps (fwd_tile, fwd_warps; None: the defaults)."""
  options = resolve(options)
  b, l, d = x.shape
  g, n = B.shape[-2:]
  lay = _Layout(b, l, d, g, n, min(chunk, l) if with_starts else l, options.fwd_tile)
  out_shape = [jax.ShapeDtypeStruct((b, lay.lp, lay.g_p, lay.cpg_p), f32),
               jax.ShapeDtypeStruct((b, lay.g_p, lay.cpg_p, lay.n_p), f32)]
  out_specs = [lay.seq(), lay.state()]
  if with_starts:
    out_shape.append(jax.ShapeDtypeStruct((b, lay.nc, lay.g_p, lay.cpg_p, lay.n_p), f32))
    out_specs.append(lay.steps_state(lay.nc))
  outs = common.call(
      functools.partial(_scan_kernel, lay.chunk),
      out_shape=tuple(out_shape), grid=lay.grid,
      in_specs=[lay.seq(), lay.seq(), lay.seq_grp(), lay.seq_grp(), lay.seq_keep(), lay.a(), lay.state()],
      out_specs=tuple(out_specs), num_warps=options.fwd_warps, interpret=interpret,
  )(lay.chan(delta), lay.chan(x), lay.grp(B), lay.grp(C), lay.keep(keep), lay.tile(A.astype(f32)),
    lay.tile(h0))
  ys, ht = lay.unchan(outs[0]), lay.untile(outs[1])
  if with_starts:
    return ys, ht, lay.untile(outs[2])
  return ys, ht


# ------------------------------------------------------------------------------------------------
# Pallas backward kernel
def _scan_bwd_kernel(chunk, sync, delta_ref, x_ref, b_ref, c_ref, keep_ref, a_ref, gy_ref, starts_ref,
                     ght_ref, ddelta_ref, dx_ref, db_ref, dc_ref, dkeep_ref, da_ref, dh0_ref, hs_ref):
  """One program (the forward's tile): the chunks in reverse. Per chunk, the states are recomputed from the
  forward's checkpoint into hs_ref (a per-program scratch in global memory: the state entering each step),
  then the chunk runs backwards with lam = dL/dh_t:
    gbar = lam + gy_t C_t,  lam <- exp(delta_t A) keep_t gbar,
    dC_t = sum_c gy h_t,  dB_t = sum_c gbar delta x,  dx_t = delta sum_n gbar B,
    ddelta_t = x sum_n gbar B + sum_n A q,  dA += delta q,  dkeep_t = sum r,
  with r = gbar exp(delta_t A) h_{t-1}, q = keep_t r. dB / dC / dkeep are this program's partial sums
  (over its channels); the caller adds the programs'. sync(): a CTA barrier on the GPU (hs_ref is written and
  read by different threads), nothing in interpret mode."""
  a = a_ref[...]  # [gb, cb, N]
  nc = x_ref.shape[0] // chunk

  def step_inputs(t):
    dl = delta_ref[t]  # [gb, cb]
    xt, bt = x_ref[t].astype(f32), b_ref[t].astype(f32)
    return dl, xt, bt, keep_ref[t][:, :, None], jnp.exp(dl[:, :, None] * a)

  def one_chunk(j, carry):
    c = nc - 1 - j

    def recompute(i, h):
      hs_ref[i] = h
      dl, xt, bt, kt, e = step_inputs(c * chunk + i)
      return e * kt * h + (dl * xt)[:, :, None] * bt[:, None, :]  # the forward's step

    jax.lax.fori_loop(0, chunk, recompute, starts_ref[c])
    sync()

    def back(i, carry):
      lam, da = carry
      k = chunk - 1 - i
      t = c * chunk + k
      dl, xt, bt, kt, e = step_inputs(t)
      ct, gy, h_prev = c_ref[t].astype(f32), gy_ref[t], hs_ref[k]
      dlx, decay = dl * xt, e * kt
      h = decay * h_prev + dlx[:, :, None] * bt[:, None, :]
      gbar = lam + gy[:, :, None] * ct[:, None, :]
      s = jnp.sum(gbar * bt[:, None, :], axis=2)  # [gb, cb]
      r = gbar * e * h_prev
      q = r * kt
      dc_ref[t] = jnp.sum(gy[:, :, None] * h, axis=1)  # [gb, N]
      db_ref[t] = jnp.sum(gbar * dlx[:, :, None], axis=1)
      dx_ref[t] = dl * s
      ddelta_ref[t] = xt * s + jnp.sum(q * a, axis=2)
      dkeep_ref[t] = jnp.broadcast_to(jnp.sum(r), (1, 1))
      return decay * gbar, da + dl[:, :, None] * q

    carry = jax.lax.fori_loop(0, chunk, back, carry)
    sync()  # the next chunk's recompute overwrites hs_ref
    return carry

  lam, da = jax.lax.fori_loop(0, nc, one_chunk, (ght_ref[...], jnp.zeros_like(a)))
  dh0_ref[...] = lam
  da_ref[...] = da


def kernel_core_bwd(res, starts, cot, *, chunk: int, interpret: bool | None = None,
                    options: KernelOptions | None = None):
  """VJP of the core by the backward kernel, from the forward's chunk checkpoints `starts` [b, nc, d, N]
  (taken with the same `chunk`). Returns the cotangents of (delta, x, A, B, C, keep, h0). options: the
  program tile and warps (bwd_tile, bwd_warps; None: the defaults)."""
  options = resolve(options)
  delta, x, A, B, C, keep, h0 = res
  gys, g_ht = cot
  b, l, d = x.shape
  g, n = B.shape[-2:]
  lay = _Layout(b, l, d, g, n, chunk, options.bwd_tile)
  interpret = common.interpret_mode() if interpret is None else interpret
  sync = (lambda: None) if interpret else _cta_barrier
  gblocks, cblocks = lay.grid[1:]
  chan_f32 = jax.ShapeDtypeStruct((b, lay.lp, lay.g_p, lay.cpg_p), f32)
  grp_part = jax.ShapeDtypeStruct((b, cblocks, lay.lp, lay.g_p, lay.n_p), f32)  # per channel block
  grp_part_spec = pl.BlockSpec((None, None, lay.lp, lay.gb, lay.n_p), lambda i, j, c: (i, c, 0, j, 0))
  state = jax.ShapeDtypeStruct((b, lay.g_p, lay.cpg_p, lay.n_p), f32)
  outs = common.call(
      functools.partial(_scan_bwd_kernel, chunk, sync),
      out_shape=(chan_f32, chan_f32, grp_part, grp_part,
                 jax.ShapeDtypeStruct((b, lay.lp, gblocks, cblocks), f32), state, state,
                 jax.ShapeDtypeStruct((b, chunk, lay.g_p, lay.cpg_p, lay.n_p), f32)),
      grid=lay.grid,
      in_specs=[lay.seq(), lay.seq(), lay.seq_grp(), lay.seq_grp(), lay.seq_keep(), lay.a(), lay.seq(),
                lay.steps_state(lay.nc), lay.state()],
      out_specs=(lay.seq(), lay.seq(), grp_part_spec, grp_part_spec,
                 pl.BlockSpec((None, lay.lp, 1, 1), lambda i, j, c: (i, 0, j, c)), lay.state(), lay.state(),
                 lay.steps_state(chunk)),
      num_warps=options.bwd_warps, interpret=interpret,
  )(lay.chan(delta), lay.chan(x), lay.grp(B), lay.grp(C), lay.keep(keep), lay.tile(A.astype(f32)),
    lay.chan(gys.astype(f32)), lay.tile(starts), lay.tile(g_ht.astype(f32)))
  ddelta, dx, db, dc, dkeep, da, dh0, _ = outs
  grp_sum = lambda v: jnp.sum(v, axis=1)[:, :l, :g, :n]
  return (lay.unchan(ddelta), lay.unchan(dx).astype(x.dtype), lay.untile(jnp.sum(da, axis=0)),
          grp_sum(db).astype(B.dtype), grp_sum(dc).astype(C.dtype), jnp.sum(dkeep, axis=(2, 3))[:, :l],
          lay.untile(dh0).astype(h0.dtype))


def _cta_barrier():
  from jax.experimental.pallas import triton as plgpu
  plgpu.debug_barrier()  # bar.sync: also orders the CTA's global-memory accesses around it


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
# custom VJP: Pallas forward, the backward kernel or the chunked-JAX backward (KernelOptions.bwd_impl)


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
  b, _, d = x.shape
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


# interpret and options are static (hashable): two options trace two programs, forward and backward alike
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _pallas_core(delta, x, A, B, C, keep, h0, interpret, options):
  return kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, options=options)


def _pallas_core_fwd(delta, x, A, B, C, keep, h0, interpret, options):
  ys, ht, starts = kernel_core(delta, x, A, B, C, keep, h0, interpret=interpret, chunk=options.bwd_chunk,
                               with_starts=True, options=options)
  return (ys, ht), ((delta, x, A, B, C, keep, h0), starts)


def _pallas_core_bwd(interpret, options, res, cot):
  chunk = min(options.bwd_chunk, res[0][1].shape[1])  # as in the forward
  if options.bwd_impl == "kernel":
    return kernel_core_bwd(res[0], res[1], cot, chunk=chunk, interpret=interpret, options=options)
  return checkpointed_vjp(res[0], res[1], cot, chunk)


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
                          interpret: bool | None = None, options: KernelOptions | None = None):
  """`selective_scan_ref` with the Pallas kernel forward and a recompute backward from its chunk checkpoints
  (options: tiles, bwd_impl, bwd_chunk; None: the defaults)."""
  options = resolve(options)
  interp = common.interpret_mode(options.platform) if interpret is None else interpret
  core = lambda *a: _pallas_core(*a, interp, options)
  return _front(core, x, dt, A, B, C, D, dt_bias, z, reset, h0)


def selective_scan_chunked(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *, chunk: int = 32):
  """`selective_scan_ref` as the chunk-parallel plain-JAX scan (any backend, plain AD)."""
  return _front(functools.partial(chunked_core, chunk=chunk), x, dt, A, B, C, D, dt_bias, z, reset, h0)
