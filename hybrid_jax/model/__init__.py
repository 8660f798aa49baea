"""The model as Flax (linen) modules: attention, Mamba-1 and Mamba-2 mixers, the decoder layer and the LM.

  model = HybridLM(cfg)                       # teacher, hybrid or draft: `cfg.attn_layers` decides
  variables = model.init(key, tokens)
  logits, _ = model.apply(variables, tokens)  # [b, t, V] fp32
"""
from hybrid_jax.model.attention import Attention
from hybrid_jax.model.cache import Cache
from hybrid_jax.model.hybrid import (
  DecoderLayer,
  HybridLM,
  cached_context,
  forward,
  full_context,
  init_params,
  mixer_class,
)
from hybrid_jax.model.mamba import Mamba
from hybrid_jax.model.mamba2 import Mamba2
from hybrid_jax.model.mixer import Context, SSMMixer

__all__ = ["Attention", "Cache", "Context", "DecoderLayer", "HybridLM", "Mamba", "Mamba2", "SSMMixer",
           "cached_context", "forward", "full_context", "init_params", "mixer_class"]
