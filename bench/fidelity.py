"""Runs the GPU fidelity recipes (stepwise alignment, then end-to-end distillation) and writes their table.

A recipe is a chain of configs/gpu_<variant>_attn<pct>_<stage>.yaml stages, each started from the previous
one's model (--init); the alignment stages replace a growing set of layers (50% -> 25% -> 12.5% attention,
nested layouts), so the shorter chains are prefixes of the longer ones and are run once:

  mamba_attn50:  gpu_mamba_attn50_align -> gpu_mamba_attn50_distill
  mamba_attn25:  gpu_mamba_attn50_align -> gpu_mamba_attn25_align -> gpu_mamba_attn25_distill
  mamba_attn12:  ... -> gpu_mamba_attn25_align -> gpu_mamba_attn12_align -> gpu_mamba_attn12_distill
  (mamba2_* the same with Mamba-2 mixers)

Each stage writes RUNS/<chain so far>/ (train.py's run dir); a finished stage (its model/ exists) is skipped, an
interrupted one resumes from its checkpoint. So when a command may run only so long (--deadline-s), run the
same command again: it continues where it stopped. After a recipe's last stage, its model is evaluated against
the teacher (hybrid_jax.evaluate.fidelity: held-out perplexity on teacher-written conversations and
human-written text, KL, top-1 agreement, greedy answers). The results go to OUT/fidelity.json and
OUT/fidelity.md, with the device, the library versions and the command.

  python bench/fidelity.py --teacher .cache/teachers/smollm2-135m-instruct --recipes mamba_attn50,mamba2_attn50
  python bench/fidelity.py --teacher DIR --smoke          # 2 steps per stage, tiny data: a CPU check
  python bench/fidelity.py --teacher DIR --jobs 4         # up to 4 stages side by side, one GPU each
  python bench/fidelity.py --teacher DIR --recipes mamba2_attn50 --runs runs/fidelity_replaced \
      --distill-set 'optim.trainable=^layers_([13579]|[12][13579])/'   # distil only the replaced layers
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("mamba", "mamba2")
ATTENTION = {"attn50": "50%", "attn25": "25%", "attn12": "12.5%"}
ALIGN_CHAIN = {"attn50": ("attn50",), "attn25": ("attn50", "attn25"), "attn12": ("attn50", "attn25", "attn12")}
RECIPES = {f"{v}_{a}": tuple(f"gpu_{v}_{s}_align" for s in ALIGN_CHAIN[a]) + (f"gpu_{v}_{a}_distill",)
           for v in VARIANTS for a in ATTENTION}

# A CPU check of the whole chain: tiny data, 2 steps a stage, fp32, a small evaluation.
SMOKE_SET = ("train.steps=2", "train.log_every=1", "train.eval_batches=1", "train.save_every=0",
             "data.batch_size=2", "data.seq_len=64", "model.dtype=float32", "default_data.n_train=8",
             "default_data.n_eval=2", "default_data.max_new_tokens=8", "default_data.batch_size=10")
SMOKE_TEXT = ("default_data.n_text=4", "default_data.text_tokens=8")  # when a stage mixes in documents
SMOKE_EVAL = ("--conversations", "2", "--texts", "2", "--answers", "1", "--max-new-tokens", "4",
              "--seq-len", "64", "--batch-size", "2")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--teacher", required=True, help="the teacher's checkpoint directory (convert_torch.py output)")
  ap.add_argument("--recipes", default=",".join(RECIPES),
                  help=f"comma list of {', '.join(RECIPES)} (default: all, in this order)")
  ap.add_argument("--runs", default="runs/fidelity", help="run directories (one per stage chain)")
  ap.add_argument("--out", default="runs/fidelity/results", help="where fidelity.json and fidelity.md go")
  ap.add_argument("--cache-dir", default=".cache", help="generated data (training and held-out) cache")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for every stage, e.g. --set train.steps=100 (repeatable)")
  ap.add_argument("--align-set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for the alignment stages only (repeatable)")
  ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for the distillation stages only, e.g. --distill-set "
                       "'optim.trainable=^layers_(1|3)/' (repeatable)")
  ap.add_argument("--eval-args", default="", help="extra arguments of python -m hybrid_jax.evaluate.fidelity")
  ap.add_argument("--deadline-s", type=float, default=0.0,
                  help="stop (checkpointing the running stage) after this many seconds; 0 = no limit")
  ap.add_argument("--jobs", type=int, default=1,
                  help="stages and evaluations run side by side, each on its own GPU when there are several "
                       "(slot i on GPU i mod count; the data is generated first, once); default 1")
  ap.add_argument("--smoke", action="store_true", help="2 steps a stage on tiny data (a CPU check)")
  ap.add_argument("--python", default=sys.executable, help="interpreter for train.py and the evaluation")
  return ap.parse_args(argv)


def _versions(python: str) -> dict:
  """Device and versions, read in a child process (so this one never holds the accelerator)."""
  code = ("import json, platform, jax, flax, optax; d = jax.devices(); print(json.dumps({'device': "
          "d[0].device_kind, 'device_count': len(d), 'backend': jax.default_backend(), 'jax': jax.__version__, "
          "'flax': flax.__version__, 'optax': optax.__version__, 'python': platform.python_version()}))")
  out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
  info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
  try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO,
                                    check=False).stdout.strip() or None
  except OSError:
    info["commit"] = None
  info["host"] = platform.node()
  return info


class Deadline:
  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds if seconds > 0 else None

  def left(self) -> float:
    return float("inf") if self.end is None else self.end - time.monotonic()


def _run(cmd: list[str], log_path: str, deadline: Deadline, env: dict | None = None,
         prefix: str = "") -> tuple[int, float]:
  """Runs cmd with its output teed to log_path (and to stdout, each line after `prefix`); past the deadline it
  gets SIGTERM (train.py then saves a checkpoint) and 60 s to exit. env: variables set for the child only.
  Returns (exit code, wall seconds)."""
  print(prefix + "$ " + shlex.join(cmd), flush=True)
  t0 = time.monotonic()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, **(env or {})})
    stopped = False
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
      if not stopped and deadline.left() <= 0:
        proc.send_signal(signal.SIGTERM)
        stopped, kill_at = True, time.monotonic() + 60
      if stopped and time.monotonic() > kill_at:
        proc.kill()
      if sel.select(timeout=1.0):
        line = proc.stdout.readline()
        if not line:
          break
        sys.stdout.write(prefix + line)
        log.write(line)
    rc = proc.wait()
  return rc, time.monotonic() - t0


def _last_eval(run_dir: str) -> dict:
  """The last held-out numbers train.py logged (eval/ppl, eval/teacher_ppl, eval/kl) and the step."""
  path = os.path.join(run_dir, "logs", "metrics.jsonl")
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if "eval/ppl" in row:
          out = {k: row[k] for k in ("step", "eval/ppl", "eval/teacher_ppl", "eval/kl") if k in row}
  return out


def stage_command(config: str, run_dir: str | None, init: str | None, args) -> list[str]:
  """train.py's command line for one stage: the recipe, the previous stage's model, the overrides (--set for
  every stage, then --align-set or --distill-set for this stage's kind), --resume when a checkpoint exists.
  run_dir None: the command that only generates the stage's data."""
  stage = "align" if config.endswith("_align") else "distill"
  cmd = [args.python, "train.py", f"--stage={stage}", "--config", f"configs/{config}.yaml", "--teacher",
         args.teacher, "--cache-dir", args.cache_dir, "--no-progress"]
  if run_dir is None:  # only the stage's data (train.py --data-only)
    cmd.append("--data-only")
  else:
    cmd += ["--output", run_dir]
  if init:
    cmd += ["--init", os.path.join(init, "model")]
  if run_dir is not None and os.path.isdir(os.path.join(run_dir, "checkpoints")):
    cmd.append("--resume")
  sets = args.set + (args.align_set if stage == "align" else args.distill_set)
  if not args.smoke:
    return cmd + sets
  return cmd + list(SMOKE_SET) + sets + list(SMOKE_TEXT if _mixes_documents(config, sets) else ())


def _recipe(config: str) -> dict:
  """configs/<config>.yaml as plain data."""
  import yaml
  with open(os.path.join(REPO, "configs", f"{config}.yaml")) as f:
    return yaml.safe_load(f)


def _mixes_documents(config: str, sets: list[str]) -> bool:
  """Whether this stage's default_data.n_text (the recipe's, then the overrides') asks for documents."""
  import yaml
  n = (_recipe(config).get("default_data") or {}).get("n_text", 0)
  for s in sets:
    if s.startswith("default_data.n_text="):
      n = yaml.safe_load(s.split("=", 1)[1])
  return bool(n)


def run_stage(config: str, run_dir: str, init: str | None, args, deadline: Deadline, env: dict | None = None,
              prefix: str = "") -> dict:
  """One train.py stage (skipped when finished, resumed when interrupted) -> its record."""
  record = {"config": f"configs/{config}.yaml", "run_dir": run_dir}
  timing_path = os.path.join(run_dir, "timing.json")
  if os.path.isfile(os.path.join(run_dir, "model", "config.json")):
    with open(timing_path) as f:
      return {**record, **json.load(f), "skipped": True, "eval": _last_eval(run_dir)}
  os.makedirs(run_dir, exist_ok=True)
  cmd = stage_command(config, run_dir, init, args)
  earlier = {}
  if os.path.isfile(timing_path):
    with open(timing_path) as f:
      earlier = json.load(f)
  rc, wall = _run(cmd, os.path.join(run_dir, "train.log"), deadline, env, prefix)
  timing = {"wall_s": round(earlier.get("wall_s", 0.0) + wall, 1), "calls": earlier.get("calls", 0) + 1,
            "command": shlex.join(cmd)}
  with open(timing_path, "w") as f:
    json.dump(timing, f)
  done = rc == 0 and os.path.isfile(os.path.join(run_dir, "model", "config.json"))
  return {**record, **timing, "rc": rc, "done": done, "eval": _last_eval(run_dir)}


def evaluate_command(model_dir: str | None, args, out_json: str | None = None) -> list[str]:
  """python -m hybrid_jax.evaluate.fidelity's command line for one model, or without one (None) the command
  that only generates the held-out conversations (--smoke: a small evaluation)."""
  cmd = [args.python, "-m", "hybrid_jax.evaluate.fidelity", "--teacher", args.teacher, "--cache-dir",
         args.cache_dir]
  cmd += ["--model", model_dir, "--json", out_json] if model_dir else ["--data-only"]
  return cmd + list(SMOKE_EVAL if args.smoke else ()) + shlex.split(args.eval_args)


def evaluate(model_dir: str, args, out_json: str, env: dict | None = None,
             prefix: str = "") -> tuple[int, dict | None]:
  cmd = evaluate_command(model_dir, args, out_json)
  rc, wall = _run(cmd, out_json[:-len(".json")] + ".log", Deadline(0), env, prefix)
  if rc != 0:
    return rc, None
  with open(out_json) as f:
    return rc, {**json.load(f), "wall_s": round(wall, 1), "command": shlex.join(cmd)}


def markdown(results: dict) -> str:
  info = results["environment"]
  title = (f"# Fidelity recipes ({info.get('device', '?')} x{info.get('device_count', '?')}, "
           f"jax {info.get('jax', '?')}, flax {info.get('flax', '?')}, python {info.get('python', '?')}, "
           f"commit {str(info.get('commit'))[:12]})")
  lines = [title, "", f"Command: `{results['command']}`", "",
           ("| recipe | variant | attention | stages | train wall (s) | conversations ppl teacher / student "
            "(ratio) | text ppl teacher / student (ratio) | top-1 agreement conv / text | KL conv / text |"),
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results["recipes"].items():
    v, a = name.split("_")
    wall = sum(s.get("wall_s", 0.0) for s in r["stages"])
    f = r.get("fidelity")
    if f and "conversations" in f and "text" in f:
      c, t = f["conversations"], f["text"]
      cells = (f"{c['teacher_ppl']:.3f} / {c['student_ppl']:.3f} ({c['ppl_ratio']:.2f}x)",
               f"{t['teacher_ppl']:.2f} / {t['student_ppl']:.2f} ({t['ppl_ratio']:.2f}x)",
               f"{100 * c['top1_agreement']:.1f}% / {100 * t['top1_agreement']:.1f}%",
               f"{c['kl']:.3f} / {t['kl']:.3f}")
    else:
      cells = (r.get("status", "not run"),) + ("",) * 3
    lines.append(f"| {name} | {v} | {ATTENTION[a]} | {len(r['stages'])} | {wall:.0f} | " + " | ".join(cells) + " |")
  lines += ["", "Stages (train.py's own held-out numbers on the recipe's eval split, answer tokens):", "",
            "| recipe | stage | wall (s) | calls | step | student ppl | teacher ppl | KL |",
            "|---|---|---|---|---|---|---|---|"]
  for name, r in results["recipes"].items():
    for s in r["stages"]:
      e = s.get("eval", {})
      cells = [f"{e[k]:.{p}f}" if k in e else "" for k, p in (("eval/ppl", 3), ("eval/teacher_ppl", 3),
                                                               ("eval/kl", 4))]
      lines.append(f"| {name} | {os.path.basename(s['config'])} | {s.get('wall_s', 0):.0f} | {s.get('calls', 0)} | "
                   f"{e.get('step', '')} | " + " | ".join(cells) + " |")
  for name, r in results["recipes"].items():
    for a in (r.get("fidelity") or {}).get("answers", []):
      lines += ["", f"**{name}: {a['prompt']}**", f"- teacher: {' '.join(a['teacher'].split())}",
                f"- student: {' '.join(a['student'].split())}"]
  return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Task:
  """One process of the plan: a train.py stage (shared by every recipe whose chain passes through its run dir)
  or the evaluation of a recipe's final model. `after`: the stage it starts from (None: the teacher)."""
  kind: str                  # "stage" | "eval"
  key: str                   # a stage's run dir | a recipe's name
  config: str | None = None  # the stage's recipe (configs/<config>.yaml)
  after: str | None = None
  priority: tuple[int, int] = (0, 0)  # (first recipe that needs it, position in its chain): lowest runs first


def plan(names: list[str], runs: str) -> tuple[dict[str, Task], dict[str, list[str]]]:
  """The stages of the recipes (a chain's prefix shared with an earlier recipe is one stage) and each recipe's
  evaluation -> ({task id: Task}, {recipe: [its stage run dirs]}). Ids: the run dir, or 'eval:<recipe>'."""
  tasks, chains = {}, {}
  for i, name in enumerate(names):
    prev, chain_dir, chain = None, runs, []
    for j, config in enumerate(RECIPES[name]):
      chain_dir = os.path.join(chain_dir, config)  # a stage's dir names its whole chain: prefixes are shared
      tasks.setdefault(chain_dir, Task("stage", chain_dir, config, prev, (i, j)))
      chain.append(chain_dir)
      prev = chain_dir
    tasks[f"eval:{name}"] = Task("eval", name, None, prev, (i, len(chain)))
    chains[name] = chain
  return tasks, chains


def _finished(rec: dict | None) -> bool:
  return bool(rec) and bool(rec.get("skipped") or rec.get("done"))


def schedule(tasks: dict[str, Task], execute, jobs: int, deadline: Deadline, on_done=None) -> dict[str, object]:
  """Runs the tasks, at most `jobs` at a time, each once the stage it starts from has finished, the lowest
  priority first (jobs=1: recipe by recipe, each evaluated right after its last stage). execute(task, slot) ->
  its record (a stage's dict, judged by `_finished`; an evaluation's (rc, result)), slot in [0, jobs). A task
  whose stage did not finish, and any task after the deadline, is not started. on_done(done) is called after
  each task (in this thread). Returns {id: record}."""
  import concurrent.futures as cf
  done: dict[str, object] = {}
  waiting = dict(tasks)
  running: dict = {}  # future -> (id, slot)
  free = list(range(jobs))
  with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
    while waiting or running:
      for tid, t in list(waiting.items()):  # drop what can never start
        if t.after is not None and t.after in done and not _finished(done[t.after]):
          del waiting[tid]
      ready = sorted((t.priority, tid) for tid, t in waiting.items() if t.after is None or t.after in done)
      while ready and free and deadline.left() > 0:
        _, tid = ready.pop(0)
        slot = free.pop(0)
        running[pool.submit(execute, waiting.pop(tid), slot)] = (tid, slot)
      if not running:
        break  # nothing can start: the deadline passed or every remaining task waits on a failed stage
      finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
      for fut in finished:
        tid, slot = running.pop(fut)
        done[tid] = fut.result()
        free.append(slot)
        free.sort()
      if on_done:
        on_done(done)
  return done


def slot_env(slot: int, gpus: int, jobs: int, visible: str | None) -> dict[str, str]:
  """The environment of the process in `slot`: with several GPUs and jobs, one GPU of those this process may
  use (`visible`, its CUDA_VISIBLE_DEVICES, else all `gpus`), slot i on the (i mod gpus)-th; when processes
  share a GPU, each takes memory as it needs it instead of 75% of it up front."""
  env = {}
  if gpus > 1 and jobs > 1:
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
  if jobs > gpus:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def _data_key(config: str, sets: list[str]) -> str:
  """What decides a stage's data: its recipe's data and default_data sections and the overrides of them."""
  raw = _recipe(config)
  own = [s for s in sets if s.startswith(("data.", "default_data."))]
  return json.dumps([raw.get("stage"), raw.get("data"), raw.get("default_data"), own], sort_keys=True, default=str)


def prepare_data(tasks: dict[str, Task], args, env: dict | None) -> int:
  """Generates, one process at a time, the data of every stage still to run (train.py --data-only, once per
  distinct data setting), so that stages started side by side find it cached instead of each generating it."""
  seen = set()
  for t in sorted(tasks.values(), key=lambda t: t.priority):
    if t.kind != "stage" or os.path.isfile(os.path.join(t.key, "model", "config.json")):
      continue
    cmd = stage_command(t.config, None, None, args)
    key = _data_key(t.config, cmd[cmd.index("--data-only") + 1:])
    if key in seen:
      continue
    seen.add(key)
    os.makedirs(args.out, exist_ok=True)
    rc, _ = _run(cmd, os.path.join(args.out, "data.log"), Deadline(0), env, "[data] ")
    if rc != 0:
      return rc
  if any(t.kind == "eval" for t in tasks.values()):  # the evaluations' held-out conversations
    return _run(evaluate_command(None, args), os.path.join(args.out, "data.log"), Deadline(0), env, "[data] ")[0]
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  names = [n.strip() for n in args.recipes.split(",") if n.strip()]
  bad = [n for n in names if n not in RECIPES]
  if bad:
    print(f"error: unknown recipe(s) {bad}; known: {', '.join(RECIPES)}", file=sys.stderr)
    return 2
  if args.jobs < 1:
    print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
    return 2
  if not os.path.isfile(os.path.join(args.teacher, "config.json")):
    print(f"error: --teacher {args.teacher} is not a checkpoint directory (no config.json)", file=sys.stderr)
    return 2
  args.teacher = os.path.abspath(args.teacher)
  deadline = Deadline(args.deadline_s)
  os.makedirs(args.out, exist_ok=True)
  results = {"command": shlex.join([os.path.basename(sys.executable), "bench/fidelity.py"]
                                   + list(sys.argv[1:] if argv is None else argv)),
             "environment": _versions(args.python), "recipes": {}}
  info = results["environment"]
  gpus = info.get("device_count", 1) if info.get("backend") == "gpu" else 1
  tasks, chains = plan(names, args.runs)

  def pinned(slot: int) -> dict:
    return slot_env(slot, gpus, args.jobs, os.environ.get("CUDA_VISIBLE_DEVICES"))

  if args.jobs > 1 and prepare_data(tasks, args, pinned(0)) != 0:
    print("error: generating the recipes' data failed (see the [data] lines above)", file=sys.stderr)
    return 1

  def execute(task: Task, slot: int):
    prefix = f"[{os.path.basename(task.key)}] " if args.jobs > 1 else ""
    if task.kind == "stage":
      return run_stage(task.config, task.key, task.after, args, deadline, pinned(slot), prefix)
    out_json = os.path.join(args.out, f"{task.key}.json")
    if os.path.isfile(out_json) and os.path.getmtime(out_json) > os.path.getmtime(os.path.join(task.after, "model")):
      with open(out_json) as f:
        return 0, json.load(f)
    return evaluate(os.path.join(task.after, "model"), args, out_json, pinned(slot), prefix)

  def collect(done: dict) -> bool:  # the table so far, written after every task: True when complete
    complete = True
    for name in names:
      stages, status = [], "done"
      for run_dir in chains[name]:
        rec = done.get(run_dir)
        if rec is None:
          status = "stopped at the deadline" if deadline.left() <= 0 else "not run"
          break
        stages.append(rec)
        if not _finished(rec):
          status = f"stage {tasks[run_dir].config} unfinished (rc {rec.get('rc')})"
          break
      entry = {"stages": stages, "status": status}
      if status == "done":
        ev = done.get(f"eval:{name}")
        if ev is None:
          entry["status"] = "trained; evaluation not run (deadline)" if deadline.left() <= 0 else "not evaluated"
        else:
          rc, entry["fidelity"] = ev
          if entry["fidelity"] is None:
            entry["status"] = f"evaluation failed (rc {rc})"
      complete &= entry["status"] == "done" and entry.get("fidelity") is not None
      results["recipes"][name] = entry
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
      f.write(markdown(results))
    return complete

  complete = collect(schedule(tasks, execute, args.jobs, deadline, collect))
  print(markdown(results))
  if not complete:
    print("not complete: run the same command again to continue", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
