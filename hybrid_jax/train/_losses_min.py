"""Minimal losses with the agreed `hybrid_jax.train.losses` API, used only while that module is absent."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _targets(logits, tokens, mask):
  # position t predicts tokens[t+1]; the last position has no target
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  tgt = tokens[:, 1:]
  m = mask[:, :-1].astype(jnp.float32)
  return lp, tgt, m


def cross_entropy(logits, tokens, loss_mask):
  lp, tgt, m = _targets(logits, tokens, loss_mask)
  nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  n = jnp.sum(m)
  return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n


def kl_div(teacher_logits, student_logits, loss_mask, temperature=1.0):
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  kl = jnp.sum(jnp.exp(t) * (t - s), -1)
  m = loss_mask.astype(jnp.float32)
  return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def sequence_logprob(logits, tokens, mask):
  lp, tgt, m = _targets(logits, tokens, mask)
  return jnp.sum(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0] * m, -1)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, variant="sigmoid", label_smoothing=0.0):
  logits = (pi_c - ref_c) - (pi_r - ref_r)
  if variant == "sigmoid":
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * logits) - label_smoothing * jax.nn.log_sigmoid(
        -beta * logits)
  elif variant == "ipo":
    loss = (logits - 1 / (2 * beta)) ** 2
  else:
    raise ValueError(f"unknown DPO variant {variant!r}")
  rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
  return jnp.mean(loss), {"reward_margin": jnp.mean(rc - rr), "reward_accuracy": jnp.mean(rc > rr)}
