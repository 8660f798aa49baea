"""Conversion HF <-> hybrid_jax, checkpoint directories, and the errors of both (nothing partial left behind)."""
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hybrid_jax.checkpoint import CheckpointError, is_checkpoint, load_model, save_model
from hybrid_jax.config import ModelConfig
from hybrid_jax.convert import ConversionError, checkpoint_to_hf, convert_to_checkpoint, load_llama
from tests.test_llama_parity import tiny_hf_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import convert_torch


def read_json(path):
  with open(path) as f:
    return json.load(f)


def write_json(obj, path):
  with open(path, "w") as f:
    json.dump(obj, f)


def no_leftovers(out) -> bool:
  """Nothing at `out` and no temp sibling of it."""
  out = str(out)
  return not os.path.exists(out) and not glob.glob(out + ".tmp-*") and not glob.glob(out + ".old-*")


@pytest.fixture()
def hf_dir(tmp_path):
  model = tiny_hf_llama(seed=3)
  d = tmp_path / "hf"
  model.save_pretrained(d)
  return d


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_identical_tensors(tmp_path, tie):
  model = tiny_hf_llama(tie=tie, seed=4)
  src = tmp_path / "src"
  model.save_pretrained(src)
  ckpt = convert_to_checkpoint(str(src), str(tmp_path / "ckpt"))
  assert is_checkpoint(ckpt)
  out = checkpoint_to_hf(ckpt, str(tmp_path / "back"))
  a, b = load_file(src / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
  # transformers loads the export and computes the same function
  back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  assert back.config.tie_word_embeddings == tie
  toks = torch.tensor(np.random.RandomState(0).randint(0, 101, (1, 12)))
  with torch.no_grad():
    assert torch.equal(back(toks).logits, model(toks).logits)


def test_bf16_source_round_trips_exactly(tmp_path):
  model = tiny_hf_llama(seed=5).to(torch.bfloat16)
  src = tmp_path / "src"
  model.save_pretrained(src)
  params, cfg, _ = load_llama(str(src), dtype="bfloat16")
  assert params["embed_tokens"].dtype == jnp.bfloat16 and cfg.param_dtype == "bfloat16"
  ckpt = save_model(tmp_path / "ckpt", params, cfg)
  out = checkpoint_to_hf(ckpt, str(tmp_path / "back"))
  a, b = load_file(src / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
  for k in a:
    assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k


def test_checkpoint_save_load_generic_pytree_and_overwrite(tmp_path):
  cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
  params = {"embed_tokens": jnp.arange(88.0).reshape(11, 8),
            "blocks": [{"mamba": {"A_log": jnp.ones((4, 3), jnp.bfloat16), "nested": [jnp.zeros(2)]}}],
            "steps": np.arange(3, dtype=np.int32)}
  d = tmp_path / "ck"
  save_model(d, params, cfg, extra={"teacher_config.json": {"model_type": "llama"}})
  got, cfg2, tok = load_model(d)
  assert cfg2 == cfg and tok is None
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  assert read_json(d / "teacher_config.json") == {"model_type": "llama"}
  # overwrite in place: the new content replaces the old, no temp dirs remain
  save_model(d, {"embed_tokens": jnp.zeros((11, 8))}, cfg)
  got, _, _ = load_model(d, dtype=jnp.bfloat16)
  assert set(got) == {"embed_tokens"} and got["embed_tokens"].dtype == jnp.bfloat16
  assert not glob.glob(str(d) + ".tmp-*") and not glob.glob(str(d) + ".old-*")


def test_save_model_crash_leaves_nothing(tmp_path):
  class BrokenTokenizer:
    def save_pretrained(self, path):
      with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{")
      raise OSError("disk full")
  cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
  out = tmp_path / "ck"
  with pytest.raises(OSError, match="disk full"):
    save_model(out, {"embed_tokens": jnp.zeros((11, 8))}, cfg, tokenizer=BrokenTokenizer())
  assert no_leftovers(out)


def test_load_model_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="config.json"):
    load_model(tmp_path / "empty")
  cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
  (tmp_path / "noparams").mkdir()
  cfg.save(tmp_path / "noparams" / "config.json")
  with pytest.raises(CheckpointError, match="params"):
    load_model(tmp_path / "noparams")


def _expect_error(src, out, match):
  with pytest.raises(ConversionError, match=match):
    convert_to_checkpoint(str(src), str(out))
  assert no_leftovers(out)


def test_nonexistent_path(tmp_path):
  _expect_error(tmp_path / "does-not-exist", tmp_path / "out", "does not exist")


def test_hub_id_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _expect_error("no-such-org-xyz/no-such-model", tmp_path / "out", "treated as a Hugging Face hub id")


def test_dir_without_weights(tmp_path, hf_dir):
  os.remove(hf_dir / "model.safetensors")
  _expect_error(hf_dir, tmp_path / "out", "no weights in")


def test_dir_without_config(tmp_path):
  (tmp_path / "w").mkdir()
  _expect_error(tmp_path / "w", tmp_path / "out", "no config.json")


def test_missing_tensor(tmp_path, hf_dir):
  sd = load_file(hf_dir / "model.safetensors")
  del sd["model.layers.1.mlp.up_proj.weight"]
  save_file(sd, hf_dir / "model.safetensors")
  _expect_error(hf_dir, tmp_path / "out", "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_missing_untied_lm_head(tmp_path, hf_dir):
  sd = load_file(hf_dir / "model.safetensors")
  del sd["lm_head.weight"]
  save_file(sd, hf_dir / "model.safetensors")
  _expect_error(hf_dir, tmp_path / "out", "missing tensor 'lm_head.weight'.*tie_word_embeddings")


def test_unexpected_tensor(tmp_path, hf_dir):
  sd = load_file(hf_dir / "model.safetensors")
  sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
  save_file(sd, hf_dir / "model.safetensors")
  _expect_error(hf_dir, tmp_path / "out", "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'")


def test_shape_mismatch(tmp_path, hf_dir):
  cfg = read_json(hf_dir / "config.json")
  cfg["intermediate_size"] = 128
  write_json(cfg, hf_dir / "config.json")
  _expect_error(hf_dir, tmp_path / "out",
                r"shape mismatch for tensor 'model.layers.0.mlp.gate_proj.weight'.*\(96, 64\).*\(128, 64\)")


def test_gpt2_dir_rejected(tmp_path):
  cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
  _expect_error(tmp_path / "gpt2", tmp_path / "out", "model_type='gpt2'.*GPT2LMHeadModel")


def test_mistral_config_rejected(tmp_path, hf_dir):
  cfg = read_json(hf_dir / "config.json")
  cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
  write_json(cfg, hf_dir / "config.json")
  _expect_error(hf_dir, tmp_path / "out", "model_type='mistral'")


def test_hybrid_cannot_export_to_hf(tmp_path):
  cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, attn_layers=(0,), ssm={"variant": "mamba"})
  save_model(tmp_path / "hyb", {"embed_tokens": jnp.zeros((11, 8))}, cfg)
  with pytest.raises(ConversionError, match="hybrid"):
    checkpoint_to_hf(str(tmp_path / "hyb"), str(tmp_path / "out"))
  assert no_leftovers(tmp_path / "out")


def test_cli_convert_and_errors(tmp_path, hf_dir, capsys):
  assert convert_torch.main([str(hf_dir), "--output", str(tmp_path / "ck")]) == 0
  assert is_checkpoint(tmp_path / "ck")
  assert convert_torch.main(["--to-hf", str(tmp_path / "ck"), "--output", str(tmp_path / "hf2")]) == 0
  assert os.path.isfile(tmp_path / "hf2" / "model.safetensors")
  capsys.readouterr()
  os.remove(hf_dir / "model.safetensors")
  assert convert_torch.main([str(hf_dir), "--output", str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no weights in") and err.count("\n") == 1
  assert no_leftovers(tmp_path / "bad")
  with pytest.raises(SystemExit):  # argparse: two modes at once
    convert_torch.main(["--to-hf", "x", "--default-teacher", "--output", str(tmp_path / "o")])


def test_cli_subprocess_one_line_error(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(REPO, "convert_torch.py"), str(tmp_path / "missing"),
                      "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, check=False,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: source path does not exist"]
  assert "Traceback" not in r.stderr
  assert no_leftovers(tmp_path / "out")


def test_default_teacher_reused(teacher_dir, capsys):
  assert convert_torch.main(["--default-teacher", "--output", teacher_dir]) == 0
  assert "reusing" in capsys.readouterr().out


def test_hybrid_jax_checkpoint_is_not_a_source(tmp_path, hf_dir):
  ckpt = convert_to_checkpoint(str(hf_dir), str(tmp_path / "ck"))
  _expect_error(ckpt, tmp_path / "out", "already a hybrid_jax checkpoint")


def test_refuses_to_replace_unrelated_dir(tmp_path, hf_dir, capsys):
  other = tmp_path / "mine"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  assert convert_torch.main([str(hf_dir), "--output", str(other)]) == 2
  assert "refusing to replace" in capsys.readouterr().err
  assert (other / "notes.txt").read_text() == "keep me"
  with pytest.raises(ConversionError, match="source itself"):
    convert_to_checkpoint(str(hf_dir), str(hf_dir))
  # a previous output is replaced
  convert_to_checkpoint(str(hf_dir), str(tmp_path / "ck"))
  convert_to_checkpoint(str(hf_dir), str(tmp_path / "ck"))
  assert is_checkpoint(tmp_path / "ck")
