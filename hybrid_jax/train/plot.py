"""Plots a run's metric curves to a PNG: `python -m hybrid_jax.train.plot RUN_DIR [--out PNG]`.

Reads RUN_DIR/metrics.jsonl (written by MetricsWriter) and draws one panel per metric found among
loss / kl / ce / dpo / lr / grad_norm / tokens_per_s / mfu / reward_*, plus one panel per eval metric.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from hybrid_jax.train.metrics import read_metrics

TRAIN_KEYS = ("loss", "kl", "ce", "dpo", "lr", "grad_norm", "tokens_per_s", "mfu", "reward_margin",
              "reward_accuracy")
LOG_Y = {"loss", "kl", "ce", "grad_norm"}  # losses span decades early in training


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  return [p[0] for p in pts], [float(p[1]) for p in pts]


def panels(rows: list[dict]) -> list[str]:
  present = {k for r in rows for k in r} - {"step", "time"}
  evals = sorted(k for k in present if k.startswith("eval") or k not in TRAIN_KEYS)
  return [k for k in TRAIN_KEYS if k in present] + evals


def plot_run(run_dir: str, out: str | None = None) -> str:
  """Writes the PNG (default RUN_DIR/metrics.png) and returns its path."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt

  rows = read_metrics(run_dir)
  keys = panels(rows)
  if not keys:
    raise ValueError(f"no metrics in {run_dir}")
  out = out or os.path.join(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir), "metrics.png")
  ncol = min(3, len(keys))
  nrow = math.ceil(len(keys) / ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    x, y = series(rows, key)
    ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if key in LOG_Y and y and all(v > 0 and math.isfinite(v) for v in y):
      ax.set_yscale("log")
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("run_dir", help="run directory containing metrics.jsonl (or the file itself)")
  ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
  args = ap.parse_args(argv)
  try:
    path = plot_run(args.run_dir, args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"plot: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
