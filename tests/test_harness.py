"""lm-evaluation-harness model `hybrid_jax`: the default teacher scores and generates as lm-eval's HFLM does
on the same weights, for the three request types (tiny local tasks written here); a tiny hybrid runs through
the same class and the CLI; the packing planner; bad input."""
import itertools
import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from hybrid_jax.checkpoint import load_tokenizer, save_model
from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.evaluate import __main__ as cli
from hybrid_jax.evaluate.harness import HybridJaxLM, length_bucket, plan_batches
from hybrid_jax.model import hybrid

TOL = 1e-4
MAX_LENGTH = 64  # small: rolling documents need two windows, generation contexts get left-truncated
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]

MC_ROWS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["five", "four", "seven"], "answer": 1},
    {"question": "The colour of a clear daytime sky is", "choices": ["green", "purple", "blue"], "answer": 2},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "per hour"], "answer": 0},
]
ROLLING_ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 12},
    {"text": "Rivers carry water from mountains to the sea, shaping valleys as they go."},
    {"text": ("In the morning the baker lights the oven, kneads the dough and waits for it to rise; by noon "
              "the shop smells of fresh bread, and the queue outside reaches the corner of the street where "
              "children play football until their parents call them home for lunch.")},
]
GEN_ROWS = [
    {"question": "Q: What is the capital of Italy?\nA:", "answer": " Rome"},
    {"question": "Q: Name a colour of the rainbow.\nA:", "answer": " Red"},
    {"question": ("Here is a long preamble that makes this context longer than the window allows, so that "
                  "the harness has to cut it from the left exactly as the reference implementation does. " * 3
                  + "Q: What do bees make?\nA:"), "answer": " Honey"},
]


def metric(name, aggregation, higher_is_better):
  return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def write_tasks(root) -> str:
  """Three local tasks (YAML + JSONL) under root; returns the include path."""
  root.mkdir(parents=True, exist_ok=True)
  yamls = {
      "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                  "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                  "metric_list": [metric("acc", "mean", True), metric("acc_norm", "mean", True)]},
      "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [metric("word_perplexity", "weighted_perplexity", False),
                                       metric("bits_per_byte", "bits_per_byte", False)]},
      "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                   "doc_to_target": "{{answer}}",
                   "generation_kwargs": {"until": ["\n", "Q:"], "do_sample": False, "max_gen_toks": 12},
                   "metric_list": [metric("exact_match", "mean", True)]},
  }
  rows = {"tiny_mc": MC_ROWS, "tiny_rolling": ROLLING_ROWS, "tiny_gen": GEN_ROWS}
  for name, spec in yamls.items():
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **spec, "metadata": {"version": 1.0}}
    (root / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
  return str(root)


def run_tasks(lm, include_path, tasks=TASKS) -> dict:
  tm = TaskManager(include_path=include_path, include_defaults=False)  # skips indexing the built-in tasks
  return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm,
                         log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                         torch_random_seed=0, fewshot_random_seed=0)


def responses(results, task) -> list:
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [s["resps"] for s in samples]


# ------------------------------------------------------------------------------------------------
# The default teacher against HFLM on the same weights
def hf_llama(params, cfg):
  """transformers' LlamaForCausalLM holding the same weights (our converter's HF layout), fp32."""
  import torch
  import transformers

  from hybrid_jax.convert import params_to_hf
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # tied head
  model.tie_weights()
  return model


@pytest.fixture(scope="module")
def teacher_runs(teacher_dir, tmp_path_factory):
  from lm_eval.models.huggingface import HFLM
  include = write_tasks(tmp_path_factory.mktemp("harness") / "tasks")
  ours = HybridJaxLM(path=teacher_dir, batch_size=4, max_length=MAX_LENGTH)
  hf = HFLM(pretrained=hf_llama(ours.params, ours.cfg), tokenizer=ours.tokenizer, batch_size=4,
            max_length=MAX_LENGTH)
  return run_tasks(ours, include), run_tasks(hf, include), ours


@pytest.mark.slow
def test_teacher_multiple_choice_matches_hflm(teacher_runs):
  ours, ref = (responses(r, "tiny_mc") for r in teacher_runs[:2])
  assert len(ours) == len(MC_ROWS) and all(len(r) == 3 for r in ours)
  for doc_ours, doc_ref in zip(ours, ref):
    for [(ll, greedy)], [(ll_ref, greedy_ref)] in zip(doc_ours, doc_ref):
      assert abs(ll - ll_ref) <= TOL, (ll, ll_ref)
      assert greedy == greedy_ref
  acc = teacher_runs[0]["results"]["tiny_mc"]["acc,none"]
  assert acc == teacher_runs[1]["results"]["tiny_mc"]["acc,none"]


@pytest.mark.slow
def test_teacher_rolling_perplexity_matches_hflm(teacher_runs):
  ours, ref = (responses(r, "tiny_rolling") for r in teacher_runs[:2])
  lm = teacher_runs[2]
  for row, [[ll]], [[ll_ref]] in zip(ROLLING_ROWS, ours, ref):
    n = len(lm.tok_encode(row["text"]))
    assert n > MAX_LENGTH or row is not ROLLING_ROWS[0]  # the first document needs two windows
    # A sum of n log-probs, each within TOL (transformers' fp32 sum drifts ~2e-3 from fp64 over ~100 tokens).
    assert ll < 0 and abs(ll - ll_ref) <= TOL * n, (ll, ll_ref, n)
  ppl = teacher_runs[0]["results"]["tiny_rolling"]["word_perplexity,none"]
  assert math.isfinite(ppl) and ppl > 1


@pytest.mark.slow
def test_teacher_generations_match_hflm(teacher_runs):
  ours, ref = (responses(r, "tiny_gen") for r in teacher_runs[:2])
  assert ours == ref, (ours, ref)
  assert all("\n" not in text and "Q:" not in text for [[text]] in ours)
  assert any(text.strip() for [[text]] in ours)  # the stop sequences do not cut everything


# ------------------------------------------------------------------------------------------------
# A tiny hybrid through the same class and the CLI
@pytest.fixture(scope="module")
def tiny_hybrid(teacher_dir, tmp_path_factory):
  tok = load_tokenizer(teacher_dir)
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, attn_layers=(1,),
                    max_position_embeddings=256, eos_token_id=(2,),
                    ssm=SSMConfig(variant="mamba", d_state=4, scan_impl="reference"))
  params = hybrid.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  root = tmp_path_factory.mktemp("hybrid")
  return save_model(root / "ckpt", params, cfg, tok), write_tasks(root / "tasks")


def test_tiny_hybrid_evaluates(tiny_hybrid):
  ckpt, include = tiny_hybrid
  lm = HybridJaxLM(path=ckpt, batch_size=4, max_length=64)
  results = run_tasks(lm, include)
  mc = responses(results, "tiny_mc")
  assert all(math.isfinite(ll) and ll < 0 for doc in mc for [(ll, _)] in doc)
  assert all(ll < 0 for [[ll]] in responses(results, "tiny_rolling"))
  assert all(isinstance(text, str) for [[text]] in responses(results, "tiny_gen"))
  # Packing several requests per row (segment ids) scores exactly as one request per row.
  unpacked = HybridJaxLM(model=(lm.params, lm.cfg, lm.tokenizer), batch_size=4, max_length=64, pack=False)
  seqs = [lm.tok_encode(r["question"] + " " + c) for r in MC_ROWS for c in r["choices"]]
  n_scored = [len(s) // 2 for s in seqs]
  packed_scores = lm.score_sequences(seqs, n_scored)
  assert len(plan_batches([len(s) - 1 for s in seqs], 4, 64)) == 1  # all of them share one call when packed
  for (a, ga), (b, gb) in zip(packed_scores, unpacked.score_sequences(seqs, n_scored)):
    assert abs(a - b) <= 1e-5 and ga == gb


def test_cli_prints_table_and_writes_json(tiny_hybrid, tmp_path, capsys):
  ckpt, include = tiny_hybrid
  out, data = tmp_path / "results.json", tmp_path / "held_out.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in ROLLING_ROWS))
  rc = cli.main(["--model", ckpt, "--tasks", "tiny_mc", "--include-path", include, "--batch-size", "4",
                 "--limit", "2", "--output", str(out), "--perplexity", str(data),
                 "--perplexity-seq-len", "64"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "tiny_mc" in printed and "acc" in printed and "perplexity on" in printed
  saved = json.loads(out.read_text())
  assert 0.0 <= saved["results"]["tiny_mc"]["acc,none"] <= 1.0
  assert saved["perplexity"]["student_ppl"] > 1 and saved["perplexity"]["n_tokens"] > 100


def test_chat_template_requests(tiny_hybrid):
  ckpt, include = tiny_hybrid
  lm = HybridJaxLM(path=ckpt, batch_size=4, max_length=64)
  chat = [{"role": "user", "content": "Two plus two equals"}]
  text = lm.apply_chat_template(chat)
  assert text == lm.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert lm.chat_template(True) == lm.tokenizer.chat_template and lm.tokenizer_name
  bos = lm.tokenizer.decode([lm.prefix_token_id])
  # The templated text starts with BOS already: encoding it adds no second one.
  assert text.startswith(bos) and lm.tok_encode(text).count(lm.prefix_token_id) == text.count(bos)
  tm = TaskManager(include_path=include, include_defaults=False)
  results = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tm, apply_chat_template=True, limit=2,
                            log_samples=True, bootstrap_iters=0)
  contexts = [s["arguments"][0][0] for s in results["samples"]["tiny_mc"]]
  assert contexts and all(c.startswith(bos) and "<|im_start|>assistant" in c for c in contexts), contexts


def test_cli_bad_input(tiny_hybrid, tmp_path, capsys):
  ckpt, include = tiny_hybrid
  missing = str(tmp_path / "missing")
  assert cli.main(["--model", missing, "--tasks", "tiny_mc", "--include-path", include]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "missing" in err and len(err.splitlines()) == 1
  args = ["--model", ckpt, "--tasks", "tiny_mc", "--include-path", include, "--batch-size", "0"]
  assert cli.main(args) == 1
  assert "batch_size" in capsys.readouterr().err


@pytest.mark.slow  # indexes the harness's built-in tasks (~10k files) to be sure the name is nowhere
def test_cli_unknown_task(tiny_hybrid, capsys):
  ckpt, include = tiny_hybrid
  assert cli.main(["--model", ckpt, "--tasks", "tiny_mc,no_such_task_xyz", "--include-path", include]) == 1
  err = capsys.readouterr().err.strip()
  assert "no_such_task_xyz" in err and "tiny_mc" not in err and len(err.splitlines()) == 1


def test_registered_beside_the_builtin_models():
  from lm_eval.api.registry import get_model
  from lm_eval.models.huggingface import HFLM
  assert get_model("hybrid_jax") is HybridJaxLM and get_model("hf") is HFLM


def test_unknown_model_arg_is_named():
  with pytest.raises(ValueError, match="bogus"):
    HybridJaxLM.create_from_arg_string("path=/nowhere,bogus=1")


def test_model_args_batch_size_wins_over_cli_default(tiny_hybrid):
  ckpt, _ = tiny_hybrid
  lm = HybridJaxLM.create_from_arg_string(f"path={ckpt},batch_size=8", {"batch_size": 1, "device": None})
  assert lm.batch_size == 8


# ------------------------------------------------------------------------------------------------
# Packing plan
def test_length_bucket():
  assert [length_bucket(n, 1000) for n in (1, 64, 65, 200, 513)] == [64, 64, 128, 256, 1000]
  assert length_bucket(700, 700) == 700 and length_bucket(3, 2048, smallest=16) == 16


def test_plan_batches_places_every_sequence_once_without_overlap():
  rng = np.random.RandomState(0)
  lengths = rng.randint(1, 300, size=200).tolist()
  for pack in (True, False):
    plan = plan_batches(lengths, rows=8, cap=512, pack=pack, max_batch_tokens=4096)
    placed = sorted(i for b in plan for i, _, _ in b.slots)
    assert placed == list(range(len(lengths)))
    for b in plan:
      assert b.rows * b.length <= 4096 or b.rows == 1
      assert b.length == length_bucket(max(lengths[i] for i, _, _ in b.slots), 512)
      used = {}
      for i, row, start in b.slots:
        assert 0 <= row < b.rows and start + lengths[i] <= b.length
        used.setdefault(row, []).append((start, start + lengths[i]))
      for spans in used.values():
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
        if not pack:
          assert len(spans) == 1
    if pack:  # short sequences share rows: far fewer calls than one row each
      assert len(plan) < len(plan_batches(lengths, rows=8, cap=512, pack=False, max_batch_tokens=4096))
