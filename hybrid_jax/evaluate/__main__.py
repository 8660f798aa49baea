"""Evaluate a hybrid_jax checkpoint on lm-evaluation-harness tasks and print the results table.

  python -m hybrid_jax.evaluate --model DIR --tasks arc_easy,hellaswag,piqa,winogrande
  python -m hybrid_jax.evaluate --model DIR --tasks my_task --include-path ./my_tasks --limit 100
  python -m hybrid_jax.evaluate --model DIR --tasks arc_easy --perplexity data/eval.jsonl

Needs the `eval` extra (pip install -e ".[eval]"). Harness tasks download their data sets unless local.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="hybrid_jax checkpoint directory (teacher, hybrid or draft)")
  ap.add_argument("--tasks", required=True, help="comma-separated harness task / group names (globs allowed)")
  ap.add_argument("--include-path", default=None, help="directory of extra task YAMLs (local tasks)")
  ap.add_argument("--num-fewshot", type=int, default=None)
  ap.add_argument("--limit", type=float, default=None,
                  help="documents per task (an integer), or a fraction of each task when < 1")
  ap.add_argument("--batch-size", type=int, default=16,
                  help="rows per scoring call / prompts per generation call")
  ap.add_argument("--dtype", default=None,
                  help="parameter and compute dtype, e.g. bfloat16 (default: the checkpoint's)")
  ap.add_argument("--max-length", type=int, default=0, help="context window in tokens (0: the model's)")
  ap.add_argument("--max-gen-toks", type=int, default=256, help="default cap on generated tokens")
  ap.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
  ap.add_argument("--system-instruction", default=None)
  ap.add_argument("--gen-kwargs", default=None,
                  help="generation overrides, e.g. temperature=0.7,do_sample=True")
  ap.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed")
  ap.add_argument("--output", default=None, help="write the results (metrics and config) to this JSON file")
  ap.add_argument("--perplexity", nargs="+", default=None, metavar="DATA",
                  help="also print the perplexity on these JSONL / Parquet files (training data format)")
  ap.add_argument("--perplexity-seq-len", type=int, default=512, help="packed row length for --perplexity")
  return ap


def _error(e: BaseException) -> int:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  print(f"error: {msg}", file=sys.stderr)
  return 1


def perplexity(lm, paths: list[str], seq_len: int, batch_size: int) -> dict:
  """The held-out perplexity of the harness model's checkpoint on data files (hybrid_jax.train.evaluate)."""
  from hybrid_jax.data import DataConfig, make_dataset
  from hybrid_jax.train.evaluate import as_numpy_batches, evaluate
  dcfg = DataConfig(eval_paths=tuple(paths), seq_len=seq_len, batch_size=batch_size, shuffle=False)
  batches = as_numpy_batches(make_dataset(dcfg, lm.tokenizer, split="eval", process_index=0, process_count=1))
  return evaluate(lm.params, lm.cfg, batches)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
  except ImportError:
    return _error(ImportError('lm-evaluation-harness is not installed: pip install -e ".[eval]"'))
  from hybrid_jax.checkpoint import CheckpointError
  from hybrid_jax.config import ConfigError
  from hybrid_jax.evaluate.harness import HybridJaxLM

  names = [t.strip() for t in args.tasks.split(",") if t.strip()]
  task_manager = None
  if args.include_path:  # local tasks alone: skip indexing the harness's thousands of built-in task files
    task_manager = TaskManager(include_path=args.include_path, include_defaults=False)
    if not names or not all(task_manager.match_tasks([n]) for n in names):
      task_manager = None
  task_manager = task_manager or TaskManager(include_path=args.include_path)
  unknown = [n for n in names if not task_manager.match_tasks([n])]
  if not names or unknown:
    hint = "" if args.include_path else " (local tasks need --include-path DIR)"
    return _error(ValueError(f"unknown task(s): {', '.join(unknown) or '(none given)'}{hint}"))
  options = {"batch_size": args.batch_size, "max_length": args.max_length, "max_gen_toks": args.max_gen_toks,
             "seed": args.seed}
  try:
    lm = HybridJaxLM(path=args.model, dtype=args.dtype, **options)
  except (CheckpointError, ConfigError, FileNotFoundError, ValueError, OSError) as e:
    return _error(e)
  limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
  try:
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=task_manager, num_fewshot=args.num_fewshot, limit=limit,
        apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction,
        gen_kwargs=args.gen_kwargs, log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed)
  except (ValueError, KeyError, FileNotFoundError, ConnectionError) as e:  # e.g. a data set that cannot load
    return _error(e)
  print(make_table(results))
  if results.get("groups"):
    print(make_table(results, "groups"))
  if args.perplexity:
    try:
      ppl = perplexity(lm, args.perplexity, args.perplexity_seq_len, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
      return _error(e)
    print(f"perplexity on {', '.join(args.perplexity)}: {ppl['student_ppl']:.4f} "
          f"({int(ppl['n_tokens'])} tokens)")
    results["perplexity"] = {"paths": list(args.perplexity), **ppl}
  if args.output:
    with open(args.output, "w") as f:
      json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2,
                default=handle_non_serializable)
  return 0


if __name__ == "__main__":
  sys.exit(main())
