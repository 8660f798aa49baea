"""The mixer interface shared by attention, Mamba and Mamba-2, and the SSM machinery both Mamba variants use.

Every mixer is a Flax module with three paths over the same parameters:
  __call__(u, ctx)                           full sequence (training, scoring): packed documents via segment ids
  cached(u, ctx, state) -> (y, state)        one or more tokens appended to a decode cache (prefill, decode)
  speculative(u, ctx, state, commit)         draft / verify calls whose state can be rolled back by position
and two unbound helpers (`nn.nowrap`): `init_state(batch, max_len, dtype)` for an empty decode cache and
`speculative_state(state, pos, k)` to turn a decode state into the speculative layout.

Speculative layout of an SSM layer (an SSM state cannot be rolled back, so it is re-derived from a checkpoint):
  'ckpt'      [b, ...state]        fp32 state at position ckpt_pos[b] (the last position known to be verified)
  'ckpt_pos'  [b] int32
  'x','dt','B' [b, R, ...]         scan inputs of the steps ckpt_pos, ckpt_pos+1, ... (R = k + 1 slots)
  'conv'      [b, d_conv-1+R, C]   conv inputs: the d_conv-1 before ckpt_pos, then one per cached step
A call with t new tokens at cache.pos[b] replays the s = pos - ckpt_pos cached steps still valid from the
checkpoint, then runs the t new steps (`hybrid_jax.pallas.multistep_scan`). commit=True makes the replayed state
the new checkpoint (ckpt_pos = pos) and caches the new steps from slot 0; commit=False (the draft's later steps
of a round, not verified yet) appends them at slot s. Rolling back is setting cache.pos: the next call replays
fewer steps. Attention needs no special layout: its KV cache rolls back by position alone.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig
from hybrid_jax.model.conv import causal_conv

Array = jax.Array


@struct.dataclass
class Context:
  """What every layer of one decoder call shares, built once by the decoder.

  segment_ids [b, t] int32: 0 marks padding; full path: packed-document ids; cached path: 1 for real tokens.
  cos, sin [b, t, hd] fp32: rotary tables at the tokens' positions.
  mask [b, t, S] bool or None: which keys each query may see (S = t without a cache, the cache length with one);
    None on the full path when attention can take `segment_ids` directly.
  pos [b] int32 or None: the cache index the first new token is written at (cached / speculative paths).
  """
  segment_ids: Array
  cos: Array
  sin: Array
  mask: Array | None = None
  pos: Array | None = None


def reset_from_segments(segment_ids: Array) -> Array:
  """[b, t] bool: True where a new segment starts (never at t=0: a carried state belongs to that token)."""
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                          segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def _per_seq(fn, *args):
  return jax.vmap(fn)(*args)


def _slice(a: Array, start: Array, size: int) -> Array:
  """a [b, L, ...] -> a[b, start[b]:start[b]+size] per sequence."""
  return _per_seq(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0), a, start)


def _put(a: Array, new: Array, start: Array) -> Array:
  """Writes new [b, t, ...] into a [b, L, ...] at start[b] per sequence."""
  return _per_seq(lambda x, v, s: jax.lax.dynamic_update_slice_in_dim(x, v.astype(x.dtype), s, axis=0),
                  a, new, start)


def _mask_time(x: Array, real: Array) -> Array:
  """Zeros x [b, t, ...] where real [b, t] is False."""
  return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), x, 0)


class SSMMixer(nn.Module):
  """The three paths of a Mamba mixer, written once. A variant supplies its parameters (setup) and:

    conv_input(u)            u [b, t, D] -> (raw conv input [b, t, C], the projections that bypass the conv)
    scan_inputs(xc, rest)    conv output [b, t, C] (before silu) + bypass -> {'x', 'dt', 'B', 'C', 'z'}
    decay_params()           (A fp32, D, dt_bias) as the scans take them
    scan(inp, reset, h0)     the full-sequence scan -> (y, final state fp32)
    gate(inp)                z for the multi-step scan's gate (Mamba-1) or None (Mamba-2 gates in `output`)
    output(y, inp)           y -> [b, t, D]
    state_shapes(batch)      {'conv': ..., 'ssm': ...} shapes of the decode state
    step_shapes(batch, r)    {'x', 'dt', 'B'} shapes of r cached scan inputs
    pack(p, cfg)             (static) its params -> the decoding layout it declares when `packed`
  """
  cfg: ModelConfig
  kernel_options: pallas.KernelOptions | None = None
  packed: bool = False  # the decoding layout of the variant's `pack`: projections fused, in the compute dtype

  @property
  def scan_impl(self) -> pallas.ScanImpl:
    return pallas.ScanImpl(self.cfg.ssm.scan_impl)

  def _run(self, u: Array, segment_ids: Array, conv_state: Array | None, h0: Array | None):
    real = segment_ids != 0
    xr, rest = self.conv_input(u)
    xr = _mask_time(xr, real)  # padding leaves no trace in the conv window
    xc, new_conv = causal_conv(xr, self.conv1d.weight, self.conv1d.bias, segment_ids, conv_state)
    inp = self.scan_inputs(xc, rest)
    inp["x"] = _mask_time(inp["x"], real)  # ... nor in the SSM state
    y, h = self.scan(inp, reset_from_segments(segment_ids), h0)
    return self.output(y, inp), new_conv, h

  def __call__(self, u: Array, ctx: Context) -> Array:
    """Full sequence. u [b, t, D] -> [b, t, D]; documents separated by ctx.segment_ids restart the state."""
    return self._run(u, ctx.segment_ids, None, None)[0]

  def cached(self, u: Array, ctx: Context, state: dict) -> tuple[Array, dict]:
    """t tokens continuing `state` ({'conv' [b, K-1, C], 'ssm'}); ctx.segment_ids 0 marks left padding."""
    out, conv, h = self._run(u, ctx.segment_ids, state["conv"], state["ssm"])
    return out, {"conv": conv.astype(state["conv"].dtype), "ssm": h}

  def speculative(self, u: Array, ctx: Context, state: dict, commit: bool) -> tuple[Array, dict]:
    """t new tokens u [b, t, D] at positions ctx.pos[b]... in the speculative layout (module docstring).

    Requires pos - ckpt_pos + t <= R (commit=False) or t <= R (commit=True). Returns (out [b, t, D], state).
    """
    pos = ctx.pos
    t = u.shape[1]
    r = state["x"].shape[1]
    kc = state["conv"].shape[1] - r  # d_conv - 1
    if t > r:
      raise ValueError(f"speculative call of {t} tokens exceeds the cache's {r} step slots")
    s = pos - state["ckpt_pos"]  # cached steps still valid (verified or drafted since the checkpoint)
    xr, rest = self.conv_input(u)
    conv = state["conv"]
    if commit:  # the window moves to the new checkpoint: its d_conv-1 inputs, then free slots
      conv = jnp.concatenate([_slice(conv, s, kc), jnp.zeros_like(conv[:, kc:])], axis=1)
      slot = jnp.zeros_like(s)
    else:
      slot = s
    xc, _ = causal_conv(xr, self.conv1d.weight, self.conv1d.bias, None, _slice(conv, slot, kc))
    inp = self.scan_inputs(xc, rest)
    A, D, dt_bias = self.decay_params()
    impl = self.scan_impl  # (CHUNKED, a training form, verifies as AUTO does)
    y, ckpt, _ = pallas.multistep_scan(state["ckpt"], state["x"], state["dt"], state["B"], s, inp["x"], inp["dt"],
                                       inp["B"], inp["C"], A, D, dt_bias, self.gate(inp), impl=impl,
                                       options=self.kernel_options)
    new = {"conv": _put(conv, xr, kc + slot),
           "x": _put(state["x"], inp["x"], slot), "dt": _put(state["dt"], inp["dt"], slot),
           "B": _put(state["B"], inp["B"], slot),
           "ckpt": ckpt if commit else state["ckpt"],
           "ckpt_pos": pos if commit else state["ckpt_pos"]}
    return self.output(y, inp), new

  @nn.nowrap
  def init_state(self, batch: int, max_len: int, dtype) -> dict:
    """Empty decode state: conv [b, K-1, C] (previous conv inputs) in `dtype`, ssm fp32. max_len is unused."""
    del max_len  # an SSM state does not grow with the sequence
    shapes = self.state_shapes(batch)
    return {"conv": jnp.zeros(shapes["conv"], dtype), "ssm": jnp.zeros(shapes["ssm"], jnp.float32)}

  @nn.nowrap
  def speculative_state(self, state: dict, pos: Array, k: int) -> dict:
    """A decode state at position pos [b] -> the speculative layout with room for calls of k + 1 tokens."""
    r = k + 1
    conv, h = state["conv"], state["ssm"]
    b, dtype = conv.shape[0], conv.dtype
    return {"ckpt": h.astype(jnp.float32), "ckpt_pos": pos.astype(jnp.int32),
            "conv": jnp.concatenate([conv, jnp.zeros((b, r, conv.shape[2]), dtype)], axis=1),
            **{name: jnp.zeros(shape, dtype) for name, shape in self.step_shapes(b, r).items()}}
