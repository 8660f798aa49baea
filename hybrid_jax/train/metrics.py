"""Metric logging: one JSONL line per write (the source of truth, read by `plot`) plus TensorBoard events.

metrics.jsonl lines look like {"step": 10, "time": 1732400000.0, "loss": 2.1, "eval/ppl": 9.3, ...}.
Values are written as plain floats; non-finite values are kept (JSON NaN / Infinity) so divergence is visible.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _to_float(v: Any) -> float:
  # jax / numpy scalars and 0-d arrays all support float()
  return float(v)


class MetricsWriter:
  """Appends metrics to `logdir/metrics.jsonl` and to TensorBoard event files in `logdir`.

  Appending (not truncating) lets a resumed run continue the same log. Each write is flushed, so a
  killed run loses nothing already written.
  """

  def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    self.path = os.path.join(self.logdir, METRICS_FILE)
    self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=self.logdir, flush_secs=10)

  def write(self, step: int, values: dict[str, Any]) -> None:
    vals = {str(k): _to_float(v) for k, v in values.items()}
    row = {"step": int(step), "time": time.time(), **vals}
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in vals.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, global_step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if not self._f.closed:
      self._f.close()

  def __enter__(self) -> MetricsWriter:  # noqa: PYI034
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
  """Rows of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl); a truncated last line is skipped."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a run killed mid-write leaves a partial last line
  return rows
