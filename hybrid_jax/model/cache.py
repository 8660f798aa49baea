"""Inference caches: a KV cache per attention layer, conv + SSM state per Mamba layer.

`pos` [b] is the next write index of each sequence (sequences may advance by different amounts, as in
speculative decoding); `offset` [b] is the number of left-padding tokens of each prompt, so a token at cache
index i has rotary position i - offset and keys below offset are masked. `HybridLM.init_cache` makes one.
"""
from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class Cache:
  layers: tuple  # per layer: the mixer's state ({'k', 'v'} [b, S, Hkv, hd] | {'conv', 'ssm'} | speculative)
  pos: Array  # [b] int32
  offset: Array  # [b] int32

  @property
  def has_attention(self) -> bool:
    return any("k" in lc for lc in self.layers)

  @property
  def max_len(self) -> int:
    """Tokens the cache holds per sequence (unbounded without attention layers)."""
    for lc in self.layers:
      if "k" in lc:
        return lc["k"].shape[1]
    return 1 << 30
