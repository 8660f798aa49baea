"""Converted Llamas give the same logits as transformers' LlamaForCausalLM on the same weights (fp32)."""
import copy
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hybrid_jax.checkpoint import load_model
from hybrid_jax.convert import convert_to_checkpoint, default_teacher_gguf, load_llama
from hybrid_jax.model import hybrid

TOL = 1e-4


def tiny_hf_llama(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A small random Llama with llama3 rope scaling, GQA and (by default) untied embeddings."""
  cfg = transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie,
      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1: perturb them so a swapped norm would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def our_logits(params, cfg, tokens: np.ndarray) -> np.ndarray:
  out, _ = hybrid.forward(params, cfg, jnp.asarray(tokens))
  return np.asarray(out)


def test_tiny_llama_safetensors_dir(tmp_path):
  model = tiny_hf_llama()
  src = tmp_path / "hf"
  model.save_pretrained(src)
  assert any(f.endswith(".safetensors") for f in os.listdir(src))
  params, cfg, _ = load_llama(str(src))
  assert cfg.rope_type == "llama3" and not cfg.tie_word_embeddings and cfg.num_key_value_heads == 2
  assert "lm_head" in params
  tokens = np.random.RandomState(0).randint(0, 101, (2, 40))
  diff = np.abs(our_logits(params, cfg, tokens) - hf_logits(model, tokens)).max()
  assert diff <= TOL, diff


def test_tiny_llama_pytorch_bin_dir_through_checkpoint(tmp_path):
  model = tiny_hf_llama(seed=1)
  src = tmp_path / "hf_bin"
  src.mkdir()
  model.config.save_pretrained(src)
  torch.save(model.state_dict(), src / "pytorch_model.bin")
  ckpt = convert_to_checkpoint(str(src), str(tmp_path / "ckpt"))  # also exercises save/load_model
  params, cfg, tok = load_model(ckpt)
  assert tok is None  # the source has no tokenizer files
  tokens = np.random.RandomState(1).randint(0, 101, (2, 33))
  diff = np.abs(our_logits(params, cfg, tokens) - hf_logits(model, tokens)).max()
  assert diff <= TOL, diff


def test_tiny_llama_sharded_safetensors_tied(tmp_path):
  model = tiny_hf_llama(tie=True, seed=2)
  src = tmp_path / "hf_sharded"
  model.save_pretrained(src, max_shard_size="30KB")
  assert os.path.exists(src / "model.safetensors.index.json")
  params, cfg, _ = load_llama(str(src))
  assert cfg.tie_word_embeddings and "lm_head" not in params
  tokens = np.random.RandomState(2).randint(0, 101, (1, 20))
  diff = np.abs(our_logits(params, cfg, tokens) - hf_logits(model, tokens)).max()
  assert diff <= TOL, diff


@pytest.fixture(scope="module")
def hf_teacher():
  gguf = default_teacher_gguf()
  d, name = os.path.split(gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  return model, tok


@pytest.mark.slow
def test_default_teacher_matches_transformers(teacher_dir, hf_teacher):
  model, hf_tok = hf_teacher
  params, cfg, tok = load_model(teacher_dir)
  assert cfg.tie_word_embeddings and cfg.num_hidden_layers == 30
  messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue, and then name three "
                                          "colours of a rainbow, one famous painter from Spain and one river "
                                          "that flows through Paris, the capital city of France."}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ids = tok(ids, add_special_tokens=False)["input_ids"]
  assert ids == hf_tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
  assert len(ids) >= 64, len(ids)
  tokens = np.asarray([ids[:64]])
  ref32 = hf_logits(model, tokens)
  ours = our_logits(params, cfg, tokens)
  with torch.no_grad():  # the exact answer for these weights: transformers in float64
    ref64 = copy.deepcopy(model).double()(torch.tensor(tokens)).logits.numpy()
  err_ours, err_hf = np.abs(ours - ref64).max(), np.abs(ref32 - ref64).max()
  diff = np.abs(ours - ref32).max()
  print(f"max|ours-hf32|={diff:.3g} max|ours-hf64|={err_ours:.3g} max|hf32-hf64|={err_hf:.3g}")
  # Measured (2-core AMD EPYC, torch 2.13 MKL): ours-hf32 6.8e-5, ours-hf64 7.4e-5, hf32-hf64 9.3e-5 (logits up
  # to ~38, 30 layers, residual outliers ~2.5e4). The fp64 errors are printed for diagnosis; the acceptance
  # bound is on the fp32-vs-fp32 difference.
  assert diff <= TOL, (diff, err_ours, err_hf)
  assert (ours.argmax(-1) == ref32.argmax(-1)).all()
