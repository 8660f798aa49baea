"""Hybrid configs from a teacher and the attention-weight initialisation of the Mamba layers (docs/DESIGN.md).

`init_from_teacher` mirrors the reference's `init_with_kqvo`: for every replaced layer, Mamba-1 gets
in_proj_x <- v_proj, B_proj <- k_proj, C_proj <- q_proj, out_proj <- o_proj; Mamba-2 gets the x / B / C column
blocks of in_proj <- v / k / q and out_proj <- o_proj. Norms, MLPs, embeddings and head are the teacher's;
the rest of each mixer keeps its reference init.

The ablation baselines (MIXER_INITS): 'random' keeps the teacher's MLP and norms and leaves only the mixer at
its own init (a mild baseline); 'random_layer' is the reference's `init_with_kqvo=False`, which skips the
whole copy: the replaced layer's mixer, MLP (nn.Linear's default init) and norms (ones) are all new.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.config import ConfigError, ModelConfig, SSMConfig
from hybrid_jax.model import hybrid, mamba, mamba2
from hybrid_jax.model.layers import linear_init

Array = jax.Array


def hybrid_config(teacher_cfg: ModelConfig, attn_layers, variant: str = "mamba", **ssm_overrides) -> ModelConfig:
  """The recipes' hybrid of `teacher_cfg`: Mamba-1 ssm_cfg {expand: 1} (d_state 16); Mamba-2
  {expand: 1, ngroups: H, d_state: hd}. d_inner = D (= H * hd for Mamba-2), d_xb = Hkv * hd."""
  h, hd = teacher_cfg.num_attention_heads, teacher_cfg.head_dim
  if variant == "mamba":
    kw = {"variant": "mamba", "expand": 1, "d_state": 16}
  elif variant == "mamba2":
    kw = {"variant": "mamba2", "expand": 1, "ngroups": h, "d_state": hd, "d_inner": h * hd}
  else:
    raise ConfigError(f"variant must be 'mamba' or 'mamba2', got {variant!r}")
  kw.update(ssm_overrides)
  attn = tuple(sorted(int(i) for i in attn_layers))
  cfg = teacher_cfg.replace(attn_layers=attn, ssm=SSMConfig(**kw))
  if cfg.is_hybrid:  # fail now on dimensions the mixer cannot take, naming them
    try:
      (mamba.dims if variant == "mamba" else mamba2.dims)(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  return cfg


def attn_layers_for_fraction(n_layers: int, fraction: float) -> tuple[int, ...]:
  """Evenly spread attention layers keeping `fraction` of them, as in the recipes (50% of 32 layers:
  every even layer 0, 2, ..., 30; 25%: 0, 4, 8, ...; 0%: none)."""
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"attention fraction must be in [0, 1], got {fraction}")
  k = round(n_layers * fraction)
  if k == 0:
    return ()
  return tuple(sorted({int(i * n_layers / k) for i in range(k)}))


MIXER_INITS = ("attention", "random", "random_layer")


def init_from_teacher(teacher_params: dict, teacher_cfg: ModelConfig, hybrid_cfg: ModelConfig,
                      key: Array, mixer_init: str = "attention") -> dict:
  """Hybrid params: the teacher's everywhere, Mamba mixers initialised from the replaced attention
  (mixer_init 'attention', docs/DESIGN.md) or left at the mixer's own random init ('random': norms, MLPs,
  embeddings and head are still the teacher's), or the whole replaced layer new ('random_layer': the
  reference's init_with_kqvo=False, the paper's ablation baseline: random mixer and MLP, norms at one)."""
  if mixer_init not in MIXER_INITS:
    raise ConfigError(f"mixer init must be one of {MIXER_INITS}, got {mixer_init!r}")
  if teacher_cfg.is_hybrid:
    raise ConfigError("the teacher must be a plain Llama (all attention layers)")
  same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim")
  bad = [f for f in same if getattr(teacher_cfg, f) != getattr(hybrid_cfg, f)]
  if bad:
    raise ConfigError(f"hybrid and teacher configs differ in {bad}")
  out = dict(teacher_params)
  keys = jax.random.split(key, hybrid_cfg.num_hidden_layers)
  for i in hybrid_cfg.ssm_layers:
    name = f"layers_{i}"
    teacher_layer = teacher_params[name]
    mixer = dict(hybrid.init_mixer_params(hybrid_cfg, i, keys[i]))  # the mixer's reference init
    if mixer_init == "attention":
      _seed_from_attention(mixer, teacher_layer["self_attn"], hybrid_cfg, i)
    layer = {n: v for n, v in teacher_layer.items() if n != "self_attn"}
    if mixer_init == "random_layer":
      layer = _fresh_mlp_and_norms(layer, jax.random.fold_in(keys[i], 1), hybrid_cfg.params_dtype)
    out[name] = {**layer, "mamba": mixer}
  return jax.tree.map(jnp.asarray, out)


def _fresh_mlp_and_norms(layer: dict, key: Array, dtype) -> dict:
  """The layer's MLP at PyTorch nn.Linear's default init and its norms at one (the reference's
  MambaDecoderLayer as constructed, before any copy), same shapes as the teacher's."""
  mlp = layer["mlp"]
  keys = jax.random.split(key, len(mlp))
  new_mlp = {n: linear_init(k, tuple(mlp[n].shape), dtype) for n, k in zip(sorted(mlp), keys)}
  norms = {n: jnp.ones(v.shape, dtype) for n, v in layer.items() if n.endswith("layernorm")}
  return {**layer, **norms, "mlp": new_mlp}


def _seed_from_attention(m: dict, a: dict, hybrid_cfg: ModelConfig, layer: int) -> None:
  """In place: the mixer's x / B / C / out projections <- the attention's V / K / Q / O (docs/DESIGN.md)."""
  dt, d_model = hybrid_cfg.params_dtype, hybrid_cfg.hidden_size
  want = {"v_proj": (d_model, hybrid_cfg.d_xb), "k_proj": (d_model, hybrid_cfg.d_xb),
          "q_proj": (d_model, hybrid_cfg.d_inner), "o_proj": (hybrid_cfg.d_inner, d_model)}
  wrong = {n: tuple(a[n].shape) for n, s in want.items() if tuple(a[n].shape) != s}
  if wrong:  # e.g. d_inner != H * hd: the attention weights cannot seed the mixer
    raise ConfigError(f"layer {layer}: attention shapes {wrong} do not fit the mixer ({want})")
  if hybrid_cfg.ssm.variant == "mamba":
    m.update(in_proj_x=a["v_proj"].astype(dt), B_proj=a["k_proj"].astype(dt),
             C_proj=a["q_proj"].astype(dt), out_proj=a["o_proj"].astype(dt))
  else:
    d = mamba2.dims(hybrid_cfg)
    di, dxb = d["d_inner"], d["d_xb"]
    w = m["in_proj"]  # [D, z | x | B | C | dt]
    w = w.at[:, di:di + dxb].set(a["v_proj"].astype(dt))
    w = w.at[:, di + dxb:di + 2 * dxb].set(a["k_proj"].astype(dt))
    w = w.at[:, di + 2 * dxb:2 * di + 2 * dxb].set(a["q_proj"].astype(dt))
    m.update(in_proj=w, out_proj=a["o_proj"].astype(dt))
