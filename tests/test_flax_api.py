"""The public Flax API: init/apply of the LM, a mixer as a layer of a user's module, nn.remat, old checkpoints."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.checkpoint import load_model
from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.model import HybridLM, Mamba, Mamba2, cached_context, full_context, hybrid

DATA = os.path.join(os.path.dirname(__file__), "data")
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, attn_layers=(1,), ssm=SSMConfig(d_state=8, scan_impl="reference"))


def test_init_apply_and_remat_agree():
  tokens = jnp.asarray([[5, 9, 2, 7, 1, 3]], jnp.int32)
  model = HybridLM(CFG)
  variables = model.init(jax.random.PRNGKey(0), tokens)
  assert set(variables["params"]) == {"embed_tokens", "layers_0", "layers_1", "layers_2", "norm", "lm_head"}
  assert "mamba" in variables["params"]["layers_0"] and "self_attn" in variables["params"]["layers_1"]
  logits, cache = model.apply(variables, tokens)
  assert logits.shape == (1, 6, 64) and logits.dtype == jnp.float32 and cache is None
  remat = HybridLM(CFG.replace(remat="full"))
  np.testing.assert_allclose(jax.jit(remat.apply)(variables, tokens)[0], logits, rtol=1e-6, atol=1e-6)

  def grad(m):  # jitted: one compilation instead of one per primitive
    return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, tokens)[0] ** 2)))(variables["params"])
  g, g_remat = grad(model), grad(remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_remat)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_init_params_has_the_tree_of_module_init(variant):
  """hybrid.init_params builds a layer at a time; its tree, shapes and dtypes are those of HybridLM.init."""
  cfg = CFG.replace(ssm=SSMConfig(variant=variant, d_state=8, scan_impl="reference"), param_dtype="bfloat16")
  spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  want = jax.eval_shape(lambda k: HybridLM(cfg).init(k, jnp.zeros((1, 1), jnp.int32))["params"],
                        jax.random.PRNGKey(0))
  got = hybrid.init_params(cfg, jax.random.PRNGKey(0))
  assert spec(got) == spec(want)
  a, b = got["layers_0"]["mamba"]["out_proj"], got["layers_2"]["mamba"]["out_proj"]
  assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))  # each layer its own draw


@pytest.mark.parametrize("mixer_cls", [Mamba, Mamba2])
def test_mixer_as_a_layer_of_a_user_module(mixer_cls):
  """A user's own module holding one of our mixers (wrapped in nn.remat), trained with jax.grad."""
  cfg = CFG.replace(ssm=SSMConfig(variant="mamba" if mixer_cls is Mamba else "mamba2", d_state=8,
                                  ngroups=4 if mixer_cls is Mamba2 else 0, scan_impl="reference"))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      ctx = full_context(cfg, x.shape[:2])
      y = nn.remat(mixer_cls)(cfg, name="mixer")(nn.Dense(cfg.hidden_size)(x), ctx)
      return x + y

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg.hidden_size))
  block = Block()
  variables = block.init(jax.random.PRNGKey(2), x)
  assert "conv1d" in variables["params"]["mixer"]
  y = jax.jit(block.apply)(variables, x)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  g = jax.jit(jax.grad(lambda v: jnp.sum(block.apply(v, x) ** 2)))(variables)
  assert float(jnp.abs(g["params"]["mixer"]["A_log"]).max()) > 0


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_checkpoint_of_the_earlier_layout_loads_with_the_same_logits(variant):
  """tests/data/legacy_*: tiny hybrids saved by the earlier release (parameters as a list of layers) with
  the logits that release computed."""
  d = os.path.join(DATA, f"legacy_{variant}")
  params, cfg, _ = load_model(d, with_tokenizer=False)
  assert "layers" not in params and "layers_0" in params
  tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
  logits, _ = HybridLM(cfg).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.load(os.path.join(d, "logits.npy")), rtol=1e-5, atol=1e-5)


def test_pure_ssm_cache_builds_no_key_mask():
  """A model without attention layers has an unbounded cache (max_len 2^30): no call may build a key mask over
  it (an eager speculative call used to allocate arange(2^30))."""
  cfg = CFG.replace(attn_layers=())
  params = HybridLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
  model = HybridLM(cfg)
  cache = model.init_cache(1, 16)
  assert not cache.has_attention and cached_context(cfg, cache, 3).mask is None
  _, cache = model.apply({"params": params}, jnp.asarray([[1, 2, 3]]), cache=cache)
  cache = model.speculative_cache(cache, 2)
  logits, cache = model.apply({"params": params}, jnp.asarray([[4, 5, 6]]), cache=cache, speculative="commit")
  assert logits.shape == (1, 3, 64) and int(cache.pos[0]) == 6
