"""Checkpoint conversion: Hugging Face / GGUF Llama teachers <-> hybrid_jax checkpoints."""
from hybrid_jax.convert.llama_hf import (
    ConversionError,
    checkpoint_to_hf,
    convert_to_checkpoint,
    default_teacher_gguf,
    export_hf,
    hf_to_params,
    load_llama,
    params_to_hf,
)

__all__ = ["ConversionError", "checkpoint_to_hf", "convert_to_checkpoint", "default_teacher_gguf",
           "export_hf", "hf_to_params", "load_llama", "params_to_hf"]
