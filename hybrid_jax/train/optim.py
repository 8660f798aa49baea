"""Optimiser: AdamW + cosine schedule with warmup + global-norm clipping, on the trainable params only.

Frozen parameters go through `optax.set_to_zero()` inside `optax.multi_transform`, whose masked inner states
hold `MaskedNode`s for them: no Adam moments are allocated for frozen weights, and the clipping norm is taken
over the trainable gradients only.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.config import ConfigError
from hybrid_jax.train.config import OptimSection
from hybrid_jax.train.sharding import path_strings

# Stage defaults of optim.trainable (regex over 'layers_3/mamba/A_log'-style paths).
DEFAULT_TRAINABLE = {
    "align": r"^layers_\d+/mamba/",    # docs/DESIGN.md §4: only the Mamba mixers train in stepwise alignment
    "distill": r".*",
    "sft": r".*",
    "dpo": r".*",
}


# optim.trainable keywords: names for patterns that depend on the student's layout.
REPLACED = "replaced"   # every parameter of the layers whose mixer is Mamba (mixer, MLP, norms)


def trainable_pattern(stage: str, cfg: OptimSection, model_cfg=None) -> str:
  """The regex `optim.trainable` stands for; `replaced` needs the student's ModelConfig (its attn_layers)."""
  if cfg.trainable is None:
    return DEFAULT_TRAINABLE[stage]
  if cfg.trainable != REPLACED:
    return cfg.trainable
  if model_cfg is None:
    raise ConfigError(f"optim.trainable={REPLACED!r} needs the student's model config")
  mamba = model_cfg.ssm_layers
  if not mamba:
    raise ConfigError(f"optim.trainable={REPLACED!r}: the student has no Mamba layers (model.attn_layers keeps "
                      "every layer)")
  return "^layers_(" + "|".join(str(i) for i in mamba) + ")/"


def trainable_mask(params, pattern: str):
  """Pytree of bools: True where the param path matches `pattern` (re.search)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"optim.trainable={pattern!r} is not a valid regex: {e}") from None
  mask = jax.tree.map(lambda p: bool(rx.search(p)), path_strings(params))
  if not any(jax.tree.leaves(mask)):
    raise ConfigError(f"optim.trainable={pattern!r} matches no parameter (paths look like "
                      f"{jax.tree.leaves(path_strings(params))[:3]})")
  return mask


def lr_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at `total_steps`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimSection, total_steps: int, mask) -> optax.GradientTransformation:
  """AdamW on the params where `mask` is True; zero updates (and no state) elsewhere."""
  sched = lr_schedule(cfg, total_steps)
  chain = []
  if cfg.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  chain.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))  # no decay on vectors
  train = optax.chain(*chain)
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def masked_global_norm(grads, mask) -> jax.Array:
  """Global L2 norm over the trainable gradients (what clipping sees)."""
  leaves = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m]
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
