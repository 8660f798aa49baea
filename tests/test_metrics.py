"""MetricsWriter writes readable JSONL and parseable TensorBoard events; plot makes a PNG."""
import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np

from hybrid_jax.train import plot
from hybrid_jax.train.metrics import MetricsWriter, read_metrics


def _read_events(path):
  """Parses a TFRecord event file by hand (length, crc, payload, crc) into Event protos."""
  from tensorboardX.proto import event_pb2
  events = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    payload = data[i + 12:i + 12 + n]
    events.append(event_pb2.Event.FromString(payload))
    i += 12 + n + 4
  assert i == len(data)
  return events


def _write_run(d):
  with MetricsWriter(d) as w:
    for s in range(1, 6):
      w.write(s, {"loss": 3.0 / s, "kl": np.float32(1.0 / s), "ce": 2.0 / s, "lr": 1e-4 * s,
                  "grad_norm": 0.5, "tokens_per_s": 1000.0 + s})
    w.write(5, {"eval/ppl": 12.5, "eval/kl": 0.25})
    w.write(6, {"loss": float("nan")})


def test_jsonl_roundtrip_and_append(tmp_path):
  d = str(tmp_path / "run")
  _write_run(d)
  rows = read_metrics(d)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5, 6]
  assert rows[1]["loss"] == 1.5 and abs(rows[0]["kl"] - 1.0) < 1e-7 and rows[5]["eval/ppl"] == 12.5
  assert math.isnan(rows[6]["loss"])
  # a resumed run appends; a torn last line is skipped by the reader
  with MetricsWriter(d, tensorboard=False) as w:
    w.write(7, {"loss": 0.1})
  with open(os.path.join(d, "metrics.jsonl"), "a") as f:
    f.write('{"step": 8, "lo')
  rows = read_metrics(os.path.join(d, "metrics.jsonl"))
  assert rows[-1] == {**rows[-1], "step": 7, "loss": 0.1} and len(rows) == 8
  with open(os.path.join(d, "metrics.jsonl")) as f:
    assert json.loads(f.readline())["loss"] == 3.0


def test_tensorboard_events_parse(tmp_path):
  d = str(tmp_path / "run")
  _write_run(d)
  files = glob.glob(os.path.join(d, "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for ev in _read_events(files[0]):
    for v in ev.summary.value:
      scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]  # the NaN was not sent to TensorBoard
  np.testing.assert_allclose([v for _, v in scalars["loss"]], [3.0 / s for s in range(1, 6)], rtol=1e-6)
  assert scalars["eval/ppl"] == [(5, 12.5)]


def test_plot_png(tmp_path):
  d = str(tmp_path / "run")
  _write_run(d)
  assert plot.panels(read_metrics(d))[:3] == ["loss", "kl", "ce"]
  out = plot.plot_run(d)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # the CLI, as documented
  out2 = str(tmp_path / "x.png")
  r = subprocess.run([sys.executable, "-m", "hybrid_jax.train.plot", d, "--out", out2],
                     check=False, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  assert os.path.getsize(out2) > 1000
  r = subprocess.run([sys.executable, "-m", "hybrid_jax.train.plot", str(tmp_path / "missing")],
                     check=False, capture_output=True, text=True)
  assert r.returncode == 1 and "plot:" in r.stderr
