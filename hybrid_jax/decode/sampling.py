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
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < nucleus_threshold(probs, top_p), NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def nucleus_threshold(probs: Array, top_p: float) -> Array:
  """The top-p cut [..., 1]: tokens with probs >= it form the smallest set of most-probable tokens whose mass
  reaches top_p (always at least the top one; tied tokens all in or all out). probs [..., V] fp32 >= 0.

  A token belongs to that set exactly when the mass of the tokens strictly more probable than it is below
  top_p, and that mass only falls as the probability rises, so the cut is the smallest float tau with
  mass(probs > tau) < top_p: found by bisection over the bit patterns of non-negative floats (ordered as the
  floats are), one masked sum over the vocabulary per bit. The same set as sorting the probabilities and
  cutting their cumulative sum, without a sort of [..., V] at every step (the slowest part of a sampled decode
  step at large batch); the masses are summed in another order, which can move a token whose mass sits within
  rounding of top_p.
  """
  probs = probs.astype(jnp.float32)
  hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)  # always in the set
  lo = jnp.full_like(hi, -1)  # below every float: mass(probs > -0.0...) is everything, >= top_p

  def mass_below_top_p(bits):
    tau = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.sum(jnp.where(probs > tau, probs, 0.0), axis=-1, keepdims=True) < top_p

  def bisect(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = mass_below_top_p(jnp.maximum(mid, 0))
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, bisect, (lo, hi))  # the bit range of floats in [0, 1] is under 2**31
  return jax.lax.bitcast_convert_type(hi, jnp.float32)


def sample_logits(logits: Array, key: Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Samples one token per row. logits [b, V] -> tokens [b] int32 (argmax when temperature == 0)."""
  if is_greedy(temperature):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logp = processed_logprobs(logits, temperature, top_k, top_p)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
