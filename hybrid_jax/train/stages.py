"""Per-stage losses and the jitted train / eval steps.

align, distill: kl_weight * KL(teacher || student, T) at every real position (loss.kl_reduction: per position
                or per row) + ce_weight * CE(student) on loss_mask (assistant) tokens
sft:            ce_weight * CE on assistant tokens (the data's loss_mask) [+ kl_weight * KL if a teacher is given]
dpo:            DPO(policy vs frozen reference = the starting model) on chosen/rejected pairs

The frozen model (teacher, or DPO reference) is the step's `aux` argument: sharded like the student, run under
stop_gradient, never updated and never checkpointed (it is re-read from its model dir on resume).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import hybrid
from hybrid_jax.train import losses
from hybrid_jax.train import sharding as shd
from hybrid_jax.train.config import TrainConfig
from hybrid_jax.train.optim import masked_global_norm
from hybrid_jax.train.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]

from hybrid_jax.data.pipeline import DPO_KEYS
from hybrid_jax.data.pipeline import SFT_KEYS as LM_KEYS


def uses_teacher(cfg: TrainConfig) -> bool:
  """Whether the stage needs the teacher's logits (always in align/distill; in sft only with a KL term)."""
  return cfg.stage in ("align", "distill") or (cfg.stage == "sft" and cfg.loss.kl_weight > 0)


def _logits(params, mcfg: ModelConfig, tokens, segment_ids, kernel_options=None):
  logits, _ = hybrid.forward(params, mcfg, tokens, segment_ids=segment_ids, kernel_options=kernel_options)
  return logits


def make_loss_fn(cfg: TrainConfig, student_cfg: ModelConfig, frozen_cfg: ModelConfig | None,
                 kernel_options=None) -> LossFn:
  """loss_fn(params, batch, frozen_params) -> (loss, metrics) for the configured stage. kernel_options: the
  SSM kernels' `KernelOptions` (None: the defaults for the default backend), e.g. a platform to lower for."""
  lc = cfg.loss

  if cfg.stage == "dpo":
    def dpo_fn(params, batch, ref_params):
      # One forward over [chosen; rejected] for policy and reference each.
      toks = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
      mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
      seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]], 0)
      b = batch["chosen_tokens"].shape[0]
      pi = losses.sequence_logprob(_logits(params, student_cfg, toks, seg, kernel_options), toks, mask)
      ref = jax.lax.stop_gradient(
          losses.sequence_logprob(_logits(ref_params, frozen_cfg, toks, seg, kernel_options), toks, mask))
      loss, m = losses.dpo_loss(pi[:b], pi[b:], ref[:b], ref[b:], lc.dpo_beta, variant=lc.dpo_variant,
                                label_smoothing=lc.label_smoothing)
      m = dict(m)
      m.update(dpo=loss, n_tokens=jnp.sum(mask).astype(jnp.float32))
      return loss, m
    return dpo_fn

  with_teacher = uses_teacher(cfg)
  kl_w = lc.kl_weight if with_teacher else 0.0
  ce_w = lc.ce_weight

  def lm_fn(params, batch, teacher_params):
    # From final hidden states, in time chunks, head gradients made in the forward pass (fused_ce_kl_loss).
    toks, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    s_hidden, _ = hybrid.forward(params, student_cfg, toks, segment_ids=seg, return_hidden=True,
                                 kernel_options=kernel_options)
    t_hidden = t_head = None
    if with_teacher:
      t_hidden, _ = hybrid.forward(teacher_params, frozen_cfg, toks, segment_ids=seg, return_hidden=True,
                                   kernel_options=kernel_options)
      t_hidden, t_head = jax.lax.stop_gradient(t_hidden), hybrid.lm_head_weight(teacher_params, frozen_cfg)
    # KL at every real position (prompt and template too), as the reference; CE on the assistant tokens only.
    loss, ce, kl, n = losses.fused_ce_kl_loss(
        s_hidden, hybrid.lm_head_weight(params, student_cfg), toks, mask, t_hidden, t_head, ce_weight=ce_w,
        kl_weight=kl_w, temperature=lc.temperature, kl_mask=losses.real_positions(seg),
        kl_reduction=lc.kl_reduction, dtype=student_cfg.compute_dtype)
    m = {"ce": ce, "n_tokens": jnp.asarray(n, jnp.float32)}
    if with_teacher:
      m["kl"] = kl
    return loss, m
  return lm_fn


def split_micro(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] for gradient accumulation."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mask, schedule, grad_accum: int):
  """(state, batch, frozen) -> (state, metrics). Micro-batches are averaged with equal weight."""

  def step(state: TrainState, batch: Batch, frozen) -> tuple[TrainState, dict]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
      (loss, m), grads = grad_fn(state.params, batch, frozen)
    else:
      micro = split_micro(batch, grad_accum)

      def body(carry, mb):
        (l, mm), g = grad_fn(state.params, mb, frozen)
        acc_g, acc_l, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_m, mm)), None
      mb0 = jax.tree.map(lambda x: x[0], micro)
      m_shape = jax.eval_shape(lambda: grad_fn(state.params, mb0, frozen)[0][1])
      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))
      (grads, loss, m), _ = jax.lax.scan(body, zeros, micro)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      n_tok = m.get("n_tokens")
      m = jax.tree.map(lambda x: x / grad_accum, m)
      if n_tok is not None:
        m["n_tokens"] = n_tok
      loss = loss / grad_accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = dict(m, loss=loss, grad_norm=masked_global_norm(grads, mask), lr=schedule(state.step))
    rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), m
  return step


def jit_train_step(step_fn, state_sh: TrainState, frozen_sh, mesh: Mesh):
  rep = shd.replicated(mesh)
  # Batch shardings come from the arrays themselves (shard_batch); the state is donated (updated in place).
  return jax.jit(step_fn, in_shardings=(state_sh, None, frozen_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


def make_eval_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, temperature: float = 1.0,
                   kernel_options=None):
  """(params, teacher_params | None, batch) -> token-weighted sums: ce_sum, n, [kl_sum, teacher_ce_sum]."""

  def ev(params, teacher_params, batch):
    toks, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    s = _logits(params, student_cfg, toks, seg, kernel_options)
    ce, n = losses.cross_entropy(s, toks, mask)
    n = jnp.asarray(n, jnp.float32)
    out = {"ce_sum": ce * n, "n": n}
    if teacher_params is not None:
      t = _logits(teacher_params, teacher_cfg, toks, seg, kernel_options)
      out["kl_sum"] = losses.kl_div(t, s, losses.target_weights(mask), temperature=temperature) * n
      tce, _ = losses.cross_entropy(t, toks, mask)
      out["teacher_ce_sum"] = tce * n
    return out
  return jax.jit(ev)


def make_dpo_eval_step(cfg: TrainConfig, student_cfg: ModelConfig, kernel_options=None):
  """(params, ref_params, batch) -> sums over real pairs of the DPO loss, reward margin and accuracy."""
  lc = cfg.loss

  def ev(params, ref_params, batch):
    toks = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
    seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]], 0)
    b = batch["chosen_tokens"].shape[0]
    pi = losses.sequence_logprob(_logits(params, student_cfg, toks, seg, kernel_options), toks, mask)
    ref = losses.sequence_logprob(_logits(ref_params, student_cfg, toks, seg, kernel_options), toks, mask)
    # per pair (vmap over scalars), so the padded rows of the last eval batch can be left out
    per = jax.vmap(lambda pc, pr, rc, rr: losses.dpo_loss(pc, pr, rc, rr, lc.dpo_beta, variant=lc.dpo_variant,
                                                           label_smoothing=lc.label_smoothing))
    loss, m = per(pi[:b], pi[b:], ref[:b], ref[b:])
    valid = (jnp.sum(batch["chosen_mask"], -1) > 0).astype(jnp.float32)
    return {"dpo_sum": jnp.sum(loss * valid), "margin_sum": jnp.sum(m["reward_margin"] * valid),
            "acc_sum": jnp.sum(m["reward_accuracy"] * valid), "n": jnp.sum(valid)}
  return jax.jit(ev)


def run_dpo_eval(eval_fn, params, ref_params, batches, mesh: Mesh) -> dict[str, float]:
  tot: dict[str, float] = {}
  for b in batches:
    out = eval_fn(params, ref_params, shd.shard_batch({k: b[k] for k in DPO_KEYS}, mesh))
    for k, v in out.items():
      tot[k] = tot.get(k, 0.0) + float(v)
  n = max(tot.get("n", 0.0), 1.0)
  return {"eval/dpo_loss": tot.get("dpo_sum", 0.0) / n, "eval/reward_margin": tot.get("margin_sum", 0.0) / n,
          "eval/reward_accuracy": tot.get("acc_sum", 0.0) / n, "eval/pairs": tot.get("n", 0.0)}


def run_eval(eval_fn, params, teacher_params, batches, mesh: Mesh) -> dict[str, float]:
  """Held-out perplexity of student (and teacher) and mean KL(teacher || student) over `batches`."""
  tot: dict[str, float] = {}
  for b in batches:
    out = eval_fn(params, teacher_params, shd.shard_batch({k: b[k] for k in LM_KEYS}, mesh))
    for k, v in out.items():
      tot[k] = tot.get(k, 0.0) + float(v)
  n = max(tot.get("n", 0.0), 1.0)
  res = {"eval/ppl": float(np.exp(tot.get("ce_sum", 0.0) / n)), "eval/ce": tot.get("ce_sum", 0.0) / n,
         "eval/tokens": tot.get("n", 0.0)}
  if "kl_sum" in tot:
    res["eval/kl"] = tot["kl_sum"] / n
    res["eval/teacher_ppl"] = float(np.exp(tot["teacher_ce_sum"] / n))
  return res


# ---- FLOPs / MFU ---------------------------------------------------------------------------------

PEAK_TFLOPS = {  # dense bf16 per device (vendor figures)
    "h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0, "l4": 121.0, "a10": 125.0,
    "v5e": 197.0, "v5 lite": 197.0, "v5p": 459.0, "v4": 275.0, "v6": 918.0,
}


def peak_flops_per_device(cfg_tflops: float) -> float | None:
  if cfg_tflops > 0:
    return cfg_tflops * 1e12
  kind = jax.devices()[0].device_kind.lower()
  for k, v in PEAK_TFLOPS.items():
    if k in kind:
      return v * 1e12
  return None  # CPU / unknown: MFU not reported


def matmul_params(params, mcfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (the embedding lookup is free unless tied)."""
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  if not mcfg.tie_word_embeddings:
    n -= int(params["embed_tokens"].size)
  return n


def flops_per_token(cfg: TrainConfig, n_student: int, n_frozen: int, student_cfg: ModelConfig | None = None,
                    frozen_cfg: ModelConfig | None = None) -> float:
  """6N per trained token for the student, 2N for each frozen forward (teacher / reference); with the model
  configs also the causal attention scores and values (PaLM's MFU convention, halved for causality:
  2 * seq_len * heads * head_dim per attention layer and forward; x3 for a trained forward + backward)."""
  uses_frozen = cfg.stage == "dpo" or uses_teacher(cfg)
  flops = 6.0 * n_student + (2.0 * n_frozen if uses_frozen else 0.0)
  t = cfg.data_config.seq_len

  def attn(mc: ModelConfig) -> float:
    return 2.0 * t * mc.num_attention_heads * mc.head_dim * (mc.num_hidden_layers - len(mc.ssm_layers))
  if student_cfg is not None:
    flops += 3.0 * attn(student_cfg)
  if frozen_cfg is not None and uses_frozen:
    flops += attn(frozen_cfg)
  return flops
