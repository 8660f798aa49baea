"""Default data: teacher-written chat JSONL, deterministic by seed, cached by teacher + settings."""
import json
import os

import jax
import pytest

from hybrid_jax.data import default_data as dd


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, teacher_dir):
  """A tiny random Llama with the real SmolLM2 tokenizer (vocabulary and chat template)."""
  from hybrid_jax.checkpoint import load_tokenizer, save_model
  from hybrid_jax.config import ModelConfig
  from hybrid_jax.model import hybrid
  tok = load_tokenizer(teacher_dir)
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, eos_token_id=(2,), tie_word_embeddings=True)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.02)
  return save_model(str(tmp_path_factory.mktemp("tiny") / "teacher"), params, cfg, tok)


KW = {"n_train": 5, "n_eval": 2, "seed": 3, "max_new_tokens": 6, "batch_size": 4, "question_tokens": 6}


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _text(path):
  with open(path) as f:
    return f.read()


def _meta(d):
  return json.loads(_text(os.path.join(d, "meta.json")))


def test_plan_and_cleaning_are_deterministic():
  assert dd.plan(10, 0) == dd.plan(10, 0) and dd.plan(10, 0) != dd.plan(10, 1)
  assert len(set(dd.plan(len(dd.TOPICS) * len(dd.STYLES), 0))) == len(dd.TOPICS) * len(dd.STYLES)
  assert dd.clean_question('Question: "Why is the sky blue?"\nextra', "x") == "Why is the sky blue?"
  assert dd.clean_question("Curious student: How do bees fly?", "x") == "How do bees fly?"
  assert dd.clean_question("??", "bees") == dd.FALLBACK_QUESTION.format(topic="bees")
  assert dd.clean_answer("One. Two. Thr", truncated=True) == "One. Two."
  assert dd.clean_answer("One. Two. Thr", truncated=False) == "One. Two. Thr"


def test_generates_valid_records_deterministically_and_caches(tiny_teacher, tmp_path, monkeypatch):
  from hybrid_jax.data.records import normalise
  a = dd.ensure_default_data(tiny_teacher, str(tmp_path / "c1"), **KW)
  train, ev = _read(a["train"]), _read(a["eval"])
  assert len(train) == 5 and len(ev) == 2
  for r in train + ev:
    n = normalise(r)  # the data pipeline accepts it as a chat record
    assert n["kind"] == "messages" and [m["role"] for m in n["messages"]] == ["user", "assistant"]
    assert r["messages"][1]["content"]
  meta = _meta(a["dir"])
  assert meta["settings"]["seed"] == 3 and meta["stats"]["answer_s"] >= 0

  # a fresh cache with the same settings -> byte-identical files (determinism)
  b = dd.ensure_default_data(tiny_teacher, str(tmp_path / "c2"), **KW)
  assert os.path.basename(a["dir"]) == os.path.basename(b["dir"])
  for k in ("train", "eval"):
    assert _text(a[k]) == _text(b[k])

  # a cache hit loads no model at all
  import hybrid_jax.checkpoint as ck
  monkeypatch.setattr(ck, "load_model", lambda *a, **k: pytest.fail("cache hit must not load the model"))
  assert dd.ensure_default_data(tiny_teacher, str(tmp_path / "c1"), **KW) == a
  monkeypatch.undo()

  # other settings -> another cache entry with other content
  c = dd.ensure_default_data(tiny_teacher, str(tmp_path / "c1"), **{**KW, "seed": 4})
  assert c["dir"] != a["dir"] and _text(c["train"]) != _text(a["train"])


def test_recipe_answer_sampling_reaches_the_generator(tiny_teacher, tmp_path):
  """default_data.answer_temperature / answer_top_p of a recipe select sampled answers (their own cache entry);
  the greedy defaults keep the cache key of a plain ensure_default_data call."""
  from hybrid_jax.config import ConfigError
  from hybrid_jax.train import config as tcfg
  from hybrid_jax.train.cli import resolve_data
  size = [f"default_data.{k}={v}" for k, v in
          {"n_train": 5, "n_eval": 2, "max_new_tokens": 6, "batch_size": 4}.items()]
  greedy = resolve_data(tcfg.load(None, size), tiny_teacher, str(tmp_path), log=lambda *_: None)
  sampled = resolve_data(tcfg.load(None, size + ["default_data.answer_temperature=0.8",
                                                 "default_data.answer_top_p=0.9"]),
                         tiny_teacher, str(tmp_path), log=lambda *_: None)
  g_dir, s_dir = (os.path.dirname(c.data["paths"][0]) for c in (greedy, sampled))
  plain = dd.ensure_default_data(tiny_teacher, str(tmp_path), n_train=5, n_eval=2, max_new_tokens=6, batch_size=4)
  assert g_dir == plain["dir"] and s_dir != g_dir
  settings = _meta(s_dir)["settings"]
  assert (settings["answer_temperature"], settings["answer_top_p"]) == (0.8, 0.9)
  for bad in ("default_data.answer_temperature=-1", "default_data.answer_top_p=0"):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
      tcfg.load(None, [bad])


def test_plain_text_documents(tiny_teacher, tmp_path, monkeypatch, capsys):
  """Teacher-written documents: deterministic, cached, plain-text records; a recipe's default_data.n_text mixes
  them into its training paths (not into DPO's); `train.py --data-only` prints a recipe's data files."""
  from hybrid_jax.data.records import normalise
  from hybrid_jax.train import config as tcfg
  from hybrid_jax.train.cli import resolve_data
  kw = {"n": 5, "seed": 1, "max_new_tokens": 6, "batch_size": 4}
  a = dd.ensure_default_texts(tiny_teacher, str(tmp_path / "c1"), **kw)
  rows = _read(a["train"])
  assert len(rows) == 5 and len(set(dd.text_plan(64, 0))) == 64
  for r, title in zip(rows, dd.text_plan(5, 1)):
    assert normalise(r)["kind"] == "text" and r["text"].startswith(title + "\n\n")
  assert _text(dd.ensure_default_texts(tiny_teacher, str(tmp_path / "c2"), **kw)["train"]) == _text(a["train"])
  import hybrid_jax.checkpoint as ck
  monkeypatch.setattr(ck, "load_model", lambda *a, **k: pytest.fail("cache hit must not load the model"))
  assert dd.ensure_default_texts(tiny_teacher, str(tmp_path / "c1"), **kw) == a
  monkeypatch.undo()

  size = [f"default_data.{k}={v}" for k, v in
          {"n_train": 5, "n_eval": 2, "max_new_tokens": 6, "batch_size": 4, "n_text": 3, "text_tokens": 6}.items()]
  cfg = resolve_data(tcfg.load(None, size), tiny_teacher, str(tmp_path / "c3"), log=lambda *_: None)
  chat, text = cfg.data["paths"]
  assert os.path.basename(os.path.dirname(chat)).startswith("sft-") and len(_read(text)) == 3
  from hybrid_jax.train import cli
  monkeypatch.setattr(ck, "load_model", lambda *a, **k: pytest.fail("cached data must not load a model"))
  capsys.readouterr()
  assert cli.main(["--stage=distill", "--teacher", tiny_teacher, "--cache-dir", str(tmp_path / "c3"), "--data-only",
                   *size]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[-3:] == [chat, text, cfg.data["eval_paths"][0]]
  monkeypatch.undo()
  with pytest.raises(Exception, match="default_data.n_text"):
    tcfg.load(None, ["default_data.n_text=-1"])


def test_dpo_pairs(tiny_teacher, tmp_path, teacher_dir):
  from hybrid_jax.checkpoint import save_model
  from hybrid_jax.config import ModelConfig
  from hybrid_jax.data.records import normalise
  from hybrid_jax.model import hybrid
  cfg = ModelConfig.load(os.path.join(tiny_teacher, "config.json"))
  student = save_model(str(tmp_path / "student"), hybrid.init_params(cfg, jax.random.PRNGKey(7)), cfg)  # no tokenizer
  p = dd.ensure_default_dpo_data(tiny_teacher, student, str(tmp_path / "c"), **KW)
  sft = dd.ensure_default_data(tiny_teacher, str(tmp_path / "c"), **KW)
  chosen = [r["messages"] for r in _read(sft["train"])]
  rows = _read(p["train"])
  meta = _meta(p["dir"])
  assert len(rows) + meta["stats"]["dropped_identical"] == 5 and len(rows) >= 1
  for r in rows:
    n = normalise(r)
    assert n["kind"] == "dpo" and n["chat"]
    assert [r["prompt"][0], r["chosen"][0]] in chosen  # chosen = the teacher's answer to that prompt
    assert r["rejected"][0]["content"] != r["chosen"][0]["content"]
  assert dd.ensure_default_dpo_data(tiny_teacher, student, str(tmp_path / "c"), **KW) == p


@pytest.mark.slow
def test_real_teacher_smoke(teacher_dir, tmp_path):
  p = dd.ensure_default_data(teacher_dir, str(tmp_path), n_train=3, n_eval=1, seed=0, max_new_tokens=24,
                             batch_size=4)
  rows = _read(p["train"]) + _read(p["eval"])
  assert len(rows) == 4
  meta = _meta(p["dir"])
  # the real teacher writes real questions (not the templated fallback) and non-trivial English answers
  assert meta["stats"]["fallback_questions"] <= 1, rows
  for r in rows:
    ans = r["messages"][1]["content"]
    assert len(ans.split()) >= 3 and sum(c.isalpha() for c in ans) > 0.5 * len(ans), rows


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_recipes_are_valid_train_configs(name):
  """Every YAML recipe loads against the training schema (unknown keys / bad values fail here)."""
  from hybrid_jax.train import config as tcfg
  path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
  cfg = tcfg.load(path)
  assert cfg.stage in name or name.startswith("paper_")
  if name.startswith("paper_"):
    assert cfg.model.attn_layers is not None and cfg.model.dtype == "bfloat16"
