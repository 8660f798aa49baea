"""Causal depthwise conv1d with a carried state (decode) and packed-document masking (training)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def causal_conv(x: Array, w: Array, bias: Array, segment_ids: Array | None = None,
                state: Array | None = None) -> tuple[Array, Array]:
  """Depthwise causal conv, PyTorch Conv1d(groups=C, padding=K-1)[..., :l] semantics.

  x [b, t, C]; w [K, C] (w[k] = torch weight[:, 0, k]); bias [C]; segment_ids [b, t] (taps from another
  segment read as zero: no leakage across packed documents or from left padding); state [b, K-1, C] = the
  previous K-1 conv inputs (zeros at the start). Returns y [b, t, C] (fp32) and the new state [b, K-1, C].
  """
  K = w.shape[0]
  b, t, c = x.shape
  if state is None:
    state = jnp.zeros((b, K - 1, c), x.dtype)
  xe = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b, K-1+t, C]
  if segment_ids is not None:
    seg_e = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (b, K - 1)), segment_ids], axis=1)
  y = jnp.zeros((b, t, c), jnp.float32) + bias.astype(jnp.float32)
  for k in range(K):  # tap k looks back K-1-k steps
    tap = xe[:, k:k + t].astype(jnp.float32)
    if segment_ids is not None and k < K - 1:
      tap = tap * (seg_e[:, k:k + t] == segment_ids)[..., None]
    y = y + tap * w[k].astype(jnp.float32)
  new_state = xe[:, t:] if K > 1 else xe[:, :0]
  return y, new_state
