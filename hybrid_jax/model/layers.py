"""Small shared building blocks: dense, RMSNorm, SwiGLU MLP, initialisers, their Flax modules, block sizing."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


# On CPU, XLA accumulates an fp32 contraction in one sequential chain over all of `in`; BLAS sgemm (what
# PyTorch runs) adds up partial products over blocks of `in` instead. fp32 `dense` on CPU does the same, with
# MKL's AVX2 block of 192: ~4x less rounding error at in=1536, and bitwise equal to PyTorch's CPU matmuls for
# most shapes. GPU/TPU and bf16 matmuls are left as one dot.
CPU_FP32_K_BLOCK = 192


def dense(x: Array, w: Array, dtype, out_dtype=None) -> Array:
  """x [..., in] @ w [in, out] in the compute dtype (fp32 accumulation is XLA's default on GPU/TPU).

  out_dtype: the result dtype (default: the compute dtype), e.g. fp32 logits from bf16 operands.
  """
  x, w = x.astype(dtype), w.astype(dtype)
  k, blk = x.shape[-1], CPU_FP32_K_BLOCK
  if dtype == jnp.float32 and k > blk and jax.default_backend() == "cpu":
    out = jnp.einsum("...i,io->...o", x[..., :blk], w[:blk], preferred_element_type=out_dtype)
    for s in range(blk, k, blk):
      out = out + jnp.einsum("...i,io->...o", x[..., s:s + blk], w[s:s + blk], preferred_element_type=out_dtype)
    return out
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """Hugging Face LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(dtype) * x32.astype(dtype) if dtype != jnp.float32 else weight * x32


def silu(x: Array) -> Array:
  """x * sigmoid(x), written as PyTorch's x / (1 + exp(-x)) (rounds as it does: fp32 parity with transformers).

  exp's argument is capped so that very negative x give ~0 and a finite gradient, not inf / inf.
  """
  return x / (1 + jnp.exp(-jnp.maximum(x, -80.0)))


def mlp(p: dict, x: Array, dtype) -> Array:
  """SwiGLU: down(silu(gate(x)) * up(x)). x [..., D] -> [..., D]; p in either layout of `MLP`."""
  if "gate_up_proj" in p:
    g, u = jnp.split(dense(x, p["gate_up_proj"], dtype), 2, axis=-1)
  else:
    g, u = dense(x, p["gate_proj"], dtype), dense(x, p["up_proj"], dtype)
  return dense(silu(g) * u, p["down_proj"], dtype)


# ---- Flax building blocks ----------------------------------------------------------------------
def uniform_init(bound: float):
  """U(-bound, bound), the PyTorch default for Linear (bound 1/sqrt(in)) and Conv1d (bound 1/sqrt(K))."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear's default for a [in, out] matrix: kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in))."""
  return uniform_init(1.0 / math.sqrt(shape[0]))(key, shape, dtype)


class WeightAndBias(nn.Module):
  """A PyTorch module with a `weight` and a `bias` (a conv1d, a Linear with bias), stored under those names."""
  weight_shape: tuple[int, ...]
  weight_init: Callable
  bias_init: Callable
  param_dtype: Any = jnp.float32

  def setup(self):
    self.weight = self.param("weight", self.weight_init, self.weight_shape, self.param_dtype)
    self.bias = self.param("bias", self.bias_init, self.weight_shape[-1:], self.param_dtype)


class MLP(nn.Module):
  """SwiGLU MLP with HF Llama's parameter names; matrices [in, out]; HF's normal(0, 0.02) init by default.

  packed: the decoding layout made by `pack` (gate_up_proj [D, 2F], matrices in the compute dtype)."""
  hidden_size: int
  intermediate_size: int
  dtype: Any
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  packed: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d, f, init = self.hidden_size, self.intermediate_size, nn.initializers.normal(self.init_std)
    if self.packed:
      p = {"gate_up_proj": self.param("gate_up_proj", init, (d, 2 * f), self.dtype)}
    else:
      p = {"gate_proj": self.param("gate_proj", init, (d, f), self.param_dtype),
           "up_proj": self.param("up_proj", init, (d, f), self.param_dtype)}
    p["down_proj"] = self.param("down_proj", init, (f, d), self.dtype if self.packed else self.param_dtype)
    return mlp(p, x, self.dtype)

  @staticmethod
  def pack(p: dict, dtype) -> dict:
    """HF layout -> the packed one: gate and up read the same input, so one matrix serves both."""
    return {"gate_up_proj": jnp.concatenate([p["gate_proj"], p["up_proj"]], axis=1).astype(dtype),
            "down_proj": p["down_proj"].astype(dtype)}


def largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of n that is at most `at_most` (1 when `at_most` < 1): the block size that splits n
  evenly under a memory cap."""
  return max(c for c in range(1, min(n, max(at_most, 1)) + 1) if n % c == 0)
