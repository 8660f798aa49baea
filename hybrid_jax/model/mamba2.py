"""Mamba-2 mixer of MambaInLlama (SPEC 2.2; reference: jxiw/MambaInLlama `mamba2/hybrid_mamba_layer.py`).

Params (PyTorch names; Linear weights [in, out]; modules with a bias are {'weight', 'bias'} dicts):
  in_proj [D, d_inner + 2 d_xb + d_inner + H]  (output columns z, x, B, C, dt)
  conv1d {'weight' [K, conv_dim], 'bias' [conv_dim]}  (conv_dim = 2 d_xb + d_inner: x, B, C)
  dt_bias [H]  A_log [H]  D [H]  norm [d_inner] (gated RMSNorm weight)  out_proj [d_inner, D]

The reference sets nheads = ngroups and headdim = d_state, so d_inner = H * N and each head has its own B and
C (recipes: ngroups = num_attention_heads, d_state = head_dim). Split like mamba.py into `scan_inputs`,
`scan`, `output` for replay by a speculative-decoding verifier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.conv import causal_conv
from hybrid_jax.model.layers import dense, init_linear
from hybrid_jax.model.mamba import init_conv, init_dt_bias, reset_from_segments

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


def init_mixer(key: Array, cfg: ModelConfig) -> dict:
  m = dims(cfg)
  d = cfg.hidden_size
  dt = cfg.params_dtype
  ks = jax.random.split(key, 5)
  return {
      "in_proj": init_linear(ks[0], d, m["d_in_proj"], dt),
      "conv1d": init_conv(ks[1], cfg.ssm.d_conv, m["conv_dim"], dt),
      "dt_bias": init_dt_bias(ks[2], m["H"], cfg).astype(dt),
      "A_log": jnp.log(jax.random.uniform(ks[3], (m["H"],), jnp.float32, 1.0, 16.0)).astype(dt),
      "D": jnp.ones((m["H"],), dt),
      "norm": jnp.ones((m["d_inner"],), dt),
      "out_proj": init_linear(ks[4], m["d_inner"], d, dt),
  }


def init_state(cfg: ModelConfig, batch: int, dtype) -> dict:
  """conv [b, K-1, conv_dim] (previous conv inputs), ssm [b, H, P, N] fp32."""
  m = dims(cfg)
  return {"conv": jnp.zeros((batch, cfg.ssm.d_conv - 1, m["conv_dim"]), dtype),
          "ssm": jnp.zeros((batch, m["H"], m["N"], m["N"]), jnp.float32)}


def scan_inputs(p: dict, cfg: ModelConfig, u: Array, *, segment_ids: Array,
                conv_state: Array | None = None) -> tuple[dict, Array]:
  """in_proj, conv over (x, B, C), GQA repeat. u [b, t, D] -> ({'x' [b,t,H,P], 'dt' [b,t,H] (no bias),
  'B' [b,t,H,N], 'C' [b,t,H,N], 'z' [b,t,d_inner]}, new conv state [b, K-1, conv_dim]).
  Padding tokens (segment 0) get zero conv input and zero x: they leave no trace in either state."""
  dtype = cfg.compute_dtype
  m = dims(cfg)
  b, t, _ = u.shape
  d_inner, d_xb, h, n = m["d_inner"], m["d_xb"], m["H"], m["N"]
  zxbcdt = dense(u, p["in_proj"], dtype)
  z, xbc, dt = jnp.split(zxbcdt, [d_inner, d_inner + m["conv_dim"]], axis=-1)
  real = (segment_ids != 0)[..., None]
  xbc = jnp.where(real, xbc, 0)
  xbc, new_conv = causal_conv(xbc, p["conv1d"]["weight"], p["conv1d"]["bias"], segment_ids, conv_state)
  xbc = jax.nn.silu(xbc).astype(dtype)
  x, B, C = jnp.split(xbc, [d_xb, 2 * d_xb], axis=-1)
  x = jnp.where(real, x, 0)
  # GQA after the conv: kv group g -> heads g*rep .. g*rep+rep-1.
  x = jnp.repeat(x.reshape(b, t, d_xb // n, n), m["rep"], axis=2)
  B = jnp.repeat(B.reshape(b, t, d_xb // n, n), m["rep"], axis=2)
  C = C.reshape(b, t, h, n)
  return {"x": x, "dt": dt, "B": B, "C": C, "z": z}, new_conv


def scan(p: dict, cfg: ModelConfig, inp: dict, *, reset: Array | None = None,
         h0: Array | None = None) -> tuple[Array, Array]:
  """SSD recurrence: -> y [b, t, H, P] (compute dtype, before the gate), final state [b, H, P, N] fp32."""
  A = -jnp.exp(p["A_log"].astype(jnp.float32))
  return pallas.ssd_scan(inp["x"], inp["dt"], A, inp["B"], inp["C"], p["D"], p["dt_bias"], reset=reset,
                         h0=h0, impl=cfg.ssm.scan_impl)


def gated_rms_norm(y: Array, z: Array, weight: Array, group: int, eps: float = NORM_EPS) -> Array:
  """RMSNormGated(norm_before_gate=False): normalise y * silu(z) over groups of `group` channels (fp32)."""
  f32 = jnp.float32
  g = y.astype(f32) * jax.nn.silu(z.astype(f32))
  shp = g.shape
  gg = g.reshape(*shp[:-1], shp[-1] // group, group)
  gg = gg * jax.lax.rsqrt(jnp.mean(gg * gg, axis=-1, keepdims=True) + eps)
  return gg.reshape(shp) * weight.astype(f32)


def output(p: dict, cfg: ModelConfig, y: Array, z: Array) -> Array:
  """Gated RMSNorm (group = head dim) then out_proj. y [b, t, H, P], z [b, t, d_inner] -> [b, t, D]."""
  b, t = y.shape[:2]
  yn = gated_rms_norm(y.reshape(b, t, -1), z, p["norm"], dims(cfg)["N"])
  return dense(yn.astype(cfg.compute_dtype), p["out_proj"], cfg.compute_dtype)


def mixer(p: dict, cfg: ModelConfig, u: Array, *, segment_ids: Array,
          state: dict | None = None) -> tuple[Array, dict | None]:
  """u [b, t, D] -> (y [b, t, D], new state or None). `state` = init_state(...) layout when decoding."""
  inp, new_conv = scan_inputs(p, cfg, u, segment_ids=segment_ids,
                              conv_state=None if state is None else state["conv"])
  y, h = scan(p, cfg, inp, reset=reset_from_segments(segment_ids),
              h0=None if state is None else state["ssm"])
  out = output(p, cfg, y, inp["z"])
  if state is None:
    return out, None
  return out, {"conv": new_conv.astype(state["conv"].dtype), "ssm": h}
