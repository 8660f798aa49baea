"""Model configuration: small frozen dataclasses, JSON round-trippable, hashable (usable as jit statics).

A pure Llama is a hybrid whose `attn_layers` lists every layer, so one config type (and one forward) serves
teacher, student and draft models.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from hybrid_jax.pallas import ScanImpl


class ConfigError(ValueError):
  """A configuration that cannot work; the message names the field."""


ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
DECODE_ATTENTION_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class SSMConfig:
  """Mamba mixer settings (docs/DESIGN.md §3.1-3.2).

  variant: 'mamba' (Mamba-1 layer of MambaInLlama) or 'mamba2'.
  d_inner / d_xb: 0 means derive from the model (expand * D, and Hkv * hd).
  """
  variant: str = "mamba"
  d_state: int = 16
  d_conv: int = 4
  expand: int = 1
  dt_rank: int = 0  # Mamba-1 only; 0 -> ceil(D / 16)
  d_inner: int = 0
  d_xb: int = 0
  ngroups: int = 0  # Mamba-2 only; 0 -> num_heads
  headdim: int = 0  # Mamba-2 only; 0 -> head_dim of the attention
  chunk_size: int = 256
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  scan_impl: str = "auto"  # 'auto' | 'reference' | 'pallas' | 'chunked'

  def __post_init__(self):
    if self.variant not in ("mamba", "mamba2"):
      raise ConfigError(f"ssm.variant must be 'mamba' or 'mamba2', got {self.variant!r}")
    if self.scan_impl not in tuple(v.value for v in ScanImpl):
      raise ConfigError(f"ssm.scan_impl must be auto|reference|pallas|chunked, got {self.scan_impl!r}")
    if self.d_conv < 1 or self.d_state < 1 or self.expand < 1:
      raise ConfigError("ssm.d_conv, ssm.d_state and ssm.expand must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama / hybrid decoder config. Field names follow Hugging Face's LlamaConfig where one exists."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"  # 'default' | 'llama3'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  # Hybrid: indices of layers that keep attention; None means all (a plain Llama).
  attn_layers: tuple[int, ...] | None = None
  ssm: SSMConfig | None = None
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype; norms/softmax/scan in fp32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Runtime choices (no effect on the math): how attention runs without a cache ('auto': the Pallas flash
  # kernel with segment ids on GPU, the einsum elsewhere | 'xla' | 'pallas' | 'cudnn'); how a few new queries
  # attend over a cache, decode steps and verify calls ('xla': einsums | 'pallas': one kernel per call,
  # hybrid_jax.pallas.decode_attention, where its shapes allow); and what each decoder layer keeps for the
  # backward pass ('none': everything | 'dots': matmul outputs | 'full': only its input).
  attention_impl: str = "auto"
  decode_attention: str = "xla"
  remat: str = "none"

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.attn_layers is not None:
      object.__setattr__(self, "attn_layers", tuple(sorted(int(i) for i in self.attn_layers)))
    if isinstance(self.eos_token_id, int):
      object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
    elif self.eos_token_id is None:
      object.__setattr__(self, "eos_token_id", ())
    else:
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.ssm, dict):
      object.__setattr__(self, "ssm", SSMConfig(**self.ssm))
    self.validate()

  def validate(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads={self.num_key_value_heads}")
    if self.rope_type not in ("default", "llama3"):
      raise ConfigError(f"unsupported rope type {self.rope_type!r} (supported: default, llama3)")
    if self.attn_layers is not None:
      bad = [i for i in self.attn_layers if not 0 <= i < self.num_hidden_layers]
      if bad:
        raise ConfigError(f"attn_layers {bad} out of range for {self.num_hidden_layers} layers")
      if len(self.attn_layers) < self.num_hidden_layers and self.ssm is None:
        raise ConfigError("attn_layers leaves Mamba layers but no `ssm` config is given")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not a dtype") from e
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl must be one of {'|'.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
    if self.decode_attention not in DECODE_ATTENTION_IMPLS:
      raise ConfigError(f"decode_attention must be one of {'|'.join(DECODE_ATTENTION_IMPLS)}, "
                        f"got {self.decode_attention!r}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat must be one of {'|'.join(REMAT_POLICIES)}, got {self.remat!r}")

  # ---- derived -------------------------------------------------------------------------------
  def is_attention(self, layer: int) -> bool:
    return self.attn_layers is None or layer in self.attn_layers

  @property
  def ssm_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if not self.is_attention(i))

  @property
  def is_hybrid(self) -> bool:
    return bool(self.ssm_layers)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def d_inner(self) -> int:
    s = self.ssm or SSMConfig()
    if s.d_inner:
      return s.d_inner
    return s.expand * self.hidden_size

  @property
  def d_xb(self) -> int:
    s = self.ssm or SSMConfig()
    return s.d_xb or self.num_key_value_heads * self.head_dim

  @property
  def dt_rank(self) -> int:
    s = self.ssm or SSMConfig()
    return s.dt_rank or math.ceil(self.hidden_size / 16)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  # ---- serialisation -------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if self.attn_layers is not None:
      d["attn_layers"] = list(self.attn_layers)
    d["eos_token_id"] = list(self.eos_token_id)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError(f"unknown model config keys: {unknown}")
    d = dict(d)
    if d.get("ssm") is not None:
      ssm_fields = {f.name for f in dataclasses.fields(SSMConfig)}
      bad = sorted(set(d["ssm"]) - ssm_fields)
      if bad:
        raise ConfigError(f"unknown ssm config keys: {bad}")
      d["ssm"] = SSMConfig(**d["ssm"])
    if d.get("attn_layers") is not None:
      d["attn_layers"] = tuple(d["attn_layers"])
    return cls(**d)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2, sort_keys=True)

  @classmethod
  def load(cls, path: str | os.PathLike) -> ModelConfig:
    try:
      with open(path) as f:
        return cls.from_dict(json.load(f))
    except FileNotFoundError:
      raise FileNotFoundError(f"model config not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from None

  # ---- Hugging Face --------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """Reads a Hugging Face Llama `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "llama")
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
      raise ConfigError(f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
                        "only Llama (LlamaForCausalLM) teachers are supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError("attention_bias / mlp_bias Llama variants are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_type=rope_type,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id") or (),
    )
    if rope_type == "llama3":
      kw.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position=int(rope["original_max_position_embeddings"]))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """The Llama part of this config as a Hugging Face `config.json` dict."""
    d = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=self.vocab_size,
        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=self.bos_token_id,
        eos_token_id=(list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]),
        torch_dtype="float32",
    )
    if self.rope_type == "llama3":
      d["rope_scaling"] = dict(rope_type="llama3", factor=self.rope_factor,
                               low_freq_factor=self.rope_low_freq_factor,
                               high_freq_factor=self.rope_high_freq_factor,
                               original_max_position_embeddings=self.rope_original_max_position)
    return d
