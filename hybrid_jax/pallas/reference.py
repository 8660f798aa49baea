"""The plain `lax.scan` references of the SSM scans: what every kernel in this package is tested against.

Sequential, fp32 state. Shapes: b batch, l steps, d channels (Mamba-1), H heads of P channels (Mamba-2),
N state size, G groups of B/C. `reset` [b, l] bool marks steps whose previous state is dropped (the first
token of a packed document). `multistep_scan_ref` is the reference of the speculative-verification update
(`hybrid_jax.pallas.multistep`, whose docstring has its shapes).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
f32 = jnp.float32


def _scan_steps(step: Callable, h: Array, xs: tuple) -> tuple[Array, Array]:
  """lax.scan over the leading (time) axis of xs; one step (every cached decode step) is a plain call: even a
  fully unrolled scan lowers to a while loop of one trip, left to the compiler to remove."""
  if xs[0].shape[0] == 1:
    h, y = step(h, tuple(v[0] for v in xs))
    return h, y[None]
  return jax.lax.scan(step, h, xs)


# ------------------------------------------------------------------------------------------------
# Mamba-1
def selective_scan_ref(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array, dt_bias: Array,
                       z: Array | None = None, reset: Array | None = None,
                       h0: Array | None = None) -> tuple[Array, Array]:
  """Mamba-1 selective scan (mamba_ssm's selective_scan_fn with delta_softplus=True).

  x, dt, z [b, l, d]; A [d, N]; B, C [b, l, G, N] (channel c uses group c // (d // G)); D, dt_bias [d];
  reset [b, l] bool; h0 [b, d, N]. Returns y [b, l, d] (x.dtype) and the final state [b, d, N] (fp32).
    delta = softplus(dt + dt_bias); h_t = exp(delta A) h_{t-1} + delta B_t x_t; y_t = C_t h_t + D x_t;
    y_t *= silu(z_t).
  """
  b, l, d = x.shape
  g, n = B.shape[-2:]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
  Bc = jnp.repeat(B.astype(f32), d // g, axis=2)  # [b, l, d, N]
  Cc = jnp.repeat(C.astype(f32), d // g, axis=2)
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h = jnp.zeros((b, d, n), f32) if h0 is None else h0.astype(f32)

  def step(h, inp):
    delta_t, x_t, B_t, C_t, keep_t = inp
    dA = jnp.exp(delta_t[..., None] * A.astype(f32)) * keep_t[:, None, None]
    h = dA * h + (delta_t * x_t)[..., None] * B_t
    return h, jnp.sum(h * C_t, axis=-1)  # multiply + reduce: exact fp32 on every backend (no TF32 dot)

  xs = (delta.swapaxes(0, 1), x.astype(f32).swapaxes(0, 1), Bc.swapaxes(0, 1), Cc.swapaxes(0, 1),
        keep.swapaxes(0, 1))
  h, ys = _scan_steps(step, h, xs)
  y = ys.swapaxes(0, 1) + x.astype(f32) * D.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return y.astype(x.dtype), h


# ------------------------------------------------------------------------------------------------
# Mamba-2
def ssd_scan_ref(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array, dt_bias: Array,
                 reset: Array | None = None, h0: Array | None = None) -> tuple[Array, Array]:
  """Mamba-2 SSD recurrence with a scalar decay per head and step.

  x [b, l, H, P]; dt [b, l, H]; A, D, dt_bias [H]; B, C [b, l, G, N] (head h uses group h // (H // G));
  reset [b, l]; h0 [b, H, P, N]. Returns y [b, l, H, P] (x.dtype) and the final state [b, H, P, N] (fp32).
    delta = softplus(dt + dt_bias); h_t = exp(delta A) h_{t-1} + delta x_t (outer) B_t; y_t = h_t C_t + D x_t.
  """
  b, l, nh, p = x.shape
  g, n = B.shape[-2:]
  delta = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))  # [b, l, H]
  Bh = jnp.repeat(B.astype(f32), nh // g, axis=2)  # [b, l, H, N]
  Ch = jnp.repeat(C.astype(f32), nh // g, axis=2)
  keep = jnp.ones((b, l), f32) if reset is None else 1.0 - reset.astype(f32)
  h = jnp.zeros((b, nh, p, n), f32) if h0 is None else h0.astype(f32)

  def step(h, inp):
    delta_t, x_t, B_t, C_t, keep_t = inp
    a = jnp.exp(delta_t * A.astype(f32)) * keep_t[:, None]  # [b, H]
    h = a[..., None, None] * h + (delta_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
    return h, jnp.sum(h * C_t[:, :, None, :], axis=-1)

  xs = (delta.swapaxes(0, 1), x.astype(f32).swapaxes(0, 1), Bh.swapaxes(0, 1), Ch.swapaxes(0, 1),
        keep.swapaxes(0, 1))
  h, ys = _scan_steps(step, h, xs)
  y = ys.swapaxes(0, 1) + x.astype(f32) * D.astype(f32)[:, None]
  return y.astype(x.dtype), h


# ------------------------------------------------------------------------------------------------
# Multistep verification
def multistep_scan_ref(state, cache_x, cache_dt, cache_B, n_accept, x, dt, B, C, A, D, dt_bias, z=None):
  """Plain lax.scan reference of `multistep_scan` (same arguments and results): the sequential single-step
  updates."""
  mamba1 = state.ndim == 3
  kc = cache_x.shape[1]
  # replay: step k applies only while k < n_accept; a skipped step is expressed as a reset-free no-op by
  # keeping the old state (jnp.where), so this is exactly the sequential single-step update.
  def replay(h, k):
    xk, dtk, bk = cache_x[:, k], cache_dt[:, k], cache_B[:, k]
    if mamba1:
      zero_c = jnp.zeros_like(bk)
      _, h_new = selective_scan_ref(xk[:, None], dtk[:, None], A, bk[:, None], zero_c[:, None], D, dt_bias,
                                    h0=h)
    else:
      _, h_new = ssd_scan_ref(xk[:, None], dtk[:, None], A, bk[:, None], jnp.zeros_like(bk)[:, None], D,
                              dt_bias, h0=h)
    on = (k < n_accept).reshape((-1,) + (1,) * (h.ndim - 1))
    return jnp.where(on, h_new, h), None

  ckpt, _ = jax.lax.scan(replay, state.astype(f32), jnp.arange(kc))
  if mamba1:
    y, _ = selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, h0=ckpt)
  else:
    y, _ = ssd_scan_ref(x, dt, A, B, C, D, dt_bias, h0=ckpt)
    if z is not None:
      y = (y.astype(f32) * jax.nn.silu(z.astype(f32))).astype(x.dtype)
  return y, ckpt, (x, dt, B)
