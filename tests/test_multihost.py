"""train.py as several JAX processes on CPU (2 processes x 4 devices, gloo collectives, free local ports): the
same per-step losses as 1 process with 8 devices, checkpoints resumed across process counts (1 -> 2, 2 -> 1),
and a killed process ending the other with a one-line error, after which --resume continues exactly."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 9, 3
HEARTBEAT_S = 10
RUN_TIMEOUT_S = 600  # per launch: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny teacher with a character-level tokenizer, a text data file, and a compilation cache that the
  launches share (the train step compiles once per process count)."""
  import tokenizers
  import transformers

  from hybrid_jax.checkpoint import save_model
  from hybrid_jax.config import ModelConfig
  from hybrid_jax.model import hybrid
  root = tmp_path_factory.mktemp("multihost")
  vocab = {t: i for i, t in enumerate(["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"] + sorted(string.printable))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                             unk_token="<unk>")
  cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
  teacher = save_model(str(root / "teacher"), hybrid.init_params(cfg, jax.random.key(0)), cfg, tok)
  rng = np.random.default_rng(0)
  words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "big", "small", "red", "blue", "house"]
  data = root / "data.jsonl"
  data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(2, 6)))}) + "\n"
                          for _ in range(64)))
  return {"root": root, "teacher": teacher, "data": str(data), "cache": str(root / "jit-cache")}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(setup, out, n: int, *extra: str, name: str) -> list[subprocess.Popen]:
  """train.py as n processes (8 // n CPU devices each) writing to `out`; output to NAME_I.log files."""
  args = [sys.executable, os.path.join(REPO, "train.py"), "--stage=distill", "--teacher", setup["teacher"],
          "--output", str(out), "--no-progress", f"data.paths=[{setup['data']}]", "data.batch_size=8",
          "data.seq_len=32", "data.num_threads=0", f"train.steps={STEPS}", "train.log_every=1",
          f"train.save_every={SAVE_EVERY}", f"train.keep_checkpoints={STEPS}", "optim.lr=1e-3",
          "model.attn_layers=[1]", "loss.ce_weight=0.5", "mesh.fsdp=-1", *extra]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", f"--xla_force_host_platform_device_count={8 // n}",
                     os.environ["XLA_FLAGS"])  # conftest's flags, 8 // n devices a process
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
             JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=setup["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  cluster = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(n),
             "--heartbeat-timeout", str(HEARTBEAT_S)] if n > 1 else []
  procs = []
  for i in range(n):
    log = open(setup["root"] / f"{name}_{i}.log", "w")  # noqa: SIM115 - the child holds it
    procs.append(subprocess.Popen(args + cluster + (["--process-id", str(i)] if n > 1 else []), env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    procs[-1].log_path = log.name
  return procs


def wait(procs, timeout: float = RUN_TIMEOUT_S) -> list[int]:
  deadline = time.monotonic() + timeout
  rcs = []
  for p in procs:
    try:
      rcs.append(p.wait(max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process did not finish within {timeout} s; see {p.log_path}:\n{text(p)[-3000:]}")
  return rcs


def text(p) -> str:
  with open(p.log_path) as f:
    return f.read()


def check_ok(procs) -> None:
  for p, rc in zip(procs, wait(procs)):
    assert rc == 0, f"{p.log_path} exited {rc}:\n{text(p)[-3000:]}"


def losses(out) -> dict[int, float]:
  """step -> loss from the run's metrics (a resumed run appends; the last row of a step wins)."""
  with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def resumable_copy(src, dst, step: int):
  """The run dir as it was when step `step` had just been saved (later checkpoints, logs and model dropped)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs", "model"))
  for d in os.listdir(os.path.join(dst, "checkpoints")):
    if not d.isdigit() or int(d) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", d))
  return dst


def assert_same_losses(got: dict, want: dict, steps) -> None:
  steps = list(steps)
  assert steps and all(s in got for s in steps), (sorted(got), steps)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(setup):
  """One process with 8 devices and two processes with 4 each, run side by side."""
  one, two = setup["root"] / "one", setup["root"] / "two"
  procs = launch(setup, one, 1, name="one") + launch(setup, two, 2, name="two")
  check_ok(procs)
  return {"one": one, "two": two, "losses": losses(one), "logs": [text(p) for p in procs]}


def test_two_processes_train_like_one(uninterrupted):
  ref = uninterrupted["losses"]
  assert sorted(ref) == list(range(1, STEPS + 1))
  two = uninterrupted["two"]
  assert_same_losses(losses(two), ref, range(1, STEPS + 1))  # same global batches, same order
  with open(two / "logs" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), "metrics written once"
  _, log0, log1 = uninterrupted["logs"]
  assert "stage=distill" in log0 and "final model saved" in log0
  assert "stage=distill" not in log1 and "final model saved" not in log1, "only process 0 logs"
  assert os.path.exists(two / "model" / "config.json")
  files = sorted(os.listdir(two / "checkpoints" / str(SAVE_EVERY) / "data"))
  assert "process_0-of-2.json" in files and "process_1-of-2.json" in files


def test_resume_across_process_counts_and_lost_process(setup, uninterrupted):
  """1 -> 2: step k saved by one process, continued by two until process 1 is killed; the other then exits
  with a one-line error naming it. 2 -> 1: --resume by one process from that run's last complete checkpoint
  (written by the two). Both continue the uninterrupted run's losses."""
  ref, k = uninterrupted["losses"], SAVE_EVERY
  out = resumable_copy(uninterrupted["one"], setup["root"] / "resumed", k)
  pair = launch(setup, out, 2, "--resume", name="resumed")
  ckpt = out / "checkpoints"
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not os.path.isdir(ckpt / str(2 * k)) and pair[0].poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert pair[0].poll() is None, f"the run ended before it could be killed:\n{text(pair[0])[-3000:]}"
  pair[1].send_signal(signal.SIGKILL)
  t_kill = time.monotonic()
  rc = wait(pair[:1], timeout=180)[0]
  waited = time.monotonic() - t_kill
  pair[1].wait()
  err = text(pair[0])
  assert rc == 3 and waited < 120, (rc, waited, err[-3000:])
  assert "error: lost process 1 of 2" in err and "--resume" in err
  assert_same_losses(losses(out), ref, range(k + 1, 2 * k + 1))  # what the pair trained before the kill
  done = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())  # complete checkpoints only
  last = done[-1]
  assert 2 * k <= last < STEPS, done
  assert sorted(os.listdir(ckpt / str(last) / "data"))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]
  after = launch(setup, out, 1, "--resume", name="after_kill")
  check_ok(after)
  assert f"resumed from {ckpt} at step {last}" in text(after[0])
  assert_same_losses(losses(out), ref, range(last + 1, STEPS + 1))


def test_cluster_flags_are_checked(tmp_path, capsys):
  from hybrid_jax.train import cli
  base = ["--stage=distill", "--output", str(tmp_path / "out"), "--no-progress"]
  for flags, words in ((["--coordinator", "localhost:1234"], "needs --num-processes and --process-id"),
                       (["--coordinator", "host0", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
                       (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is out of range"),
                       (["--process-id", "1"], "--process-id needs --num-processes"),
                       (["--num-processes", "2", "--heartbeat-timeout", "0"], "--heartbeat-timeout must be")):
    assert cli.main(base + flags) == 2
    assert words in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
