"""The hybrid decoder: cached decoding == full forward, packing, all-attention == teacher, gradients, init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.model import hybrid
from hybrid_jax.model.init import attn_layers_for_fraction, hybrid_config, init_from_teacher

TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


def make(variant, attn_layers, seed=0):
  cfg = hybrid_config(TEACHER, attn_layers, variant, d_state=8,
                      scan_impl="reference")
  teacher = hybrid.init_params(TEACHER, jax.random.PRNGKey(seed), std=0.2)
  return cfg, teacher, init_from_teacher(teacher, TEACHER, cfg, jax.random.PRNGKey(seed + 1))


@pytest.mark.parametrize("variant,attn", [("mamba", (0, 2)), ("mamba", ()), ("mamba2", (1,)),
                                          ("mamba2", (0, 2))])
def test_cached_decoding_equals_full_forward(variant, attn):
  cfg, _, params = make(variant, attn)
  rng = np.random.default_rng(0)
  lens, total, steps = [5, 2], 5, 4
  seqs = [rng.integers(1, 64, n + steps) for n in lens]
  # Left-padded prompt batch; pad token 0 must not matter.
  prompt = np.zeros((2, total), np.int32)
  for i, n in enumerate(lens):
    prompt[i, total - n:] = seqs[i][:n]
  cache = hybrid.init_cache(cfg, 2, total + steps)
  cache = cache.replace(offset=jnp.array([total - n for n in lens], jnp.int32))
  logits, cache = hybrid.forward(params, cfg, jnp.asarray(prompt), cache=cache)
  got = [[np.asarray(logits[i, total - n:])] for i, n in enumerate(lens)]
  for s in range(steps):
    tok = np.array([seqs[i][n + s] for i, n in enumerate(lens)], np.int32)[:, None]
    logits, cache = hybrid.forward(params, cfg, jnp.asarray(tok), cache=cache)
    for i in range(2):
      got[i].append(np.asarray(logits[i]))
  for i, n in enumerate(lens):
    full, _ = hybrid.forward(params, cfg, jnp.asarray(seqs[i])[None])
    np.testing.assert_allclose(np.concatenate(got[i], 0), np.asarray(full[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_packed_segments_equal_separate(variant):
  cfg, _, params = make(variant, (1,))
  rng = np.random.default_rng(1)
  a, b = rng.integers(1, 64, 4), rng.integers(1, 64, 5)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0]]))[None]
  seg = jnp.asarray([[1] * 4 + [2] * 5 + [0, 0]], jnp.int32)
  logits, _ = hybrid.forward(params, cfg, packed, segment_ids=seg)
  la, _ = hybrid.forward(params, cfg, jnp.asarray(a)[None])
  lb, _ = hybrid.forward(params, cfg, jnp.asarray(b)[None])
  np.testing.assert_allclose(np.asarray(logits[0, :4]), np.asarray(la[0]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 4:9]), np.asarray(lb[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_all_attention_hybrid_equals_teacher(variant):
  cfg, teacher, params = make(variant, range(TEACHER.num_hidden_layers))
  assert not cfg.is_hybrid
  toks = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 6)))
  lt, _ = hybrid.forward(teacher, TEACHER, toks)
  lh, _ = hybrid.forward(params, cfg, toks)
  np.testing.assert_allclose(np.asarray(lh), np.asarray(lt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_grad_matches_finite_differences(variant):
  cfg, _, params = make(variant, (0,))
  # Steps of order 1 (the init's dt ~ 0.001-0.1 makes d loss / d A_log vanish below fp32 resolution).
  m = dict(params["layers_1"]["mamba"])
  if variant == "mamba":
    m["dt_proj"] = {**m["dt_proj"], "bias": m["dt_proj"]["bias"] * 0 + 0.3}
  else:
    m["dt_bias"] = m["dt_bias"] * 0 + 0.5
  params["layers_1"] = {**params["layers_1"], "mamba": m}
  toks = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 6)))

  def loss(p):
    logits, _ = hybrid.forward(p, cfg, toks)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0])

  g = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  f = jax.jit(loss)
  names = ["A_log", "conv1d", "out_proj", "dt_proj" if variant == "mamba" else "dt_bias"]
  for j, name in enumerate(names):
    leaf = params["layers_1"]["mamba"][name]
    gl = g["layers_1"]["mamba"][name]
    if isinstance(leaf, dict):
      leaf, gl, sub = leaf["weight"], gl["weight"], "weight"
    else:
      sub = None
    v = jax.random.normal(jax.random.PRNGKey(10 + j), leaf.shape)
    v = v / jnp.linalg.norm(v)

    def shifted(eps, name=name, sub=sub, leaf=leaf, v=v):
      p = jax.tree.map(lambda x: x, params)
      m = dict(p["layers_1"]["mamba"])
      if sub:
        m[name] = {**m[name], sub: leaf + eps * v}
      else:
        m[name] = leaf + eps * v
      p["layers_1"] = {**p["layers_1"], "mamba": m}
      return f(p)

    # Richardson-extrapolated central differences: O(eps^4) truncation with steps large enough that fp32
    # rounding of the loss (~1e-7 relative) stays far below the smallest directional derivative (~1e-4).
    central = lambda eps: (float(shifted(eps)) - float(shifted(-eps))) / (2 * eps)
    h = 0.1 if name == "A_log" else 0.05  # d loss / d A_log is the smallest: the largest step
    fd = (4 * central(h) - central(2 * h)) / 3
    an = float(jnp.vdot(gl, v))
    assert abs(an) > 1e-5, name
    assert abs(fd - an) <= 2e-2 * abs(an) + 1e-5, (name, fd, an)


def test_init_copies_attention_into_mixers():
  for variant in ("mamba", "mamba2"):
    _cfg, teacher, params = make(variant, (0, 2))
    for i in (1, 3):
      a, m = teacher[f"layers_{i}"]["self_attn"], params[f"layers_{i}"]["mamba"]
      assert "self_attn" not in params[f"layers_{i}"]
      if variant == "mamba":
        pairs = [("in_proj_x", "v_proj"), ("B_proj", "k_proj"), ("C_proj", "q_proj"), ("out_proj", "o_proj")]
        for mn, an in pairs:
          np.testing.assert_array_equal(np.asarray(m[mn]), np.asarray(a[an]))
      else:
        w = np.asarray(m["in_proj"])
        np.testing.assert_array_equal(w[:, 32:48], np.asarray(a["v_proj"]))
        np.testing.assert_array_equal(w[:, 48:64], np.asarray(a["k_proj"]))
        np.testing.assert_array_equal(w[:, 64:96], np.asarray(a["q_proj"]))
        np.testing.assert_array_equal(np.asarray(m["out_proj"]), np.asarray(a["o_proj"]))
      for k in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(params[f"layers_{i}"][k]), np.asarray(teacher[f"layers_{i}"][k]))
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), np.asarray(teacher["embed_tokens"]))
    for i in (0, 2):
      np.testing.assert_array_equal(np.asarray(params[f"layers_{i}"]["self_attn"]["q_proj"]),
                                    np.asarray(teacher[f"layers_{i}"]["self_attn"]["q_proj"]))


def test_random_mixer_init_keeps_the_teachers_rest():
  """mixer_init='random' (the ablation baseline): the mixer's own init (not the attention weights), the same
  shapes as the attention init, and the teacher's norms/MLPs/embeddings; unknown names are errors."""
  cfg, teacher, kqvo = make("mamba", (0, 2))
  rand = init_from_teacher(teacher, TEACHER, cfg, jax.random.PRNGKey(1), mixer_init="random")
  assert jax.tree.structure(rand) == jax.tree.structure(kqvo)
  m, a = rand["layers_1"]["mamba"], teacher["layers_1"]["self_attn"]
  assert not np.array_equal(np.asarray(m["in_proj_x"]), np.asarray(a["v_proj"]))
  np.testing.assert_array_equal(np.asarray(m["A_log"]), np.asarray(kqvo["layers_1"]["mamba"]["A_log"]))
  np.testing.assert_array_equal(np.asarray(rand["layers_1"]["mlp"]["gate_proj"]),
                                np.asarray(teacher["layers_1"]["mlp"]["gate_proj"]))
  with pytest.raises(ConfigError, match="mixer init"):
    init_from_teacher(teacher, TEACHER, cfg, jax.random.PRNGKey(1), mixer_init="zeros")


def test_random_layer_init_resets_mixer_mlp_and_norms():
  """mixer_init='random_layer' (the reference's init_with_kqvo=False): the replaced layers get the mixer's own
  init, an MLP at nn.Linear's default U(+-1/sqrt(in)) and norms at one; kept attention layers, embeddings,
  final norm and head stay the teacher's."""
  cfg, teacher, kqvo = make("mamba", (0, 2))
  rand = init_from_teacher(teacher, TEACHER, cfg, jax.random.PRNGKey(1), mixer_init="random_layer")
  mixer_only = init_from_teacher(teacher, TEACHER, cfg, jax.random.PRNGKey(1), mixer_init="random")
  assert jax.tree.structure(rand) == jax.tree.structure(kqvo)
  for i in (1, 3):
    layer, t_layer = rand[f"layers_{i}"], teacher[f"layers_{i}"]
    for name in ("in_proj_x", "dt_proj_down", "A_log"):  # the same mixer as 'random'
      np.testing.assert_array_equal(np.asarray(layer["mamba"][name]),
                                    np.asarray(mixer_only[f"layers_{i}"]["mamba"][name]))
    for k in ("input_layernorm", "post_attention_layernorm"):
      np.testing.assert_array_equal(np.asarray(layer[k]), np.ones(TEACHER.hidden_size, np.float32))
    for name, w in layer["mlp"].items():
      w, tw = np.asarray(w), np.asarray(t_layer["mlp"][name])
      assert w.shape == tw.shape and not np.array_equal(w, tw)
      bound = 1 / np.sqrt(w.shape[0])
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  assert not np.array_equal(np.asarray(rand["layers_1"]["mlp"]["up_proj"]),
                            np.asarray(rand["layers_3"]["mlp"]["up_proj"]))
  for i in (0, 2):
    for leaf, t_leaf in zip(jax.tree.leaves(rand[f"layers_{i}"]), jax.tree.leaves(teacher[f"layers_{i}"])):
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(t_leaf))
  for name in ("embed_tokens", "norm", "lm_head"):
    np.testing.assert_array_equal(np.asarray(rand[name]), np.asarray(teacher[name]))


def test_attn_layers_for_fraction_matches_recipes():
  assert attn_layers_for_fraction(32, 0.5) == tuple(range(0, 32, 2))
  assert attn_layers_for_fraction(32, 0.25) == tuple(range(0, 32, 4))
  assert attn_layers_for_fraction(32, 0.125) == (0, 8, 16, 24)
  assert attn_layers_for_fraction(32, 0.0) == ()
  assert attn_layers_for_fraction(30, 0.5) == tuple(range(0, 30, 2))
  with pytest.raises(ConfigError):
    attn_layers_for_fraction(4, 1.5)


def test_hybrid_config_recipes():
  c1 = hybrid_config(TEACHER, (0,), "mamba")
  assert (c1.d_inner, c1.d_xb, c1.ssm.d_state, c1.dt_rank) == (32, 16, 16, 2)
  c2 = hybrid_config(TEACHER, (0,), "mamba2")
  assert (c2.d_inner, c2.ssm.ngroups, c2.ssm.d_state) == (32, 4, 8)
  with pytest.raises(ConfigError):
    hybrid_config(TEACHER, (0,), "mamba3")


def test_prefill_attention_in_query_blocks_equals_one_block():
  """A long prompt written into a cache attends a block of queries at a time (bounded scores memory): same
  output and cache as all queries at once, with left padding masked."""
  from hybrid_jax.model.attention import _query_chunk, attention
  cfg = TEACHER
  teacher = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.2)
  p = teacher["layers_0"]["self_attn"]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.hidden_size))
  cache = hybrid.init_cache(cfg, 2, 12).replace(offset=jnp.asarray([0, 3], jnp.int32))
  ctx = hybrid.cached_context(cfg, cache, 8)
  run = lambda chunk: attention(p, cfg, x, ctx.cos, ctx.sin, ctx.mask, cache.layers[0], cache.pos, query_chunk=chunk)
  (whole, kv_whole), (blocks, kv_blocks) = run(8), run(2)
  np.testing.assert_allclose(blocks, whole, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(kv_blocks["k"], kv_whole["k"])
  assert _query_chunk(1, 8, 12, 4) == 8 and _query_chunk(64, 2048, 2560, 32) == 64
  assert _query_chunk(64, 2046, 2560, 32) == 93  # the largest divisor that fits


@pytest.mark.parametrize("variant,attn,dtype", [("mamba", (0, 2), "float32"), ("mamba2", (1,), "bfloat16")])
def test_packed_layout_equals_hf_layout(variant, attn, dtype):
  """pack_params (fused projections, matrices in the compute dtype) computes what the HF layout computes, on
  the cached and the speculative paths; fp32 params with a bf16 compute dtype are the case it casts."""
  cfg, _, params = make(variant, attn)
  cfg = cfg.replace(dtype=dtype)
  packed = hybrid.pack_params(params, cfg)
  lp = packed["layers_0"]
  assert ("qkv_proj" in lp["self_attn"]) if 0 in attn else ("in_proj" in lp["mamba"])
  assert "gate_up_proj" in lp["mlp"] and lp["mlp"]["down_proj"].dtype == cfg.compute_dtype
  # the packed tree is exactly what the packed module declares
  declared = jax.eval_shape(lambda: hybrid.HybridLM(cfg, packed=True).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))["params"])
  assert jax.tree.structure(declared) == jax.tree.structure(packed)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(declared), jax.tree.leaves(packed)))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, 6)), jnp.int32)
  tol = 1e-5 if dtype == "float32" else 2e-2
  for spec in (None, "commit"):
    outs = []
    for p, is_packed in ((params, False), (packed, True)):
      cache = hybrid.init_cache(cfg, 2, 8)
      if spec:
        cache = hybrid.speculative_cache(cfg, cache, 6)
      logits, cache = hybrid.forward(p, cfg, tokens, cache=cache, packed=is_packed, speculative=spec)
      logits2, _ = hybrid.forward(p, cfg, tokens[:, :1], cache=cache, packed=is_packed, speculative=spec)
      outs.append(np.concatenate([np.asarray(logits, np.float32), np.asarray(logits2, np.float32)], 1))
    np.testing.assert_allclose(outs[1], outs[0], atol=tol, rtol=tol)
