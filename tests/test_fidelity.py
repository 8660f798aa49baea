"""Fidelity evaluation: held-out sets, scores against a direct per-document computation, answers, the table."""
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.evaluate import fidelity as fd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, teacher_dir):
  """A tiny random Llama teacher with the real SmolLM2 tokenizer (saved, for the data generator) and its
  hybrid student (layer 1 a Mamba mixer initialised from the attention)."""
  from hybrid_jax.checkpoint import load_tokenizer, save_model
  from hybrid_jax.config import ModelConfig
  from hybrid_jax.model import hybrid
  from hybrid_jax.model.init import hybrid_config, init_from_teacher
  tok = load_tokenizer(teacher_dir)
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, eos_token_id=(2,), tie_word_embeddings=True)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.05)
  tdir = save_model(str(tmp_path_factory.mktemp("tiny") / "teacher"), params, cfg, tok)
  scfg = hybrid_config(cfg, (0,), "mamba", d_state=4, scan_impl="reference")
  sparams = init_from_teacher(params, cfg, scfg, jax.random.PRNGKey(1))
  return (sparams, scfg, tok), (params, cfg, tok), tdir


def test_human_text_is_prose_and_deterministic():
  a, b = fd.human_text(12), fd.human_text(12)
  assert a == b and len(set(a)) == 12
  for p in a:
    assert len(p.split()) >= 40 and "\n" not in p and "::=" not in p and "****" not in p
  assert fd.human_text(3) != a[:3]  # spread over the topics, not the first paragraphs
  with pytest.raises(ValueError, match="paragraphs"):
    fd.human_text(10 ** 6)


def _direct_nll(model, docs, seq_len):
  """Sum of -log p over the scored tokens and their count, one unpadded forward per document."""
  from hybrid_jax.model import hybrid
  params, cfg, _ = model
  nll, n = 0.0, 0
  for ids, target in docs:
    ids, target = ids[:seq_len], target[:seq_len]
    logits, _ = hybrid.forward(params, cfg, jnp.asarray(ids)[None])
    logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    for t in range(len(ids) - 1):
      if target[t + 1]:
        nll -= logp[t, ids[t + 1]]
        n += 1
  return nll, n


def test_evaluate_fidelity_scores_answers_and_table(tiny, tmp_path):
  from hybrid_jax.data.tokenize import chat_tokens, text_tokens
  student, teacher, tdir = tiny
  tok = teacher[2]
  opts = fd.FidelityOptions(n_conversations=3, answer_tokens=4, n_text=3, seq_len=80, batch_size=2,
                            n_answers=2, max_new_tokens=5, cache_dir=str(tmp_path / "cache"))
  convs = fd.heldout_conversations(tdir, opts)
  assert len(convs) == 3 and convs == fd.heldout_conversations(tdir, opts)  # cached, deterministic
  assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)
  res = fd.evaluate_fidelity(student, teacher, teacher_dir=tdir, options=opts)
  assert set(res) == {"conversations", "text", "answers", "settings"}
  texts = fd.human_text(3)
  docs = {"conversations": [chat_tokens(tok, c) for c in convs],
          "text": [(ids, np.ones_like(ids)) for ids in (text_tokens(tok, t) for t in texts)]}
  assert any(len(ids) > opts.seq_len for ids, _ in docs["text"])  # the cut at seq_len is exercised
  for name, d in docs.items():
    r = res[name]
    assert r["documents"] == 3
    for model, key in ((teacher, "teacher_ppl"), (student, "student_ppl")):
      nll, n = _direct_nll(model, d, opts.seq_len)
      assert r["n_tokens"] == n
      np.testing.assert_allclose(r[key], np.exp(nll / n), rtol=1e-4)
    np.testing.assert_allclose(r["ppl_ratio"], r["student_ppl"] / r["teacher_ppl"])
    assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl"] > 0
  assert [a["prompt"] for a in res["answers"]] == list(fd.PROMPTS[:2])
  assert res["answers"][0]["teacher"] == fd.greedy_answers(teacher, fd.PROMPTS[:1], 5)[0]
  assert res["settings"]["seed"] == fd.HELDOUT_SEED and res["settings"]["text_source"] == fd.TEXT_SOURCE

  same = fd.evaluate_fidelity(teacher, teacher, conversations=convs, texts=texts, options=opts)
  for name in ("conversations", "text"):
    assert same[name]["top1_agreement"] == 1.0 and same[name]["ppl_ratio"] == 1.0
  assert all(a["teacher"] == a["student"] for a in same["answers"])

  table = fd.format_table(res, answers=1)
  assert "teacher-written conversations" in table and "human-written text" in table
  assert f"{res['text']['student_ppl']:.3f}" in table
  assert fd.PROMPTS[0] in table and fd.PROMPTS[1] not in table
  json.dumps(res)  # plain data


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert fd.main(["--model", str(tmp_path / "nope"), "--teacher", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.count("\n") == 1
  with pytest.raises(ValueError, match="n_answers"):
    fd.FidelityOptions(n_answers=len(fd.PROMPTS) + 1)
  with pytest.raises(SystemExit) as e:  # a model is needed unless only the held-out data is asked for
    fd.main(["--teacher", str(tmp_path / "nope")])
  assert e.value.code == 2 and "--model is required" in capsys.readouterr().err


def test_gpu_recipe_chains_are_nested_and_valid():
  """bench/fidelity.py's chains: every stage config exists and loads; each alignment stage keeps the Mamba layers
  of the one before (progressive: a growing Mamba set) and the distill stage keeps the last layout."""
  import os

  from hybrid_jax.train import config as tcfg
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bench = _bench_fidelity()
  assert len(bench.RECIPES) == 6
  for name, chain in bench.RECIPES.items():
    variant, attn = name.split("_")
    cfgs = [tcfg.load(os.path.join(repo, "configs", f"{c}.yaml")) for c in chain]
    assert [c.stage for c in cfgs] == ["align"] * (len(cfgs) - 1) + ["distill"]
    assert all(c.model.variant == variant for c in cfgs)
    layouts = [set(c.model.attn_layers) for c in cfgs]
    assert all(b <= a for a, b in itertools.pairwise(layouts)), name  # attention only ever shrinks
    assert layouts[-1] == layouts[-2]
    assert round(100 * len(layouts[-1]) / 30) == {"attn50": 50, "attn25": 27, "attn12": 13}[attn]
    assert all(c.loss.kl_reduction == "batchmean" for c in cfgs[:-1])
  assert bench.main(["--teacher", "/nonexistent", "--recipes", "mamba_attn99"]) == 2
  # per-stage overrides reach only their stage's command, after the ones for every stage
  args = bench.parse_args(["--teacher", "T", "--set", "a=1", "--align-set", "b=2", "--distill-set", "c=3"])
  align = bench.stage_command("gpu_mamba_attn50_align", "/nonexistent/r", None, args)
  distill = bench.stage_command("gpu_mamba_attn50_distill", "/nonexistent/r/d", "/nonexistent/r", args)
  assert align[-2:] == ["a=1", "b=2"] and "c=3" not in align
  assert distill[-2:] == ["a=1", "c=3"] and "b=2" not in distill
  assert distill[distill.index("--init") + 1] == "/nonexistent/r/model"
  data = bench.stage_command("gpu_mamba_attn50_distill", None, None, args)  # the data of a stage, nothing else
  assert "--data-only" in data and "--output" not in data and "--resume" not in data and data[-2:] == ["a=1", "c=3"]
  ev = bench.evaluate_command(None, args)
  assert "--data-only" in ev and "--model" not in ev and "--json" not in ev
  # a smoke run keeps any mixed-in document set tiny, whatever the override asked for
  smoke = bench.parse_args(["--teacher", "T", "--smoke", "--align-set", "default_data.n_text=32768"])
  cmd = bench.stage_command("gpu_mamba_attn50_align", "/nonexistent/r", None, smoke)
  assert cmd[-3:] == ["default_data.n_text=32768", "default_data.n_text=4", "default_data.text_tokens=8"]
  assert bench.stage_command("gpu_mamba_attn50_distill", "/nonexistent/r/d", "/nonexistent/r",
                             smoke)[-2:] == ["default_data.n_text=4", "default_data.text_tokens=8"]  # the recipe's
  smoke = bench.parse_args(["--teacher", "T", "--smoke", "--distill-set", "default_data.n_text=0"])
  assert "default_data.n_text=4" not in bench.stage_command("gpu_mamba_attn50_distill", "/nonexistent/r/d",
                                                            "/nonexistent/r", smoke)


def _bench_fidelity():
  import importlib.util
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("bench_fidelity", os.path.join(repo, "bench", "fidelity.py"))
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # its dataclasses look their module up
  spec.loader.exec_module(bench)
  return bench


def test_recipe_plan_runs_in_order_and_side_by_side():
  """bench/fidelity.py's scheduler: shared chain prefixes run once; one job runs recipe by recipe (each evaluated
  after its last stage); several jobs never exceed their number, start a task only after the stage it starts
  from, and skip what follows a failed stage."""
  import threading
  import time
  bench = _bench_fidelity()
  tasks, chains = bench.plan(["mamba2_attn50", "mamba_attn50", "mamba2_attn25"], "R")
  a50 = "R/gpu_mamba2_attn50_align"
  assert chains["mamba2_attn25"][0] == chains["mamba2_attn50"][0] == a50
  assert len(tasks) == 2 + 2 + 2 + 3  # the 25% chain adds its own alignment and distillation only

  def fake(fail=(), sleep=0.0):
    lock, log, live = threading.Lock(), [], [0, 0]

    def execute(task, slot):
      with lock:
        log.append(("start", task.key, slot))
        live[0] += 1
        live[1] = max(live[1], live[0])
      time.sleep(sleep)
      with lock:
        live[0] -= 1
        log.append(("end", task.key, slot))
      if task.kind == "eval":
        return 0, {}
      return {"done": task.key not in fail, "rc": 1 if task.key in fail else 0}
    return execute, log, live

  execute, log, _ = fake()
  done = bench.schedule(tasks, execute, 1, bench.Deadline(0))
  order = [k for what, k, _ in log if what == "start"]
  assert order == [a50, a50 + "/gpu_mamba2_attn50_distill", "mamba2_attn50", "R/gpu_mamba_attn50_align",
                   "R/gpu_mamba_attn50_align/gpu_mamba_attn50_distill", "mamba_attn50", a50 + "/gpu_mamba2_attn25_align",
                   a50 + "/gpu_mamba2_attn25_align/gpu_mamba2_attn25_distill", "mamba2_attn25"]
  assert len(done) == len(tasks)

  execute, log, live = fake(fail={"R/gpu_mamba_attn50_align"}, sleep=0.05)
  done = bench.schedule(tasks, execute, 2, bench.Deadline(0))
  assert live[1] == 2  # two at a time, never more
  ended = set()
  for what, key, _ in log:
    if what == "start":
      after = next(t.after for t in tasks.values() if t.key == key)
      assert after is None or after in ended, (key, after)
    else:
      ended.add(key)
  assert "R/gpu_mamba_attn50_align/gpu_mamba_attn50_distill" not in done and "eval:mamba_attn50" not in done
  assert "eval:mamba2_attn25" in done  # the other chains went on
  assert {s for _, _, s in log} == {0, 1}

  # each slot's GPU: one of those the caller may use, by its id; sharing a GPU turns preallocation off
  assert bench.slot_env(3, 2, 4, "4,5") == {"CUDA_VISIBLE_DEVICES": "5", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  assert bench.slot_env(2, 4, 4, None) == {"CUDA_VISIBLE_DEVICES": "2"}
  assert bench.slot_env(1, 1, 2, None) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  assert bench.slot_env(0, 8, 1, None) == {}

  expired = bench.Deadline(1e-9)
  time.sleep(0.01)
  assert bench.schedule(tasks, fake()[0], 2, expired) == {}
