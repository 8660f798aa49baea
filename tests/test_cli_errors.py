"""Bad input to the three command lines: one line `error: <path>: <problem>` on stderr, a non-zero exit code
(2), never a traceback. Each CLI runs as a subprocess on a few cases (what reaches stderr up to the process'
exit counts), and in-process through its main() on the rest; the checkpoints are tiny ones made here, and
every case fails before any model is compiled."""
import argparse
import glob
import json
import os
import shutil
import string
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import tokenizers
import transformers

from hybrid_jax import argtypes
from hybrid_jax.checkpoint import CheckpointError, load_model, save_model
from hybrid_jax.config import ModelConfig
from hybrid_jax.model import hybrid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import convert_torch
from hybrid_jax import chat as generate_cli
from hybrid_jax.train import cli as train_cli

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                             unk_token="<unk>")
  tok.chat_template = CHATML
  return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A 2-layer Llama checkpoint with a tokenizer and a chat template (config, params, tokenizer files)."""
  tok = tiny_tokenizer()
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
  return save_model(tmp_path_factory.mktemp("ckpt") / "model", hybrid.init_params(cfg, jax.random.key(0)), cfg,
                    tok)


def truncate(path) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def corrupt_copy(ckpt, tmp_path, *names) -> str:
  """A copy of the checkpoint with the files `names` (globs relative to it) cut to half their size."""
  out = str(tmp_path / "corrupt")
  shutil.copytree(ckpt, out)
  for name in names:
    paths = glob.glob(os.path.join(out, name))
    assert paths, name
    for p in paths:
      truncate(p)
  return out


def largest_array_file(ckpt) -> str:
  """The tensor-store data file holding most of the arrays' bytes (relative to the checkpoint). Cutting it,
  and not all files, leaves reads of other arrays in flight when the first read fails."""
  files = glob.glob(os.path.join(ckpt, "params", "ocdbt.process_0", "d", "*"))
  return os.path.relpath(max(files, key=os.path.getsize), ckpt)


def run(*args, cwd=REPO):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
                        check=False)


def assert_one_line_error(r, path) -> None:
  """Exit code 2 and exactly one stderr line, `error: <path>...` (nothing else: no traceback, no warnings)."""
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
  assert lines[0].startswith(f"error: {path}"), lines[0]


def assert_main_error(main, argv, path, capsys) -> None:
  """In-process: main(argv) returns 2 and prints one stderr line `error: <path>...`."""
  capsys.readouterr()
  assert main([str(a) for a in argv]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), lines


def assert_usage_error(r, flag: str) -> None:
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert f"error: argument {flag}:" in r.stderr.strip().splitlines()[-1], r.stderr


GENERATE = ("-m", "hybrid_jax.chat")
TRAIN = (os.path.join(REPO, "train.py"),)
CONVERT = (os.path.join(REPO, "convert_torch.py"),)
ORBAX_JSON = ("_METADATA", "_CHECKPOINT_METADATA")  # Orbax's plain JSON files in params/


# ---- the library: every file of a checkpoint -----------------------------------------------------

def test_every_truncated_checkpoint_file_is_named_or_harmless(ckpt, tmp_path):
  """Each file cut in half: load_model raises CheckpointError naming that file (tensor-store files: the params
  directory, whose message names the array), or the file was not needed and the params load unchanged."""
  want = jax.tree.leaves(load_model(ckpt)[0])
  files = sorted(os.path.relpath(p, ckpt) for p in glob.glob(os.path.join(ckpt, "**"), recursive=True)
                 if os.path.isfile(p))
  failed = []
  for i, rel in enumerate(files):
    d = shutil.copytree(ckpt, tmp_path / str(i))
    truncate(d / rel)
    try:
      got = jax.tree.leaves(load_model(d)[0])
    except CheckpointError as e:
      tensor_store = rel.startswith("params" + os.sep) and os.path.basename(rel) not in ORBAX_JSON
      assert str(e).startswith(f"{d / 'params' if tensor_store else d / rel}: "), (rel, str(e))
      assert "\n" not in str(e)
      failed.append(rel)
      continue
    assert all(np.array_equal(a, b) for a, b in zip(want, got)), rel
  for must_fail in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    os.path.join("params", "_METADATA")):
    assert must_fail in failed


def test_failed_params_read_drops_only_closed_loop_reports(ckpt, tmp_path, monkeypatch):
  """After a failed tensor read, the other reads still in flight report 'Event loop is closed' through
  sys.unraisablehook whenever they finish (whether any does before exit is a race): exactly those are dropped."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda report: seen.append(str(report.exc_value)))
  d = corrupt_copy(ckpt, tmp_path, largest_array_file(ckpt))
  with pytest.raises(CheckpointError, match=f"^{d}/params: .*Error reading"):
    load_model(d)
  seen.clear()  # reports of an earlier test's reads may land before the failed read installs the filter
  for message in ("Event loop is closed", "something else"):
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(message),
                                             exc_traceback=None, err_msg=None, object=None))
  assert seen == ["something else"]


# ---- generate ------------------------------------------------------------------------------------

def test_generate_corrupt_tokenizer(ckpt, tmp_path):
  d = corrupt_copy(ckpt, tmp_path, "tokenizer.json")
  assert_one_line_error(run(*GENERATE, "--model", d, "--prompt", "hi"), os.path.join(d, "tokenizer.json"))


@pytest.mark.parametrize("name", ["config.json", "chat_template.jinja", "tokenizer_config.json"])
def test_generate_names_the_corrupt_file(ckpt, tmp_path, name, capsys):
  d = corrupt_copy(ckpt, tmp_path, name)
  assert_main_error(generate_cli.main, ["--model", d, "--prompt", "hi"], os.path.join(d, name), capsys)
  # the same as the draft model
  assert_main_error(generate_cli.main, ["--model", ckpt, "--draft", d, "--prompt", "hi"], os.path.join(d, name),
                    capsys)


def test_generate_truncated_params_one_line(ckpt, tmp_path):
  """The array's read error only: no 'Event loop is closed' traceback from the reads still in flight."""
  d = corrupt_copy(ckpt, tmp_path, largest_array_file(ckpt))
  r = run(*GENERATE, "--model", d, "--prompt", "hi")
  assert_one_line_error(r, os.path.join(d, "params"))
  assert "Event loop is closed" not in r.stderr


def test_generate_missing_model(ckpt, tmp_path, capsys):
  assert_one_line_error(run(*GENERATE, "--model", str(tmp_path / "nope"), "--prompt", "hi"), tmp_path / "nope")
  assert_main_error(generate_cli.main, ["--model", os.path.join(ckpt, "config.json"), "--prompt", "hi"],
                    os.path.join(ckpt, "config.json"), capsys)


def test_generate_rejects_out_of_range_flags(ckpt):
  assert_usage_error(run(*GENERATE, "--model", ckpt, "--prompt", "hi", "--max-new-tokens", "-3"),
                     "--max-new-tokens")


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "-3"), ("--max-new-tokens", "0"), ("--k", "0"),
                                        ("--temperature", "-0.5"), ("--temperature", "nan"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--top-k", "-1"), ("--max-new-tokens", "ten")])
def test_generate_parser_bounds(flag, value, capsys):
  with pytest.raises(SystemExit) as e:
    generate_cli.build_parser().parse_args(["--model", "m", "--prompt", "p", flag, value])
  assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_generate_parser_accepts_edges():
  a = generate_cli.build_parser().parse_args(["--model", "m", "--max-new-tokens", "1", "--k", "1", "--top-p", "1",
                                              "--top-k", "0", "--temperature", "0"])
  assert (a.max_new_tokens, a.k, a.top_p, a.top_k, a.temperature) == (1, 1, 1.0, 0, 0.0)


# ---- train.py ------------------------------------------------------------------------------------

@pytest.fixture()
def recipe(tmp_path):
  """A recipe over 8 chat records (valid), as a path."""
  data = tmp_path / "chat.jsonl"
  data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                          for i in range(8)))
  path = tmp_path / "recipe.yaml"
  path.write_text(f"data:\n  paths: [{data}]\n  seq_len: 32\n  batch_size: 2\ntrain:\n  steps: 1\n"
                  f"  output: {tmp_path / 'run'}\n")
  return str(path)


def test_train_corrupt_teacher_tokenizer(ckpt, tmp_path, recipe):
  d = corrupt_copy(ckpt, tmp_path, "tokenizer.json")
  assert_one_line_error(run(*TRAIN, "--config", recipe, "--teacher", d), os.path.join(d, "tokenizer.json"))


def test_train_truncated_teacher_params(ckpt, tmp_path, recipe):
  d = corrupt_copy(ckpt, tmp_path, largest_array_file(ckpt))
  assert_one_line_error(run(*TRAIN, "--config", recipe, "--teacher", d), os.path.join(d, "params"))


def test_train_bad_config_and_data(ckpt, tmp_path, recipe):
  bad_yaml = tmp_path / "bad.yaml"
  bad_yaml.write_text("data: [1\n  x: : y\n")
  assert_one_line_error(run(*TRAIN, "--config", str(bad_yaml), "--teacher", ckpt), bad_yaml)
  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_text('{"messages": [{"role": "user"\n')
  assert_one_line_error(run(*TRAIN, "--config", recipe, "--teacher", ckpt, f"data.paths=[{bad_jsonl}]"),
                        f"{bad_jsonl}:1")


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_train_config_file_unreadable(ckpt, tmp_path, case, capsys):
  path = tmp_path / "nope.yaml" if case == "missing" else tmp_path
  assert_main_error(train_cli.main, ["--config", path, "--teacher", ckpt], path, capsys)


@pytest.mark.parametrize("case", ["missing", "parquet", "empty_dir", "glob"])
def test_train_bad_data_file(ckpt, tmp_path, recipe, case, capsys):
  path = {"missing": tmp_path / "nope.jsonl", "parquet": tmp_path / "bad.parquet", "empty_dir": tmp_path / "nodata",
          "glob": tmp_path / "*.none"}[case]
  if case == "parquet":
    path.write_bytes(b"PAR1 not really parquet")
  elif case == "empty_dir":
    path.mkdir()
  assert_main_error(train_cli.main, ["--config", recipe, "--teacher", ckpt, f"data.paths=[{path}]"], path, capsys)


def test_train_out_of_device_memory_is_one_line(ckpt, recipe, monkeypatch, capsys):
  """A step that does not fit in device memory: one line naming the recipe keys to change, exit 2."""
  def oom(*a, **k):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 30.45GiB")
  monkeypatch.setattr(train_cli.loop, "train", oom)
  assert train_cli.main(["--config", recipe, "--teacher", ckpt, "model.attn_fraction=1.0"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: out of device memory") and "\n" not in err
  assert "data.batch_size=2 x data.seq_len=32" in err and "train.grad_accum" in err and "--resume" in err


# ---- convert_torch.py ----------------------------------------------------------------------------

@pytest.fixture()
def hf_dir(tmp_path):
  from tests.test_llama_parity import tiny_hf_llama
  d = tmp_path / "hf"
  tiny_hf_llama(seed=1).save_pretrained(d)
  return d


def test_convert_truncated_safetensors(hf_dir, tmp_path):
  truncate(hf_dir / "model.safetensors")
  out = tmp_path / "out"
  assert_one_line_error(run(*CONVERT, str(hf_dir), "--output", str(out)), hf_dir / "model.safetensors")
  assert not os.path.exists(out)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json"])
def test_convert_corrupt_hf_file(ckpt, hf_dir, tmp_path, name, capsys):
  if name == "tokenizer.json":
    shutil.copy(os.path.join(ckpt, name), hf_dir / name)
  truncate(hf_dir / name)
  assert_main_error(convert_torch.main, [hf_dir, "--output", tmp_path / "out"], hf_dir / name, capsys)
  assert not os.path.exists(tmp_path / "out")


def test_convert_bad_sources(tmp_path, capsys):
  gguf = tmp_path / "model.gguf"
  gguf.write_bytes(os.urandom(256))
  assert_one_line_error(run(*CONVERT, str(gguf), "-o", str(tmp_path / "out")), gguf)
  assert_main_error(convert_torch.main, [tmp_path / "nope", "-o", tmp_path / "out"], tmp_path / "nope", capsys)
  d = tmp_path / "mil"  # a MambaInLlama directory
  d.mkdir()
  (d / "mamba_config.json").write_text('{"d_model": 32,')
  (d / "config.json").write_text("{}")
  assert_main_error(convert_torch.main, [d, "-o", tmp_path / "out"], d / "mamba_config.json", capsys)


def test_convert_corrupt_checkpoint(ckpt, tmp_path):
  d = corrupt_copy(ckpt, tmp_path, os.path.join("params", "_METADATA"))
  assert_one_line_error(run(*CONVERT, "--to-hf", d, "-o", str(tmp_path / "out")),
                        os.path.join(d, "params", "_METADATA"))


def test_convert_rejects_out_of_range_flags(ckpt, tmp_path):
  assert_usage_error(run(*CONVERT, "--init-hybrid", ckpt, "--attn-fraction", "1.5", "-o", str(tmp_path / "o")),
                     "--attn-fraction")


@pytest.mark.parametrize("flag,value", [("--attn-fraction", "1.5"), ("--attn-fraction", "-0.1"), ("--seed", "-1"),
                                        ("--dtype", "int7")])
def test_convert_parser_bounds(flag, value, capsys):
  with pytest.raises(SystemExit) as e:
    convert_torch.build_parser().parse_args(["--init-hybrid", "t", "-o", "o", flag, value])
  assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_argtypes():
  assert argtypes.fraction("0") == 0.0 and argtypes.fraction("1") == 1.0 and argtypes.positive_int("3") == 3
  for fn, text in [(argtypes.fraction, "1.01"), (argtypes.positive_int, "0"), (argtypes.non_negative_int, "-1"),
                   (argtypes.non_negative_float, "-1e-9"), (argtypes.probability_mass, "0"),
                   (argtypes.non_negative_float, "inf"), (argtypes.positive_int, "2.5")]:
    with pytest.raises(argparse.ArgumentTypeError):
      fn(text)


def test_error_line_is_one_line_for_multi_line_messages():
  """Some readers (tensorstore) raise OSErrors whose text spans several lines; the CLI still prints one."""
  from hybrid_jax.errors import error_line
  e = OSError(5, "OUT_OF_RANGE: Error reading\n  byte range [1, 2)\n  is not valid", "/ck/params")
  assert error_line(e) == "error: /ck/params: OUT_OF_RANGE: Error reading byte range [1, 2) is not valid"
  assert error_line(ValueError("/ck/config.json:\nbad\nvalue")) == "error: /ck/config.json: bad value"
