"""Training losses: next-token CE, token-level KL distillation, sequence log-probs and DPO.

Conventions (shared by every function here):
  logits [b, t, V] (any float dtype; promoted to fp32 inside), tokens [b, t] int.
  Position t predicts tokens[t + 1]; `mask[t] = 1` means that prediction counts. The last position has no
  target and never counts, whatever its mask says.
  The KL needs no target: `kl_mask[t] = 1` means position t's next-token distribution counts, the last
  position included. Distillation takes it at every real position (`real_positions`: prompt, template and
  answer tokens, padding excluded), as the reference does, while CE keeps its assistant-only mask.
  KL reductions (`KL_REDUCTIONS`): 'token_mean' divides the masked KL sum by the number of counted positions;
  'batchmean' divides it by the number of rows, as the reference's `F.kl_div(..., reduction='batchmean')` on
  [b, t, V] logits does (a per-sequence sum: about t times the token mean).

Memory: the [b, t, V] tensors dominate. Log-probs of the targets are computed as
`logit[target] - logsumexp(logits)`, so no normalised [b, t, V] copy is kept for CE / sequence log-probs;
the KL builds one fp32 log-softmax per side (needed for the gradient anyway) and reduces over V at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

KL_REDUCTIONS = ("token_mean", "batchmean")


def real_positions(segment_ids: Array) -> Array:
  """The KL mask of distillation: 1 at every real (non-padding) position. [b, t] -> [b, t] fp32."""
  return (segment_ids > 0).astype(jnp.float32)


def _kl_denominator(kl_weights: Array, reduction: str) -> Array:
  """What the masked KL sum is divided by: the counted positions ('token_mean') or the rows ('batchmean')."""
  if reduction not in KL_REDUCTIONS:
    raise ValueError(f"kl reduction must be one of {'|'.join(KL_REDUCTIONS)}, got {reduction!r}")
  if reduction == "batchmean":
    return jnp.asarray(kl_weights.shape[0], jnp.float32)
  return jnp.maximum(jnp.sum(kl_weights), 1.0)


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[..., targets]: [b, t, V], [b, t] -> [b, t] fp32 (no normalised [b, t, V] copy)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _shifted(tokens: Array, mask: Array) -> tuple[Array, Array]:
  """Targets [b, t] (tokens shifted left; last = 0 dummy) and fp32 weights with the last column zeroed."""
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  return targets, target_weights(mask)


def cross_entropy(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
  """Mean next-token NLL over counted predictions.

  logits [b, t, V], tokens [b, t], loss_mask [b, t] -> (loss scalar fp32, n_tokens scalar fp32).
  Logits are not sliced to [:, :-1] (a slice would copy [b, t-1, V]); the last position is masked instead.
  """
  targets, w = _shifted(tokens, loss_mask)
  nll = -token_logprobs(logits, targets)
  n = jnp.sum(w)
  return jnp.sum(nll * w) / jnp.maximum(n, 1.0), n


def kl_div(teacher_logits: Array, student_logits: Array, kl_mask: Array, temperature: float = 1.0,
           reduction: str = "token_mean") -> Array:
  """KL(softmax(teacher / T) || softmax(student / T)) summed over positions with kl_mask = 1, divided per
  `reduction` (module doc). teacher_logits, student_logits [b, t, V]; kl_mask [b, t] -> scalar fp32.
  Gradients flow to the student only (the teacher side is stop_gradient'ed).

  Every position with kl_mask = 1 counts, the last one included (no target is involved). To take the KL where
  `cross_entropy` counts (so that `kl * n_tokens` is the exact sum there), pass `target_weights(loss_mask)`.

  No T^2 factor is applied. The reference (jxiw/MambaInLlama train_mamba/train_hybrid.py and
  trainer/kd_trainer.py) computes `F.kl_div(F.log_softmax(student), F.softmax(teacher),
  reduction='batchmean')` with no temperature at all, over every position of its padded rows; T = 1 with
  kl_mask = real_positions(segment_ids) and reduction 'batchmean' is that loss without the padding.
  """
  inv_t = 1.0 / temperature
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) * inv_t, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) * inv_t, axis=-1)
  # sum_v p_t (log p_t - log p_s); exp is fused into the reduction by XLA.
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [b, t]
  w = kl_mask.astype(jnp.float32)
  return jnp.sum(kl * w) / _kl_denominator(w, reduction)


def target_weights(loss_mask: Array) -> Array:
  """The positions `cross_entropy` counts, as fp32 weights: loss_mask with the last column zeroed. [b, t]."""
  return loss_mask.astype(jnp.float32).at[:, -1].set(0.0)


def sequence_logprob(logits: Array, tokens: Array, mask: Array) -> Array:
  """Sum over t with mask[t] = 1 of log p(tokens[t + 1] | tokens[:t + 1]): [b, t, V], [b, t], [b, t] -> [b]."""
  targets, w = _shifted(tokens, mask)
  return jnp.sum(token_logprobs(logits, targets) * w, axis=-1)


DPO_VARIANTS = ("sigmoid", "ipo", "hinge")


def dpo_loss(pi_c: Array, pi_r: Array, ref_c: Array, ref_r: Array, beta: float, variant: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """DPO loss from summed sequence log-probs of policy (pi) and frozen reference (ref), each [b].

  With h = (pi_c - ref_c) - (pi_r - ref_r):
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing; cDPO)
    ipo:     (h - 1 / (2 beta))^2
    hinge:   relu(1 - beta h)
  These are the forms used by TRL's DPOTrainer, which the reference's train_dpo.py runs
  (the recipes use the default sigmoid loss). Returns (mean loss, metrics): rewards are beta * (pi - ref).
  """
  if variant not in DPO_VARIANTS:
    raise ValueError(f"dpo variant must be one of {'|'.join(DPO_VARIANTS)}, got {variant!r}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pi_c, pi_r, ref_c, ref_r = map(f32, (pi_c, pi_r, ref_c, ref_r))
  h = (pi_c - ref_c) - (pi_r - ref_r)
  if variant == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  elif variant == "ipo":
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    losses = jax.nn.relu(1.0 - beta * h)
  chosen = jax.lax.stop_gradient(beta * (pi_c - ref_c))
  rejected = jax.lax.stop_gradient(beta * (pi_r - ref_r))
  metrics = {
      "reward_margin": jnp.mean(chosen - rejected),
      "reward_accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
      "chosen_reward": jnp.mean(chosen),
      "rejected_reward": jnp.mean(rejected),
  }
  return jnp.mean(losses), metrics


def fused_ce_kl_loss(s_hidden: Array, s_head: Array, tokens: Array, loss_mask: Array,
                     t_hidden: Array | None = None, t_head: Array | None = None, *, ce_weight: float = 1.0,
                     kl_weight: float = 0.0, temperature: float = 1.0, kl_mask: Array | None = None,
                     kl_reduction: str = "token_mean", chunk: int = 0, dtype=jnp.bfloat16
                     ) -> tuple[Array, Array, Array, Array]:
  """The training loss `ce_weight * ce + kl_weight * kl` of `chunked_ce_kl`, with its LM-head gradient made
  in the forward pass (the loss is a scalar, so d loss / d logits is known per chunk without a backward).

  Same arguments as `chunked_ce_kl`. Returns (loss, ce, kl, n_tokens); only `loss` carries gradients (to
  s_hidden and s_head); ce and kl are stop-gradient'ed metrics (kl as `kl_reduction` reduces it).
  Why: under autodiff, `chunked_ce_kl` runs the student's and the teacher's LM-head matmul again in the
  backward pass and adds a [D, V] fp32 head gradient once per chunk. Here each chunk's logits are made once:
  d loss / d logits gives d hidden (one matmul) and the head gradient (one matmul, fp32 accumulation, summed
  over chunks in the scan's carry). The value and the gradients enter autodiff through the identity
  `v + <g_h, h> + <g_W, W> - stop_gradient(<g_h, h> + <g_W, W>)` with g stop-gradient'ed: exact values,
  exact gradients, 4 instead of 6 LM-head matmuls per token with a teacher.
  """
  b, t, d = s_hidden.shape
  v = s_head.shape[1]
  chunk = chunk if chunk > 0 else _default_chunk(b, t, v)
  targets, w = _shifted(tokens, loss_mask)
  wk = w if kl_mask is None else kl_mask.astype(jnp.float32)
  pad = (-t) % chunk
  nc = (t + pad) // chunk
  denom = jnp.maximum(jnp.sum(w), 1.0)
  kl_denom = _kl_denominator(wk, kl_reduction)
  split = functools.partial(_split_time, b=b, nc=nc, chunk=chunk, pad=pad)
  inv_t = 1.0 / temperature
  with_teacher = t_hidden is not None and kl_weight != 0.0
  sg = jax.lax.stop_gradient
  w_s = sg(s_head).astype(dtype)  # cast once: no autodiff runs through the loop below
  w_t = sg(t_head).astype(dtype) if with_teacher else None

  def body(carry, xs):
    g_head, ce_acc, kl_acc = carry
    s_h, t_h, tgt, wc, wkc = xs
    s_h = s_h.astype(dtype)
    z = jnp.einsum("btd,dv->btv", s_h, w_s, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    onehot = jax.nn.one_hot(tgt, v, dtype=jnp.float32)
    ce_acc = ce_acc - jnp.sum(jnp.sum(logp * onehot, axis=-1) * wc)
    dz = (ce_weight * (jnp.exp(logp) - onehot)) * (wc / denom)[..., None]
    if with_teacher:
      t_logits = jnp.einsum("btd,dv->btv", t_h.astype(dtype), w_t, preferred_element_type=jnp.float32)
      t_logp = jax.nn.log_softmax(t_logits * inv_t, axis=-1)
      s_logp = jax.nn.log_softmax(z * inv_t, axis=-1) if temperature != 1.0 else logp
      p_t = jnp.exp(t_logp)
      kl_acc = kl_acc + jnp.sum(jnp.sum(p_t * (t_logp - s_logp), axis=-1) * wkc)
      dz = dz + (kl_weight * inv_t) * (jnp.exp(s_logp) - p_t) * (wkc / kl_denom)[..., None]
    dz = dz.astype(dtype)
    g_h = jnp.einsum("btv,dv->btd", dz, w_s, preferred_element_type=jnp.float32)
    g_head = g_head + jnp.einsum("btd,btv->dv", s_h, dz, preferred_element_type=jnp.float32)
    return (g_head, ce_acc, kl_acc), g_h

  t_in = split(sg(t_hidden)) if with_teacher else split(jnp.zeros((b, t, 1), dtype))
  zero = jnp.zeros((), jnp.float32)
  (g_head, ce_sum, kl_sum), g_h = jax.lax.scan(
      body, (jnp.zeros((d, v), jnp.float32), zero, zero),
      (split(sg(s_hidden)), t_in, split(targets), split(w), split(wk)))
  g_hidden = jnp.moveaxis(g_h, 0, 1).reshape(b, nc * chunk, d)[:, :t]
  ce, kl = ce_sum / denom, kl_sum / kl_denom
  value = ce_weight * ce + (kl_weight * kl if with_teacher else 0.0)
  link = (jnp.sum(g_hidden * s_hidden.astype(jnp.float32)) + jnp.sum(g_head * s_head.astype(jnp.float32)))
  loss = value + link - sg(link)
  return loss, ce, kl, jnp.sum(w)


def _default_chunk(b: int, t: int, v: int) -> int:
  """Chunk length for ~512 MiB of fp32 logits per side: few chunks (each adds a [D, V] head gradient) while
  the handful of [b, chunk, V] fp32 temporaries of a chunk stays a few GiB."""
  return max(16, min(t, (1 << 27) // max(1, b * v)))


def _split_time(x: Array, *, b: int, nc: int, chunk: int, pad: int) -> Array:
  """[b, t, ...] -> [nc, b, chunk, ...] (the padded tail gets loss weight 0 through the padded weights)."""
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, nc, chunk) + x.shape[2:]), 1, 0)


def chunked_ce_kl(s_hidden: Array, s_head: Array, tokens: Array, loss_mask: Array,
                  t_hidden: Array | None = None, t_head: Array | None = None, temperature: float = 1.0,
                  chunk: int = 0, dtype=jnp.bfloat16, kl_mask: Array | None = None,
                  kl_reduction: str = "token_mean") -> tuple[Array, Array, Array]:
  """`cross_entropy` and `kl_div` from final hidden states, never holding [b, t, V] logits at once.

  s_hidden [b, t, D] (student), s_head [D, V]; t_hidden [b, t, Dt], t_head [Dt, V] (teacher, optional: then
  kl = 0); kl_mask [b, t] (default: where CE counts) and kl_reduction as in `kl_div`. The time axis is cut
  into chunks; each chunk's logits (matmul in `dtype`, fp32 accumulation, as
  hybrid.logits_from_hidden) are made, reduced and dropped, and rebuilt in the backward pass (jax.checkpoint),
  so a 128k-vocab teacher + student fit at long sequence lengths for ~2 extra LM-head matmuls per token.
  Returns (ce, kl, n_tokens) with the exact semantics (and values) of the unchunked functions.
  """
  b, t, _ = s_hidden.shape
  v = s_head.shape[1]
  if chunk <= 0:  # ~128 MiB of fp32 logits per side and chunk
    chunk = max(16, min(t, (1 << 25) // max(1, b * v)))
  targets, w = _shifted(tokens, loss_mask)
  wk = w if kl_mask is None else kl_mask.astype(jnp.float32)
  pad = (-t) % chunk
  nc = (t + pad) // chunk

  def split(x):  # [b, t, ...] -> [nc, b, chunk, ...] (padded positions get weight 0)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, nc, chunk) + x.shape[2:]), 1, 0)

  inv_t = 1.0 / temperature
  with_teacher = t_hidden is not None

  @jax.checkpoint
  def piece(s_h, t_h, tgt, wc, wkc):
    s_logits = jnp.einsum("btd,dv->btv", s_h.astype(dtype), s_head.astype(dtype),
                          preferred_element_type=jnp.float32)
    ce = -jnp.sum(token_logprobs(s_logits, tgt) * wc)
    if not with_teacher:
      return ce, jnp.zeros((), jnp.float32)
    t_logits = jnp.einsum("btd,dv->btv", t_h.astype(dtype), jax.lax.stop_gradient(t_head).astype(dtype),
                          preferred_element_type=jnp.float32)
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits) * inv_t, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits * inv_t, axis=-1)
    kl = jnp.sum(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * wkc)
    return ce, kl

  def body(carry, xs):
    ce, kl = piece(*xs)
    return (carry[0] + ce, carry[1] + kl), None

  t_in = split(jax.lax.stop_gradient(t_hidden)) if with_teacher else split(jnp.zeros((b, t, 1), s_hidden.dtype))
  zero = jnp.zeros((), jnp.float32)
  (ce_sum, kl_sum), _ = jax.lax.scan(body, (zero, zero),
                                     (split(s_hidden), t_in, split(targets), split(w), split(wk)))
  n = jnp.sum(w)
  return ce_sum / jnp.maximum(n, 1.0), kl_sum / _kl_denominator(wk, kl_reduction), n
