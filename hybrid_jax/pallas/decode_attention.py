"""Attention of a few new queries over a KV cache in one Pallas (Triton) kernel: decode steps and verify calls.

XLA runs such a call as three kernels or more (scores, the masked softmax, probabilities times values), each
tiny at batch 1; here one program per (sequence, KV head) streams the cache in blocks of `block` keys with an
online softmax, so the scores never leave the chip. Semantics of the einsum path it replaces (GQA as Hugging
Face's repeat_kv, fp32 scores and softmax, masked keys at float32's lowest value, so a row with no visible key
averages every value as the einsum path does); the probabilities are normalised after the values are summed,
so results agree to the rounding of the bf16 probabilities, not bit for bit.

  q [b, t, H, hd], k / v [b, S, Hkv, hd], mask [b, t, S] bool  ->  [b, t, H, hd] in q's dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hybrid_jax.pallas import common

f32 = jnp.float32
BLOCK = 64  # keys per step of the loop over the cache
MAX_ROWS = 64  # t * (H / Hkv) query rows per program at most: beyond that the einsum path is the better form


def supported(t: int, heads: int, kv_heads: int, cache_len: int, head_dim: int, block: int = BLOCK) -> bool:
  """Whether the kernel takes this call: few query rows per KV head, whole blocks of cache, a power-of-two
  head dim of at least 16 (Triton tiles)."""
  rows = t * (heads // kv_heads)
  pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
  return rows <= MAX_ROWS and cache_len % block == 0 and pow2


def _kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *, block: int, scale: float):
  """One program: one sequence, one KV head; q_ref [R, hd] (its query heads' rows), k_ref / v_ref [S, hd],
  mask_ref [R, S] int8, o_ref [R, hd]."""
  q = q_ref[...]
  rows, hd = q.shape
  low = jnp.finfo(f32).min

  def step(i, carry):
    m, l, acc = carry
    keys = pl.ds(pl.multiple_of(i * block, block), block)
    s = jax.lax.dot_general(q, k_ref[keys, :], (((1,), (1,)), ((), ())), preferred_element_type=f32) * scale
    s = jnp.where(mask_ref[:, keys] != 0, s, low)  # [R, block]
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    rescale = jnp.exp(m - m_new)
    l = l * rescale + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[keys, :], preferred_element_type=f32)
    return m_new, l, acc * rescale[:, None] + pv

  init = (jnp.full((rows,), low, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, hd), f32))
  _, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block, step, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def decode_attention(q, k, v, mask, *, block: int = BLOCK, num_warps: int = 4, interpret: bool | None = None):
  """q [b, t, H, hd], k / v [b, S, Hkv, hd], mask [b, t, S] bool -> [b, t, H, hd] (see the module docstring;
  `supported` says which shapes it takes)."""
  b, t, h, hd = q.shape
  s_len, kvh = k.shape[1], k.shape[2]
  rep = h // kvh
  if not supported(t, h, kvh, s_len, hd, block):
    raise ValueError(f"decode_attention: unsupported shape t={t}, heads={h}/{kvh}, cache {s_len}, head dim {hd}")
  rows = t * rep
  rows_p = max(16, common.next_pow2(rows))
  # query row (token i, head r of the group) -> i * rep + r, per KV head; padded rows see no key (harmless)
  qr = q.reshape(b, t, kvh, rep, hd).transpose(0, 2, 1, 3, 4).reshape(b, kvh, rows, hd)
  qr = common.pad_axis(qr.astype(k.dtype), 2, rows_p)
  mr = jnp.repeat(mask.astype(jnp.int8), rep, axis=1)  # [b, t * rep, S]: row i * rep + r is token i's
  mr = common.pad_axis(mr, 1, rows_p)
  cache = pl.BlockSpec((None, s_len, None, hd), lambda i, g: (i, 0, g, 0))
  out = common.call(
      functools.partial(_kernel, block=block, scale=1.0 / math.sqrt(hd)),
      out_shape=jax.ShapeDtypeStruct((b, kvh, rows_p, hd), q.dtype),
      grid=(b, kvh),
      in_specs=[pl.BlockSpec((None, None, rows_p, hd), lambda i, g: (i, g, 0, 0)), cache, cache,
                pl.BlockSpec((None, rows_p, s_len), lambda i, g: (i, 0, 0))],
      out_specs=pl.BlockSpec((None, None, rows_p, hd), lambda i, g: (i, g, 0, 0)),
      num_warps=num_warps, interpret=interpret,
  )(qr, k, v, mr)
  return out[:, :, :rows].reshape(b, kvh, t, rep, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)
