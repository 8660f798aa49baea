"""MambaInLlama checkpoint conversion: lossless round trip, torch-loadable key names, clear errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mamba_torch_ref import torch_hybrid

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.convert import mambainllama as mil
from hybrid_jax.model import hybrid
from hybrid_jax.model.init import hybrid_config, init_from_teacher

TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


def make(variant, attn=(0, 2), teacher=TEACHER, dtype="float32"):
  cfg = hybrid_config(teacher, attn, variant, d_state=8, scan_impl="reference")
  t = hybrid.init_params(teacher, jax.random.PRNGKey(0), std=0.2)
  p = init_from_teacher(t, teacher, cfg, jax.random.PRNGKey(1))
  if dtype != "float32":
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    p = jax.tree.map(lambda x: x.astype(dtype), p)
  return cfg, p


def _same_tree(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))


@pytest.mark.parametrize("variant,dtype,tied", [("mamba", "float32", False), ("mamba2", "float32", True),
                                                ("mamba", "bfloat16", True), ("mamba2", "bfloat16", False)])
def test_export_reload_is_lossless(tmp_path, variant, dtype, tied):
  cfg, p = make(variant, teacher=TEACHER.replace(tie_word_embeddings=tied), dtype=dtype)
  if tied:
    p = {k: v for k, v in p.items() if k != "lm_head"}
  mil.export(p, cfg, str(tmp_path), teacher_name="some/teacher")
  assert mil.is_mambainllama_dir(str(tmp_path))
  p2, cfg2 = mil.load(str(tmp_path))
  _same_tree(p, p2)
  assert cfg2.attn_layers == cfg.attn_layers and cfg2.ssm.variant == variant
  assert (cfg2.d_inner, cfg2.d_xb, cfg2.ssm.d_state, cfg2.dt_rank) == (cfg.d_inner, cfg.d_xb, 8, cfg.dt_rank)
  assert cfg2.param_dtype == dtype
  with open(tmp_path / "config.json") as fh:
    assert json.load(fh)["_name_or_path"] == "some/teacher"
  # Exporting the reloaded model again writes the same tensors.
  mil.export(p2, cfg2, str(tmp_path / "again"))
  a, b = mil.read_state_dict(str(tmp_path)), mil.read_state_dict(str(tmp_path / "again"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_torch_model_loads_export_and_agrees(tmp_path, variant):
  """A transformers Llama with MambaInLlama-style layers loads the export strictly and gives our logits."""
  cfg, p = make(variant, attn=(1,))
  mil.export(p, cfg, str(tmp_path), safetensors=False)
  sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
  model = torch_hybrid(cfg, cfg.attn_layers, variant)
  model.load_state_dict({k: v.double() for k, v in sd.items()}, strict=True)
  toks = np.random.default_rng(0).integers(0, 64, (2, 6))
  with torch.no_grad():
    ref = model(torch.from_numpy(toks)).logits.numpy()
  ours, _ = hybrid.forward(p, cfg, jnp.asarray(toks))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  # .bin reload is lossless too
  p2, _ = mil.load(str(tmp_path))
  _same_tree(p, p2)


def test_errors_name_missing_unexpected_and_config(tmp_path):
  cfg, p = make("mamba")
  sd = mil.params_to_state_dict(p, cfg)
  bad = dict(sd)
  del bad["model.layers.1.mamba.dt_proj.bias"]
  bad["model.layers.1.mamba.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing.*mamba\.dt_proj\.bias.*unexpected.*mamba\.extra"):
    mil.state_dict_to_params(bad, cfg)
  bad = dict(sd)
  bad["model.layers.1.mamba.A_log"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match=r"shape.*mamba\.A_log"):
    mil.state_dict_to_params(bad, cfg)
  # Attention layers where the config says Mamba (wrong attn_layers) are reported.
  with pytest.raises(ValueError, match=r"missing.*layers\.3\.self_attn.*unexpected.*layers\.3\.mamba"):
    mil.state_dict_to_params(sd, cfg.replace(attn_layers=(0, 2, 3)))

  mil.export(p, cfg, str(tmp_path))
  mcfg = json.loads((tmp_path / "mamba_config.json").read_text())
  hf = json.loads((tmp_path / "config.json").read_text())
  for field, value, msg in [("d_model", 64, "d_model"), ("hidden_act", "gelu", "hidden_act")]:
    with pytest.raises(ConfigError, match=msg):
      mil.config_from_mambainllama({**mcfg, field: value}, hf, "mamba")
  with pytest.raises(ConfigError, match="ssm_cfg.repeat_kv_before_conv"):
    mil.config_from_mambainllama({**mcfg, "ssm_cfg": {**mcfg["ssm_cfg"], "repeat_kv_before_conv": False}},
                                 hf, "mamba")
  with pytest.raises(ConfigError, match="ssm_cfg.bogus"):
    mil.config_from_mambainllama({**mcfg, "ssm_cfg": {"bogus": 1}}, hf, "mamba")
  with pytest.raises(ConfigError, match="attn_layers"):
    mil.config_from_mambainllama({k: v for k, v in mcfg.items() if k != "attn_layers"}, hf, "mamba")
  os.remove(tmp_path / "mamba_config.json")
  with pytest.raises(FileNotFoundError, match="mamba_config.json"):
    mil.load(str(tmp_path))


def test_reference_recipe_config_reads():
  """A mamba_config.json as train_hybrid.py writes it (ssm_cfg {"expand": 1}, no d_inner) loads with the
  reference mixer's defaults (d_state 16, dt_rank ceil(D/16))."""
  hf = {**TEACHER.to_hf(), "_name_or_path": "t"}
  mcfg = {"d_model": 32, "ssm_cfg": {"expand": 1}, "rms_norm_eps": 1e-5, "vocab_size": 64, "d_xb": 16,
          "intermediate_size": 48, "hidden_act": "silu", "n_layer": 4, "attn_layers": [0, 2]}
  cfg = mil.config_from_mambainllama(mcfg, hf, "mamba")
  assert (cfg.d_inner, cfg.d_xb, cfg.ssm.d_state, cfg.dt_rank, cfg.ssm_layers) == (32, 16, 16, 2, (1, 3))
  m2 = {**mcfg, "ssm_cfg": {"expand": 1, "ngroups": 4, "d_state": 8}, "d_inner": 32}
  cfg2 = mil.config_from_mambainllama(m2, hf, "mamba2")
  assert (cfg2.ssm.ngroups, cfg2.ssm.d_state, cfg2.d_inner) == (4, 8, 32)


def test_cli_init_hybrid_export_and_reimport(tmp_path, capsys):
  import importlib.util

  from conftest import REPO

  from hybrid_jax.checkpoint import load_model, save_model
  spec = importlib.util.spec_from_file_location("convert_torch", os.path.join(REPO, "convert_torch.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  teacher = hybrid.init_params(TEACHER, jax.random.PRNGKey(0), std=0.2)
  save_model(tmp_path / "teacher", teacher, TEACHER)
  for variant, sel in (("mamba2", ["--attn-layers", "0,2"]), ("mamba", ["--attn-fraction", "0.5"])):
    hyb, out, back = (str(tmp_path / f"{n}-{variant}") for n in ("hyb", "mil", "back"))
    assert cli.main(["--init-hybrid", str(tmp_path / "teacher"), *sel, "--variant", variant,
                     "--output", hyb]) == 0
    assert cli.main(["--to-mambainllama", hyb, "--output", out]) == 0
    assert cli.main([out, "--output", back]) == 0
    p1, c1, _ = load_model(hyb)
    p2, c2, _ = load_model(back)
    assert c1.attn_layers == c2.attn_layers == (0, 2) and c2.ssm.variant == variant
    _same_tree(p1, p2)
    with open(os.path.join(out, "config.json")) as fh:
      assert json.load(fh)["_name_or_path"] == str(tmp_path / "teacher")
  assert cli.main(["--init-hybrid", str(tmp_path / "teacher"), "--attn-layers", "0,x",
                   "--output", str(tmp_path / "bad")]) == 2
  assert "attn-layers" in capsys.readouterr().err
