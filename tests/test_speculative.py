"""Speculative decoding: greedy output == the target's own greedy output; sampled output ~ the target's
distribution (chi-square, with a control that must fail); the speculative-mode caches roll back exactly."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.decode.generate import generate
from hybrid_jax.decode.sampling import processed_logprobs
from hybrid_jax.decode.speculative import (
  NgramDraft,
  choose_k,
  controlled_acceptance_hook,
  greedy_accept,
  layer_skip_draft,
  ngram_propose,
  sampling_accept,
  shared_layers,
  speculative_generate,
  speculative_loop,
)
from hybrid_jax.model import hybrid

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]  # batch 3, different lengths


def tiny_cfg(variant, layers=3, attn=(1,), vocab=64, **kw):
  base = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
          "num_attention_heads": 4, "num_key_value_heads": 2}
  if variant is not None:
    base.update(attn_layers=attn, ssm=SSMConfig(variant=variant, d_state=8 if variant == "mamba2" else 4,
                                                 scan_impl="reference"))
  base.update(kw)
  return ModelConfig(**base)


def perturbed(params, key, scale):
  """A draft that agrees with the target often but not always: the target's weights plus noise."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [w + scale * jnp.std(w) * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)])


@pytest.fixture(scope="module", params=[None, "mamba", "mamba2"], ids=["llama", "mamba", "mamba2"])
def target(request):
  cfg = tiny_cfg(request.param)
  return cfg, hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)


# ------------------------------------------------------------------------------------------------
# Acceptance rules on hand-made inputs
def test_greedy_accept_rule():
  draft = jnp.array([[3, 1, 2], [0, 0, 0], [5, 6, 7]])
  best = jnp.array([[3, 1, 4, 2], [1, 0, 0, 0], [5, 6, 7, 1]])  # target argmax per position
  logits = jax.nn.one_hot(best, 8) * 5.0
  n, nxt = greedy_accept(draft, logits)
  np.testing.assert_array_equal(n, [2, 0, 3])
  np.testing.assert_array_equal(nxt, [4, 1, 1])  # correction, correction, bonus


def test_sampling_accept_rule_edges():
  v = 4
  p = jnp.log(jnp.array([[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]]) + 1e-30)  # target certain: 1 then 3
  q_same = p[:, :1]
  n, nxt = sampling_accept(jax.random.PRNGKey(0), jnp.array([[1]]), q_same, p)
  assert int(n[0]) == 1 and int(nxt[0]) == 3  # p == q: always accepted, bonus from p_2
  q_other = jnp.log(jnp.full((1, 1, v), 0.25))
  n, nxt = sampling_accept(jax.random.PRNGKey(0), jnp.array([[2]]), q_other, p)
  assert int(n[0]) == 0 and int(nxt[0]) == 1  # p(2) = 0: rejected, residual is all on token 1


# ------------------------------------------------------------------------------------------------
# The speculative-mode caches
def test_spec_forward_rollback_matches_full_forward(target):
  """Verify k+1 tokens, keep a different prefix per sequence, verify again: the logits of the kept tokens
  equal a plain forward over the kept sequence (attention: pos rollback; Mamba: checkpoint + replay)."""
  cfg, params = target
  k, b = 3, 3
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 4)), jnp.int32)
  cache = hybrid.init_cache(cfg, b, 32)
  _, cache = hybrid.forward(params, cfg, prompt, cache=cache)
  cache = hybrid.speculative_cache(cfg, cache, k)
  seqs = [list(map(int, r)) for r in prompt]
  keep_plan = [[0, 3, 1], [4, 2, 0], [1, 4, 4]]  # tokens kept after each call, per sequence (<= k + 1)
  full_len = prompt.shape[1] + len(keep_plan) * (k + 1)
  for keep in keep_plan:
    new = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, k + 1)), jnp.int32)
    pos0 = cache.pos
    logits, cache = hybrid.forward(params, cfg, new, cache=cache, speculative="commit")
    # one causal forward over the sequences right-padded to one length: padding after a token changes nothing
    # before it, and one shape compiles once
    full = [seqs[i] + list(map(int, new[i])) for i in range(b)]
    want, _ = hybrid.forward(params, cfg, jnp.asarray([f + [0] * (full_len - len(f)) for f in full], jnp.int32))
    for i in range(b):
      np.testing.assert_allclose(logits[i], want[i, len(full[i]) - (k + 1):len(full[i])], atol=2e-4, rtol=2e-4)
      seqs[i] += list(map(int, new[i, :keep[i]]))
    cache = cache.replace(pos=pos0 + jnp.asarray(keep, jnp.int32))


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_spec_forward_rollback_with_pallas_multistep_kernel(variant):
  """The same through the Pallas multistep kernel (interpret mode off-GPU) instead of its lax.scan reference."""
  cfg = tiny_cfg(variant)
  cfg = cfg.replace(ssm=dataclasses.replace(cfg.ssm, scan_impl="pallas"))
  test_spec_forward_rollback_matches_full_forward((cfg, hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)))


# ------------------------------------------------------------------------------------------------
# Greedy: token-for-token equal to the target's own greedy decoding
@pytest.mark.parametrize("k", [1, 3, 8])  # k = 2 runs in the sampling tests, up to 5 in the auto-k ones
def test_greedy_equals_target_with_perturbed_draft(target, k):
  cfg, params = target
  draft = perturbed(params, jax.random.PRNGKey(7), 0.03)
  want = generate(params, cfg, PROMPTS, 14)
  got, stats = speculative_generate(params, cfg, draft, cfg, PROMPTS, 14, k)
  assert got == want
  assert 0.0 < stats["acceptance_rate"] < 1.0, stats  # both accepted and rejected proposals happened


def test_greedy_draft_equals_target_accepts_everything(target):
  cfg, params = target
  want = generate(params, cfg, PROMPTS, 13)
  got, stats = speculative_generate(params, cfg, params, cfg, PROMPTS, 13, 4)
  assert got == want
  assert stats["acceptance_rate"] == 1.0 and stats["accepted_per_step"] == 4.0


def test_greedy_with_different_architecture_draft_and_eos(target):
  """A draft of another shape (2 layers, attention + the other Mamba variant or none) and EOS stopping."""
  cfg, params = target
  dcfg = tiny_cfg("mamba2" if cfg.ssm is None or cfg.ssm.variant == "mamba" else "mamba", layers=2, attn=(0,))
  dparams = hybrid.init_params(dcfg, jax.random.PRNGKey(5), std=0.3)
  plain = generate(params, cfg, PROMPTS, 12)
  eos = (plain[0][4],)  # stops the first row early (and maybe others)
  want = generate(params, cfg, PROMPTS, 12, eos_ids=eos)
  got, stats = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, 12, 3, eos_ids=eos)
  assert got == want and len(got[0]) == plain[0].index(eos[0]) < 12
  assert stats["target_calls"] <= 12


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.6])
def test_controlled_acceptance_hook(alpha):
  """The benchmark hook: alpha = 1 accepts all k proposals in every round, alpha = 0 none, 0.6 a mean of about
  sum_{i<=k} alpha^i; the output is still exactly the target's greedy output (a hook changes speed only).
  One compilation serves the three alphas (hook_args is traced)."""
  cfg = tiny_cfg("mamba2")
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  dparams = hybrid.init_params(cfg, jax.random.PRNGKey(9), std=0.3)  # unrelated draft: rarely right alone
  k, n_new = 3, 24
  prompts = PROMPTS * 4  # batch 12
  cont = generate(params, cfg, prompts, n_new + k + 1, eos_ids=())  # proposals may land up to k + 1 past the end
  got, stats = speculative_generate(params, cfg, dparams, cfg, prompts, n_new, k, eos_ids=(),
                                    draft_hook=controlled_acceptance_hook,
                                    hook_args=(jnp.asarray(cont, jnp.int32), jnp.float32(alpha)))
  assert got == [c[:n_new] for c in cont]
  if alpha in (0.0, 1.0):  # every round of every row, the last (truncated) one included
    assert stats["accepted_per_step"] == k * alpha, stats
    assert stats["rounds"] == (-(-(n_new - 1) // (k + 1)) if alpha else n_new - 1), stats
  else:  # ~125 row-rounds: standard error ~0.1
    want = sum(alpha ** i for i in range(1, k + 1))
    assert abs(stats["accepted_per_step"] - want) < 0.3, (stats, want)


# ------------------------------------------------------------------------------------------------
# Sampling: the emitted tokens are distributed as the target's (chi-square at a fixed seed)
def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
  total = counts.sum()
  expected = probs * total
  if counts[probs == 0].sum() > 0:
    return 0.0  # a token the target can never emit was emitted
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
  df = int(keep.sum()) - 1
  return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0))


def exact_joint(params, cfg, prompt, n, **sampling):
  """Target's exact probability of each n-token continuation [V**n] under the processed distribution."""
  v = cfg.vocab_size
  conts = np.array(list(itertools.product(range(v), repeat=n - 1)), np.int32).reshape(-1, n - 1)
  seqs = jnp.asarray(np.concatenate([np.tile(prompt, (len(conts), 1)), conts], axis=1))
  logits, _ = hybrid.forward(params, cfg, seqs)
  logp = np.asarray(processed_logprobs(logits[:, len(prompt) - 1:], **sampling), np.float64)  # [c, n, V]
  joint = np.zeros((len(conts), v))
  for c, cont in enumerate(conts):
    lp = sum(logp[c, j, t] for j, t in enumerate(cont))
    joint[c] = np.exp(lp + logp[c, n - 1])
  return joint.reshape(-1)


@pytest.mark.parametrize("sampling", [{"temperature": 1.0, "top_k": 0, "top_p": 1.0},
                                      {"temperature": 0.7, "top_k": 6, "top_p": 0.9}], ids=["plain", "topk_topp"])
def test_sampling_matches_target_distribution(sampling):
  v, n_tok, samples = 8, 3, 12000
  cfg = tiny_cfg("mamba", layers=2, attn=(1,), vocab=v)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(11), std=0.5)
  draft = perturbed(params, jax.random.PRNGKey(12), 1.0)
  prompt = [1, 2, 3]
  probs = exact_joint(params, cfg, prompt, n_tok, **sampling)
  assert abs(probs.sum() - 1) < 1e-4

  def counts(tokens):
    idx = np.array([np.ravel_multi_index(t[:n_tok], (v,) * n_tok) for t in tokens])
    return np.bincount(idx, minlength=v ** n_tok)

  got, stats = speculative_generate(params, cfg, draft, cfg, [prompt] * samples, n_tok, 2, seed=3,
                                    eos_ids=(), **sampling)
  assert 0.1 < stats["acceptance_rate"] < 0.95, stats  # rejections and residual resampling both matter
  assert chi_square_pvalue(counts(got), probs) > 1e-3
  # Control: as many draws from the draft's own distribution (what the loop would emit if it always accepted)
  # must fail, or the test could not tell the draft's distribution from the target's.
  draft_probs = exact_joint(draft, cfg, prompt, n_tok, **sampling)
  control = np.random.default_rng(3).multinomial(samples, draft_probs / draft_probs.sum())
  assert chi_square_pvalue(control, probs) < 1e-6


# ------------------------------------------------------------------------------------------------
# Prompt lookup (n-gram) draft
def test_ngram_propose_rules():
  """Longest match first, then the latest; the continuation repeats the matched pattern where it reaches the
  end; padding (-1) and tokens past `end` never match; no match proposes the last token."""
  rows = [  # (history, n, min_n, expected proposals for k = 3, matched length)
      ([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, [4, 9, 1], 3),  # plain continuation of a full match
      ([7, 2, 3, 5, 8, 2, 3], 3, 1, [5, 8, 2], 2),  # falls back to the last 2 tokens
      ([2, 3, 4, 2, 3, 5, 1, 2, 3], 3, 1, [5, 1, 2], 2),  # two 2-matches: the latest
      ([1, 2, 3, 4, 0, 2, 3, 6, 1, 2, 3], 3, 1, [4, 0, 2], 3),  # an older 3-match beats a later 2-match
      ([4, 5, 4, 5, 4, 5], 3, 1, [4, 5, 4], 3),  # period 2: the pattern repeats past the end
      ([1, 2, 3], 3, 1, [3, 3, 3], 0),  # nothing earlier matches
      ([-1, -1, 7], 3, 1, [7, 7, 7], 0),  # padding is no token
      ([1, 2, 1], 2, 1, [2, 1, 2], 1),  # a 1-match (the earlier 1), period 2
      ([1, 2, 1], 2, 2, [1, 1, 1], 0),  # ... which min_n = 2 refuses
  ]
  t = max(len(r[0]) for r in rows) + 4
  for hist, n, min_n, want, want_m in rows:
    buf = np.full((1, t), -1, np.int32)
    buf[0, :len(hist)] = hist
    buf[0, len(hist):] = 1  # not -1: tokens past `end` must be ignored by position, not by value
    prop, m = ngram_propose(jnp.asarray(buf), jnp.asarray([len(hist)], jnp.int32), 3, n, min_n)
    assert prop[0].tolist() == want and int(m[0]) == want_m, (hist, prop, m)


REPEATING = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8], [9, 10, 11, 9, 10, 11, 12, 9, 10]]


def test_ngram_greedy_equals_target(target, k=3):
  cfg, params = target
  want = generate(params, cfg, REPEATING, 20)
  got, stats = speculative_generate(params, cfg, NgramDraft(3), None, REPEATING, 20, k)
  assert got == want
  assert stats["draft_calls"] == 0 and stats["acceptance_rate"] > 0.0, stats  # some lookups paid off


def test_ngram_sampling_matches_target_distribution():
  """Deterministic proposals (one-hot q) under speculative sampling: the emitted tokens are distributed as the
  target's, while proposals are both accepted and rejected."""
  v, n_tok, samples = 8, 3, 12000
  sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
  cfg = tiny_cfg("mamba", layers=2, attn=(1,), vocab=v)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(17), std=0.5)  # weights that accept ~30% of lookups
  prompt = [1, 2, 3, 1, 2]  # the lookup proposes 3, 1, 2, ... from the start
  probs = exact_joint(params, cfg, prompt, n_tok, **sampling)
  got, stats = speculative_generate(params, cfg, NgramDraft(2), None, [prompt] * samples, n_tok, 2, seed=3,
                                    eos_ids=(), **sampling)
  assert 0.05 < stats["acceptance_rate"] < 0.95, stats
  counts = np.bincount([np.ravel_multi_index(t[:n_tok], (v,) * n_tok) for t in got], minlength=v ** n_tok)
  assert chi_square_pvalue(counts, probs) > 1e-3


# ------------------------------------------------------------------------------------------------
# k = "auto": the round length chosen from the measured acceptance
def test_choose_k_cost_model():
  ks = np.arange(1, 9)
  for acc, rej, c in [(90, 10, 0.0), (900, 100, 0.3), (10, 90, 0.3), (0, 0, 0.1), (50, 50, 0.05)]:
    a = (acc + 1) / (acc + rej + 2)
    want = 1 + int(np.argmax((1 - a ** (ks + 1)) / ((1 - a) * (1 + c * ks))))
    assert int(choose_k(jnp.int32(acc), jnp.int32(rej), 8, c)) == want, (acc, rej, c)
  assert int(choose_k(jnp.int32(990), jnp.int32(10), 8, 0.0)) == 8  # free drafts, high acceptance: the longest
  assert int(choose_k(jnp.int32(5), jnp.int32(95), 8, 0.5)) == 1  # costly drafts that miss: the shortest


def test_accept_rules_with_limit():
  """Only the first `limit` proposals count: never accepted past it; the next token then comes from p there."""
  draft = jnp.array([[3, 1, 2], [3, 1, 2]])
  best = jnp.array([[3, 1, 2, 5], [3, 0, 2, 5]])
  n, nxt = greedy_accept(draft, jax.nn.one_hot(best, 8) * 5.0, limit=jnp.int32(2))
  np.testing.assert_array_equal(n, [2, 1])
  np.testing.assert_array_equal(nxt, [2, 0])  # the target's token after 2 proposals; a correction
  # Sampling, k = 2, limit 1: d_1 = 1 is certain under p and q; p_2 is 50/50 on tokens 2 and 3 and the
  # (unproposed) d_2 = 3 has q = 1. Without the limit d_2 would be accepted half of the time.
  p = jnp.log(jnp.array([[[0, 1, 0, 0], [0, 0, .5, .5], [1, 0, 0, 0]]]) + 1e-30)
  q = jnp.log(jnp.array([[[0, 1, 0, 0], [0, 0, 0, 1]]]) + 1e-30)
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  n, nxt = jax.vmap(lambda key: sampling_accept(key, jnp.array([[1, 3]]), q, p, limit=jnp.int32(1)))(keys)
  assert np.all(np.asarray(n) == 1)
  assert 150 < int(np.sum(np.asarray(nxt) == 2)) < 250 and set(np.asarray(nxt).ravel().tolist()) == {2, 3}


def test_auto_k_greedy_equals_target(target):
  cfg, params = target
  draft = perturbed(params, jax.random.PRNGKey(7), 0.03)
  want = generate(params, cfg, PROMPTS, 14)
  got, stats = speculative_generate(params, cfg, draft, cfg, PROMPTS, 14, "auto", k_max=5, draft_cost=0.1)
  assert got == want
  assert stats["k"] == "auto" and 1 <= stats["k_final"] <= 5 and 0.0 < stats["acceptance_rate"] < 1.0, stats


def test_auto_k_follows_acceptance():
  """A draft equal to the target climbs to k_max; an unrelated, costly one settles at 1; outputs stay exact."""
  cfg = tiny_cfg(None)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  other = hybrid.init_params(cfg, jax.random.PRNGKey(9), std=0.3)
  want = generate(params, cfg, PROMPTS, 24)
  got, stats = speculative_generate(params, cfg, params, cfg, PROMPTS, 24, "auto", k_max=6, draft_cost=0.05)
  assert got == want and stats["k_final"] == 6 and stats["acceptance_rate"] == 1.0, stats
  got, stats = speculative_generate(params, cfg, other, cfg, PROMPTS, 24, "auto", k_max=6, draft_cost=0.5)
  assert got == want and stats["k_final"] == 1 and stats["mean_k"] < 2, stats
  assert stats["draft_calls"] < stats["rounds"] * 2 + 1  # short rounds skip the draft's later steps


def test_auto_k_sampling_matches_target_distribution():
  """Sampling with rounds shorter than k_max (the acceptance limit in use): still the target's distribution."""
  v, n_tok, samples = 8, 3, 12000
  sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
  cfg = tiny_cfg("mamba", layers=2, attn=(1,), vocab=v)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(11), std=0.5)
  draft = perturbed(params, jax.random.PRNGKey(12), 1.0)
  probs = exact_joint(params, cfg, [1, 2, 3], n_tok, **sampling)
  got, stats = speculative_generate(params, cfg, draft, cfg, [[1, 2, 3]] * samples, n_tok, "auto", seed=3,
                                    eos_ids=(), k_max=4, draft_cost=0.1, **sampling)
  assert 1 <= stats["mean_k"] < 4, stats  # the first round proposes 2 of at most 4
  counts = np.bincount([np.ravel_multi_index(t[:n_tok], (v,) * n_tok) for t in got], minlength=v ** n_tok)
  assert chi_square_pvalue(counts, probs) > 1e-3


# ------------------------------------------------------------------------------------------------
# Self-draft by layer skipping
def test_layer_skip_draft():
  """All layers kept: the draft is the target (everything accepted); layers skipped: still the target's output.
  The hybrid's attention layer is re-indexed in the draft's config; the arrays are the target's own."""
  cfg = tiny_cfg("mamba", layers=3, attn=(1,))
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  dparams, dcfg = layer_skip_draft(params, cfg, [0, 1, 2])
  assert dcfg == cfg and dparams["layers_2"] is params["layers_2"]
  want = generate(params, cfg, PROMPTS, 12)
  got, stats = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, 12, 3)
  assert got == want and stats["acceptance_rate"] == 1.0, stats
  dparams, dcfg = layer_skip_draft(params, cfg, [1, 2])
  assert dcfg.num_hidden_layers == 2 and dcfg.attn_layers == (0,) and dparams["layers_0"] is params["layers_1"]
  got, _ = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, 12, 3)
  assert got == want
  # the loop takes such a draft's decoding layout from the target's instead of packing its layers again
  assert shared_layers(params, dparams) == (1, 2) and shared_layers(params, jax.tree.map(lambda a: a, dparams)) is None
  tokens, offsets = jnp.asarray([[1, 2, 3, 4]]), jnp.zeros((1,), jnp.int32)
  concats = lambda layers: str(jax.make_jaxpr(lambda tp, dp: speculative_loop(
      tp, cfg, dp, dcfg, tokens, offsets, jax.random.PRNGKey(0), jnp.zeros((0,), jnp.int32), k=2, max_new_tokens=3,
      max_len=10, temperature=0.0, top_k=0, top_p=1.0, draft_layers=layers))(params, dparams)).count("concatenate[")
  assert concats((1, 2)) < concats(None)
  with pytest.raises(ValueError, match="layer_skip_draft"):
    layer_skip_draft(params, cfg, [3])
