"""Small shared building blocks: dense, RMSNorm, SwiGLU MLP, param init helpers."""
from __future__ import annotations

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
  """SwiGLU: down(silu(gate(x)) * up(x)). x [..., D] -> [..., D]."""
  g = dense(x, p["gate_proj"], dtype)
  u = dense(x, p["up_proj"], dtype)
  return dense(silu(g) * u, p["down_proj"], dtype)


def init_linear(key: Array, d_in: int, d_out: int, dtype=jnp.float32) -> Array:
  """PyTorch nn.Linear default (kaiming-uniform, a=sqrt(5)) => U(-1/sqrt(in), 1/sqrt(in)); layout [in, out]."""
  bound = 1.0 / jnp.sqrt(d_in)
  return jax.random.uniform(key, (d_in, d_out), dtype, -bound, bound)


def init_mlp(key: Array, d: int, f: int, dtype=jnp.float32) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  return {"gate_proj": init_linear(k1, d, f, dtype), "up_proj": init_linear(k2, d, f, dtype),
          "down_proj": init_linear(k3, f, d, dtype)}
