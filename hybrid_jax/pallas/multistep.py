"""Multi-step SSM update for speculative verification (SPEC section 4), Pallas kernel + lax.scan reference.

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

from hybrid_jax.model import ssm
from hybrid_jax.pallas import common

Array = jax.Array
f32 = jnp.float32


# ------------------------------------------------------------------------------------------------
# Reference
def multistep_scan_ref(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None):
  """Plain lax.scan reference of `multistep_scan` (same arguments and results)."""
  mamba1 = state.ndim == 3
  kc = cache_x.shape[1]
  # replay: step k applies only while k < n_accept; a skipped step is expressed as a reset-free no-op by
  # keeping the old state (jnp.where), so this is exactly the sequential single-step update.
  def replay(h, k):
    xk, dtk, bk = cache_x[:, k], cache_dt[:, k], cache_B[:, k]
    if mamba1:
      zero_c = jnp.zeros_like(bk)
      _, h_new = ssm.selective_scan_ref(xk[:, None], dtk[:, None], A, bk[:, None], zero_c[:, None], D, dt_bias,
                                        h0=h)
    else:
      _, h_new = ssm.ssd_scan_ref(xk[:, None], dtk[:, None], A, bk[:, None], jnp.zeros_like(bk)[:, None], D,
                                  dt_bias, h0=h)
    on = (k < n_accept).reshape((-1,) + (1,) * (h.ndim - 1))
    return jnp.where(on, h_new, h), None

  ckpt, _ = jax.lax.scan(replay, state.astype(f32), jnp.arange(kc))
  if mamba1:
    y, _ = ssm.selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, h0=ckpt)
  else:
    y, _ = ssm.ssd_scan_ref(x, dt, A, B, C, D, dt_bias, h0=ckpt)
    if z is not None:
      y = (y.astype(f32) * jax.nn.silu(z.astype(f32))).astype(x.dtype)
  return y, ckpt, (x, dt, B)


# ------------------------------------------------------------------------------------------------
# Kernels
# Tiling: (tile, warps) per program, by batch size (tile = Mamba-1 state elements, gb groups x cb channels x N,
# or Mamba-2 rows of P, x N); the first entry whose max_batch >= b applies. Picked on an H200 by the sweeps in
# bench/ (docs/KERNELS.md): at small batch the chain of per-step work (softplus, exp, the reduction over N) is
# computed by every thread, so fewer, fuller threads lose to latency and more threads pay that overhead more
# often; the layouts Triton picks also decide whether a step's B/C need a shuffle. Mamba-2's state is held in
# chunks of N columns: Triton lays a chunk's contiguous columns over the lanes, so a 32-column chunk reduces
# C.h over 8 lanes where the whole row of 64 takes 16 (more shuffles) and a 16-column chunk needs 16 B/C values
# per thread and step (registers). (Cutting a program's tile into parts, the next part's loads in flight while
# a part computes, was slower at every tile tried.) Mamba-1 above batch 16 is a bandwidth regime: (2048, 4)
# reads 65-76% of copy at batch 128-256 where (512, 4) read 58-67%; at batch 12 (1024, 8) beats (512, 4)
# (K = 8 7.7 vs 9.4 us), at 16 it is level or better.
M1_TILES = ((2, 256, 4), (16, 1024, 8), (1 << 30, 2048, 4))  # (max_batch, tile elements, warps)
M2_TILES = ((2, 8, 4, 64), (1 << 30, 32, 4, 32))  # (max_batch, rows of P, warps, columns of N per chunk)
TILE_OVERRIDE = None  # (tile, warps[, Mamba-2 columns per chunk]) for both variants: the bench sweeps set it
ACC_Y = True  # power-of-2 K: gather y in registers and store it once (False: a store per step)
# The per-step scalars with MUFU ex2 and a short series (`common.softplus_fast`, exp2 of delta * A log2 e)
# instead of libdevice exp/log1p: every thread of a program computes them, so they were 17% of the Mamba-2
# and 42% of the Mamba-1 kernel's instructions at batch 8, K = 8 (docs/KERNELS.md). False: libdevice.
FAST_MATH = True
# bfloat16 step inputs -> float32 as integer ops on the bits: Triton's conversion takes two instructions (PRMT,
# SHF) for every other value of a packed pair, this form one for each (a shift or a mask)
BITS_BF16 = True
# a * b + c as explicit FMAs in the compiled kernel (common.fma): XLA's Triton pipeline does not contract them
FMA = True
# softplus_fast's reciprocal of 2 + e as one MUFU op (common.rcp) instead of the guarded approximate division
# (2 + e is in [2, 3]: no operand scaling needed): 6% fewer instructions (Mamba-2 batch 8, K = 8), same error
PTX_RCP = True
# Mamba-2's per-step scalars computed one step per lane and broadcast with warp shuffles (common.lane_id,
# common.shfl); compiled CUDA only (interpret mode runs the per-thread form). Mamba-2 batch 8, K = 8: 1664 ->
# 1304 instructions per warp, 8.07 -> 7.69 us on an H200, same error against the reference (docs/KERNELS.md)
LANE_SCALARS = True


# The new checkpoint is written over the state's buffer (argument 1 -> output 1): every program reads its
# state tile before it writes the same tile, and in a decode loop the old state is dead after the call, so
# XLA needs no copy of the state into the loop's buffer (a profile showed one per call: 1.3 us at batch 1,
# 2.5 us at batch 8 for the Mamba-2 shape, docs/KERNELS.md).
_STATE_IN_PLACE = {1: 1}


def _pick(table, b: int) -> tuple[int, ...]:
  if TILE_OVERRIDE is not None:
    return TILE_OVERRIDE
  return next(entry[1:] for entry in table if b <= entry[0])


def _m1_tiling(b: int, g: int, cpg_p: int, n_p: int) -> tuple[int, int, int]:
  """(gb groups, cb channels, warps) per program; gb > 1 only with whole groups (cb == cpg_p)."""
  tile, warps = _pick(M1_TILES, b)[:2]
  return (*common.group_tiling(tile, g, cpg_p, n_p), warps)


def _m2_tiling(b: int, p: int, n_p: int) -> tuple[int, int, int]:
  """(rows of P, warps, columns of N per chunk) per program."""
  rows, warps, *cols = _pick(M2_TILES, b)
  return max(1, min(rows, common.next_pow2(p))), warps, min(cols[0] if cols else n_p, n_p)


def _verify_body(has_z, n_ref, st_ref, cx_ref, cdt_ref, cb_ref, x_ref, dt_ref, b_ref, c_ref, a_ref, d_ref,
                 bias_ref, rest, *, cols, log_decay, inject, times_c, finish, ptx, scalar_decay=False):
  """Shared body of both variants. All step inputs are loaded before the first store, so the loads are
  issued together (a store in between would keep the compiler from hoisting later loads: the refs may
  alias); the step terms that do not depend on h are computed off the dependent chain h = decay * h + u.
  The state and B/C are held as chunks of N (`cols`, static slices of the last axis): Triton spreads a
  tile's contiguous last axis over the lanes, so narrower chunks put more of a row in each thread and leave
  fewer lanes for the reduction over N. scalar_decay (Mamba-2: one decay per head): the replay as one rank
  update per step. inject(u, b) / times_c(h, c): the two factors of a step's input u B and of C h, which the
  updates take as fused multiply-adds (`ptx`: explicit ones, see common.fma)."""
  z_ref, y_ref, out_ref = rest if has_z else (None, *rest)
  a, bias, dd = a_ref[...], bias_ref[...], d_ref[...]
  mad = functools.partial(common.fma, ptx=ptx and FMA)
  softplus, exp, a_e = common.softplus, jnp.exp, a
  if FAST_MATH:  # exp(dl a) = exp2(dl (a log2 e)): the scaling once per program, not per step
    softplus = functools.partial(common.softplus_fast, ptx=ptx and FMA, ptx_rcp=PTX_RCP)
    exp, a_e = jnp.exp2, a * common.LOG2E
  exp_a = lambda dl: exp(log_decay(dl, a_e))
  chunks = lambda ref, *idx: [ref[(*idx, Ellipsis, sl)] for sl in cols]
  f32s = lambda vs: [_to_f32(v) for v in vs]

  def read_out(hs, cs):  # C h summed over N ([..., 1]); the chunks' products chained as FMAs
    acc = None
    for hc, cc in zip(hs, f32s(cs)):
      hf, cf = times_c(hc, cc)
      acc = hf * cf if acc is None else mad(hf, cf, acc)
    return jnp.sum(acc, axis=-1, keepdims=True)
  n_acc = n_ref[0]
  kc, k_new = cx_ref.shape[0], x_ref.shape[0]
  cached = [(cdt_ref[k], cx_ref[k], chunks(cb_ref, k)) for k in range(kc)]
  new = [(dt_ref[k], _to_f32(x_ref[k]), chunks(b_ref, k), chunks(c_ref, k), z_ref[k] if has_z else None)
         for k in range(k_new)]
  h = chunks(st_ref)
  # (a) replay; steps k >= n_accept get delta = 0, which makes them exactly the identity (exp(0) = 1 and a
  # zero input; no select over the state)
  lanes = scalar_decay and ptx and LANE_SCALARS and 2 <= max(kc, k_new) <= 32  # a warp has 32 lanes
  if lanes:
    # one step's scalars per lane (lane j: step j mod K), then shuffled to every thread: each thread computes
    # one softplus and exp2 per group of steps instead of one per step (layout-free: the source of a shuffle
    # is a hardware lane id, not a position in Triton's layout)
    lane = common.lane_id(bias.shape)
    own_c, own_n = lane % kc, lane % k_new
    dl_lane = jnp.where(own_c < n_acc, softplus(_to_f32(cdt_ref[own_c, 0, 0]) + bias), 0.0)
    dls = [common.shfl(dl_lane, k) for k in range(kc)]
    dln_lane = softplus(_to_f32(dt_ref[own_n, 0, 0]) + bias)
    decn_lane = exp_a(dln_lane)
  else:
    dls = [jnp.where(k < n_acc, softplus(_to_f32(dtk) + bias), 0.0) for k, (dtk, _, _) in enumerate(cached)]
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
      u = coef * _to_f32(xk)
      h = [mad(*inject(u, bc), hc) for hc, bc in zip(h, f32s(bk))]
  else:
    for dl, (_, xk, bk) in zip(dls, cached):
      decay, u = exp_a(dl), dl * _to_f32(xk)
      h = [mad(*inject(u, bc), decay * hc) for hc, bc in zip(h, f32s(bk))]
  for sl, hc in zip(cols, h):
    out_ref[..., sl] = hc
  # (b) the new steps
  ys = []
  for k, (dtk, xk, bk, ck, _) in enumerate(new):
    if lanes:
      dl, decay = common.shfl(dln_lane, k), common.shfl(decn_lane, k)
    else:
      dl = softplus(_to_f32(dtk) + bias)
      decay = exp_a(dl)
    u = dl * xk
    h = [mad(*inject(u, bc), decay * hc) for hc, bc in zip(h, f32s(bk))]
    ys.append(read_out(h, ck))  # [..., 1]
  # Power-of-2 K: C.h of every step goes into one register tile (column k), in the layout the reduction
  # produced: one layout change and one store at the end instead of a shared-memory round trip per step
  if ACC_Y and k_new == common.next_pow2(k_new):
    acc = None
    for k, yk in enumerate(ys):
      col = jax.lax.broadcasted_iota(jnp.int32, (*yk.shape[:-1], k_new), yk.ndim - 1)
      acc = jnp.where(col == k, yk, 0.0 if acc is None else acc)
    z_all = z_ref[...] if has_z else None
    y_ref[...] = _gate(finish(acc), _to_f32(x_ref[...]), z_all, dd, mad).astype(y_ref.dtype)
  else:
    for k, (yk, (_, xk, *_, zk)) in enumerate(zip(ys, new)):
      y_ref[k] = _gate(yk.reshape(xk.shape), xk, zk, dd, mad).astype(y_ref.dtype)


def _to_f32(v):
  """A step input in float32 (exact for bfloat16: its bits are a float32's upper half)."""
  if BITS_BF16 and v.dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, f32)
  return v.astype(f32)


def _gate(y, x, z, dd, mad):
  """(C h) + D x, times silu(z) when given (x f32; z in its input dtype or None)."""
  y = mad(dd, x, y)
  if z is not None:
    z = _to_f32(z)
    y = y * z * jax.nn.sigmoid(z)
  return y


def _m1_kernel(has_z, ptx, *refs):
  """Mamba-1, one program = one sequence x gb groups x cb channels of a group; state [gb, cb, N] in
  registers. Per step: dt, x [gb, cb]; B, C [gb, N]."""
  _verify_body(has_z, *refs[:12], refs[12:],
               cols=(slice(None),), log_decay=lambda dl, a: dl[:, :, None] * a,
               inject=lambda u, b: (u[:, :, None], b[:, None, :]), times_c=lambda h, c: (h, c[:, None, :]),
               finish=lambda acc: jnp.transpose(acc, (2, 0, 1)), ptx=ptx)  # [gb, cb, K] -> [K, gb, cb]


def _m2_kernel(has_z, cols, ptx, *refs):
  """Mamba-2, one program = one sequence x one head x bp rows of P; state [bp, N] in registers, as chunks of
  N (`cols`). Per step: dt [1, 1]; x [bp, 1]; B, C [1, N]; A [1, 1]."""
  _verify_body(has_z, *refs[:12], refs[12:],
               cols=cols, log_decay=lambda dl, a: dl * a, inject=lambda u, b: (u, b),
               times_c=lambda h, c: (h, c),
               finish=lambda acc: jnp.transpose(acc)[:, :, None],  # [bp, K] -> [K, bp, 1]
               ptx=ptx, scalar_decay=True)


def _call_m1(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret):
  b, d, n = state.shape
  kc, k = cache_x.shape[1], x.shape[1]
  g = B.shape[-2]
  cpg = d // g
  cpg_p, n_p = common.next_pow2(cpg), common.next_pow2(n)
  gb, cb, warps = _m1_tiling(b, g, cpg_p, n_p)
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
      lambda *r: _m1_kernel(z is not None, common.ptx_available(interpret), *r),
      out_shape=(jax.ShapeDtypeStruct((b, k, g_p, cpg_p), x.dtype), jax.ShapeDtypeStruct(st.shape, f32)),
      grid=(b, g_p // gb, cpg_p // cb), in_specs=specs, out_specs=(steps(k), st_spec),
      num_warps=warps, interpret=interpret, input_output_aliases=_STATE_IN_PLACE,
  )(*args)
  return y[:, :, :g, :cpg].reshape(b, k, d), ck[:, :g, :cpg, :n].reshape(b, d, n)


def _call_m2(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret):
  b, nh, p, n = state.shape
  kc, k = cache_x.shape[1], x.shape[1]
  hpg = nh // B.shape[-2]
  n_p = common.next_pow2(n)
  bp, warps, width = _m2_tiling(b, p, n_p)
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
      lambda *r: _m2_kernel(z is not None, cols, common.ptx_available(interpret), *r),
      out_shape=(jax.ShapeDtypeStruct((b, k, nh, p_p, 1), x.dtype), jax.ShapeDtypeStruct(st.shape, f32)),
      grid=(b, nh, p_p // bp), in_specs=specs, out_specs=(row_spec(k), st_spec),
      num_warps=warps, interpret=interpret, input_output_aliases=_STATE_IN_PLACE,
  )(*args)
  return y[:, :, :, :p, 0], ck[:, :, :p, :n]


def multistep_scan(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None, *,
                   impl: str = "auto", interpret: bool | None = None):
  """Speculative-verification update (see the module docstring for shapes). impl: 'auto' (the kernel on
  GPU, the reference elsewhere), 'pallas' (the kernel; interpret mode on CPU) or 'reference'."""
  if impl == "reference" or (impl == "auto" and jax.default_backend() != "gpu"):
    return multistep_scan_ref(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z)
  if impl not in ("auto", "pallas"):
    raise ValueError(f"multistep_scan impl must be auto|reference|pallas, got {impl!r}")
  call = _call_m1 if state.ndim == 3 else _call_m2
  y, ckpt = call(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z, interpret)
  return y, ckpt, (x, dt, B)
