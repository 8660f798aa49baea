"""lm-evaluation-harness's own command line, with `--model hybrid_jax` registered.

  python -m hybrid_jax.evaluate.lm_eval_cli --model hybrid_jax \\
      --model_args path=DIR,dtype=bfloat16,batch_size=16 --tasks arc_easy,hellaswag [any other lm_eval flag]

The harness finds models only in its built-in table (no entry points; `--include_path` loads task YAMLs, not
code), so a third-party model is available to its CLI only once the module defining it has been imported. This
runs `lm_eval`'s entry point after importing `hybrid_jax.evaluate.harness`; every argument is lm_eval's.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
  from lm_eval.__main__ import cli_evaluate

  import hybrid_jax.evaluate.harness  # noqa: F401  (registers the model)
  sys.argv = ["lm_eval"] + (sys.argv[1:] if argv is None else list(argv))
  cli_evaluate()


if __name__ == "__main__":
  main()
