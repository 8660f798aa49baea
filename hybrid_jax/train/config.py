"""Training configuration: small frozen dataclasses loaded from YAML (+ `a.b=value` overrides).

Unknown keys are rejected by name and values are checked, so a typo in a recipe fails before any work starts.

YAML layout (every section optional; defaults below):
  stage: distill                     # align | distill | sft | dpo
  model: {variant, attn_fraction | attn_layers, dtype, param_dtype, scan_impl, mixer_init, num_layers}
  data:  {paths, seq_len, batch_size, ...}  # hybrid_jax.data.DataConfig (validated there)
  train: {steps, grad_accum, seed, log_every, eval_every, eval_batches,
          save_every, keep_checkpoints, peak_tflops, output}
  optim: {lr, b1, b2, eps, weight_decay, warmup_steps, min_lr_ratio, max_grad_norm, trainable}
  loss:  {kl_weight, ce_weight, temperature, kl_reduction, dpo_beta, dpo_variant, label_smoothing}
  mesh:  {data, fsdp, tensor}         # -1 = the rest of the devices
  default_data: {n_train, n_eval, max_new_tokens, batch_size, answer_temperature, answer_top_p, n_text,
                 text_tokens}       # only when data.paths is empty
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from hybrid_jax.config import ATTENTION_IMPLS, REMAT_POLICIES, ConfigError
from hybrid_jax.errors import describe
from hybrid_jax.model.init import MIXER_INITS
from hybrid_jax.pallas import ScanImpl
from hybrid_jax.train.losses import KL_REDUCTIONS

STAGES = ("align", "distill", "sft", "dpo")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  variant: str = "mamba"              # Mamba mixer of the student: 'mamba' | 'mamba2'
  attn_fraction: float = 0.5          # fraction of layers that keep attention (when attn_layers is None)
  attn_layers: tuple[int, ...] | None = None
  dtype: str = "float32"              # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"
  scan_impl: str = "auto"             # Mamba scans: auto | reference | pallas | chunked
  remat: str = "none"                 # what each decoder layer keeps for the backward: none | dots | full
  attention_impl: str = "auto"        # cache-free attention: auto | xla | pallas | cudnn
  # new Mamba mixers: from the replaced attention (docs/DESIGN.md §3.3) | 'random' (mixer) | 'random_layer'
  # (mixer, MLP and norms)
  mixer_init: str = "attention"
  num_layers: int | None = None       # keep the teacher's first N layers only (a small draft); None: all

  def __post_init__(self):
    if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
      raise ConfigError(f"model.num_layers must be a positive integer or null, got {self.num_layers!r}")
    if self.mixer_init not in MIXER_INITS:
      raise ConfigError(f"model.mixer_init must be one of {MIXER_INITS}, got {self.mixer_init!r}")
    if self.variant not in ("mamba", "mamba2"):
      raise ConfigError(f"model.variant must be 'mamba' or 'mamba2', got {self.variant!r}")
    if not 0.0 <= self.attn_fraction <= 1.0:
      raise ConfigError(f"model.attn_fraction must be in [0, 1], got {self.attn_fraction}")
    if self.attn_layers is not None:
      object.__setattr__(self, "attn_layers", tuple(int(i) for i in self.attn_layers))
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.{name} must be float32|bfloat16|float16, got {getattr(self, name)!r}")
    for name, allowed in (("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                          ("scan_impl", tuple(v.value for v in ScanImpl))):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"model.{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
  steps: int = 100                    # optimiser steps (batch size / seq_len live in `data:`)
  grad_accum: int = 1                 # micro-batches per step; data.batch_size must divide by it
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0                 # 0 = only at start and end
  eval_batches: int = 8
  save_every: int = 0                 # 0 = only at the end (and on interrupt)
  keep_checkpoints: int = 2
  peak_tflops: float = 0.0            # per device; 0 = guess from the device kind
  output: str = "runs/default"

  def __post_init__(self):
    for name in ("steps", "grad_accum", "log_every", "eval_batches",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "save_every"):
      if getattr(self, name) < 0:
        raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float = 8e-5
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.0
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
  max_grad_norm: float = 1.0          # 0 = no clipping
  # Regex over param paths like 'layers_3/mamba/A_log', or `replaced` (every parameter of the Mamba layers);
  # None = the stage's default (align: Mamba mixers only; distill/sft/dpo: everything).
  trainable: str | None = None

  def __post_init__(self):
    if self.lr <= 0:
      raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
    if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
      raise ConfigError("optim.warmup_steps, optim.max_grad_norm and optim.weight_decay must be >= 0")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class LossSection:
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  temperature: float = 1.0
  # KL summed over every real position, divided by the positions ('token_mean') or by the rows ('batchmean':
  # the reference's reduction, ~seq_len x larger; the align recipes' kl 0.1 / ce 1 assume it)
  kl_reduction: str = "token_mean"
  dpo_beta: float = 0.1
  dpo_variant: str = "sigmoid"
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.kl_weight < 0 or self.ce_weight < 0:
      raise ConfigError("loss.kl_weight and loss.ce_weight must be >= 0")
    if self.temperature <= 0:
      raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
    if self.dpo_beta <= 0:
      raise ConfigError(f"loss.dpo_beta must be > 0, got {self.dpo_beta}")
    if self.kl_reduction not in KL_REDUCTIONS:
      raise ConfigError(f"loss.kl_reduction must be one of {'|'.join(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ConfigError(f"mesh sizes must be positive, with at most one -1; got data={self.data} "
                        f"fsdp={self.fsdp} tensor={self.tensor}")


@dataclasses.dataclass(frozen=True)
class DefaultDataSection:
  """Size of the teacher-generated default data (used only when data.paths is empty). Generation on a CPU
  costs ~ rows x tokens, so CPU recipes ask for just what their steps consume. The teacher answers greedily
  by default; a temperature > 0 samples its answers (more varied text per question, the same distribution
  the student is matched to). The held-out split follows the same settings."""
  n_train: int = 384
  n_eval: int = 32
  max_new_tokens: int = 64
  batch_size: int = 128
  answer_temperature: float = 0.0
  answer_top_p: float = 1.0
  n_text: int = 0                     # plain-text documents the teacher writes, mixed into the training data
  text_tokens: int = 192              # length cap of each document's continuation

  def __post_init__(self):
    for name in ("n_train", "max_new_tokens", "batch_size", "text_tokens"):
      if getattr(self, name) < 1:
        raise ConfigError(f"default_data.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("n_eval", "n_text"):
      if getattr(self, name) < 0:
        raise ConfigError(f"default_data.{name} must be >= 0, got {getattr(self, name)}")
    if self.answer_temperature < 0:
      raise ConfigError(f"default_data.answer_temperature must be >= 0, got {self.answer_temperature}")
    if not 0 < self.answer_top_p <= 1:
      raise ConfigError(f"default_data.answer_top_p must be in (0, 1], got {self.answer_top_p}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  stage: str = "distill"
  model: ModelSection = ModelSection()
  data: dict = dataclasses.field(default_factory=dict)   # validated by hybrid_jax.data.DataConfig
  train: TrainSection = TrainSection()
  optim: OptimSection = OptimSection()
  loss: LossSection = LossSection()
  mesh: MeshSection = MeshSection()
  default_data: DefaultDataSection = DefaultDataSection()

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ConfigError(f"stage must be one of {'|'.join(STAGES)}, got {self.stage!r}")
    from hybrid_jax.data.config import DataConfig  # validates data.* (unknown keys named there)
    dc = DataConfig.from_dict(self.data)
    if dc.batch_size % self.train.grad_accum:
      raise ConfigError(f"data.batch_size={dc.batch_size} is not a multiple of "
                        f"train.grad_accum={self.train.grad_accum}")

  @property
  def data_config(self):
    from hybrid_jax.data.config import DataConfig
    return DataConfig.from_dict(self.data)

  def __hash__(self):  # data is a dict; hash by the YAML text so the config can be a jit static
    return hash(yaml.safe_dump(self.to_dict(), sort_keys=True))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d["model"]["attn_layers"] is not None:
      d["model"]["attn_layers"] = list(d["model"]["attn_layers"])
    return d

  def replace(self, **kw) -> TrainConfig:
    return dataclasses.replace(self, **kw)


# ---- loading -------------------------------------------------------------------------------------

def _coerce(value: Any, typ: Any, where: str) -> Any:
  """Checks/coerces a YAML value against a field annotation (ints accepted for floats)."""
  if isinstance(typ, str):
    typ = eval(typ, globals())  # annotations are strings under `from __future__ import annotations`
  origin = typing.get_origin(typ)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(typ)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where} must be a list, got {value!r}")
    return tuple(_coerce(v, typing.get_args(typ)[0], where) for v in value)
  if typ is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)
  if typ is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value
  if typ is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value
  if typ is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
  if typ is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return dict(value)
  if dataclasses.is_dataclass(typ):
    return _build(typ, value, where)
  return value


def _build(cls, d: Any, where: str):
  if not isinstance(d, dict):
    raise ConfigError(f"{where or 'config'} must be a mapping, got {d!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    prefix = f"{where}." if where else ""
    raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                      f"(allowed in {where or 'top level'}: {', '.join(sorted(fields))})")
  kw = {k: _coerce(v, fields[k].type, f"{where}.{k}" if where else k) for k, v in d.items()}
  return cls(**kw)


def from_dict(d: dict[str, Any]) -> TrainConfig:
  return _build(TrainConfig, d or {}, "")


def parse_override(text: str) -> tuple[list[str], Any]:
  """'optim.lr=1e-4' -> (['optim', 'lr'], 1e-4); the value is parsed as YAML ('1e-4' as a float too)."""
  if "=" not in text:
    raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4)")
  key, raw = text.split("=", 1)
  value = yaml.safe_load(raw) if raw.strip() else None
  if isinstance(value, str):
    try:  # YAML 1.1 reads '1e-4' as a string
      value = float(value) if any(c in value for c in ".eE") else value
    except ValueError:
      pass
  return key.strip().split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
  d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()}
  for text in overrides:
    path, value = parse_override(text)
    node = d
    for p in path[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: {p} is not a section")
    node[path[-1]] = value
  return d


def load(path: str | None, overrides: list[str] = (), **top: Any) -> TrainConfig:
  """Reads a YAML recipe, applies `a.b=value` overrides and top-level keys (e.g. stage=...)."""
  d: dict[str, Any] = {}
  if path:
    try:
      with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f) or {}
    except FileNotFoundError:
      raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path}: {describe(e)}") from None
    if not isinstance(d, dict):
      raise ConfigError(f"{path}: top level must be a mapping")
  d = apply_overrides(d, list(overrides))
  d.update({k: v for k, v in top.items() if v is not None})
  return from_dict(d)
