"""Chat with a hybrid_jax checkpoint.

  python -m hybrid_jax.chat --model DIR --prompt "What is the capital of France?"
  python -m hybrid_jax.chat --model DIR --chat            # interactive, keeps the conversation

Prints only the generated answer. Greedy unless --temperature > 0 is given.
"""
from __future__ import annotations

import argparse
import sys

from hybrid_jax.argtypes import non_negative_float, non_negative_int, positive_int, probability_mass


def _k_arg(value: str) -> int | str:
  """--k: a positive integer or 'auto'."""
  return value if value == "auto" else positive_int(value)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="hybrid_jax checkpoint directory")
  ap.add_argument("--prompt", default=None, help="user message (with --chat: the first turn)")
  ap.add_argument("--system", default=None, help="optional system message")
  ap.add_argument("--max-new-tokens", type=positive_int, default=256)
  ap.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default) = greedy")
  ap.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k filtering")
  ap.add_argument("--top-p", type=probability_mass, default=1.0, help="in (0, 1]; 1 = no nucleus filtering")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
  ap.add_argument("--draft", default=None,
                  help="draft checkpoint directory, 'ngram' (prompt lookup, no draft model) or 'self:0,1,2' "
                       "(the model's own layers 0, 1, 2 as the draft): speculative decoding (the same answer "
                       "when greedy)")
  ap.add_argument("--k", type=_k_arg, default=4,
                  help="draft tokens proposed per target call (with --draft), or 'auto': chosen each round "
                       "(up to 8) from the acceptance measured so far")
  ap.add_argument("--ngram-n", type=positive_int, default=3,
                  help="with --draft ngram: the longest n-gram looked up (falls back to shorter ones)")
  ap.add_argument("--stats", action="store_true",
                  help="with --draft: print acceptance rate and tokens/s to stderr")
  return ap


def make_answer_fn(args):
  """Returns answer(messages) -> str for the chosen decoding method."""
  from hybrid_jax.decode.generate import generate_text, load_for_generation
  model = load_for_generation(args.model)
  sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
  if args.draft:
    from hybrid_jax.decode.speculative import resolve_draft, speculative_generate_text
    draft = resolve_draft(args.draft, model[0], model[1], args.ngram_n)

    def answer_speculative(messages):
      text, st = speculative_generate_text(model, draft, messages, max_new_tokens=args.max_new_tokens, k=args.k,
                                           **sampling)
      if args.stats:
        print(f"[speculative k={args.k}, mean {st['mean_k']:.1f}] acceptance rate "
              f"{st['acceptance_rate']:.3f}, "
              f"accepted per target call {st['accepted_per_step']:.2f}, target calls {st['target_calls']}, "
              f"{st['generated_tokens']} tokens in {st['seconds']:.2f} s = {st['tokens_per_s']:.1f} tokens/s "
              f"(+ {st['compile_seconds']:.1f} s compilation)", file=sys.stderr)
      return text
    return answer_speculative

  def answer(messages):
    return generate_text(model, messages, max_new_tokens=args.max_new_tokens, **sampling)
  return answer


def _chat_loop(answer, messages: list, first: str | None, out=None) -> None:
  """Reads user turns from stdin (until EOF or /exit), appending both sides to `messages`."""
  pending = first
  while True:
    if pending is None:
      try:
        pending = input("> " if sys.stdin.isatty() else "")
      except EOFError:
        return
      if pending.strip() in ("/exit", "/quit"):
        return
      if not pending.strip():
        pending = None
        continue
    messages.append({"role": "user", "content": pending})
    reply = answer(messages)
    messages.append({"role": "assistant", "content": reply})
    print(reply, file=out or sys.stdout, flush=True)
    pending = None


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if not args.chat and args.prompt is None:
    print("error: give --prompt TEXT, or --chat for an interactive conversation", file=sys.stderr)
    return 2
  from hybrid_jax.compile_cache import enable_compilation_cache
  from hybrid_jax.errors import error_line
  enable_compilation_cache()  # a second run of the same shapes skips compilation
  try:
    answer = make_answer_fn(args)
  except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors; both name the file
    print(error_line(e), file=sys.stderr)
    return 2
  messages = [{"role": "system", "content": args.system}] if args.system else []
  if args.chat:
    _chat_loop(answer, messages, args.prompt)
  else:
    messages.append({"role": "user", "content": args.prompt})
    print(answer(messages))
  return 0


if __name__ == "__main__":
  sys.exit(main())
