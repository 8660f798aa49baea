"""Token sampling: temperature, top-k, top-p (nucleus), greedy.

`processed_logprobs` is the single definition of the sampling distribution; speculative decoding uses it for
both the draft and the target so that acceptance tests compare the same distributions that are sampled.
temperature / top_k / top_p are Python numbers (static under jit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


def is_greedy(temperature: float) -> bool:
  return float(temperature) <= 0.0


def processed_logprobs(logits: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Log-probabilities [..., V] (fp32) of the distribution that `sample_logits` samples from.

  Order as in Hugging Face: temperature, then top-k, then top-p. Filtered tokens get -inf. Greedy
  (temperature == 0) gives the one-hot distribution on the argmax (log-prob 0 there, -inf elsewhere).
  """
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  if is_greedy(temperature):
    best = jnp.argmax(logits, axis=-1)
    return jnp.where(jnp.arange(v) == best[..., None], 0.0, NEG_INF)
  logits = logits / temperature
  if 0 < top_k < v:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    # Keep the smallest set of most-probable tokens whose mass reaches top_p (always at least the top one).
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(probs < threshold, NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def sample_logits(logits: Array, key: Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Samples one token per row. logits [b, V] -> tokens [b] int32 (argmax when temperature == 0)."""
  if is_greedy(temperature):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logp = processed_logprobs(logits, temperature, top_k, top_p)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
