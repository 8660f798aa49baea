"""Training loop: exact resume, interrupt -> checkpoint, frozen params in `align`, config/input errors."""
from __future__ import annotations

import glob
import os
import signal

import grain
import jax
import numpy as np
import pytest

from hybrid_jax.checkpoint import CheckpointError
from hybrid_jax.config import ConfigError, ModelConfig, SSMConfig
from hybrid_jax.model import hybrid
from hybrid_jax.train import checkpointing, loop, optim
from hybrid_jax.train import config as tcfg
from hybrid_jax.train import sharding as shd
from hybrid_jax.train import state as st

V, L, B = 64, 16, 4
TEACHER = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
STUDENT = TEACHER.replace(attn_layers=(1,), ssm=SSMConfig(d_state=8))


@pytest.fixture(scope="module")
def models():
  return (hybrid.init_params(TEACHER, jax.random.key(0)), hybrid.init_params(STUDENT, jax.random.key(1)))


def rows(n=48, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seg = np.ones(L, np.int32)
    seg[rng.integers(4, L):] = 2  # two packed documents per row
    out.append({"tokens": rng.integers(0, V, L).astype(np.int32), "segment_ids": seg,
                "loss_mask": (rng.random(L) > 0.2).astype(np.int32)})
  return out


def data_iter(seed=0):
  """A real Grain pipeline (shuffled, repeated) with checkpointable state."""
  return iter(grain.MapDataset.source(rows()).shuffle(seed=seed).repeat(None).batch(B).to_iter_dataset())


def one_device_mesh():
  return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def make_cfg(stage="align", steps=6, **over):
  d = {"stage": stage, "data": {"batch_size": B, "seq_len": L},
       "train": {"steps": steps, "log_every": 1, "keep_checkpoints": 3},
       "optim": {"lr": 3e-3, "warmup_steps": 2, "max_grad_norm": 1.0},
       "loss": {"kl_weight": 0.1, "ce_weight": 1.0}}
  for k, v in over.items():
    d.setdefault(k, {}).update(v)
  return tcfg.from_dict(d)


def run(cfg, models, out, resume=False, on_step=None):
  tp, sp = models
  return loop.train(cfg, student_params=sp, student_cfg=STUDENT, frozen_params=tp, frozen_cfg=TEACHER,
                    train_iter=data_iter(), eval_batches=None, output_dir=str(out), resume=resume,
                    mesh=one_device_mesh(), on_step=on_step, progress=False, log=lambda *_: None)


def sigterm_at(k):
  def hook(step, _):
    if step == k:
      os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: handler sets a flag, loop saves + exits
  return hook


def test_resume_is_exact_and_interrupt_saves(models, tmp_path):
  cfg = make_cfg(steps=6)
  full = run(cfg, models, tmp_path / "full")
  assert sorted(full.losses) == list(range(1, 7)) and not full.interrupted

  part = run(cfg, models, tmp_path / "split", on_step=sigterm_at(3))
  assert part.interrupted and part.step == 3
  ck = checkpointing.Checkpointer(part.checkpoint_dir)
  assert ck.latest_step() == 3 and "data" in ck.item_names(3)
  ck.close()
  # Restarting without --resume must refuse rather than overwrite the run.
  with pytest.raises(ConfigError, match="--resume"):
    run(cfg, models, tmp_path / "split")
  rest = run(cfg, models, tmp_path / "split", resume=True)
  assert sorted(rest.losses) == [4, 5, 6]
  for s in (1, 2, 3):
    np.testing.assert_allclose(part.losses[s], full.losses[s], rtol=0, atol=0)
  for s in (4, 5, 6):  # same data order and same optimiser state => same numbers
    np.testing.assert_allclose(rest.losses[s], full.losses[s], rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
               rest.state.params, full.state.params)


def test_resume_from_a_damaged_checkpoint_names_it_and_the_one_before(models, tmp_path):
  """A latest checkpoint with a cut tensor file: resuming fails with CheckpointError naming that step's
  directory and the earlier checkpoint the run can resume from; nothing is deleted."""
  cfg = make_cfg(steps=4, train={"save_every": 2})
  ckpts = run(cfg, models, tmp_path / "r").checkpoint_dir
  data = glob.glob(os.path.join(ckpts, "4", "state", "**", "d", "*"), recursive=True)
  biggest = max(data, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with pytest.raises(CheckpointError) as e:
    run(cfg, models, tmp_path / "r", resume=True)
  msg = str(e.value)
  assert msg.startswith(os.path.join(ckpts, "4") + ": ") and "\n" not in msg, msg
  assert msg.endswith(f"the checkpoint of step 2 is in {ckpts}: move 4 aside to resume from it"), msg
  assert sorted(os.listdir(ckpts)) == ["2", "4"]


def test_align_freezes_all_but_mamba(models, tmp_path):
  _tp, sp = models
  res = run(make_cfg(steps=2), models, tmp_path / "a")
  mask = optim.trainable_mask(sp, optim.trainable_pattern("align", tcfg.OptimSection()))
  paths = jax.tree.leaves(shd.path_strings(sp))
  assert all(("/mamba/" in p) == m for p, m in zip(paths, jax.tree.leaves(mask)))
  n_mamba = sum(int(x.size) for x, m in zip(jax.tree.leaves(sp), jax.tree.leaves(mask)) if m)
  # Adam mu + nu for the Mamba params only; nothing for MLPs, norms, embeddings, attention.
  assert st.count_opt_floats(res.state.opt_state) == 2 * n_mamba
  for p, m, a, b in zip(paths, jax.tree.leaves(mask), jax.tree.leaves(sp), jax.tree.leaves(res.state.params)):
    if m:
      continue
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
  changed = [p for p, m, a, b in zip(paths, jax.tree.leaves(mask), jax.tree.leaves(sp),
                                     jax.tree.leaves(res.state.params)) if m and not np.array_equal(a, b)]
  assert changed, "no Mamba parameter was updated"


def test_trainable_replaced_is_every_mamba_layer(models):
  """`optim.trainable: replaced` picks every parameter of the Mamba layers and nothing of the kept ones."""
  _tp, sp = models
  oc = tcfg.OptimSection(trainable="replaced")
  pattern = optim.trainable_pattern("distill", oc, STUDENT)
  mask = optim.trainable_mask(sp, pattern)
  for p, m in zip(jax.tree.leaves(shd.path_strings(sp)), jax.tree.leaves(mask)):
    layer = int(p.split("/")[0].split("_")[1]) if p.startswith("layers_") else None
    assert m == (layer is not None and layer not in STUDENT.attn_layers), p
  assert any(jax.tree.leaves(mask))
  with pytest.raises(ConfigError, match="optim.trainable='replaced'.*no Mamba layers"):
    optim.trainable_pattern("distill", oc, TEACHER.replace(attn_layers=None))


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(ConfigError, match=r"optim\.lrr"):
    tcfg.from_dict({"optim": {"lrr": 1e-4}})
  with pytest.raises(ConfigError, match=r"unknown config key\(s\): bogus"):
    tcfg.from_dict({"bogus": 1})
  with pytest.raises(ConfigError, match=r"data\.sequence_length"):
    tcfg.from_dict({"data": {"sequence_length": 4}})
  with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):
    tcfg.load(None, ["optim.lr=-1"])
  with pytest.raises(ConfigError, match=r"train\.steps must be an integer"):
    tcfg.load(None, ["train.steps=abc"])
  with pytest.raises(ConfigError, match="stage must be one of"):
    tcfg.from_dict({"stage": "pretrain"})
  with pytest.raises(ConfigError, match="grad_accum"):
    tcfg.from_dict({"data": {"batch_size": 6}, "train": {"grad_accum": 4}})
  with pytest.raises(ConfigError, match="config file not found"):
    tcfg.load(str(tmp_path / "nope.yaml"))
  cfg = tcfg.load(None, ["optim.lr=1e-4", "model.attn_layers=[0, 2]", "stage=sft"])
  assert cfg.optim.lr == 1e-4 and cfg.model.attn_layers == (0, 2) and cfg.stage == "sft"
  with pytest.raises(ConfigError, match="matches no parameter"):
    optim.trainable_mask({"a": np.zeros(2)}, "zzz")


def test_failed_restart_leaves_checkpoint_intact(models, tmp_path):
  cfg = make_cfg(steps=2)
  first = run(cfg, models, tmp_path / "r")
  # A resume in another stage is refused, and a crash mid-save (an unfinished orbax tmp dir) is ignored.
  with pytest.raises(ConfigError, match="stage"):
    run(make_cfg("distill", steps=3), models, tmp_path / "r", resume=True)
  os.makedirs(tmp_path / "r" / "checkpoints" / "3.orbax-checkpoint-tmp-123" / "state")
  ck = checkpointing.Checkpointer(first.checkpoint_dir)
  assert ck.latest_step() == 2
  ck.close()
  again = run(make_cfg(steps=3), models, tmp_path / "r", resume=True)
  assert sorted(again.losses) == [3]


def _model_dir(path, cfg, seed=0):
  from hybrid_jax.checkpoint import save_model
  return save_model(str(path), hybrid.init_params(cfg, jax.random.key(seed)), cfg)


def test_cli_errors_are_clear(tmp_path, capsys):
  from hybrid_jax.train import cli
  teacher = _model_dir(tmp_path / "teacher", TEACHER)
  other = _model_dir(tmp_path / "other", TEACHER.replace(vocab_size=72, attn_layers=(1,), ssm=SSMConfig(d_state=8)))
  data = tmp_path / "d.jsonl"
  data.write_text('{"text": "hello"}\n')
  base = ["--output", str(tmp_path / "out"), "model.attn_layers=[1]", "--no-progress"]
  # tokenizer mismatch between teacher and --init student
  assert cli.main(["--stage=distill", "--teacher", teacher, "--init", other, f"data.paths={data}", *base]) == 2
  err = capsys.readouterr().err
  assert "tokenizer mismatch" in err and "vocab_size 64" in err and "72" in err
  # missing data file: named, before any model is built
  missing = tmp_path / "nope.jsonl"
  assert cli.main(["--stage=distill", "--teacher", teacher, f"data.paths={missing}", *base]) == 2
  assert "nope.jsonl" in capsys.readouterr().err
  # unknown key on the command line, bad value, missing teacher
  assert cli.main(["--stage=distill", "--teacher", teacher, "optim.betas=[0.9]", *base]) == 2
  assert "optim.betas" in capsys.readouterr().err
  assert cli.main(["--stage=distill", "--teacher", teacher, f"data.paths={data}", "optim.b2=1.5", *base]) == 2
  assert "optim.b2" in capsys.readouterr().err
  assert cli.main(["--stage=distill", f"data.paths={data}", *base]) == 2
  assert "--teacher" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_student_from_teacher_options(tmp_path):
  """model.num_layers makes a shallower student (a draft: the teacher's first layers, norm and head) while the
  frozen teacher keeps all its layers; model.mixer_init=random leaves the mixers at their own init. Both
  options name the problem when they cannot apply."""
  from hybrid_jax.train import cli
  tdir = _model_dir(tmp_path / "teacher", TEACHER)
  tp = hybrid.init_params(TEACHER, jax.random.key(0))
  draft = make_cfg("distill", model={"num_layers": 1, "attn_fraction": 1.0})
  sp, sc, _, _, frozen = cli.build_models(draft, tdir, None, log=lambda *_: None)
  assert sc.num_hidden_layers == 1 and hybrid.num_layers(sp) == 1 and not sc.is_hybrid
  np.testing.assert_array_equal(np.asarray(sp["layers_0"]["self_attn"]["q_proj"]),
                                np.asarray(tp["layers_0"]["self_attn"]["q_proj"]))
  assert frozen[1].num_hidden_layers == 2 and hybrid.num_layers(frozen[0]) == 2
  rand = make_cfg("distill", model={"attn_layers": [0], "mixer_init": "random"})
  sp, sc, *_ = cli.build_models(rand, tdir, None, log=lambda *_: None)
  assert sc.attn_layers == (0,)
  assert not np.array_equal(np.asarray(sp["layers_1"]["mamba"]["B_proj"]),
                            np.asarray(tp["layers_1"]["self_attn"]["k_proj"]))
  with pytest.raises(ConfigError, match="num_layers 5"):
    cli.build_models(make_cfg("distill", model={"num_layers": 5}), tdir, None, log=lambda *_: None)
  with pytest.raises(ConfigError, match="num_layers"):
    cli.build_models(make_cfg("distill", model={"num_layers": 1}), tdir, tdir, log=lambda *_: None)
  with pytest.raises(ConfigError, match="mixer_init"):
    make_cfg("distill", model={"mixer_init": "zeros"})


def test_resume_exact_with_packed_chat_pipeline(teacher_dir, tmp_path):
  """The real data path (chat template, assistant masks, first-fit packing): resume gives the same losses."""
  import json

  from hybrid_jax.checkpoint import load_tokenizer
  from hybrid_jax.train import cli
  tok = load_tokenizer(teacher_dir)
  rng = np.random.default_rng(0)
  words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "big", "small", "red", "blue", "house", "tree"]
  path = tmp_path / "chat.jsonl"
  with open(path, "w") as f:
    f.writelines(json.dumps({"messages": [{"role": "user", "content": " ".join(rng.choice(words, 4))},
                                       {"role": "assistant", "content": " ".join(rng.choice(words, 6))}]}) + "\n" for _ in range(40))
  tcfg_ = TEACHER.replace(vocab_size=len(tok))
  scfg = STUDENT.replace(vocab_size=len(tok))
  tp, sp = hybrid.init_params(tcfg_, jax.random.key(0)), hybrid.init_params(scfg, jax.random.key(1))
  cfg = tcfg.from_dict({"stage": "distill", "data": {"paths": [str(path)], "batch_size": 2, "seq_len": 48},
                        "train": {"steps": 5, "log_every": 1}, "optim": {"lr": 1e-3},
                        "loss": {"kl_weight": 1.0, "ce_weight": 0.5}})

  def go(out, resume=False, on_step=None):
    it, _ = cli.build_data(cfg, tok, log=lambda *_: None)
    return loop.train(cfg, student_params=sp, student_cfg=scfg, frozen_params=tp, frozen_cfg=tcfg_,
                      train_iter=it, output_dir=str(out), resume=resume, mesh=one_device_mesh(),
                      on_step=on_step, progress=False, log=lambda *_: None)
  full = go(tmp_path / "full")
  assert go(tmp_path / "split", on_step=sigterm_at(2)).interrupted
  rest = go(tmp_path / "split", resume=True)
  assert sorted(rest.losses) == [3, 4, 5]
  for s in (3, 4, 5):
    np.testing.assert_allclose(rest.losses[s], full.losses[s], rtol=1e-6, atol=1e-7)
