"""Mamba-1 mixer of MambaInLlama (reference: jxiw/MambaInLlama `mamba/hybrid_mamba_layer.py`; docs/DESIGN.md).

Params (PyTorch names; Linear weights [in, out]; modules with a bias are {'weight', 'bias'}):
  in_proj_x [D, d_xb]  in_proj_z [D, d_inner]  B_proj [D, d_xb]  C_proj [D, d_inner]
  conv1d {'weight' [K, d_inner], 'bias' [d_inner]}   (torch weight[:, 0, :].T)
  dt_proj_down [D, dt_rank]  dt_proj {'weight' [dt_rank, d_inner], 'bias' [d_inner]}
  A_log [d_inner, N]  D [d_inner]  out_proj [d_inner, D]
The full-sequence, cached and speculative paths are `SSMMixer`'s; this module gives the Mamba-1 pieces.
"""
from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.layers import WeightAndBias, dense, linear_init, uniform_init
from hybrid_jax.model.mixer import SSMMixer

Array = jax.Array


def dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
  """(d_inner, d_xb, N, repeat) with the divisibility the reference asserts implicitly."""
  d_inner, d_xb, n = cfg.d_inner, cfg.d_xb, cfg.ssm.d_state
  if d_xb % n or d_inner % n or d_inner % d_xb:
    raise ValueError(f"Mamba-1 needs d_state={n} | d_xb={d_xb} | d_inner={d_inner} (group repeat)")
  return d_inner, d_xb, n, d_inner // d_xb


def dt_bias_init(cfg: ModelConfig):
  """inverse-softplus of exp(U(log dt_min, log dt_max)) floored at dt_init_floor (the reference's init)."""
  s = cfg.ssm

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
    dt = jnp.maximum(dt, s.dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def conv_module(cfg: ModelConfig, channels: int) -> WeightAndBias:
  """PyTorch Conv1d default init for a depthwise conv: fan_in = K, so weight and bias ~ U(+-1/sqrt(K))."""
  k = cfg.ssm.d_conv
  init = uniform_init(1.0 / math.sqrt(k))
  return WeightAndBias((k, channels), init, init, cfg.params_dtype, name="conv1d")


# The projections of the layer input u (x, z, B, C, and dt's low-rank factor): their names, and the column order
# of the packed layout's single in_proj.
U_PROJECTIONS = ("in_proj_x", "in_proj_z", "B_proj", "C_proj", "dt_proj_down")


class Mamba(SSMMixer):
  """Mamba-1 mixer (MambaInLlama's variant: x and B at the KV width, repeated per group like GQA)."""

  def setup(self):
    cfg = self.cfg
    d = cfg.hidden_size
    d_inner, _, n, _ = dims(cfg)
    r, dt = cfg.dt_rank, cfg.params_dtype
    mat_dt = cfg.compute_dtype if self.packed else dt
    if self.packed:
      self.in_proj = self.param("in_proj", linear_init, (d, sum(self.input_widths().values())), mat_dt)
    else:
      for name, width in self.input_widths().items():
        setattr(self, name, self.param(name, linear_init, (d, width), dt))
    self.conv1d = conv_module(cfg, d_inner)
    # dt_init="random", dt_scale=1: weight ~ U(+-dt_rank^-0.5)
    self.dt_proj = WeightAndBias((r, d_inner), uniform_init(r ** -0.5), dt_bias_init(cfg), dt, name="dt_proj")
    self.A_log = self.param(
        "A_log", lambda _, shape, dtype: jnp.log(jnp.broadcast_to(
            jnp.arange(1, shape[1] + 1, dtype=jnp.float32), shape)).astype(dtype), (d_inner, n), dt)
    self.D = self.param("D", jax.nn.initializers.ones, (d_inner,), dt)
    self.out_proj = self.param("out_proj", linear_init, (d_inner, d), mat_dt)

  @nn.nowrap
  def input_widths(self) -> dict[str, int]:
    """{name: output width} of the projections of u, in the packed in_proj's column order."""
    d_inner, d_xb, _, _ = dims(self.cfg)
    return dict(zip(U_PROJECTIONS, (d_xb, d_inner, d_xb, d_inner, self.cfg.dt_rank)))

  @staticmethod
  def pack(p: dict, cfg: ModelConfig) -> dict:
    """The five projections of u -> one in_proj; matrices in the compute dtype (the decoding layout)."""
    dt = cfg.compute_dtype
    out = {k: v for k, v in p.items() if k not in U_PROJECTIONS}
    out["in_proj"] = jnp.concatenate([p[k] for k in U_PROJECTIONS], axis=1).astype(dt)
    out["dt_proj"] = {"weight": p["dt_proj"]["weight"].astype(dt), "bias": p["dt_proj"]["bias"]}
    out["out_proj"] = p["out_proj"].astype(dt)
    return out

  def conv_input(self, u: Array) -> tuple[Array, dict]:
    """x at the KV width, repeated per group before the conv (repeat_kv_before_conv=True)."""
    dtype = self.cfg.compute_dtype
    b, t, _ = u.shape
    d_inner, d_xb, n, rep = dims(self.cfg)
    if self.packed:
      x, z, B, C, dt_low = jnp.split(dense(u, self.in_proj, dtype),
                                     list(itertools.accumulate(self.input_widths().values()))[:-1], axis=-1)
    else:
      x, z, B, C, dt_low = (dense(u, getattr(self, name), dtype) for name in U_PROJECTIONS)
    x = jnp.repeat(x.reshape(b, t, d_xb // n, n), rep, axis=2).reshape(b, t, d_inner)
    B = jnp.repeat(B.reshape(b, t, d_xb // n, n), rep, axis=2)
    C = C.reshape(b, t, d_inner // n, n)
    dt = dense(dt_low, self.dt_proj.weight, dtype)
    dt = dt + self.dt_proj.bias.astype(dtype)  # the first of the reference's two dt biases (docs/DESIGN.md)
    return x, {"z": z, "B": B, "C": C, "dt": dt}

  def scan_inputs(self, xc: Array, rest: dict) -> dict:
    return {"x": jax.nn.silu(xc).astype(self.cfg.compute_dtype), **rest}

  def decay_params(self) -> tuple[Array, Array, Array]:
    return -jnp.exp(self.A_log.astype(jnp.float32)), self.D, self.dt_proj.bias

  def scan(self, inp: dict, reset: Array, h0: Array | None) -> tuple[Array, Array]:
    """Selective scan with the z gate (the scan adds dt_proj.bias once more) -> y [b, t, d_inner], h fp32."""
    A, D, dt_bias = self.decay_params()
    return pallas.selective_scan(inp["x"], inp["dt"], A, inp["B"], inp["C"], D, dt_bias, z=inp["z"],
                                 reset=reset, h0=h0, impl=self.scan_impl, options=self.kernel_options)

  def gate(self, inp: dict) -> Array:
    return inp["z"]

  def output(self, y: Array, inp: dict) -> Array:
    return dense(y, self.out_proj, self.cfg.compute_dtype)

  @nn.nowrap
  def state_shapes(self, batch: int) -> dict:
    d_inner, _, n, _ = dims(self.cfg)
    return {"conv": (batch, self.cfg.ssm.d_conv - 1, d_inner), "ssm": (batch, d_inner, n)}

  @nn.nowrap
  def step_shapes(self, batch: int, r: int) -> dict:
    d_inner, _, n, _ = dims(self.cfg)
    return {"x": (batch, r, d_inner), "dt": (batch, r, d_inner), "B": (batch, r, d_inner // n, n)}
