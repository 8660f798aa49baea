"""Mamba-1 mixer of MambaInLlama (SPEC 2.1; reference: jxiw/MambaInLlama `mamba/hybrid_mamba_layer.py`).

Params (PyTorch names; Linear weights [in, out]; modules with a bias are {'weight', 'bias'} dicts):
  in_proj_x [D, d_xb]  in_proj_z [D, d_inner]  B_proj [D, d_xb]  C_proj [D, d_inner]
  conv1d {'weight' [K, d_inner], 'bias' [d_inner]}   (torch weight[:, 0, :].T)
  dt_proj_down [D, dt_rank]  dt_proj {'weight' [dt_rank, d_inner], 'bias' [d_inner]}
  A_log [d_inner, N]  D [d_inner]  out_proj [d_inner, D]

The mixer is split in three public pieces so that a speculative-decoding verifier can replay steps from
cached scan inputs: `scan_inputs` (projections, GQA repeat, conv), `scan`, `output`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.conv import causal_conv
from hybrid_jax.model.layers import dense, init_linear

Array = jax.Array


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
  """(d_inner, d_xb, N, repeat) with the divisibility the reference asserts implicitly."""
  d_inner, d_xb, n = cfg.d_inner, cfg.d_xb, cfg.ssm.d_state
  if d_xb % n or d_inner % n or d_inner % d_xb:
    raise ValueError(f"Mamba-1 needs d_state={n} | d_xb={d_xb} | d_inner={d_inner} (group repeat)")
  return d_inner, d_xb, n, d_inner // d_xb


def init_dt_bias(key: Array, n: int, cfg: ModelConfig) -> Array:
  """inverse-softplus of exp(U(log dt_min, log dt_max)) floored at dt_init_floor (reference init)."""
  s = cfg.ssm
  u = jax.random.uniform(key, (n,), jnp.float32)
  dt = jnp.exp(u * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
  dt = jnp.maximum(dt, s.dt_init_floor)
  return dt + jnp.log(-jnp.expm1(-dt))


def init_conv(key: Array, k: int, c: int, dtype) -> dict:
  """PyTorch Conv1d default init for a depthwise conv: fan_in = K, so weight and bias ~ U(+-1/sqrt(K))."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(k)
  return {"weight": jax.random.uniform(kw, (k, c), dtype, -bound, bound),
          "bias": jax.random.uniform(kb, (c,), dtype, -bound, bound)}


def init_mixer(key: Array, cfg: ModelConfig) -> dict:
  d = cfg.hidden_size
  d_inner, d_xb, n, _ = _dims(cfg)
  r = cfg.dt_rank
  dt = cfg.params_dtype
  ks = jax.random.split(key, 9)
  std = r ** -0.5  # dt_init="random", dt_scale=1
  return {
      "in_proj_x": init_linear(ks[0], d, d_xb, dt),
      "in_proj_z": init_linear(ks[1], d, d_inner, dt),
      "B_proj": init_linear(ks[2], d, d_xb, dt),
      "C_proj": init_linear(ks[3], d, d_inner, dt),
      "conv1d": init_conv(ks[4], cfg.ssm.d_conv, d_inner, dt),
      "dt_proj_down": init_linear(ks[5], d, r, dt),
      "dt_proj": {"weight": jax.random.uniform(ks[6], (r, d_inner), dt, -std, std),
                  "bias": init_dt_bias(ks[7], d_inner, cfg).astype(dt)},
      "A_log": jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d_inner, n))).astype(dt),
      "D": jnp.ones((d_inner,), dt),
      "out_proj": init_linear(ks[8], d_inner, d, dt),
  }


def init_state(cfg: ModelConfig, batch: int, dtype) -> dict:
  """conv [b, K-1, d_inner] (previous conv inputs), ssm [b, d_inner, N] fp32."""
  d_inner, n = cfg.d_inner, cfg.ssm.d_state
  return {"conv": jnp.zeros((batch, cfg.ssm.d_conv - 1, d_inner), dtype),
          "ssm": jnp.zeros((batch, d_inner, n), jnp.float32)}


def reset_from_segments(segment_ids: Array) -> Array:
  """[b, t] bool: True where a new segment starts (never at t=0: a carried state belongs to that token)."""
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                          segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def scan_inputs(p: dict, cfg: ModelConfig, u: Array, *, segment_ids: Array,
                conv_state: Array | None = None) -> tuple[dict, Array]:
  """Projections, group repeat and conv. u [b, t, D] -> ({'x' [b,t,d_inner], 'dt' [b,t,d_inner],
  'B' [b,t,d_inner/N,N], 'C' [b,t,d_inner/N,N], 'z' [b,t,d_inner]}, new conv state [b, K-1, d_inner]).

  dt already includes dt_proj.bias; the scan adds it once more (the reference's double bias, SPEC 2.1).
  Padding tokens (segment 0) get zero conv input and zero x, so they leave no trace in either state.
  """
  dtype = cfg.compute_dtype
  b, t, _ = u.shape
  d_inner, d_xb, n, rep = _dims(cfg)
  x = dense(u, p["in_proj_x"], dtype)
  z = dense(u, p["in_proj_z"], dtype)
  B = dense(u, p["B_proj"], dtype).reshape(b, t, d_xb // n, n)
  B = jnp.repeat(B, rep, axis=2)  # repeat_kv: group g -> groups g*rep .. g*rep+rep-1
  C = dense(u, p["C_proj"], dtype).reshape(b, t, d_inner // n, n)
  dt = dense(dense(u, p["dt_proj_down"], dtype), p["dt_proj"]["weight"], dtype)
  dt = dt + p["dt_proj"]["bias"].astype(dtype)
  # repeat_kv_before_conv=True: only x goes through the conv, on its repeated d_inner channels.
  x = jnp.repeat(x.reshape(b, t, d_xb // n, n), rep, axis=2).reshape(b, t, d_inner)
  real = (segment_ids != 0)[..., None]
  x = jnp.where(real, x, 0)
  xc, new_conv = causal_conv(x, p["conv1d"]["weight"], p["conv1d"]["bias"], segment_ids, conv_state)
  x = jnp.where(real, jax.nn.silu(xc), 0).astype(dtype)
  return {"x": x, "dt": dt, "B": B, "C": C, "z": z}, new_conv


def scan(p: dict, cfg: ModelConfig, inp: dict, *, reset: Array | None = None,
         h0: Array | None = None) -> tuple[Array, Array]:
  """Selective scan with the z gate: -> y [b, t, d_inner] (compute dtype), final state [b, d_inner, N] fp32."""
  A = -jnp.exp(p["A_log"].astype(jnp.float32))
  return pallas.selective_scan(inp["x"], inp["dt"], A, inp["B"], inp["C"], p["D"], p["dt_proj"]["bias"],
                               z=inp["z"], reset=reset, h0=h0, impl=cfg.ssm.scan_impl)


def output(p: dict, cfg: ModelConfig, y: Array) -> Array:
  """out_proj. y [b, t, d_inner] -> [b, t, D]."""
  return dense(y, p["out_proj"], cfg.compute_dtype)


def mixer(p: dict, cfg: ModelConfig, u: Array, *, segment_ids: Array,
          state: dict | None = None) -> tuple[Array, dict | None]:
  """u [b, t, D] -> (y [b, t, D], new state or None). `state` = init_state(...) layout when decoding."""
  inp, new_conv = scan_inputs(p, cfg, u, segment_ids=segment_ids,
                              conv_state=None if state is None else state["conv"])
  y, h = scan(p, cfg, inp, reset=reset_from_segments(segment_ids),
              h0=None if state is None else state["ssm"])
  out = output(p, cfg, y)
  if state is None:
    return out, None
  return out, {"conv": new_conv.astype(state["conv"].dtype), "ssm": h}
