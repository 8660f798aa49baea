"""The selective-scan functions the Mamba mixers call, with their plain `lax.scan` references.

Each variant has one public function (`selective_scan` for Mamba-1, `ssd_scan` for Mamba-2) whose reference is
sequential, fp32-state `lax.scan`; `hybrid_jax.pallas` registers faster implementations behind the same
signature and `impl` picks one ('auto': a kernel on GPU/TPU when registered, the reference elsewhere).

Shapes: b batch, l steps, d channels (Mamba-1), H heads of P channels (Mamba-2), N state size, G groups of B/C.
`reset` [b, l] bool marks steps whose previous state is dropped (the first token of a packed document).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# name -> {variant: fn}; filled by hybrid_jax.pallas (and other backends) at import time.
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(impl: str, variant: str, fn: Callable) -> None:
  _IMPLS.setdefault(impl, {})[variant] = fn


def _pick(variant: str, impl: str) -> Callable | None:
  if impl == "reference":
    return None
  if impl == "auto":
    try:  # importing registers the kernels; optional so the reference works without GPU extras
      import hybrid_jax.pallas
    except ImportError:
      return None
    if jax.default_backend() not in ("gpu", "tpu"):
      return None
    return _IMPLS.get("auto", {}).get(variant) or _IMPLS.get("pallas", {}).get(variant)
  import hybrid_jax.pallas  # noqa: F401
  fn = _IMPLS.get(impl, {}).get(variant)
  if fn is None:
    raise ValueError(f"no {impl!r} implementation of the {variant} scan is registered")
  return fn


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
  f32 = jnp.float32
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


def selective_scan(x, dt, A, B, C, D, dt_bias, z=None, reset=None, h0=None, *, impl: str = "auto"):
  """Dispatching front of `selective_scan_ref` (same signature and semantics). A single step (l = 1, every
  cached decode step) always takes the reference: it is a few fused elementwise ops, while a scan kernel
  would add launches and time padding (the Pallas kernel pads l to its 32-step chunk)."""
  fn = (None if x.shape[1] == 1 else _pick("mamba", impl)) or selective_scan_ref
  return fn(x, dt, A, B, C, D, dt_bias, z=z, reset=reset, h0=h0)


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
  f32 = jnp.float32
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


def ssd_scan(x, dt, A, B, C, D, dt_bias, reset=None, h0=None, *, impl: str = "auto"):
  """Dispatching front of `ssd_scan_ref` (same signature and semantics). A single step (l = 1) always takes
  the reference, as in `selective_scan` (the chunked SSD form would run ~10 small matmuls for one step)."""
  fn = (None if x.shape[1] == 1 else _pick("mamba2", impl)) or ssd_scan_ref
  return fn(x, dt, A, B, C, D, dt_bias, reset=reset, h0=h0)
