"""Batched autoregressive generation with caches: one jitted prefill, then a jitted decode loop.

Prompts are left-padded to a common length; cache.offset holds each row's padding count so padding is
masked (attention) / skipped (SSM layers) and rotary positions start at 0 at the first real token.
Nothing here depends on the layer types: any ModelConfig (pure Llama or hybrid) decodes the same way.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig
from hybrid_jax.decode.sampling import sample_logits
from hybrid_jax.model import hybrid
from hybrid_jax.model.cache import Cache
from hybrid_jax.model.layers import largest_divisor

Array = jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to one length (rounded up to `multiple`: fewer recompilations).

  Returns tokens [b, L] int32 and offsets [b] int32 (number of padding tokens per row).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  length = -(-longest // multiple) * multiple
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  offsets = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = np.asarray(p, np.int32)
    offsets[i] = length - len(p)
  return tokens, offsets


def last_logits(params: dict, cfg: ModelConfig, hidden: Array) -> Array:
  """Final hidden states [b, t, D] -> fp32 logits of the last position [b, V]. The head runs on that position
  only: a prompt's full logits [b, t, V] would dominate prefill memory (64 x 2048 x 128K fp32 = 67 GB)."""
  return hybrid.HybridLM(cfg).apply({"params": params}, hidden[:, -1:], method=hybrid.HybridLM.logits)[:, 0]


# A prompt runs in chunks when one layer's widest activation over the whole batch of prompts, in fp32, would
# pass this (the MLP's [b, t, intermediate]: 64 prompts of 2048 tokens at the 1B shape's 8192 take 4 GiB).
PREFILL_ACTIVATION_BYTES = 1 << 31
MIN_PREFILL_CHUNK = 128  # below this a chunk would under-fill the device: such prompts run whole


def prefill_chunk(cfg: ModelConfig, batch: int, length: int) -> int:
  """Tokens per prefill chunk for `batch` prompts padded to `length`: the largest divisor of `length` whose
  activations fit PREFILL_ACTIVATION_BYTES (`length` itself when all fits, or when no divisor of at least
  MIN_PREFILL_CHUNK does)."""
  chunk = largest_divisor(length, PREFILL_ACTIVATION_BYTES // (batch * cfg.intermediate_size * 4))
  return chunk if chunk >= MIN_PREFILL_CHUNK else length


def fill_cache(params: dict, cfg: ModelConfig, tokens: Array, cache: Cache, *, kernel_options=None,
               chunk: int | None = None) -> tuple[Array, Cache]:
  """Runs tokens [b, L] into `cache` (traced: call it inside a jitted function). Returns the last position's
  final hidden state [b, D] and the cache.

  chunk: tokens per call, a divisor of L (None: `prefill_chunk`). The chunks run one after another, as a
  conversation's turns would: the same hidden state and cache as one call, with one chunk's activations at a
  time.
  """
  b, length = tokens.shape
  chunk = prefill_chunk(cfg, b, length) if chunk is None else chunk
  if length % chunk:
    raise ValueError(f"prefill chunk {chunk} does not divide the prompt length {length}")

  def run(cache, toks):
    hidden, cache = hybrid.forward(params, cfg, toks, cache=cache, return_hidden=True,
                                   kernel_options=kernel_options)
    return cache, hidden[:, -1]

  if chunk == length:
    cache, last = run(cache, tokens)
    return last, cache
  cache, lasts = jax.lax.scan(run, cache, tokens.reshape(b, length // chunk, chunk).swapaxes(0, 1))
  return lasts[-1], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "kernel_options", "chunk"))
def prefill(params: dict, cfg: ModelConfig, tokens: Array, offsets: Array, max_len: int, kernel_options=None,
            chunk: int | None = None) -> tuple[Array, Cache]:
  """Runs the padded prompts [b, L] into a fresh cache of max_len. Returns last logits [b, V] and the cache.

  kernel_options (static, also of decode_loop / generate): the SSM kernels' `KernelOptions`, None: defaults.
  chunk (static): tokens per call (`fill_cache`).
  """
  cache = hybrid.init_cache(cfg, tokens.shape[0], max_len).replace(offset=offsets.astype(jnp.int32))
  last, cache = fill_cache(params, cfg, tokens, cache, kernel_options=kernel_options, chunk=chunk)
  return last_logits(params, cfg, last[:, None]), cache


# The cache is donated and returned: the loop updates it in place instead of holding a second copy.
@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "kernel_options", "pack"), donate_argnames=("cache",))
def decode_loop(params: dict, cfg: ModelConfig, last_logits: Array, cache: Cache, key: Array, eos: Array,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float, kernel_options=None,
                pack: bool = True) -> tuple[Array, Array, Cache]:
  """Samples from last_logits [b, V], then feeds one token at a time until all rows hit EOS.

  eos [n_eos] int32 (may be empty). Returns tokens [b, max_new_tokens] (-1 after a row's EOS / past the stop),
  the number of tokens generated (scalar) and the cache after them (the input `cache` is donated: unusable
  after the call). pack: decode with `hybrid.pack_params`'s layout, made once per call (fewer, larger matmuls
  a step; holds a copy of the matrices in the compute dtype while the call runs).
  """
  b = last_logits.shape[0]
  if pack:
    params = hybrid.pack_params(params, cfg)

  def pick(logits, key):
    return sample_logits(logits, key, temperature, top_k, top_p)

  def hit_eos(tok):
    return jnp.any(tok[:, None] == eos[None, :], axis=-1) if eos.shape[0] else jnp.zeros_like(tok, bool)

  key, sub = jax.random.split(key)
  tok = pick(last_logits, sub)
  out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(tok)
  done = hit_eos(tok)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, cache, out, done, key = state
    logits, cache = hybrid.forward(params, cfg, tok[:, None], cache=cache, kernel_options=kernel_options,
                                   packed=pack)
    key, sub = jax.random.split(key)
    new = pick(logits[:, 0], sub)
    new = jnp.where(done, -1, new)  # finished rows keep feeding tokens, but their output is ignored
    out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
    return i + 1, jnp.where(done, tok, new), cache, out, done | hit_eos(new), key

  state = (jnp.int32(1), tok, cache, out, done, key)
  if eos.shape[0] == 0:  # no early stop: a fixed trip count, so no per-token device->host check of `cond`
    i, _, cache, out, _, _ = jax.lax.fori_loop(1, max(max_new_tokens, 1), lambda _, st: body(st), state)
    return out, i, cache
  i, _, cache, out, _, _ = jax.lax.while_loop(cond, body, state)
  return out, i, cache


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, pad_multiple: int = 16,
             kernel_options=None) -> list[list[int]]:
  """Generates up to max_new_tokens per prompt; returns the new tokens of each, cut before the first EOS.

  prompts: token id lists of any lengths. Greedy when temperature == 0. eos_ids defaults to cfg.eos_token_id.
  """
  if max_new_tokens <= 0:
    return [[] for _ in prompts]
  eos = tuple(cfg.eos_token_id if eos_ids is None else eos_ids)
  tokens, offsets = left_pad(prompts, pad_id, pad_multiple)
  max_len = tokens.shape[1] + max_new_tokens
  last, cache = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(offsets), max_len, kernel_options)
  out, _, _ = decode_loop(params, cfg, last, cache, jax.random.PRNGKey(seed), jnp.asarray(eos, jnp.int32),
                          max_new_tokens, float(temperature), int(top_k), float(top_p), kernel_options)
  results = []
  for row in np.asarray(out):
    seq = []
    for t in row.tolist():
      if t < 0 or t in eos:
        break
      seq.append(t)
    results.append(seq)
  return results


# ---- text helpers ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_cached(model_dir: str):
  from hybrid_jax.checkpoint import load_model
  return load_model(model_dir)


def load_for_generation(model: str | os.PathLike | tuple) -> tuple[dict, ModelConfig, Any]:
  """(params, cfg, tokenizer) from a checkpoint directory (cached) or a (params, cfg, tokenizer) tuple."""
  if isinstance(model, (str, os.PathLike)):
    params, cfg, tok = _load_cached(os.path.abspath(os.fspath(model)))
  else:
    params, cfg, tok = model
  if tok is None:
    raise ValueError("this model has no tokenizer; text generation needs one (token-level: use generate())")
  return params, cfg, tok


def chat_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
  """Token ids of a conversation with the chat template and the assistant generation prompt."""
  ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
  if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
    ids = ids["input_ids"]
  return list(ids)


def generate_text(model: str | os.PathLike | tuple, messages: str | Sequence[dict[str, str]],
                  max_new_tokens: int = 256, **sampling) -> str:
  """Answer of the model to a chat (a user message string or a list of {'role', 'content'} messages).

  model: a checkpoint directory or (params, cfg, tokenizer). sampling: generate()'s keyword arguments.
  """
  params, cfg, tok = load_for_generation(model)
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  ids = chat_ids(tok, messages)
  eos = sampling.pop("eos_ids", None)
  if eos is None:
    eos = tuple(dict.fromkeys(tuple(cfg.eos_token_id) + ((tok.eos_token_id,) if tok.eos_token_id is not None
                                                           else ())))
  new = generate(params, cfg, [ids], max_new_tokens, eos_ids=eos, **sampling)[0]
  return tok.decode(new, skip_special_tokens=True).strip()
