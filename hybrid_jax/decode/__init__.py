"""Decoding: sampling and cached batched generation."""
from hybrid_jax.decode.generate import generate, generate_text
from hybrid_jax.decode.sampling import processed_logprobs, sample_logits

__all__ = ["generate", "generate_text", "processed_logprobs", "sample_logits"]
