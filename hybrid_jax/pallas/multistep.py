"""Multi-step SSM update for speculative verification: the Pallas kernel (its lax.scan reference is
`reference.multistep_scan_ref`, the dispatcher `ops.multistep_scan`).

The state is kept only at the last *verified* position (the checkpoint), together with the raw scan inputs
(x, dt, B) of the K_c steps that the previous verification call ran. One call

  (a) replays the first n_accept[b] cached steps from the checkpoint -> the new checkpoint (written back),
  (b) runs the K new steps from there, producing y for each of them (their states are not kept),
  (c) returns the new steps' (x, dt, B) as the next call's cache (they are the inputs themselves: no copy).

In the kernel the state stays in registers for the whole call: HBM traffic is one read and one write of the
state plus the (small) step inputs, so the cost is nearly flat in K.

Shapes (K_c >= 1 cached steps; pass zeros with n_accept = 0 when there is nothing to replay):
  Mamba-1 (state.ndim == 3): state [b, d, N] f32; cache_x, cache_dt [b, K_c, d]; cache_B [b, K_c, G, N];
      x, dt, z [b, K, d]; B, C [b, K, G, N]; A [d, N]; D, dt_bias [d]; y [b, K, d].
  Mamba-2 (state.ndim == 4): state [b, H, P, N] f32; cache_x [b, K_c, H, P]; cache_dt [b, K_c, H];
      cache_B [b, K_c, G, N]; x, z [b, K, H, P]; dt [b, K, H]; B, C [b, K, G, N]; A, D, dt_bias [H];
      y [b, K, H, P].
  n_accept [b] int, 0 <= n_accept <= K_c. delta = softplus(dt + dt_bias) as in the scans; y = (C h + D x) *
  silu(z) (z optional; for Mamba-2 pass z=None and apply the gated RMSNorm outside).
Returns (y [x.dtype], new checkpoint [f32], (x, dt, B)).
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


# The tiling tables and the kernel's switches are fields of `KernelOptions` (m1_tiles, m2_tiles,
# tile_override, acc_y, fast_math, bits_bf16, fma, ptx_rcp, lane_scalars), with their measurements.

# The new checkpoint is written over the state's buffer (argument 1 -> output 1): every program reads its
# state tile before it writes the same tile, and in a decode loop the old state is dead after the call, so
# XLA needs no copy of the state into the loop's buffer (a profile showed one per call: 1.3 us at batch 1,
# 2.5 us at batch 8 for the Mamba-2 shape, docs/KERNELS.md).
_STATE_IN_PLACE = {1: 1}


def _pick(table, b: int, override: tuple[int, ...] | None) -> tuple[int, ...]:
  if override is not None:
    return override
  return next(entry[1:] for entry in table if b <= entry[0])


def _m1_tiling(b: int, g: int, cpg_p: int, n_p: int, options: KernelOptions) -> tuple[int, int, int]:
  """(gb groups, cb channels, warps) per program; gb > 1 only with whole groups (cb == cpg_p)."""
  tile, warps = _pick(options.m1_tiles, b, options.tile_override)[:2]
  return (*common.group_tiling(tile, g, cpg_p, n_p), warps)


def _m2_tiling(b: int, p: int, n_p: int, options: KernelOptions) -> tuple[int, int, int]:
  """(rows of P, warps, columns of N per chunk) per program."""
  rows, warps, *cols = _pick(options.m2_tiles, b, options.tile_override)
  return max(1, min(rows, common.next_pow2(p))), warps, min(cols[0] if cols else n_p, n_p)


def _verify_body(has_z, n_ref, st_ref, cx_ref, cdt_ref, cb_ref, x_ref, dt_ref, b_ref, c_ref, a_ref, d_ref,
                 bias_ref, rest, *, cols, log_decay, inject, times_c, finish, ptx, options,
                 scalar_decay=False):
  """Shared body of both variants. All step inputs are loaded before the first store, so the loads are
  issued together (a store in between would keep the compiler from hoisting later loads: the refs may
  alias); the step terms that do not depend on h are computed off the dependent chain h = decay * h + u.
  The state and B/C are held as chunks of N (`cols`, static slices of the last axis): Triton spreads a
  tile's contiguous last axis over the lanes, so narrower chunks put more of a row in each thread and leave
  fewer lanes for the reduction over N. scalar_decay (Mamba-2: one decay per head): the replay as one rank
  update per step. inject(u, b) / times_c(h, c): the two factors of a step's input u B and of C h, which the
  updates take as fused multiply-adds (`ptx`: explicit ones, see common.fma). options: the switches."""
  z_ref, y_ref, out_ref = rest if has_z else (None, *rest)
  a, bias, dd = a_ref[...], bias_ref[...], d_ref[...]
  mad = functools.partial(common.fma, ptx=ptx and options.fma)
  to_f32 = functools.partial(_to_f32, bits=options.bits_bf16)
  softplus, exp, a_e = common.softplus, jnp.exp, a
  if options.fast_math:  # exp(dl a) = exp2(dl (a log2 e)): the scaling once per program, not per step
    softplus = functools.partial(common.softplus_fast, ptx=ptx and options.fma, ptx_rcp=options.ptx_rcp)
    exp, a_e = jnp.exp2, a * common.LOG2E
  exp_a = lambda dl: exp(log_decay(dl, a_e))
  chunks = lambda ref, *idx: [ref[(*idx, Ellipsis, sl)] for sl in cols]
  f32s = lambda vs: [to_f32(v) for v in vs]

  def read_out(hs, cs):  # C h summed over N ([..., 1]); the chunks' products chained as FMAs
    acc = None
    for hc, cc in zip(hs, f32s(cs)):
      hf, cf = times_c(hc, cc)
      acc = hf * cf if acc is None else mad(hf, cf, acc)
    return jnp.sum(acc, axis=-1, keepdims=True)
  n_acc = n_ref[0]
  kc, k_new = cx_ref.shape[0], x_ref.shape[0]
  cached = [(cdt_ref[k], cx_ref[k], chunks(cb_ref, k)) for k in range(kc)]
  new = [(dt_ref[k], to_f32(x_ref[k]), chunks(b_ref, k), chunks(c_ref, k), z_ref[k] if has_z else None)
         for k in range(k_new)]
  h = chunks(st_ref)
  # (a) replay; steps k >= n_accept get delta = 0, which makes them exactly the identity (exp(0) = 1 and a
  # zero input; no select over the state)
  lanes = scalar_decay and ptx and options.lane_scalars and 2 <= max(kc, k_new) <= 32  # a warp has 32 lanes
  if lanes:
    # one step's scalars per lane (lane j: step j mod K), then shuffled to every thread: each thread computes
    # one softplus and exp2 per group of steps instead of one per step (layout-free: the source of a shuffle
    # is a hardware lane id, not a position in Triton's layout)
    lane = common.lane_id(bias.shape)
    own_c, own_n = lane % kc, lane % k_new
    dl_lane = jnp.where(own_c < n_acc, softplus(to_f32(cdt_ref[own_c, 0, 0]) + bias), 0.0)
    dls = [common.shfl(dl_lane, k) for k in range(kc)]
    dln_lane = softplus(to_f32(dt_ref[own_n, 0, 0]) + bias)
    decn_lane = exp_a(dln_lane)
  else:
    dls = [jnp.where(k < n_acc, softplus(to_f32(dtk) + bias), 0.0) for k, (dtk, _, _) in enumerate(cached)]
  if scalar_decay:
    # h' = exp(sum_k dl_k A) h + sum_k dl_k exp(sum_{i>k} dl_i A) x_k B_k, the sequential update unrolled:
    # one FMA per state element and step instead of a multiply and an FMA
    later = jnp.zeros_like(dls[0])  # the summed deltas of the later steps
    if lanes:  # lane k computes step k's coefficient
      later_lane = jnp.zeros_like(dl_lane)
      for k in reversed(range(kc)):
        later_lane = jnp.where(own_c == k, later, later_lane)
        later = later + dls[k]
      coef_lane = dl_lane * exp_a(later_lane)
      coefs = [common.shfl(coef_lane, k) for k in range(kc)]
    else:
      coefs = [None] * kc
      for k in reversed(range(kc)):
        coefs[k] = dls[k] if k == kc - 1 else dls[k] * exp_a(later)
        later = later + dls[k]
    decay = exp_a(later)
    h = [decay * hc for hc in h]
    for coef, (_, xk, bk) in zip(coefs, cached):
      u = coef * to_f32(xk)
      h = [mad(*inject(u, bc), hc) for hc, bc in zip(h, f32s(bk))]
  else:
    for dl, (_, xk, bk) in zip(dls, cached):
      decay, u = exp_a(dl), dl * to_f32(xk)
      h = [mad(*inject(u, bc), decay * hc) for hc, bc in zip(h, f32s(bk))]
  for sl, hc in zip(cols, h):
    out_ref[..., sl] = hc
  # (b) the new steps
  ys = []
  for k, (dtk, xk, bk, ck, _) in enumerate(new):
    if lanes:
      dl, decay = common.shfl(dln_lane, k), common.shfl(decn_lane, k)
    else:
      dl = softplus(to_f32(dtk) + bias)
      decay = exp_a(dl)
    u = dl * xk
    h = [mad(*inject(u, bc), decay * hc) for hc, bc in zip(h, f32s(bk))]
    ys.append(read_out(h, ck))  # [..., 1]
  # Power-of-2 K: C.h of every step goes into one register tile (column k), in the layout the reduction
  # produced: one layout change and one store at the end instead of a shared-memory round trip per step
  if options.acc_y and k_new == common.next_pow2(k_new):
    acc = None
    for k, yk in enumerate(ys):
      col = jax.lax.broadcasted_iota(jnp.int32, (*yk.shape[:-1], k_new), yk.ndim - 1)
      acc = jnp.where(col == k, yk, 0.0 if acc is None else acc)
    z_all = z_ref[...] if has_z else None
    y_ref[...] = _gate(finish(acc), to_f32(x_ref[...]), z_all, dd, mad, to_f32).astype(y_ref.dtype)
  else:
    for k, (yk, (_, xk, *_, zk)) in enumerate(zip(ys, new)):
      y_ref[k] = _gate(yk.reshape(xk.shape), xk, zk, dd, mad, to_f32).astype(y_ref.dtype)


def _to_f32(v, bits: bool = True):
  """A step input in float32 (exact for bfloat16: its bits are a float32's upper half). bits: a bfloat16
  converted by integer ops on its bits (`KernelOptions.bits_bf16`), else by a plain conversion."""
  if bits and v.dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, f32)
  return v.astype(f32)


def _gate(y, x, z, dd, mad, to_f32):
  """(C h) + D x, times silu(z) when given (x f32; z in its input dtype or None)."""
  y = mad(dd, x, y)
  if z is not None:
    z = to_f32(z)
    y = y * z * jax.nn.sigmoid(z)
  return y


def _m1_kernel(has_z, ptx, options, *refs):
  """Mamba-1, one program = one sequence x gb groups x cb channels of a group; state [gb, cb, N] in
  registers. Per step: dt, x [gb, cb]; B, C [gb, N]."""
  _verify_body(has_z, *refs[:12], refs[12:],
               cols=(slice(None),), log_decay=lambda dl, a: dl[:, :, None] * a,
               inject=lambda u, b: (u[:, :, None], b[:, None, :]), times_c=lambda h, c: (h, c[:, None, :]),
               finish=lambda acc: jnp.transpose(acc, (2, 0, 1)), ptx=ptx,  # [gb, cb, K] -> [K, gb, cb]
               options=options)


def _m2_kernel(has_z, cols, ptx, options, *refs):
  """Mamba-2, one program = one sequence x one head x bp rows of P; state [bp, N] in registers, as chunks of
  N (`cols`). Per step: dt [1, 1]; x [bp, 1]; B, C [1, N]; A [1, 1]."""
  _verify_body(has_z, *refs[:12], refs[12:],
               cols=cols, log_decay=lambda dl, a: dl * a, inject=lambda u, b: (u, b),
               times_c=lambda h, c: (h, c),
               finish=lambda acc: jnp.transpose(acc)[:, :, None],  # [bp, K] -> [K, bp, 1]
               ptx=ptx, options=options, scalar_decay=True)


def _call_m1(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret, options):
  b, d, n = state.shape
  kc, k = cache_x.shape[1], x.shape[1]
  g = B.shape[-2]
  cpg = d // g
  cpg_p, n_p = common.next_pow2(cpg), common.next_pow2(n)
  gb, cb, warps = _m1_tiling(b, g, cpg_p, n_p, options)
  g_p = pl.cdiv(g, gb) * gb

  def chan(v):  # [..., d] -> [..., g_p, cpg_p]
    v = v.reshape(*v.shape[:-1], g, cpg)
    return common.pad_axis(common.pad_axis(v, -1, cpg_p), -2, g_p)

  def grp(v):
    return common.pad_axis(common.pad_axis(v, -1, n_p), -2, g_p)

  # [b, d, N] -> [b, G, cpg, N] is a free reshape (channels are contiguous within a group)
  st = common.pad_axis(common.pad_axis(common.pad_axis(state.astype(f32).reshape(b, g, cpg, n), -1, n_p), -2,
                                       cpg_p), -3, g_p)
  a = common.pad_axis(common.pad_axis(common.pad_axis(A.astype(f32).reshape(g, cpg, n), -1, n_p), -2, cpg_p),
                      -3, g_p)
  # grid (sequence, group block, channel block)
  steps = lambda kk: pl.BlockSpec((None, kk, gb, cb), lambda i, j, c: (i, 0, j, c))
  gsteps = lambda kk: pl.BlockSpec((None, kk, gb, n_p), lambda i, j, c: (i, 0, j, 0))
  chans = pl.BlockSpec((gb, cb), lambda i, j, c: (j, c))
  st_spec = pl.BlockSpec((None, gb, cb, n_p), lambda i, j, c: (i, j, c, 0))
  args = [n_accept.astype(jnp.int32), st, chan(cache_x), chan(cache_dt), grp(cache_B), chan(x), chan(dt), grp(B),
          grp(C), a, chan(D.astype(f32)), chan(dt_bias.astype(f32))]
  specs = [pl.BlockSpec((1,), lambda i, j, c: (i,)), st_spec, steps(kc), steps(kc), gsteps(kc), steps(k),
           steps(k), gsteps(k), gsteps(k), pl.BlockSpec((gb, cb, n_p), lambda i, j, c: (j, c, 0)), chans,
           chans]
  if z is not None:
    args.append(chan(z))
    specs.append(steps(k))
  y, ck = common.call(
      lambda *r: _m1_kernel(z is not None, common.ptx_available(interpret), options, *r),
      out_shape=(jax.ShapeDtypeStruct((b, k, g_p, cpg_p), x.dtype), jax.ShapeDtypeStruct(st.shape, f32)),
      grid=(b, g_p // gb, cpg_p // cb), in_specs=specs, out_specs=(steps(k), st_spec),
      num_warps=warps, interpret=interpret, input_output_aliases=_STATE_IN_PLACE,
  )(*args)
  return y[:, :, :g, :cpg].reshape(b, k, d), ck[:, :g, :cpg, :n].reshape(b, d, n)


def _call_m2(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret, options):
  b, nh, p, n = state.shape
  kc, k = cache_x.shape[1], x.shape[1]
  hpg = nh // B.shape[-2]
  n_p = common.next_pow2(n)
  bp, warps, width = _m2_tiling(b, p, n_p, options)
  cols = tuple(slice(j, j + width) for j in range(0, n_p, width))
  p_p = pl.cdiv(p, bp) * bp
  rows = lambda v: common.pad_axis(v, -1, p_p)[..., None]  # [b, k, H, P_p, 1]
  grp = lambda v: common.pad_axis(v, -1, n_p)[:, :, :, None, :]  # [b, k, G, 1, N_p]
  st = common.pad_axis(common.pad_axis(state.astype(f32), -1, n_p), -2, p_p)
  row_spec = lambda kk: pl.BlockSpec((None, kk, None, bp, 1), lambda i, hh, j: (i, 0, hh, j, 0))
  scal_spec = lambda kk: pl.BlockSpec((None, kk, None, 1, 1), lambda i, hh, j: (i, 0, hh, 0, 0))
  grp_spec = lambda kk: pl.BlockSpec((None, kk, None, 1, n_p), lambda i, hh, j: (i, 0, hh // hpg, 0, 0))
  head = pl.BlockSpec((None, 1, 1), lambda i, hh, j: (hh, 0, 0))
  st_spec = pl.BlockSpec((None, None, bp, n_p), lambda i, hh, j: (i, hh, j, 0))
  per_head = lambda v: v.astype(f32).reshape(nh, 1, 1)
  args = [n_accept.astype(jnp.int32), st, rows(cache_x), cache_dt[..., None, None], grp(cache_B), rows(x),
          dt[..., None, None], grp(B), grp(C), per_head(A), per_head(D), per_head(dt_bias)]
  specs = [pl.BlockSpec((1,), lambda i, hh, j: (i,)), st_spec, row_spec(kc), scal_spec(kc), grp_spec(kc),
           row_spec(k), scal_spec(k), grp_spec(k), grp_spec(k), head, head, head]
  if z is not None:
    args.append(rows(z))
    specs.append(row_spec(k))
  y, ck = common.call(
      lambda *r: _m2_kernel(z is not None, cols, common.ptx_available(interpret), options, *r),
      out_shape=(jax.ShapeDtypeStruct((b, k, nh, p_p, 1), x.dtype), jax.ShapeDtypeStruct(st.shape, f32)),
      grid=(b, nh, p_p // bp), in_specs=specs, out_specs=(row_spec(k), st_spec),
      num_warps=warps, interpret=interpret, input_output_aliases=_STATE_IN_PLACE,
  )(*args)
  return y[:, :, :, :p, 0], ck[:, :, :p, :n]


def multistep_scan_pallas(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None, *,
                          interpret: bool | None = None, options: KernelOptions | None = None):
  """The speculative-verification update by the Pallas kernel (interpret mode on CPU; see the module docstring
  for shapes). options: tiling and switches (None: the defaults)."""
  options = resolve(options)
  interpret = common.interpret_mode(options.platform) if interpret is None else interpret
  call = _call_m1 if state.ndim == 3 else _call_m2
  y, ckpt = call(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret,
                 options)
  return y, ckpt, (x, dt, B)
