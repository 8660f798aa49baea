"""Mamba-2 mixer of MambaInLlama (reference: jxiw/MambaInLlama `mamba2/hybrid_mamba_layer.py`; docs/DESIGN.md).

Params (PyTorch names; Linear weights [in, out]; modules with a bias are {'weight', 'bias'}):
  in_proj [D, d_inner + 2 d_xb + d_inner + H]  (output columns z, x, B, C, dt)
  conv1d {'weight' [K, conv_dim], 'bias' [conv_dim]}  (conv_dim = 2 d_xb + d_inner: x, B, C)
  dt_bias [H]  A_log [H]  D [H]  norm [d_inner] (gated RMSNorm weight)  out_proj [d_inner, D]

The reference sets nheads = ngroups and headdim = d_state, so d_inner = H * N and each head has its own B and
C (recipes: ngroups = num_attention_heads, d_state = head_dim). The full-sequence, cached and speculative
paths are `SSMMixer`'s; this module gives the Mamba-2 pieces.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.layers import dense, linear_init
from hybrid_jax.model.mamba import conv_module, dt_bias_init
from hybrid_jax.model.mixer import SSMMixer

Array = jax.Array

NORM_EPS = 1e-5  # the reference builds RMSNormGated(eps=1e-5) whatever the model's rms_norm_eps


def dims(cfg: ModelConfig) -> dict:
  """d_inner, d_xb, H (heads = groups), N (= P, head dim), rep (GQA repeat), conv_dim, d_in_proj."""
  s = cfg.ssm
  h = s.ngroups or cfg.num_attention_heads
  n = s.d_state
  d_inner, d_xb = cfg.d_inner, cfg.d_xb
  if s.headdim and s.headdim != n:
    raise ValueError(f"Mamba-2 (MambaInLlama) uses headdim = d_state; got headdim={s.headdim}, d_state={n}")
  if d_inner != h * n:
    raise ValueError(f"Mamba-2 needs d_inner == ngroups * d_state; got {d_inner} != {h} * {n}")
  if d_xb % n or d_inner % d_xb:
    raise ValueError(f"Mamba-2 needs d_state={n} | d_xb={d_xb} | d_inner={d_inner}")
  return {"d_inner": d_inner, "d_xb": d_xb, "H": h, "N": n, "rep": d_inner // d_xb, "conv_dim": 2 * d_xb + d_inner,
          "d_in_proj": 2 * d_inner + 2 * d_xb + h}


def gated_rms_norm(y: Array, z: Array, weight: Array, group: int, eps: float = NORM_EPS) -> Array:
  """RMSNormGated(norm_before_gate=False): normalise y * silu(z) over groups of `group` channels (fp32)."""
  f32 = jnp.float32
  g = y.astype(f32) * jax.nn.silu(z.astype(f32))
  shp = g.shape
  gg = g.reshape(*shp[:-1], shp[-1] // group, group)
  gg = gg * jax.lax.rsqrt(jnp.mean(gg * gg, axis=-1, keepdims=True) + eps)
  return gg.reshape(shp) * weight.astype(f32)


class Mamba2(SSMMixer):
  """Mamba-2 mixer (scalar decay per head; x, B at the KV width, repeated per group after the conv)."""

  def setup(self):
    cfg = self.cfg
    m = dims(cfg)
    d, dt = cfg.hidden_size, cfg.params_dtype
    mat_dt = cfg.compute_dtype if self.packed else dt
    self.in_proj = self.param("in_proj", linear_init, (d, m["d_in_proj"]), mat_dt)
    self.conv1d = conv_module(cfg, m["conv_dim"])
    self.dt_bias = self.param("dt_bias", dt_bias_init(cfg), (m["H"],), dt)
    self.A_log = self.param(
        "A_log", lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)
                                                   ).astype(dtype), (m["H"],), dt)
    self.D = self.param("D", jax.nn.initializers.ones, (m["H"],), dt)
    self.norm = self.param("norm", jax.nn.initializers.ones, (m["d_inner"],), dt)
    self.out_proj = self.param("out_proj", linear_init, (m["d_inner"], d), mat_dt)

  @staticmethod
  def pack(p: dict, cfg: ModelConfig) -> dict:
    """The decoding layout: in_proj already serves every projection of u; matrices in the compute dtype."""
    dt = cfg.compute_dtype
    return {**p, "in_proj": p["in_proj"].astype(dt), "out_proj": p["out_proj"].astype(dt)}

  def conv_input(self, u: Array) -> tuple[Array, dict]:
    """in_proj split into z, the conv's (x, B, C) and dt (its bias is added inside the scan)."""
    m = dims(self.cfg)
    z, xbc, dt = jnp.split(dense(u, self.in_proj, self.cfg.compute_dtype),
                           [m["d_inner"], m["d_inner"] + m["conv_dim"]], axis=-1)
    return xbc, {"z": z, "dt": dt}

  def scan_inputs(self, xc: Array, rest: dict) -> dict:
    """silu after the conv, then GQA: kv group g -> heads g*rep .. g*rep+rep-1."""
    m = dims(self.cfg)
    b, t, _ = xc.shape
    d_xb, n, rep = m["d_xb"], m["N"], m["rep"]
    x, B, C = jnp.split(jax.nn.silu(xc).astype(self.cfg.compute_dtype), [d_xb, 2 * d_xb], axis=-1)
    return {"x": jnp.repeat(x.reshape(b, t, d_xb // n, n), rep, axis=2),
            "B": jnp.repeat(B.reshape(b, t, d_xb // n, n), rep, axis=2),
            "C": C.reshape(b, t, m["H"], n), **rest}

  def decay_params(self) -> tuple[Array, Array, Array]:
    return -jnp.exp(self.A_log.astype(jnp.float32)), self.D, self.dt_bias

  def scan(self, inp: dict, reset: Array, h0: Array | None) -> tuple[Array, Array]:
    """SSD recurrence -> y [b, t, H, P] (before the gate), final state [b, H, P, N] fp32."""
    A, D, dt_bias = self.decay_params()
    return pallas.ssd_scan(inp["x"], inp["dt"], A, inp["B"], inp["C"], D, dt_bias, reset=reset, h0=h0,
                           impl=self.scan_impl, options=self.kernel_options)

  def gate(self, inp: dict) -> None:
    return None  # Mamba-2 gates in the norm of `output`

  def output(self, y: Array, inp: dict) -> Array:
    """Gated RMSNorm (group = head dim) then out_proj. y [b, t, H, P], z [b, t, d_inner] -> [b, t, D]."""
    b, t = y.shape[:2]
    yn = gated_rms_norm(y.reshape(b, t, -1), inp["z"], self.norm, dims(self.cfg)["N"])
    return dense(yn.astype(self.cfg.compute_dtype), self.out_proj, self.cfg.compute_dtype)

  @nn.nowrap
  def state_shapes(self, batch: int) -> dict:
    m = dims(self.cfg)
    return {"conv": (batch, self.cfg.ssm.d_conv - 1, m["conv_dim"]), "ssm": (batch, m["H"], m["N"], m["N"])}

  @nn.nowrap
  def step_shapes(self, batch: int, r: int) -> dict:
    m = dims(self.cfg)
    return {"x": (batch, r, m["H"], m["N"]), "dt": (batch, r, m["H"]), "B": (batch, r, m["H"], m["N"])}
