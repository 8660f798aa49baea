"""hybrid_jax: distil Llama Transformers into hybrid Mamba/attention models and decode them fast in JAX."""
from hybrid_jax.config import ConfigError, ModelConfig, SSMConfig

__all__ = ["ConfigError", "ModelConfig", "SSMConfig"]
__version__ = "0.1.0"
