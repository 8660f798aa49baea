"""Held-out evaluation: student (and teacher) perplexity and KL(teacher || student) over batches.

Every quantity is token-weighted over the whole set (sums over batches, one division at the end), so
batches with different numbers of counted tokens are combined exactly.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import hybrid
from hybrid_jax.train import losses

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
def _student_sums(params: dict, cfg: ModelConfig, tokens: Array, segment_ids: Array, loss_mask: Array
                  ) -> tuple[Array, Array]:
  logits, _ = hybrid.forward(params, cfg, tokens, segment_ids=segment_ids)
  ce, n = losses.cross_entropy(logits, tokens, loss_mask)
  return ce * n, n


@functools.partial(jax.jit, static_argnames=("cfg", "teacher_cfg"))
def _pair_sums(params: dict, cfg: ModelConfig, teacher_params: dict, teacher_cfg: ModelConfig,
               tokens: Array, segment_ids: Array, loss_mask: Array
               ) -> tuple[Array, Array, Array, Array, Array]:
  s, _ = hybrid.forward(params, cfg, tokens, segment_ids=segment_ids)
  t, _ = hybrid.forward(teacher_params, teacher_cfg, tokens, segment_ids=segment_ids)
  ce, n = losses.cross_entropy(s, tokens, loss_mask)
  tce, _ = losses.cross_entropy(t, tokens, loss_mask)
  w = losses.target_weights(loss_mask)
  kl = losses.kl_div(t, s, w)  # ce's positions -> kl * n is the exact sum
  agree = jnp.sum((jnp.argmax(s, -1) == jnp.argmax(t, -1)) * w)  # same top-1 next token as the teacher
  return ce * n, tce * n, kl * n, agree, n


def evaluate(student_params: dict, student_cfg: ModelConfig, batches: Iterable[dict[str, Any]],
             teacher_params: dict | None = None, teacher_cfg: ModelConfig | None = None
             ) -> dict[str, float]:
  """{'student_ppl', 'teacher_ppl', 'kl', 'top1_agreement', 'student_ce', 'teacher_ce', 'n_tokens'} over
  `batches`.

  batches: dicts with 'tokens' [b, t] int, 'segment_ids' [b, t] (0 = padding) and 'loss_mask' [b, t]
  (the data pipeline's layout). teacher_ppl / kl / teacher_ce / top1_agreement are NaN without a teacher.
  KL is KL(teacher || student) per counted token (losses.kl_div, T = 1); top1_agreement the share of counted
  positions where the student's most likely next token is the teacher's.
  """
  if (teacher_params is None) != (teacher_cfg is None):
    raise ValueError("give both teacher_params and teacher_cfg, or neither")
  ce_sum = tce_sum = kl_sum = agree_sum = n_sum = 0.0
  for b in batches:
    toks = jnp.asarray(b["tokens"], jnp.int32)
    seg = jnp.asarray(b["segment_ids"], jnp.int32) if "segment_ids" in b else jnp.ones_like(toks)
    mask = jnp.asarray(b["loss_mask"])
    if teacher_params is None:
      ce, n = _student_sums(student_params, student_cfg, toks, seg, mask)
    else:
      ce, tce, kl, agree, n = _pair_sums(student_params, student_cfg, teacher_params, teacher_cfg, toks, seg,
                                         mask)
      tce_sum += float(tce)
      kl_sum += float(kl)
      agree_sum += float(agree)
    ce_sum += float(ce)
    n_sum += float(n)
  if n_sum == 0:
    raise ValueError("evaluate: no counted tokens in the batches (empty eval set or all-zero loss_mask)")
  nan = float("nan")
  has_t = teacher_params is not None
  return {
      "student_ce": ce_sum / n_sum,
      "student_ppl": math.exp(ce_sum / n_sum),
      "teacher_ce": tce_sum / n_sum if has_t else nan,
      "teacher_ppl": math.exp(tce_sum / n_sum) if has_t else nan,
      "kl": kl_sum / n_sum if has_t else nan,
      "top1_agreement": agree_sum / n_sum if has_t else nan,
      "n_tokens": n_sum,
  }


def as_numpy_batches(batches: Iterable[dict[str, Any]], limit: int | None = None) -> list[dict[str, np.ndarray]]:
  """Materialises up to `limit` batches (e.g. from a Grain iterator) so they can be evaluated repeatedly."""
  out = []
  for i, b in enumerate(batches):
    if limit is not None and i >= limit:
      break
    out.append({k: np.asarray(b[k]) for k in ("tokens", "segment_ids", "loss_mask") if k in b})
  return out
