"""Cached decoding, generate(), sampling, and the chat CLI on the real teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.config import ModelConfig
from hybrid_jax.decode.generate import generate, left_pad, prefill, prefill_chunk
from hybrid_jax.decode.sampling import processed_logprobs, sample_logits
from hybrid_jax.model import hybrid

V = 97


def tiny_llama_cfg():
  return ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, eos_token_id=(3,))


def tiny_llama():
  cfg = tiny_llama_cfg()
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.25)  # peaked logits: no argmax near-ties
  return params, cfg


FULL_LEN = 32


@jax.jit
def _full_forward(params, tokens):
  return hybrid.forward(params, tiny_llama_cfg(), tokens)[0]


def full_logits(params, cfg, seq):
  """Full-recompute logits [len(seq), V] without a cache. Right-padding to a fixed length (one compilation)
  cannot change the causal logits of the real tokens."""
  assert cfg == tiny_llama_cfg() and len(seq) <= FULL_LEN
  out = _full_forward(params, jnp.asarray([list(seq) + [0] * (FULL_LEN - len(seq))]))
  return np.asarray(out[0, :len(seq)])


def test_cached_prefill_and_steps_match_full_forward():
  params, cfg = tiny_llama()
  rng = np.random.RandomState(0)
  prompts = [rng.randint(4, V, n).tolist() for n in (3, 9, 6)]
  cont = rng.randint(4, V, (3, 5))  # tokens fed one at a time after the prompts
  tokens, offsets = left_pad(prompts, pad_id=0)
  L = tokens.shape[1]
  cache = hybrid.init_cache(cfg, 3, L + cont.shape[1]).replace(offset=jnp.asarray(offsets))
  pre, cache = hybrid.forward(params, cfg, jnp.asarray(tokens), cache=cache)
  steps = []
  for j in range(cont.shape[1]):
    lg, cache = hybrid.forward(params, cfg, jnp.asarray(cont[:, j:j + 1]), cache=cache)
    steps.append(np.asarray(lg[:, 0]))
  assert np.asarray(cache.pos).tolist() == [L + cont.shape[1]] * 3
  for i, p in enumerate(prompts):
    ref = full_logits(params, cfg, p + cont[i].tolist())
    np.testing.assert_allclose(np.asarray(pre[i, offsets[i]:]), ref[:len(p)], atol=1e-4, rtol=0)
    for j in range(cont.shape[1]):
      np.testing.assert_allclose(steps[j][i], ref[len(p) + j], atol=1e-4, rtol=0)


def naive_greedy(params, cfg, prompt, n, eos=()):
  seq, new = list(prompt), []
  for _ in range(n):
    t = int(full_logits(params, cfg, seq)[-1].argmax())
    if t in eos:
      break
    seq.append(t)
    new.append(t)
  return new


def test_generate_greedy_equals_naive_loop():
  params, cfg = tiny_llama()
  rng = np.random.RandomState(1)
  prompts = [rng.randint(4, V, n).tolist() for n in (2, 11, 5)]
  got = generate(params, cfg, prompts, 10, eos_ids=())
  want = [naive_greedy(params, cfg, p, 10) for p in prompts]
  assert got == want
  assert all(len(g) == 10 for g in got)
  # EOS: pick a token the first row produces at step 4; that row stops before it, the others are cut there too
  eos = want[0][4]
  got_eos = generate(params, cfg, prompts, 10, eos_ids=(eos,))
  assert got_eos == [naive_greedy(params, cfg, p, 10, eos=(eos,)) for p in prompts]
  assert got_eos[0] == want[0][:want[0].index(eos)]
  # batch composition does not change a row's result
  assert generate(params, cfg, prompts[1:2], 10, eos_ids=()) == want[1:2]


def test_generate_sampling_reproducible_and_valid():
  params, cfg = tiny_llama()
  prompts = [[5, 6, 7], [8, 9]]
  a = generate(params, cfg, prompts, 8, temperature=1.0, top_k=5, seed=3, eos_ids=())
  b = generate(params, cfg, prompts, 8, temperature=1.0, top_k=5, seed=3, eos_ids=())
  c = generate(params, cfg, prompts, 8, temperature=1.0, top_k=5, seed=4, eos_ids=())
  assert a == b and a != c
  assert all(0 <= t < V for row in a for t in row)
  # every sampled token is in the top-5 of its step (checked by full recompute)
  for p, row in zip(prompts, a):
    seq = list(p)
    for t in row:
      top5 = np.argsort(full_logits(params, cfg, seq)[-1])[-5:]
      assert t in top5
      seq.append(t)


def test_processed_logprobs_filters():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0, 2.0]])
  g = np.asarray(processed_logprobs(logits, 0.0))
  assert (g.argmax(-1) == [0, 2]).all() and np.isfinite(g).sum() == 2
  full = np.asarray(processed_logprobs(logits, 1.0))
  np.testing.assert_allclose(full, np.asarray(jax.nn.log_softmax(logits)), atol=1e-6)
  t = np.asarray(processed_logprobs(logits, 0.5))
  np.testing.assert_allclose(t, np.asarray(jax.nn.log_softmax(logits / 0.5)), atol=1e-6)
  k = np.asarray(processed_logprobs(logits, 1.0, top_k=2))
  assert (np.isfinite(k).sum(-1) == 2).all()
  np.testing.assert_allclose(np.exp(k).sum(-1), 1.0, atol=1e-6)
  # top-p: probs of row 0 are ~[.61,.22,.14,.08,.03]: 0.7 needs the top two
  p = np.asarray(processed_logprobs(logits, 1.0, top_p=0.7))
  assert np.isfinite(p[0]).tolist() == [True, True, False, False, False]
  np.testing.assert_allclose(np.exp(p[0, :2]), np.exp(full[0, :2]) / np.exp(full[0, :2]).sum(), atol=1e-6)


def test_nucleus_threshold_keeps_what_sorting_keeps():
  """The bisection cut keeps the same tokens as sorting the probabilities and cutting their cumulative sum
  (ties all in or all out, the top token always), on random and on tied distributions."""
  from hybrid_jax.decode.sampling import nucleus_threshold

  def by_sorting(probs, top_p):  # the kept tokens
    s = np.sort(probs, axis=-1)[:, ::-1].astype(np.float64)
    before = np.cumsum(s, axis=-1) - s
    return probs >= np.min(np.where(before < top_p, s, np.inf), axis=-1, keepdims=True)

  rng = np.random.default_rng(0)
  cases = [rng.normal(size=(64, 1000)) * scale for scale in (0.5, 2.0, 8.0)]
  cases.append(np.round(rng.normal(size=(64, 300)) * 2) / 2)  # many exact ties
  cases.append(np.zeros((2, 50)))  # all equal: every token is in
  for logits in cases:
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    # the mass strictly above each token (float64), once per case
    above = np.stack([np.where(r[None, :] > r[:, None], r[None, :], 0).sum(-1) for r in probs.astype(np.float64)])
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
      keep = np.asarray(probs >= np.asarray(nucleus_threshold(jnp.asarray(probs), top_p)))
      want = by_sorting(probs, top_p)
      differ = keep != want  # only where the mass above a token is top_p to within float32 rounding of a sum
      assert differ.sum() <= 1 and np.all(np.abs(above[differ] - top_p) < 1e-5), (top_p, above[differ])
      assert keep[np.arange(len(probs)), probs.argmax(-1)].all()


def test_sample_logits_follows_distribution():
  logits = jnp.tile(jnp.asarray([[1.0, 0.0, 2.0, -1.0]]), (20000, 1))
  toks = np.asarray(sample_logits(logits, jax.random.PRNGKey(0), temperature=1.0))
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.015)
  toks = np.asarray(sample_logits(logits, jax.random.PRNGKey(1), temperature=1.0, top_k=2))
  assert set(toks.tolist()) == {0, 2}
  assert np.asarray(sample_logits(logits[:2], jax.random.PRNGKey(2), temperature=0.0)).tolist() == [2, 2]


def test_left_pad_and_errors():
  tokens, offsets = left_pad([[1, 2], [3, 4, 5]], pad_id=0, multiple=4)
  assert tokens.tolist() == [[0, 0, 1, 2], [0, 3, 4, 5]] and offsets.tolist() == [2, 1]
  with pytest.raises(ValueError):
    left_pad([[1], []])


@pytest.mark.slow
def test_chat_cli_capital_of_france(teacher_dir, capsys):
  from hybrid_jax import chat as cli
  assert cli.main(["--model", teacher_dir, "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "24"]) == 0
  out = capsys.readouterr().out
  assert "Paris" in out, out
  assert "<|im_" not in out and "assistant" not in out  # only the answer is printed


def test_chat_loop_keeps_conversation(monkeypatch, capsys):
  from hybrid_jax import chat as cli
  seen = []

  def answer(messages):
    seen.append([dict(m) for m in messages])
    return f"reply{len(seen)}"
  lines = iter(["first question", "", "second question", "/exit", "never read"])
  monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
  cli._chat_loop(answer, [{"role": "system", "content": "be brief"}], None)
  assert capsys.readouterr().out.split() == ["reply1", "reply2"]
  assert [m["content"] for m in seen[1]] == ["be brief", "first question", "reply1", "second question"]


def test_generate_cli_missing_model(tmp_path, capsys):
  from hybrid_jax import chat as cli
  assert cli.main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {tmp_path / 'nope'}: checkpoint directory not found\n"


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_generate_hybrid_left_padded_equals_naive(variant):
  """Nothing in generate() is Llama-specific: a hybrid with left-padded prompts decodes like a full recompute."""
  cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attn_layers=(1,),
                    ssm={"variant": variant, "d_state": 8, "scan_impl": "reference"})
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)

  def naive(seq, n):
    seq, new = list(seq), []
    for _ in range(n):
      padded = seq + [0] * (16 - len(seq))  # right padding: causal, leaves earlier logits unchanged
      t = int(np.asarray(hybrid.forward(params, cfg, jnp.asarray([padded]))[0])[0, len(seq) - 1].argmax())
      seq.append(t)
      new.append(t)
    return new
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
  assert generate(params, cfg, prompts, 6, eos_ids=()) == [naive(p, 6) for p in prompts]


@pytest.mark.parametrize("variant", [None, "mamba", "mamba2"])
def test_prefill_in_chunks_equals_one_call(variant):
  """A prompt run as chunks into the cache gives the one call's last logits and cache, with a row whose
  left padding spans several chunks."""
  kw = {"attn_layers": (1,), "ssm": {"variant": variant, "d_state": 8, "scan_impl": "reference"}} if variant else {}
  cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, **kw)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  rng = np.random.default_rng(0)
  tokens, offsets = left_pad([list(rng.integers(1, 50, n)) for n in (24, 3, 17)], multiple=8)
  whole = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(offsets), 40)
  chunks = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(offsets), 40, chunk=8)
  assert jax.tree.structure(whole) == jax.tree.structure(chunks)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunks)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="does not divide"):
    prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(offsets), 40, chunk=7)


def test_prefill_chunk_rule():
  cfg = ModelConfig(vocab_size=50, hidden_size=2048, intermediate_size=8192, num_hidden_layers=1,
                    num_attention_heads=32, num_key_value_heads=8)
  assert prefill_chunk(cfg, 16, 2048) == 2048  # 16 x 2048 x 8192 fp32 = 1 GiB: one call
  assert prefill_chunk(cfg, 64, 2048) == 1024  # 4 GiB whole: two chunks of 2 GiB
  assert prefill_chunk(cfg, 64, 3000) == 1000  # the largest divisor under the cap
  assert prefill_chunk(cfg, 64, 2053) == 2053  # prime: no chunk of at least 128 tokens, so one call


def test_decode_attention_kernel_generates_the_same():
  """decode_attention='pallas' (a hybrid: one attention layer, one Mamba-2): the cache grows to whole blocks of
  keys, the decode steps run the kernel (interpret mode on CPU), and greedy generation, plain and speculative,
  equals the einsum path's."""
  from hybrid_jax.config import SSMConfig
  cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, attn_layers=(1,),  # head dim 16: the kernel's smallest
                    ssm=SSMConfig(variant="mamba2", d_state=16, ngroups=4, scan_impl="reference"))
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.25)
  kcfg = cfg.replace(decode_attention="pallas")
  assert hybrid.init_cache(kcfg, 1, 10).max_len == 64 and hybrid.init_cache(cfg, 1, 10).max_len == 10
  step = lambda c: lambda p, t, cache: hybrid.forward(p, c, t, cache=cache)
  one = jnp.ones((1, 1), jnp.int32)
  assert "pallas_call" in str(jax.make_jaxpr(step(kcfg))(params, one, hybrid.init_cache(kcfg, 1, 20)))
  assert "pallas_call" not in str(jax.make_jaxpr(step(cfg))(params, one, hybrid.init_cache(cfg, 1, 20)))
  prompts = [[5, 9, 11, 40], [7, 8]]
  want = generate(params, cfg, prompts, 8, eos_ids=())
  assert generate(params, kcfg, prompts, 8, eos_ids=()) == want
  # verify calls of k + 1 tokens take the kernel too; a layer-skip self-draft of the target's last layer
  from hybrid_jax.decode.speculative import layer_skip_draft, speculative_generate
  dparams, dcfg = layer_skip_draft(params, kcfg, [1])
  assert speculative_generate(params, kcfg, dparams, dcfg, prompts, 8, 3, eos_ids=())[0] == want
