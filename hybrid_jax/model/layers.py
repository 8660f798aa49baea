"""Small shared building blocks: dense, RMSNorm, SwiGLU MLP, param init helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dense(x: Array, w: Array, dtype) -> Array:
  """x [..., in] @ w [in, out] in the compute dtype (fp32 accumulation is XLA's default on GPU/TPU)."""
  return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype))


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """Hugging Face LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(dtype) * x32.astype(dtype) if dtype != jnp.float32 else weight * x32


def mlp(p: dict, x: Array, dtype) -> Array:
  """SwiGLU: down(silu(gate(x)) * up(x)). x [..., D] -> [..., D]."""
  g = dense(x, p["gate_proj"], dtype)
  u = dense(x, p["up_proj"], dtype)
  return dense(jax.nn.silu(g) * u, p["down_proj"], dtype)


def init_linear(key: Array, d_in: int, d_out: int, dtype=jnp.float32) -> Array:
  """PyTorch nn.Linear default (kaiming-uniform, a=sqrt(5)) => U(-1/sqrt(in), 1/sqrt(in)); layout [in, out]."""
  bound = 1.0 / jnp.sqrt(d_in)
  return jax.random.uniform(key, (d_in, d_out), dtype, -bound, bound)


def init_mlp(key: Array, d: int, f: int, dtype=jnp.float32) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  return {"gate_proj": init_linear(k1, d, f, dtype), "up_proj": init_linear(k2, d, f, dtype),
          "down_proj": init_linear(k3, f, d, dtype)}
