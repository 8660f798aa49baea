"""Speculative-mode caches and the multi-token forward that drafts and verifies with them (SPEC section 4).

Attention layers keep the ordinary KV cache: a call writes its t tokens at cache.pos[b], and rolling back is
just setting cache.pos[b] to the accepted length (later writes overwrite the rejected keys; the causal mask
never lets a query see keys past its own index).

A Mamba layer's state cannot be rolled back, so in speculative mode its cache is

  'ckpt'      [b, ...state]        fp32 state at position ckpt_pos[b] (the last position known to be verified)
  'ckpt_pos'  [b] int32
  'x','dt','B' [b, R, ...]         scan inputs of the steps ckpt_pos, ckpt_pos+1, ... (R slots, R = k + 1)
  'conv'      [b, d_conv-1+R, C]   conv inputs: the d_conv-1 before ckpt_pos, then one per cached step

and every call with t new tokens at cache.pos[b] runs `multistep_scan`: replay the s = pos - ckpt_pos cached
steps from the checkpoint (the ones still valid after a rollback), then run the t new steps. With commit=True
the replayed state becomes the new checkpoint (ckpt_pos = pos) and the new steps are cached from slot 0;
with commit=False (the draft's later steps inside one round, which are not verified yet) the checkpoint stays
and the new steps are appended at slot s. Rolling back is again only `pos`: the next call replays fewer steps.
The state is never stored per step; on GPU the Pallas kernel keeps it in registers for the whole call.

The projection/conv split of the mixers is re-expressed here (`_conv_input` / `_scan_inputs_from_conv`)
because the mixers' `scan_inputs` fuses the conv, and rolling the conv back needs the raw conv inputs;
tests/test_speculative.py checks that the two agree exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import llama, mamba, mamba2
from hybrid_jax.model.cache import Cache
from hybrid_jax.model.conv import causal_conv
from hybrid_jax.model.hybrid import logits_from_hidden
from hybrid_jax.model.layers import dense, mlp, rms_norm
from hybrid_jax.pallas import multistep_scan

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Mixer pieces: projections -> (raw conv input, the rest); conv output + the rest -> scan inputs.
def _conv_input(p: dict, cfg: ModelConfig, u: Array) -> tuple[Array, dict]:
  """u [b, t, D] -> raw conv input [b, t, C] and the projections that bypass the conv."""
  dtype = cfg.compute_dtype
  b, t, _ = u.shape
  if cfg.ssm.variant == "mamba":
    d_inner, d_xb, n, rep = mamba._dims(cfg)
    x = dense(u, p["in_proj_x"], dtype)
    x = jnp.repeat(x.reshape(b, t, d_xb // n, n), rep, axis=2).reshape(b, t, d_inner)
    B = jnp.repeat(dense(u, p["B_proj"], dtype).reshape(b, t, d_xb // n, n), rep, axis=2)
    C = dense(u, p["C_proj"], dtype).reshape(b, t, d_inner // n, n)
    dt = dense(dense(u, p["dt_proj_down"], dtype), p["dt_proj"]["weight"], dtype)
    dt = dt + p["dt_proj"]["bias"].astype(dtype)  # the first of the reference's two dt biases (SPEC 2.1)
    return x, {"z": dense(u, p["in_proj_z"], dtype), "B": B, "C": C, "dt": dt}
  m = mamba2.dims(cfg)
  z, xbc, dt = jnp.split(dense(u, p["in_proj"], dtype), [m["d_inner"], m["d_inner"] + m["conv_dim"]], axis=-1)
  return xbc, {"z": z, "dt": dt}


def _scan_inputs_from_conv(cfg: ModelConfig, xc: Array, rest: dict) -> dict:
  """Conv output (before silu) + the bypass projections -> the mixers' scan-input dict."""
  dtype = cfg.compute_dtype
  xc = jax.nn.silu(xc).astype(dtype)
  if cfg.ssm.variant == "mamba":
    return {"x": xc, **rest}
  m = mamba2.dims(cfg)
  b, t, _ = xc.shape
  d_xb, n, rep = m["d_xb"], m["N"], m["rep"]
  x, B, C = jnp.split(xc, [d_xb, 2 * d_xb], axis=-1)
  return {"x": jnp.repeat(x.reshape(b, t, d_xb // n, n), rep, axis=2),
          "B": jnp.repeat(B.reshape(b, t, d_xb // n, n), rep, axis=2),
          "C": C.reshape(b, t, m["H"], n), **rest}


def _ssm_params(p: dict, cfg: ModelConfig) -> tuple[Array, Array, Array]:
  """(A, D, dt_bias) as the scans take them."""
  A = -jnp.exp(p["A_log"].astype(jnp.float32))
  if cfg.ssm.variant == "mamba":
    return A, p["D"], p["dt_proj"]["bias"]
  return A, p["D"], p["dt_bias"]


# ------------------------------------------------------------------------------------------------
# Caches
def _spec_layer_cache(cfg: ModelConfig, state: dict, pos: Array, k: int) -> dict:
  """A Mamba layer's ordinary decode state {'conv' [b, K-1, C], 'ssm'} at position pos [b] -> spec layout."""
  r = k + 1
  conv, h = state["conv"], state["ssm"]
  b, dtype = conv.shape[0], conv.dtype
  if cfg.ssm.variant == "mamba":  # x, dt [b,R,d_inner]; B [b,R,d_inner/N,N]
    d_inner, _, n, _ = mamba._dims(cfg)
    shapes = {"x": (b, r, d_inner), "dt": (b, r, d_inner), "B": (b, r, d_inner // n, n)}
  else:  # x [b,R,H,P]; dt [b,R,H]; B [b,R,H,N]
    m = mamba2.dims(cfg)
    shapes = {"x": (b, r, m["H"], m["N"]), "dt": (b, r, m["H"]), "B": (b, r, m["H"], m["N"])}
  return {"ckpt": h.astype(jnp.float32), "ckpt_pos": pos.astype(jnp.int32),
          "conv": jnp.concatenate([conv, jnp.zeros((b, r, conv.shape[2]), dtype)], axis=1),
          **{name: jnp.zeros(shape, dtype) for name, shape in shapes.items()}}


def to_spec_cache(cfg: ModelConfig, cache: Cache, k: int) -> Cache:
  """An ordinary cache (e.g. right after prefill) -> the speculative layout with checkpoints at cache.pos,
  with room for calls of up to k + 1 tokens between checkpoints."""
  return cache.replace(layers=tuple(
      lc if cfg.is_attention(i) else _spec_layer_cache(cfg, lc, cache.pos, k)
      for i, lc in enumerate(cache.layers)))


def _per_seq(fn, *args):
  return jax.vmap(fn)(*args)


def _slice(a: Array, start: Array, size: int) -> Array:
  """a [b, L, ...] -> a[b, start[b]:start[b]+size] per sequence."""
  return _per_seq(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0), a, start)


def _put(a: Array, new: Array, start: Array) -> Array:
  """Writes new [b, t, ...] into a [b, L, ...] at start[b] per sequence."""
  return _per_seq(lambda x, v, s: jax.lax.dynamic_update_slice_in_dim(x, v.astype(x.dtype), s, axis=0),
                  a, new, start)


# ------------------------------------------------------------------------------------------------
# Mixer and decoder in speculative mode
def spec_mixer(p: dict, cfg: ModelConfig, u: Array, lc: dict, pos: Array, *, commit: bool
               ) -> tuple[Array, dict]:
  """One Mamba layer on t new tokens u [b, t, D] at positions pos[b].. (see the module docstring).

  Requires pos - ckpt_pos + t <= R (commit=False) or t <= R (commit=True). Returns (out [b, t, D], new lc).
  """
  t = u.shape[1]
  r = lc["x"].shape[1]
  kc = lc["conv"].shape[1] - r  # d_conv - 1
  if t > r:
    raise ValueError(f"speculative call of {t} tokens exceeds the cache's {r} step slots")
  s = pos - lc["ckpt_pos"]  # cached steps still valid (the verified or drafted ones since the checkpoint)
  xr, rest = _conv_input(p, cfg, u)
  conv = lc["conv"]
  if commit:  # the window moves to the new checkpoint: its d_conv-1 inputs, then free slots
    conv = jnp.concatenate([_slice(conv, s, kc), jnp.zeros_like(conv[:, kc:])], axis=1)
    slot = jnp.zeros_like(s)
  else:
    slot = s
  xc, _ = causal_conv(xr, p["conv1d"]["weight"], p["conv1d"]["bias"], None, _slice(conv, slot, kc))
  inp = _scan_inputs_from_conv(cfg, xc, rest)
  A, D, dt_bias = _ssm_params(p, cfg)
  z = inp["z"] if cfg.ssm.variant == "mamba" else None
  y, ckpt, _ = multistep_scan(lc["ckpt"], lc["x"], lc["dt"], lc["B"], s, inp["x"], inp["dt"], inp["B"],
                              inp["C"], A, D, dt_bias, z, impl=cfg.ssm.scan_impl)
  out = mamba.output(p, cfg, y) if cfg.ssm.variant == "mamba" else mamba2.output(p, cfg, y, inp["z"])
  new = {"conv": _put(conv, xr, kc + slot),
         "x": _put(lc["x"], inp["x"], slot), "dt": _put(lc["dt"], inp["dt"], slot),
         "B": _put(lc["B"], inp["B"], slot),
         "ckpt": ckpt if commit else lc["ckpt"],
         "ckpt_pos": pos if commit else lc["ckpt_pos"]}
  return out, new


def spec_forward(params: dict, cfg: ModelConfig, tokens: Array, cache: Cache, *, commit: bool
                 ) -> tuple[Array, Cache]:
  """hybrid.forward with a cache, for tokens [b, t] that extend each sequence at cache.pos[b] after its
  prompt (no padding among them), with Mamba layers in the speculative layout. -> logits [b, t, V] fp32."""
  b, t = tokens.shape
  dtype = cfg.compute_dtype
  abs_idx = cache.pos[:, None] + jnp.arange(t)[None, :]
  positions = jnp.maximum(abs_idx - cache.offset[:, None], 0)
  key_idx = jnp.arange(cache.max_len)[None, None, :]
  mask = (key_idx <= abs_idx[..., None]) & (key_idx >= cache.offset[:, None, None])
  cos, sin = llama.rope_tables(cfg, positions)
  x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)
  layers = []
  for i, lp in enumerate(params["layers"]):
    h = rms_norm(x, lp["input_layernorm"], cfg.rms_norm_eps)
    if "self_attn" in lp:
      a, lc = llama.attention(lp["self_attn"], cfg, h, cos, sin, mask, cache.layers[i], cache.pos)
    else:
      a, lc = spec_mixer(lp["mamba"], cfg, h, cache.layers[i], cache.pos, commit=commit)
    x = x + a.astype(x.dtype)
    x = x + mlp(lp["mlp"], rms_norm(x, lp["post_attention_layernorm"], cfg.rms_norm_eps), dtype).astype(x.dtype)
    layers.append(lc)
  x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
  return logits_from_hidden(params, cfg, x), cache.replace(layers=tuple(layers), pos=cache.pos + t)
