"""The decoder: Llama layers, some of whose self-attention mixers are replaced by Mamba mixers.

`HybridLM(cfg)` is one Flax module for teachers (every layer attention), hybrids and drafts. Parameters:
  {'embed_tokens' [V, D], 'layers_0' ... 'layers_{L-1}', 'norm' [D], 'lm_head' [D, V] (absent when tied)}
  layers_i = {'input_layernorm' [D], 'post_attention_layernorm' [D], 'mlp': {gate_proj, up_proj, down_proj},
              'self_attn': {q_proj, k_proj, v_proj, o_proj} (attention layers) | 'mamba': {...} (Mamba layers)}
All matrices are [in, out] (PyTorch names, transposed). `forward(params, cfg, tokens, ...)` is the functional
shorthand for `HybridLM(cfg).apply({'params': params}, tokens, ...)`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.attention import Attention, rope_tables
from hybrid_jax.model.cache import Cache
from hybrid_jax.model.layers import MLP, dense, rms_norm
from hybrid_jax.model.mamba import Mamba
from hybrid_jax.model.mamba2 import Mamba2
from hybrid_jax.model.mixer import Context

Array = jax.Array

# Decoder call modes (static): the full sequence, a decode cache, or a speculative cache whose SSM steps are
# committed as the new checkpoint ('commit') or appended after it ('append'; see hybrid_jax.model.mixer).
FULL, CACHED, COMMIT, APPEND = "full", "cached", "commit", "append"


def mixer_class(cfg: ModelConfig, layer: int) -> type[nn.Module]:
  """The mixer module of a layer: attention where the config keeps it, else the configured Mamba variant."""
  if cfg.is_attention(layer):
    return Attention
  return Mamba if cfg.ssm.variant == "mamba" else Mamba2


def _mixer(cfg: ModelConfig, layer: int, kernel_options, init_std: float, name: str | None = None,
           packed: bool = False) -> nn.Module:
  cls = mixer_class(cfg, layer)
  if cls is Attention:
    return Attention(cfg, init_std=init_std, packed=packed, name=name)
  return cls(cfg, kernel_options=kernel_options, packed=packed, name=name)


def _mixer_name(cfg: ModelConfig, layer: int) -> str:
  return "self_attn" if cfg.is_attention(layer) else "mamba"


class DecoderLayer(nn.Module):
  """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is the layer's own (attention or SSM)."""
  cfg: ModelConfig
  layer: int
  kernel_options: pallas.KernelOptions | None = None
  init_std: float = 0.02
  packed: bool = False

  def setup(self):
    cfg, dt = self.cfg, self.cfg.params_dtype
    ones = nn.initializers.ones
    self.input_layernorm = self.param("input_layernorm", ones, (cfg.hidden_size,), dt)
    self.post_attention_layernorm = self.param("post_attention_layernorm", ones, (cfg.hidden_size,), dt)
    self.mixer = _mixer(cfg, self.layer, self.kernel_options, self.init_std, name=_mixer_name(cfg, self.layer),
                        packed=self.packed)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.compute_dtype, dt, self.init_std, self.packed)

  def __call__(self, x: Array, ctx: Context, state: Any = None, mode: str = FULL) -> tuple[Array, Any]:
    """x [b, t, D] -> (x [b, t, D], the mixer's new state; None in FULL mode)."""
    h = rms_norm(x, self.input_layernorm, self.cfg.rms_norm_eps)
    if mode == FULL:
      a = self.mixer(h, ctx)
    elif mode == CACHED:
      a, state = self.mixer.cached(h, ctx, state)
    else:
      a, state = self.mixer.speculative(h, ctx, state, commit=mode == COMMIT)
    x = x + a.astype(x.dtype)
    h = rms_norm(x, self.post_attention_layernorm, self.cfg.rms_norm_eps)
    return x + self.mlp(h).astype(x.dtype), state


def segment_positions(segment_ids: Array) -> Array:
  """Position of each token inside its segment (packed documents restart at 0). [b, l] -> [b, l]."""
  l = segment_ids.shape[1]
  idx = jnp.arange(l)[None, :]
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def full_context(cfg: ModelConfig, shape: tuple[int, int], segment_ids: Array | None = None,
                 positions: Array | None = None) -> Context:
  """The Context of a cache-free call on tokens of `shape` [b, t]: causal attention within each segment of
  segment_ids [b, t] (0 = padding; default: one segment); positions default to the position in the segment."""
  b, t = shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if positions is None:
    positions = segment_positions(seg) if segment_ids is not None else jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  cos, sin = rope_tables(cfg, positions)
  return Context(segment_ids=seg, cos=cos, sin=sin, mask=mask)


def cached_context(cfg: ModelConfig, cache: Cache, t: int) -> Context:
  """The Context of t tokens appended at cache.pos: keys up to each query's own index and from cache.offset
  (left padding is masked; a padding query attends to itself so no row is empty)."""
  abs_idx = cache.pos[:, None] + jnp.arange(t)[None, :]  # [b, t]
  seg = (abs_idx >= cache.offset[:, None]).astype(jnp.int32)
  mask = None
  if cache.has_attention:  # a pure SSM cache has no key axis to mask
    key_idx = jnp.arange(cache.max_len)[None, None, :]
    mask = (key_idx <= abs_idx[..., None]) & (key_idx >= cache.offset[:, None, None])
    mask = mask | (key_idx == abs_idx[..., None])
  cos, sin = rope_tables(cfg, jnp.maximum(abs_idx - cache.offset[:, None], 0))
  return Context(segment_ids=seg, cos=cos, sin=sin, mask=mask, pos=cache.pos)


def _remat_policy(cfg: ModelConfig):
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None


class HybridLM(nn.Module):
  """Llama / hybrid causal LM. `cfg.attn_layers` picks the attention layers (None: all, a plain Llama).

  kernel_options: tuning of the SSM kernels (None: the per-device defaults). init_std: the normal init of
  embeddings, attention and MLP matrices (HF Llama's 0.02); Mamba mixers use their reference init.
  """
  cfg: ModelConfig
  kernel_options: pallas.KernelOptions | None = None
  init_std: float = 0.02
  packed: bool = False

  def setup(self):
    cfg, dt = self.cfg, self.cfg.params_dtype
    init = nn.initializers.normal(self.init_std)
    self.embed_tokens = self.param("embed_tokens", init, (cfg.vocab_size, cfg.hidden_size), dt)
    layer_cls = DecoderLayer
    if cfg.remat != "none":  # training: each layer keeps only what the policy saves for the backward pass
      layer_cls = nn.remat(DecoderLayer, policy=_remat_policy(cfg), static_argnums=(4,))
    self.layers = [layer_cls(cfg, i, self.kernel_options, self.init_std, self.packed)
                   for i in range(cfg.num_hidden_layers)]
    self.norm = self.param("norm", nn.initializers.ones, (cfg.hidden_size,), dt)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", init, (cfg.hidden_size, cfg.vocab_size), dt)

  def head_weight(self) -> Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return self.embed_tokens.T if self.cfg.tie_word_embeddings else self.lm_head

  def logits(self, hidden: Array) -> Array:
    """Final hidden states [b, t, D] -> fp32 logits [b, t, V]."""
    return dense(hidden, self.head_weight(), self.cfg.compute_dtype, out_dtype=jnp.float32)

  def __call__(self, tokens: Array, *, segment_ids: Array | None = None, positions: Array | None = None,
               cache: Cache | None = None, speculative: str | None = None,
               return_hidden: bool = False) -> tuple[Array, Cache | None]:
    """Runs the decoder.

    tokens [b, t] int. Without a cache (training / scoring): `segment_ids` [b, t] (0 = padding) restricts
    attention, conv and scan to each packed document; positions default to the position inside the segment.
    With a cache: the tokens extend each sequence at cache.pos; tokens at cache index < cache.offset are left
    padding. speculative ('commit' | 'append', with a cache in the speculative layout, `speculative_cache`):
    draft / verify calls whose SSM steps can be rolled back (hybrid_jax.model.mixer). Returns logits
    [b, t, V] (fp32), or the final hidden states [b, t, D] if `return_hidden`, and the updated cache (None
    without one).
    """
    cfg = self.cfg
    if cache is None:
      ctx, mode = full_context(cfg, tokens.shape, segment_ids, positions), FULL
    else:
      ctx = cached_context(cfg, cache, tokens.shape[1])
      mode = CACHED if speculative is None else {"commit": COMMIT, "append": APPEND}[speculative]

    x = jnp.take(self.embed_tokens, tokens, axis=0).astype(cfg.compute_dtype)
    states = []
    for i, layer in enumerate(self.layers):
      x, state = layer(x, ctx, None if cache is None else cache.layers[i], mode)
      states.append(state)
    x = rms_norm(x, self.norm, cfg.rms_norm_eps)
    new_cache = None if cache is None else cache.replace(layers=tuple(states), pos=cache.pos + tokens.shape[1])
    return (x if return_hidden else self.logits(x)), new_cache

  # ---- caches (no parameters needed) ------------------------------------------------------------
  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """Empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    dtype = dtype or self.cfg.compute_dtype
    layers = tuple(_mixer(self.cfg, i, self.kernel_options, self.init_std).init_state(batch, max_len, dtype)
                   for i in range(self.cfg.num_hidden_layers))
    zeros = jnp.zeros((batch,), jnp.int32)
    return Cache(layers=layers, pos=zeros, offset=zeros)

  @nn.nowrap
  def speculative_cache(self, cache: Cache, k: int) -> Cache:
    """An ordinary cache (e.g. right after prefill) -> the speculative layout, checkpoints at cache.pos, with
    room for calls of up to k + 1 tokens between checkpoints."""
    return cache.replace(layers=tuple(
        _mixer(self.cfg, i, self.kernel_options, self.init_std).speculative_state(lc, cache.pos, k)
        for i, lc in enumerate(cache.layers)))


# ---- functional shorthands --------------------------------------------------------------------------
def init_params(cfg: ModelConfig, key: Array, std: float = 0.02) -> dict:
  """Random parameters of `HybridLM(cfg)` (HF Llama's normal(0, std); Mamba mixers their reference init).

  Built a layer at a time, with one compiled init per kind of layer: a single program for the whole model
  inlines the random-number expansion of every parameter, and compiling it took longer than compiling the
  model's forward pass (26 s on a 2-core CPU for the 135M shape)."""
  dt = cfg.params_dtype
  k_embed, k_head, k_layers = jax.random.split(key, 3)
  params = {"embed_tokens": _normal(k_embed, (cfg.vocab_size, cfg.hidden_size), dt, std)}
  first_of: dict[type, int] = {}  # the first layer of each mixer class stands for all layers of that class
  for i in range(cfg.num_hidden_layers):
    first = first_of.setdefault(mixer_class(cfg, i), i)
    params[f"layers_{i}"] = _init_layer(cfg, first, std, jax.random.fold_in(k_layers, i))
  params["norm"] = jnp.ones((cfg.hidden_size,), dt)
  if not cfg.tie_word_embeddings:
    params["lm_head"] = _normal(k_head, (cfg.hidden_size, cfg.vocab_size), dt, std)
  return params


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: Array, shape: tuple[int, ...], dtype, std: float) -> Array:
  return nn.initializers.normal(std)(key, shape, dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_layer(cfg: ModelConfig, layer: int, std: float, key: Array) -> dict:
  x = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)
  return DecoderLayer(cfg, layer, None, std).init(key, x, full_context(cfg, (1, 1)))["params"]


def init_mixer_params(cfg: ModelConfig, layer: int, key: Array) -> dict:
  """Fresh parameters of one layer's mixer (its reference init), without building the rest of the model."""
  u = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)
  ctx = full_context(cfg, (1, 1))
  return jax.jit(lambda k: _mixer(cfg, layer, None, 0.02).init(k, u, ctx)["params"])(key)


@functools.partial(jax.jit, static_argnames=("cfg", "kernel_options", "packed", "speculative", "return_hidden"))
def forward(params: dict, cfg: ModelConfig, tokens: Array, *, kernel_options=None, packed: bool = False,
            segment_ids: Array | None = None, positions: Array | None = None, cache: Cache | None = None,
            speculative: str | None = None, return_hidden: bool = False) -> tuple[Array, Cache | None]:
  """`HybridLM(cfg).apply({'params': params}, tokens, ...)`, jitted (one program per shape and static options,
  where an eager apply would compile each operation by itself); see `HybridLM.__call__`. packed: params in the
  decoding layout (`pack_params`)."""
  return HybridLM(cfg, kernel_options, packed=packed).apply(
      {"params": params}, tokens, segment_ids=segment_ids, positions=positions, cache=cache,
      speculative=speculative, return_hidden=return_hidden)


def pack_params(params: dict, cfg: ModelConfig) -> dict:
  """Params -> the decoding layout of `HybridLM(cfg, packed=True)`: in each layer the projections that read the
  same input become one matrix (q/k/v, gate/up, Mamba-1's five), and every matrix and the embedding are cast to
  the compute dtype once instead of at every step. A decode step is a few hundred small kernels at batch 1, so
  each matrix fewer is a launch fewer; the cast saves re-reading fp32 weights. Costs a copy of those matrices.
  params [..] -> params [..] (norms and SSM decay parameters unchanged)."""
  dt = cfg.compute_dtype
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["embed_tokens"] = params["embed_tokens"].astype(dt)
  if "lm_head" in params:
    out["lm_head"] = params["lm_head"].astype(dt)
  for i in range(cfg.num_hidden_layers):
    lp, name = params[f"layers_{i}"], _mixer_name(cfg, i)
    out[f"layers_{i}"] = {**lp, name: mixer_class(cfg, i).pack(lp[name], cfg), "mlp": MLP.pack(lp["mlp"], dt)}
  return out


def lm_head_weight(params: dict, cfg: ModelConfig) -> Array:
  """[D, V] output projection (the transposed embedding when tied)."""
  return HybridLM(cfg).apply({"params": params}, method=HybridLM.head_weight)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  return HybridLM(cfg).init_cache(batch, max_len, dtype)


def speculative_cache(cfg: ModelConfig, cache: Cache, k: int) -> Cache:
  return HybridLM(cfg).speculative_cache(cache, k)


def layer_params(params: dict, i: int) -> dict:
  """The parameters of decoder layer i."""
  return params[f"layers_{i}"]


def num_layers(params: dict) -> int:
  return sum(1 for name in params if name.startswith("layers_"))


def from_layer_list(params: dict) -> dict:
  """Parameters in the layout of earlier releases ({'layers': [layer, ...], ...}) -> this module's layout
  ({'layers_0': layer, ...}). Trees already in this layout are returned unchanged."""
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  layers = params["layers"]
  items = layers.items() if isinstance(layers, dict) else enumerate(layers)  # Orbax may give {'0': ...}
  out.update({f"layers_{int(i)}": lp for i, lp in items})
  return out
