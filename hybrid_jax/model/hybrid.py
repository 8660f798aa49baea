"""The decoder: Llama layers, some of whose self-attention mixers are replaced by Mamba mixers.

params = {'embed_tokens' [V, D], 'layers': [layer, ...], 'norm' [D], 'lm_head' [D, V] (absent when tied)}
layer  = {'input_layernorm' [D], 'post_attention_layernorm' [D], 'mlp': {...},
          'self_attn': {...} (attention layers) | 'mamba': {...} (Mamba layers, either variant)}
All matrices are [in, out]. A pure Llama is the case `cfg.attn_layers is None`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import llama
from hybrid_jax.model.cache import Cache
from hybrid_jax.model.layers import dense, mlp, rms_norm

Array = jax.Array


def _mixer_module(cfg: ModelConfig):
  from hybrid_jax.model import mamba, mamba2
  return mamba if cfg.ssm.variant == "mamba" else mamba2


def init_params(cfg: ModelConfig, key: Array, std: float = 0.02) -> dict:
  """Random parameters (HF Llama's normal(0, 0.02) init; Mamba mixers use their reference init)."""
  dt = cfg.params_dtype
  d, v = cfg.hidden_size, cfg.vocab_size
  k_emb, k_head, k_layers = jax.random.split(key, 3)
  normal = lambda k, shape: (std * jax.random.normal(k, shape)).astype(dt)
  f = cfg.intermediate_size
  layers = []
  for i, k in enumerate(jax.random.split(k_layers, cfg.num_hidden_layers)):
    k_mix, kg, ku, kd = jax.random.split(k, 4)
    layer = {"input_layernorm": jnp.ones((d,), dt), "post_attention_layernorm": jnp.ones((d,), dt),
             "mlp": {"gate_proj": normal(kg, (d, f)), "up_proj": normal(ku, (d, f)),
                     "down_proj": normal(kd, (f, d))}}
    if cfg.is_attention(i):
      att = llama.init_attention(k_mix, cfg)  # shapes only; HF-style normal init below
      keys = dict(zip(sorted(att), jax.random.split(k_mix, len(att))))
      layer["self_attn"] = {name: normal(keys[name], w.shape) for name, w in att.items()}
    else:
      layer["mamba"] = _mixer_module(cfg).init_mixer(k_mix, cfg)
    layers.append(layer)
  params = {"embed_tokens": normal(k_emb, (v, d)), "layers": layers, "norm": jnp.ones((d,), dt)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = normal(k_head, (d, v))
  return params


def segment_positions(segment_ids: Array) -> Array:
  """Position of each token inside its segment (packed documents restart at 0). [b, l] -> [b, l]."""
  l = segment_ids.shape[1]
  idx = jnp.arange(l)[None, :]
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def forward(params: dict, cfg: ModelConfig, tokens: Array, *, segment_ids: Array | None = None,
            positions: Array | None = None, cache: Cache | None = None,
            return_hidden: bool = False) -> tuple[Array, Cache | None]:
  """Runs the decoder.

  tokens [b, t] int. Without a cache (training / scoring): `segment_ids` [b, t] (0 = padding) restricts
  attention, conv and scan to each packed document; positions default to the position inside the segment.
  With a cache: the tokens extend each sequence at cache.pos; tokens at cache index < cache.offset are left
  padding. Returns logits [b, t, V] (fp32) — or the final hidden states [b, t, D] if `return_hidden` — and
  the updated cache (None without one).
  """
  b, t = tokens.shape
  dtype = cfg.compute_dtype
  if cache is None:
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if positions is None:
      positions = segment_positions(seg) if segment_ids is not None else jnp.broadcast_to(
          jnp.arange(t), (b, t))
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    mask = causal & (seg[:, :, None] == seg[:, None, :])
  else:
    abs_idx = cache.pos[:, None] + jnp.arange(t)[None, :]  # [b, t]
    seg = (abs_idx >= cache.offset[:, None]).astype(jnp.int32)
    positions = jnp.maximum(abs_idx - cache.offset[:, None], 0)
    key_idx = jnp.arange(cache.max_len)[None, None, :] if any("k" in lc for lc in cache.layers) else None
    if key_idx is not None:
      mask = (key_idx <= abs_idx[..., None]) & (key_idx >= cache.offset[:, None, None])
      mask = mask | (key_idx == abs_idx[..., None])  # a padding query attends to itself: no empty rows
  cos, sin = llama.rope_tables(cfg, positions)

  def block(x, lp, layer_cache):
    h = rms_norm(x, lp["input_layernorm"], cfg.rms_norm_eps)
    if "self_attn" in lp:
      a, layer_cache = llama.attention(lp["self_attn"], cfg, h, cos, sin, mask, layer_cache,
                                       None if cache is None else cache.pos,
                                       segment_ids=seg if cache is None else None)
    else:
      a, layer_cache = _mixer_module(cfg).mixer(lp["mamba"], cfg, h, segment_ids=seg, state=layer_cache)
    x = x + a.astype(x.dtype)
    h = rms_norm(x, lp["post_attention_layernorm"], cfg.rms_norm_eps)
    return x + mlp(lp["mlp"], h, dtype).astype(x.dtype), layer_cache

  if cache is None and cfg.remat != "none":  # training: recompute inside each layer in the backward pass
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
    block = jax.checkpoint(block, policy=policy)

  x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)
  new_layers = []
  for i, lp in enumerate(params["layers"]):
    x, layer_cache = block(x, lp, None if cache is None else cache.layers[i])
    new_layers.append(layer_cache)
  x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
  new_cache = None if cache is None else cache.replace(layers=tuple(new_layers), pos=cache.pos + t)
  if return_hidden:
    return x, new_cache
  return logits_from_hidden(params, cfg, x), new_cache


def lm_head_weight(params: dict, cfg: ModelConfig) -> Array:
  """[D, V] output projection (the transposed embedding when tied)."""
  return params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: dict, cfg: ModelConfig, x: Array) -> Array:
  w = lm_head_weight(params, cfg)
  return dense(x, w, cfg.compute_dtype, out_dtype=jnp.float32)
