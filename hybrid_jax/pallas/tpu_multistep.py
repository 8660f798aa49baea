"""Multi-step SSM update for speculative verification as a TPU (Mosaic) Pallas kernel.

Same arguments and results as `multistep.multistep_scan_ref` (see `multistep.py` for the shapes): replay
the first n_accept[b] of the K_c cached steps from the checkpointed state (the new checkpoint), then run the
K new steps and return their y; the new steps' (x, dt, B) are the next call's cache.

One program owns one sequence and `lanes` channels of the layout of `tpu_scan` (state transposed,
[N_p, lanes], channels on lanes; Mamba-2 channel = (head, row of P)) and keeps that state on chip for the
whole call: the state is read once and the checkpoint written once (over the state's buffer). Grid (b, channel
blocks), both parallel; n_accept is a scalar-prefetch operand (SMEM). All K_c + K steps are unrolled: the
cached and the new steps' B / C are expanded to the lanes by one matmul each (`tpu_scan.expand_groups`), a
replayed step k >= n_accept gets delta = 0 (exactly the identity: decay exp(0) = 1, no input), and each new
step stores its row of y = (C h + D x) silu(z). The step inputs are small ([b, K, d]): XLA pads them (and
converts them to float32) on the way in; the state's transposes in and out are XLA ops too (a [b, d, N] state
with N = 16 on the lanes would leave 7 of 8 lanes idle).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrid_jax.pallas import common
from hybrid_jax.pallas.tpu_scan import ChannelLayout, check_lanes, expand_groups, resolve_interpret, tpu_call

Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TpuVerifyOptions:
  """Block sizes of the TPU verification kernel."""
  lane_block: int = 0  # channels per program (a power of two >= 128); 0: the most within state_tile
  state_tile: int = 8192  # state elements per program when lane_block is 0 (8 vregs of float32)
  block_shift: int = 0  # tests only: the step inputs are read from the sequence this many later (wrong)

  def __post_init__(self):
    check_lanes("TpuVerifyOptions", self.lane_block, self.state_tile)


def _verify_kernel(n_p, has_z, n_ref, st_ref, cdt_ref, cx_ref, cb_ref, dt_ref, x_ref, b_ref, c_ref, a_ref,
                   d_ref, bias_ref, e_ref, *rest):
  """One program: one sequence, `lanes` channels. State [N_p, lanes]; step rows [K_c or K, lanes] (dt, x, z);
  B / C [steps * N_p, gb]; a [N_p or 1, lanes]; D, dt_bias [1, lanes]."""
  z_ref, y_ref, ck_ref = rest if has_z else (None, *rest)
  n_acc = n_ref[pl.program_id(0)]
  a, dd, bias, e = a_ref[...], d_ref[...], bias_ref[...], e_ref[...]
  kc, k = cdt_ref.shape[0], dt_ref.shape[0]

  def step(h, dl, xk, bk):  # dl, xk [1, lanes]; bk [N_p, lanes]
    return jnp.exp(dl * a) * h + (dl * xk) * bk

  # (a) replay the accepted cached steps
  bs = expand_groups(cb_ref[...], e)  # [K_c * N_p, lanes]
  h = st_ref[...]
  for s in range(kc):
    on = jnp.where(s < n_acc, 1.0, 0.0)
    dl = on * common.softplus(cdt_ref[pl.ds(s, 1), :] + bias)
    h = step(h, dl, cx_ref[pl.ds(s, 1), :], bs[s * n_p:(s + 1) * n_p])
  ck_ref[...] = h
  # (b) the new steps: y = (C h + D x) silu(z), one row per step
  bs, cs = expand_groups(b_ref[...], e), expand_groups(c_ref[...], e)  # [K * N_p, lanes]
  for s in range(k):
    xk = x_ref[pl.ds(s, 1), :]
    h = step(h, common.softplus(dt_ref[pl.ds(s, 1), :] + bias), xk, bs[s * n_p:(s + 1) * n_p])
    y = jnp.sum(h * cs[s * n_p:(s + 1) * n_p], axis=0, keepdims=True) + dd * xk
    if has_z:
      zk = z_ref[pl.ds(s, 1), :]
      y = y * (zk * jax.nn.sigmoid(zk))
    y_ref[pl.ds(s, 1), :] = y


def multistep_scan_tpu(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None, *,
                       interpret: bool | None = None, options: TpuVerifyOptions | None = None):
  """`multistep_scan_ref` (same arguments and results) through the TPU kernel."""
  options = options or TpuVerifyOptions()
  interpret = resolve_interpret(interpret)
  mamba1 = state.ndim == 3
  if mamba1:
    b, d, n = state.shape
    per_channel = lambda v: v
    flat = lambda v: v
  else:
    b, nh, p, n = state.shape
    d = nh * p
    per_channel = lambda v: jnp.repeat(v, p, axis=-1)  # a per-head value for each of its P channels
    flat = lambda v: v.reshape(*v.shape[:-2], d)
  kc, k = cache_x.shape[1], x.shape[1]
  lay = ChannelLayout(d, B.shape[-2], n, options.lane_block, options.state_tile)
  lanes, n_p = lay.lanes, lay.n_p
  rows = lambda v: lay.chan(v.astype(f32))
  a = lay.state(A.astype(f32)) if mamba1 else lay.chan(per_channel(A.astype(f32)))[None]
  st = lay.state(state.astype(f32).reshape(b, d, n))

  shift = options.block_shift
  seq = (lambda i: (i + shift) % b) if shift else (lambda i: i)
  steps = lambda kk: pl.BlockSpec((None, kk, lanes), lambda i, j, nr: (seq(i), 0, j))
  grp = lambda kk: pl.BlockSpec((None, None, kk * n_p, lay.gb),
                                 lambda i, j, nr: (seq(i), lay.group_block(j), 0, 0))
  chans = pl.BlockSpec((1, lanes), lambda i, j, nr: (0, j))
  st_spec = pl.BlockSpec((None, n_p, lanes), lambda i, j, nr: (i, 0, j))
  y_spec = pl.BlockSpec((None, k, lanes), lambda i, j, nr: (i, 0, j))
  args = [n_accept.astype(jnp.int32), st, rows(per_channel(cache_dt)), rows(flat(cache_x)),
          lay.groups(cache_B, kc, f32), rows(per_channel(dt)), rows(flat(x)), lay.groups(B, k, f32),
          lay.groups(C, k, f32), a, rows(per_channel(D))[None], rows(per_channel(dt_bias))[None],
          lay.expander(f32)]
  specs = [st_spec, steps(kc), steps(kc), grp(kc), steps(k), steps(k), grp(k), grp(k),
           pl.BlockSpec((a.shape[0], lanes), lambda i, j, nr: (0, j)), chans, chans,
           pl.BlockSpec((lay.gb, lanes), lambda i, j, nr: (0, 0))]
  if z is not None:
    args.append(rows(flat(z)))
    specs.append(steps(k))
  y, ck = tpu_call(
      functools.partial(_verify_kernel, n_p, z is not None),
      interpret=interpret, semantics=(pltpu.PARALLEL, pltpu.PARALLEL),
      out_shape=(jax.ShapeDtypeStruct((b, k, lay.d_p), f32), jax.ShapeDtypeStruct(st.shape, f32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(b, lay.blocks), in_specs=specs,
                                             out_specs=(y_spec, st_spec)),
      input_output_aliases={1: 1},  # the checkpoint over the (transposed) state: read before written
  )(*args)
  y, ck = lay.unchan(y).astype(x.dtype), lay.unstate(ck)
  if not mamba1:
    y, ck = y.reshape(b, k, nh, p), ck.reshape(b, nh, p, n)
  return y, ck, (x, dt, B)
