"""Inference caches: a KV cache per attention layer, conv + SSM state per Mamba layer.

`pos` [b] is the next write index of each sequence (sequences may advance by different amounts, as in
speculative decoding); `offset` [b] is the number of left-padding tokens of each prompt, so a token at cache
index i has rotary position i - offset and keys below offset are masked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from hybrid_jax.config import ModelConfig

Array = jax.Array


@struct.dataclass
class Cache:
  layers: tuple  # per layer: {'k', 'v'} [b, S, Hkv, hd] or {'conv' [b, K-1, C], 'ssm' [b, ...]}
  pos: Array  # [b] int32
  offset: Array  # [b] int32

  @property
  def max_len(self) -> int:
    for lc in self.layers:
      if "k" in lc:
        return lc["k"].shape[1]
    return 1 << 30  # pure SSM: unbounded


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """Empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
  from hybrid_jax.model import mamba, mamba2  # late import: mixers import this module's users
  dtype = dtype or cfg.compute_dtype
  layers = []
  for i in range(cfg.num_hidden_layers):
    if cfg.is_attention(i):
      shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
      layers.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
    else:
      mod = mamba if cfg.ssm.variant == "mamba" else mamba2
      layers.append(mod.init_state(cfg, batch, dtype))
  zeros = jnp.zeros((batch,), jnp.int32)
  return Cache(layers=tuple(layers), pos=zeros, offset=zeros)
