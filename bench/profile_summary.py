"""Summarise a jax.profiler perfetto trace (perfetto_trace.json.gz): GPU time per kernel, largest first.

  python bench/profile_summary.py DIR [--top 40]
Kernel names are grouped after stripping numeric suffixes (fusion.123 -> fusion), so the table shows which
kinds of kernels (matmuls, fusions, Triton/Pallas kernels, copies) take the step's time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load_events(path: str) -> list[dict]:
  with gzip.open(path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_lines(events: list[dict]) -> tuple[dict, dict, dict]:
  """Per GPU timeline line (a stream's kernels, or the "XLA Ops" / "XLA Modules" lines that repeat them by
  HLO name): {line: Counter(kernel kind -> total us)}, {line: Counter(kernel kind -> count)} and {line: us from
  its first kernel's start to its last kernel's end}."""
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {p for p, n in names.items() if "/device:GPU" in n or "GPU" in n.upper() and "host" not in n}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_line: dict = collections.defaultdict(collections.Counter)
  per_line_n: dict = collections.defaultdict(collections.Counter)
  bounds: dict = {}
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    line = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
    key = re.sub(r"[._]\d+", "", e.get("name", "?"))
    per_line[line][key] += e.get("dur", 0)
    per_line_n[line][key] += 1
    lo, hi = bounds.get(line, (float("inf"), 0.0))
    bounds[line] = (min(lo, e["ts"]), max(hi, e["ts"] + e.get("dur", 0)))
  return per_line, per_line_n, {line: hi - lo for line, (lo, hi) in bounds.items()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("dir")
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--steps", type=int, default=0,
                  help="calls or decode steps in the trace: also print kernels and busy time per step")
  a = ap.parse_args(argv)
  files = glob.glob(os.path.join(a.dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"no perfetto_trace.json.gz under {a.dir}")
  for path in files:
    per_line, per_line_n, spans = device_lines(load_events(path))
    print(f"\n{path}")
    for line, total in sorted(per_line.items(), key=lambda kv: -sum(kv[1].values())):
      all_us, span = sum(total.values()), spans[line]
      # busy / span: how much of the time between its first and last kernel the GPU computed; far under 100%
      # means the gaps between kernels (their launches) set the speed
      print(f"\n[{line}] {all_us / 1e3:.1f} ms busy over {span / 1e3:.1f} ms ({100 * all_us / max(span, 1):.0f}%), "
            f"{sum(per_line_n[line].values())} kernels")
      if a.steps:
        print(f"per step: {sum(per_line_n[line].values()) / a.steps:.1f} kernels, {all_us / a.steps:.1f} us busy, "
              f"{span / a.steps:.1f} us span")
      for k, us in total.most_common(a.top):
        print(f"{us / 1e3:10.2f} ms {100 * us / max(all_us, 1):5.1f}%  x{per_line_n[line][k]:<6} {k[:110]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
