"""Losses vs straightforward torch / numpy computations (independent formulas, not the JAX code)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid_jax.train import losses

B, T, V = 3, 7, 11


def _data(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  teacher = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = (rng.random((B, T)) > 0.3).astype(np.int32)
  mask[:, -1] = 1  # set on purpose: the last position must still not count
  return logits, teacher, tokens, mask


def _torch_ce(logits, tokens, mask):
  """HF-style shifted CE: logits[:, :-1] predict tokens[:, 1:], masked targets set to -100."""
  labels = torch.tensor(tokens[:, 1:], dtype=torch.long).clone()
  labels[torch.tensor(mask[:, :-1]) == 0] = -100
  lg = torch.tensor(logits[:, :-1])
  return F.cross_entropy(lg.reshape(-1, V), labels.reshape(-1), ignore_index=-100), (labels != -100).sum()


def test_token_logprobs_matches_torch():
  logits, _, tokens, _ = _data()
  got = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
  ref = torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(tokens, dtype=torch.long)[..., None])
  np.testing.assert_allclose(got, ref[..., 0].numpy(), rtol=1e-5, atol=1e-5)


def test_cross_entropy_matches_torch_and_ignores_last_position():
  logits, _, tokens, mask = _data()
  loss, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  ref, ref_n = _torch_ce(logits, tokens, mask)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  assert int(n) == int(ref_n) == int(mask[:, :-1].sum())
  # gradient vs torch autograd
  g = jax.grad(lambda x: losses.cross_entropy(x, jnp.asarray(tokens), jnp.asarray(mask))[0])(jnp.asarray(logits))
  lt = torch.tensor(logits, requires_grad=True)
  labels = torch.tensor(tokens[:, 1:], dtype=torch.long).clone()
  labels[torch.tensor(mask[:, :-1]) == 0] = -100
  F.cross_entropy(lt[:, :-1].reshape(-1, V), labels.reshape(-1), ignore_index=-100).backward()
  np.testing.assert_allclose(np.asarray(g), lt.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(g)[:, -1] == 0)


def test_cross_entropy_empty_mask_is_zero_not_nan():
  logits, _, tokens, _ = _data()
  loss, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.zeros((B, T), jnp.int32))
  assert float(n) == 0 and float(loss) == 0.0


def test_cross_entropy_bf16_logits_computed_in_fp32():
  logits, _, tokens, mask = _data()
  lb = jnp.asarray(logits, jnp.bfloat16)
  loss, _ = losses.cross_entropy(lb, jnp.asarray(tokens), jnp.asarray(mask))
  ref, _ = _torch_ce(np.asarray(lb.astype(jnp.float32)), tokens, mask)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_torch(temperature):
  logits, teacher, _, mask = _data(1)
  got = losses.kl_div(jnp.asarray(teacher), jnp.asarray(logits), jnp.asarray(mask), temperature)
  s = torch.log_softmax(torch.tensor(logits) / temperature, -1)
  t = torch.softmax(torch.tensor(teacher) / temperature, -1)
  per_tok = F.kl_div(s, t, reduction="none").sum(-1)  # [b, t] = KL(teacher || student)
  w = torch.tensor(mask, dtype=torch.float32)  # the KL needs no target: the last position counts too
  ref = (per_tok * w).sum() / w.sum()
  np.testing.assert_allclose(float(got), ref.item(), rtol=1e-5)
  # target_weights(mask): the positions cross_entropy counts (last one dropped)
  at_ce = losses.kl_div(jnp.asarray(teacher), jnp.asarray(logits), losses.target_weights(jnp.asarray(mask)),
                        temperature)
  w[:, -1] = 0
  np.testing.assert_allclose(float(at_ce), ((per_tok * w).sum() / w.sum()).item(), rtol=1e-5)


def test_kl_reductions_against_the_direct_formula():
  """token_mean = masked sum / counted positions; batchmean = masked sum / rows, which with every position real
  is torch's F.kl_div(log_softmax(student), softmax(teacher), reduction='batchmean') on [b, t, V] (the
  reference's loss)."""
  logits, teacher, _, _ = _data(5)
  seg = np.ones((B, T), np.int32)
  seg[1, 4:] = 0  # padding at the end of row 1
  seg[2, 2:5] = 2
  kl_mask = losses.real_positions(jnp.asarray(seg))
  np.testing.assert_array_equal(np.asarray(kl_mask), (seg > 0).astype(np.float32))
  p_t = np.exp(teacher - teacher.max(-1, keepdims=True))
  p_t /= p_t.sum(-1, keepdims=True)
  log_p_t = np.log(p_t)
  log_p_s = logits - logits.max(-1, keepdims=True)
  log_p_s -= np.log(np.exp(log_p_s).sum(-1, keepdims=True))
  per_pos = (p_t * (log_p_t - log_p_s)).sum(-1) * (seg > 0)  # [b, t]
  t_, s_ = jnp.asarray(teacher), jnp.asarray(logits)
  np.testing.assert_allclose(float(losses.kl_div(t_, s_, kl_mask)), per_pos.sum() / (seg > 0).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(losses.kl_div(t_, s_, kl_mask, reduction="batchmean")), per_pos.sum() / B,
                             rtol=1e-5)
  ref_bm = F.kl_div(torch.log_softmax(torch.tensor(logits), -1), torch.softmax(torch.tensor(teacher), -1),
                    reduction="batchmean")
  got_bm = losses.kl_div(t_, s_, jnp.ones((B, T)), reduction="batchmean")
  np.testing.assert_allclose(float(got_bm), ref_bm.item(), rtol=1e-5)
  with pytest.raises(ValueError, match="reduction"):
    losses.kl_div(t_, s_, kl_mask, reduction="mean")


def test_kl_is_zero_for_equal_logits_and_grads_only_to_student():
  logits, teacher, _, mask = _data(2)
  x = jnp.asarray(logits)
  assert abs(float(losses.kl_div(x, x, jnp.asarray(mask)))) < 1e-6
  gt, gs = jax.grad(lambda t, s: losses.kl_div(t, s, jnp.asarray(mask)), argnums=(0, 1))(jnp.asarray(teacher), x)
  assert np.all(np.asarray(gt) == 0) and np.any(np.asarray(gs) != 0)
  # student gradient = (softmax(s) - softmax(t)) * w / n  (analytic)
  p_s, p_t = jax.nn.softmax(x, -1), jax.nn.softmax(jnp.asarray(teacher), -1)
  w = mask.astype(np.float32).copy()
  expect = (np.asarray(p_s - p_t)) * w[..., None] / w.sum()
  np.testing.assert_allclose(np.asarray(gs), expect, rtol=1e-4, atol=1e-7)


def test_sequence_logprob_matches_loop():
  logits, _, tokens, mask = _data(3)
  got = np.asarray(losses.sequence_logprob(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)))
  lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
  ref = np.zeros(B)
  for b in range(B):
    for t in range(T - 1):
      if mask[b, t]:
        ref[b] += lp[b, t, tokens[b, t + 1]]
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def _dpo_ref(pc, pr, rc, rr, beta, variant, ls):
  h = (pc - rc) - (pr - rr)
  logsig = lambda z: -np.log1p(np.exp(-z))
  if variant == "sigmoid":
    l = -(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h)
  elif variant == "ipo":
    l = (h - 1 / (2 * beta)) ** 2
  else:
    l = np.maximum(0, 1 - beta * h)
  return l.mean()


@pytest.mark.parametrize("variant,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss(variant, ls):
  rng = np.random.default_rng(4)
  pc, pr, rc, rr = (rng.normal(size=6) * 20 - 50 for _ in range(4))
  beta = 0.1
  loss, m = losses.dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)), beta, variant, ls)
  np.testing.assert_allclose(float(loss), _dpo_ref(pc, pr, rc, rr, beta, variant, ls), rtol=1e-5)
  ch, rj = beta * (pc - rc), beta * (pr - rr)
  np.testing.assert_allclose(float(m["chosen_reward"]), ch.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["rejected_reward"]), rj.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["reward_margin"]), (ch - rj).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["reward_accuracy"]), (ch > rj).mean())


def test_dpo_sigmoid_at_zero_margin_is_log2_and_gradient_sign():
  z = jnp.zeros(4)
  loss, _ = losses.dpo_loss(z, z, z, z, 0.1)
  np.testing.assert_allclose(float(loss), np.log(2), rtol=1e-6)
  g = jax.grad(lambda c: losses.dpo_loss(c, z, z, z, 0.1)[0])(z)
  assert np.all(np.asarray(g) < 0)  # raising the chosen log-prob lowers the loss
  with pytest.raises(ValueError, match="variant"):
    losses.dpo_loss(z, z, z, z, 0.1, variant="nope")


def test_evaluate_matches_torch_on_tiny_models():
  from hybrid_jax.config import ModelConfig, SSMConfig
  from hybrid_jax.model import hybrid
  from hybrid_jax.train.evaluate import evaluate
  tcfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
  scfg = tcfg.replace(attn_layers=(1,), ssm=SSMConfig(d_state=4, scan_impl="reference"))
  tp = hybrid.init_params(tcfg, jax.random.PRNGKey(0), std=0.5)
  sp = hybrid.init_params(scfg, jax.random.PRNGKey(1), std=0.5)
  rng = np.random.default_rng(5)
  batches = []
  for _ in range(2):  # different token counts per batch: the result must be token-weighted
    toks = rng.integers(0, 32, (2, 8)).astype(np.int32)
    seg = np.ones((2, 8), np.int32)
    seg[1, 5:] = 0
    mask = (rng.random((2, 8)) > 0.4).astype(np.int32) * (seg > 0)
    batches.append({"tokens": toks, "segment_ids": seg, "loss_mask": mask})
  res = evaluate(sp, scfg, batches, tp, tcfg)
  nll_s, nll_t, kl, agree, n = 0.0, 0.0, 0.0, 0, 0
  for b in batches:
    s = torch.tensor(np.asarray(hybrid.forward(sp, scfg, jnp.asarray(b["tokens"]),
                                               segment_ids=jnp.asarray(b["segment_ids"]))[0]))
    t = torch.tensor(np.asarray(hybrid.forward(tp, tcfg, jnp.asarray(b["tokens"]),
                                               segment_ids=jnp.asarray(b["segment_ids"]))[0]))
    for i in range(2):
      for j in range(7):
        if b["loss_mask"][i, j]:
          y = int(b["tokens"][i, j + 1])
          nll_s -= torch.log_softmax(s[i, j], -1)[y].item()
          nll_t -= torch.log_softmax(t[i, j], -1)[y].item()
          kl += F.kl_div(torch.log_softmax(s[i, j], -1), torch.softmax(t[i, j], -1), reduction="sum").item()
          agree += int(torch.argmax(s[i, j]) == torch.argmax(t[i, j]))
          n += 1
  assert res["n_tokens"] == n
  np.testing.assert_allclose(res["student_ppl"], np.exp(nll_s / n), rtol=1e-4)
  np.testing.assert_allclose(res["teacher_ppl"], np.exp(nll_t / n), rtol=1e-4)
  np.testing.assert_allclose(res["kl"], kl / n, rtol=1e-4)
  np.testing.assert_allclose(res["top1_agreement"], agree / n)
  itself = evaluate(tp, tcfg, batches, tp, tcfg)
  assert itself["top1_agreement"] == 1.0 and abs(itself["kl"]) < 1e-6
  alone = evaluate(sp, scfg, batches)
  np.testing.assert_allclose(alone["student_ppl"], res["student_ppl"], rtol=1e-6)
  assert np.isnan(alone["kl"]) and np.isnan(alone["teacher_ppl"])


def test_chunked_ce_kl_equals_full_logits_losses_and_grads():
  # The training loss works from hidden states in time chunks; it must equal CE + KL on full logits.
  rng = np.random.default_rng(0)
  b, t, d, v = 2, 37, 16, 50  # t not a multiple of the chunk: the padded tail must not count
  sh, th = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
  sw, tw = (jnp.asarray(rng.normal(size=(d, v)), jnp.float32) for _ in range(2))
  toks, mask = jnp.asarray(rng.integers(0, v, (b, t))), jnp.asarray(rng.integers(0, 2, (b, t)))

  def full(sh, sw):
    sl = sh @ sw
    ce, n = losses.cross_entropy(sl, toks, mask)
    kl = losses.kl_div(th @ tw, sl, losses.target_weights(mask), temperature=2.0)
    return ce + 0.7 * kl, (ce, kl, n)

  def chunked(sh, sw):
    ce, kl, n = losses.chunked_ce_kl(sh, sw, toks, mask, th, tw, temperature=2.0, chunk=8, dtype=jnp.float32)
    return ce + 0.7 * kl, (ce, kl, n)

  (_, ref), g_ref = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(sh, sw)
  (_, got), g_got = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(sh, sw)
  np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(np.array(a), np.array(r), rtol=1e-4, atol=1e-6)
  ce_only = losses.chunked_ce_kl(sh, sw, toks, mask, chunk=8, dtype=jnp.float32)
  np.testing.assert_allclose(float(ce_only[0]), float(ref[0]), rtol=1e-5)
  assert float(ce_only[1]) == 0.0


@pytest.mark.parametrize("temperature,ce_w,kl_w,kl_every,reduction", [
    (2.0, 1.0, 0.7, False, "token_mean"), (1.0, 0.5, 1.0, False, "token_mean"), (1.0, 1.0, 0.0, False, "token_mean"),
    (1.0, 1.0, 0.1, True, "batchmean"), (2.0, 0.0, 1.0, True, "token_mean")])
def test_fused_ce_kl_loss_equals_full_logits_loss_and_grads(temperature, ce_w, kl_w, kl_every, reduction):
  # The training loss makes its head gradients in the forward pass; values and gradients must be exact,
  # with the KL where CE counts (kl_mask None) or on its own mask (every real position) and either reduction.
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 37, 16, 50
  sh, th = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
  sw, tw = (jnp.asarray(rng.normal(size=(d, v)), jnp.float32) for _ in range(2))
  toks, mask = jnp.asarray(rng.integers(0, v, (b, t))), jnp.asarray(rng.integers(0, 2, (b, t)))
  seg = np.ones((b, t), np.int32)
  seg[1, 30:] = 0
  kl_mask = losses.real_positions(jnp.asarray(seg)) if kl_every else None
  full_kl_mask = kl_mask if kl_every else losses.target_weights(mask)

  def full(sh, sw):
    sl = sh @ sw
    ce, _ = losses.cross_entropy(sl, toks, mask)
    kl = losses.kl_div(th @ tw, sl, full_kl_mask, temperature=temperature, reduction=reduction)
    return ce_w * ce + kl_w * kl, (ce, kl)

  def fused(sh, sw):
    loss, ce, kl, _ = losses.fused_ce_kl_loss(sh, sw, toks, mask, th, tw, ce_weight=ce_w, kl_weight=kl_w,
                                              temperature=temperature, kl_mask=kl_mask, kl_reduction=reduction,
                                              chunk=8, dtype=jnp.float32)
    return loss, (ce, kl)

  (l_ref, (ce_ref, kl_ref)), g_ref = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(sh, sw)
  (l_got, (ce_got, kl_got)), g_got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(sh, sw)
  np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-5)
  np.testing.assert_allclose(float(ce_got), float(ce_ref), rtol=1e-5)
  np.testing.assert_allclose(float(kl_got), float(kl_ref) if kl_w else 0.0, rtol=1e-5, atol=1e-7)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(np.array(a), np.array(r), rtol=1e-4, atol=1e-6)
  if kl_every:  # the chunked (autodiff) form agrees on the same mask and reduction
    _, kl_c, _ = losses.chunked_ce_kl(sh, sw, toks, mask, th, tw, temperature=temperature, chunk=8,
                                      dtype=jnp.float32, kl_mask=kl_mask, kl_reduction=reduction)
    np.testing.assert_allclose(float(kl_c), float(kl_ref), rtol=1e-5)


def test_distill_loss_takes_the_kl_at_every_real_position():
  """stages' distill loss: KL over every non-padding position (prompt tokens included, independent of the
  assistant-only loss_mask), CE on loss_mask; per position or per row as loss.kl_reduction says."""
  from hybrid_jax.config import ModelConfig, SSMConfig
  from hybrid_jax.model import hybrid
  from hybrid_jax.train import stages
  from hybrid_jax.train.config import from_dict
  tcfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
  scfg = tcfg.replace(attn_layers=(1,), ssm=SSMConfig(d_state=4, scan_impl="reference"))
  tp = hybrid.init_params(tcfg, jax.random.PRNGKey(0), std=0.5)
  sp = hybrid.init_params(scfg, jax.random.PRNGKey(1), std=0.5)
  rng = np.random.default_rng(6)
  toks = rng.integers(0, 32, (2, 9)).astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], np.int32)
  answer_only = np.array([[0, 0, 1, 1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0]], np.int32)
  s_log = np.asarray(hybrid.forward(sp, scfg, jnp.asarray(toks), segment_ids=jnp.asarray(seg))[0])
  t_log = np.asarray(hybrid.forward(tp, tcfg, jnp.asarray(toks), segment_ids=jnp.asarray(seg))[0])
  kl_sum, n_real = 0.0, 0
  for i in range(2):
    for j in range(9):
      if seg[i, j]:
        kl_sum += F.kl_div(torch.log_softmax(torch.tensor(s_log[i, j]), -1),
                           torch.softmax(torch.tensor(t_log[i, j]), -1), reduction="sum").item()
        n_real += 1
  for reduction, expect in (("token_mean", kl_sum / n_real), ("batchmean", kl_sum / 2)):
    cfg = from_dict({"stage": "distill", "loss": {"kl_weight": 1.0, "ce_weight": 0.0, "kl_reduction": reduction}})
    fn = stages.make_loss_fn(cfg, scfg, tcfg)
    for mask in (answer_only, np.ones_like(answer_only)):  # the KL does not depend on the CE mask
      batch = {"tokens": jnp.asarray(toks), "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}
      loss, m = fn(sp, batch, tp)
      np.testing.assert_allclose(float(m["kl"]), expect, rtol=1e-4)
      np.testing.assert_allclose(float(loss), expect, rtol=1e-4)
  from hybrid_jax.config import ConfigError
  with pytest.raises(ConfigError, match="loss.kl_reduction"):
    from_dict({"loss": {"kl_reduction": "sum"}})
