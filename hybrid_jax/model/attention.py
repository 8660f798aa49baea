"""Llama self-attention (Hugging Face semantics): rotary embedding, grouped-query attention, KV cache.

`Attention` is the attention mixer (the interface of `hybrid_jax.model.mixer`): its KV cache rolls back by
position alone, so its speculative path is its cached path.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.config import ModelConfig
from hybrid_jax.model.layers import dense, largest_divisor
from hybrid_jax.model.mixer import Context
from hybrid_jax.pallas import decode_attention

Array = jax.Array


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies [hd/2] for the `default` and `llama3` rope types (transformers' formulas)."""
  hd = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
  """cos, sin [b, t, hd] (fp32) for integer positions [b, t]; half-split layout as HF's rotate_half."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [b, t, heads, hd]; cos/sin [b, t, hd]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * c + rotated * s


def _write(cache: Array, new: Array, pos: Array) -> Array:
  """Writes new [b, t, ...] into cache [b, S, ...] at per-sequence offsets pos [b]."""
  def one(c, n, p):
    return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), p, axis=0)
  return jax.vmap(one)(cache, new, pos)


def _use_flash(cfg: ModelConfig, t: int) -> bool:
  """Whether the cache-free path runs the Pallas flash kernel (it needs t to be a multiple of its tile)."""
  if cfg.attention_impl == "pallas":
    return True
  return cfg.attention_impl == "auto" and jax.default_backend() == "gpu" and t % FLASH_BLOCK == 0


FLASH_BLOCK = 128  # query/key tile of the forward kernel


def flash_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """Causal attention restricted to equal segment ids, never materialising [t, t] scores (the training path).

  q [b, t, H, hd], k/v [b, t, Hkv, hd], segment_ids [b, t] int. Pallas (Triton) flash attention from
  jax.experimental with its own backward; interpret mode off-GPU (tests). Same mask as `attention`'s einsum path.
  """
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  _, t, h, hd = q.shape
  rep = h // k.shape[2]
  if rep > 1:  # the kernel has no GQA: repeat kv heads as HF repeat_kv does (head j uses kv head j // rep)
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  blk = min(FLASH_BLOCK, t)
  if t % blk:
    raise ValueError(f"flash attention needs the sequence length ({t}) to be a multiple of {blk}")
  sizes = pallas_attention.BlockSizes(block_q=blk, block_k=min(64, blk), block_q_dkv=min(64, blk),
                                      block_kv_dkv=min(64, blk), block_q_dq=min(64, blk),
                                      block_kv_dq=min(64, blk))
  return pallas_attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=1.0 / math.sqrt(hd),
                              causal=True, block_sizes=sizes, interpret=jax.default_backend() != "gpu")


SCORE_BYTES = 1 << 31  # the einsum path's fp32 scores per block of queries (b x H x chunk x S x 4 bytes)


def _query_chunk(b: int, t: int, s: int, h: int) -> int:
  """The largest divisor of t whose block of scores fits SCORE_BYTES (t itself when all of them do)."""
  return largest_divisor(t, SCORE_BYTES // (4 * b * h * s))


def _dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """q [b, t, H, hd], k/v [b, S, Hkv, hd], mask [b, t, S] -> [b, t, H, hd] (fp32 softmax; GQA as HF repeat_kv:
  query head j uses kv head j // rep)."""
  b, t, h, hd = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, hd)
  scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h, hd)


def attention(p: dict, cfg: ModelConfig, x: Array, cos: Array, sin: Array, mask: Array,
              kv_cache: dict | None = None, write_pos: Array | None = None,
              segment_ids: Array | None = None, query_chunk: int | None = None) -> tuple[Array, dict | None]:
  """Causal GQA self-attention.

  p: {q_proj, k_proj, v_proj, o_proj} or the packed {qkv_proj, o_proj} (`Attention.pack`).
  x [b, t, D]; cos/sin [b, t, hd]; mask [b, t, S] bool (True = may attend), S = t without a cache or the cache
  length with one. kv_cache {'k','v'} [b, S, Hkv, hd]: the new keys/values are written at write_pos [b] first.
  segment_ids [b, t] (cache-free path only; `mask` must be causal & equal segments) enables the flash kernel.
  query_chunk: queries per block of the einsum path (a divisor of t; None: blocks whose fp32 scores stay under
  SCORE_BYTES). Returns out [b, t, D] and the updated kv cache (None without one).
  """
  dtype = cfg.compute_dtype
  b, t, _ = x.shape
  h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  if "qkv_proj" in p:
    q, k, v = jnp.split(dense(x, p["qkv_proj"], dtype), [h * hd, (h + kvh) * hd], axis=-1)
  else:
    q, k, v = (dense(x, p[name], dtype) for name in ("q_proj", "k_proj", "v_proj"))
  q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kvh, hd), v.reshape(b, t, kvh, hd)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  new_cache = None
  if kv_cache is not None:
    new_cache = {"k": _write(kv_cache["k"], k, write_pos), "v": _write(kv_cache["v"], v, write_pos)}
    k, v = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
  if kv_cache is None and segment_ids is not None and _use_flash(cfg, t):
    out = flash_attention(q, k, v, segment_ids)
  elif cfg.attention_impl == "cudnn" and kv_cache is None:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
  elif (kv_cache is not None and cfg.decode_attention == "pallas"
        and decode_attention.supported(t, h, kvh, k.shape[1], hd)):
    out = decode_attention.decode_attention(q, k, v, mask)
  else:
    chunk = query_chunk or _query_chunk(b, t, k.shape[1], h)
    if chunk >= t:
      out = _dense_attention(q, k, v, mask)
    else:  # a long prompt into a cache: a block of queries at a time bounds the fp32 scores
      split = lambda a: jnp.moveaxis(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 1, 0)
      out = jax.lax.map(lambda qm: _dense_attention(qm[0], k, v, qm[1]), (split(q), split(mask)))
      out = jnp.moveaxis(out, 0, 1)
  out = out.reshape(b, t, h * hd)
  return dense(out, p["o_proj"], dtype), new_cache


class Attention(nn.Module):
  """GQA self-attention mixer with HF Llama's parameter names (q/k/v/o_proj, [in, out]; normal(0, 0.02) init).

  packed: the decoding layout made by `pack` (qkv_proj [D, (H + 2 Hkv) hd], matrices in the compute dtype)."""
  cfg: ModelConfig
  init_std: float = 0.02
  packed: bool = False

  def setup(self):
    cfg = self.cfg
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    init = nn.initializers.normal(self.init_std)
    dt = cfg.compute_dtype if self.packed else cfg.params_dtype
    if self.packed:
      self.qkv_proj = self.param("qkv_proj", init, (d, (h + 2 * kv) * hd), dt)
    else:
      self.q_proj = self.param("q_proj", init, (d, h * hd), dt)
      self.k_proj = self.param("k_proj", init, (d, kv * hd), dt)
      self.v_proj = self.param("v_proj", init, (d, kv * hd), dt)
    self.o_proj = self.param("o_proj", init, (h * hd, d), dt)

  @staticmethod
  def pack(p: dict, cfg: ModelConfig) -> dict:
    """HF layout -> the packed one: q, k and v read the same input, so one matrix serves all three."""
    dt = cfg.compute_dtype
    return {"qkv_proj": jnp.concatenate([p["q_proj"], p["k_proj"], p["v_proj"]], axis=1).astype(dt),
            "o_proj": p["o_proj"].astype(dt)}

  def _params(self) -> dict:
    if self.packed:
      return {"qkv_proj": self.qkv_proj, "o_proj": self.o_proj}
    return {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "o_proj": self.o_proj}

  def __call__(self, u: Array, ctx: Context) -> Array:
    """Full sequence: causal within each segment of ctx.segment_ids. u [b, t, D] -> [b, t, D]."""
    return attention(self._params(), self.cfg, u, ctx.cos, ctx.sin, ctx.mask, segment_ids=ctx.segment_ids)[0]

  def cached(self, u: Array, ctx: Context, state: dict) -> tuple[Array, dict]:
    """Writes the t new keys/values at ctx.pos, then attends under ctx.mask [b, t, S]."""
    return attention(self._params(), self.cfg, u, ctx.cos, ctx.sin, ctx.mask, state, ctx.pos)

  def speculative(self, u: Array, ctx: Context, state: dict, commit: bool) -> tuple[Array, dict]:
    del commit  # later writes overwrite rejected keys; the mask never shows a query keys past its own index
    return self.cached(u, ctx, state)

  @nn.nowrap
  def init_state(self, batch: int, max_len: int, dtype) -> dict:
    if self.cfg.decode_attention == "pallas":  # whole blocks of keys for the kernel; the mask hides the rest
      max_len = -(-max_len // decode_attention.BLOCK) * decode_attention.BLOCK
    shape = (batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  @nn.nowrap
  def speculative_state(self, state: dict, pos: Array, k: int) -> dict:
    del pos, k
    return state
