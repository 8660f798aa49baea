"""Chat with a hybrid_jax checkpoint.

  python -m hybrid_jax.generate --model DIR --prompt "What is the capital of France?"
  python -m hybrid_jax.generate --model DIR --chat            # interactive, keeps the conversation

Prints only the generated answer. Greedy unless --temperature > 0 is given.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="hybrid_jax checkpoint directory")
  ap.add_argument("--prompt", default=None, help="user message (with --chat: the first turn)")
  ap.add_argument("--system", default=None, help="optional system message")
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
  ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
  ap.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
  # Speculative decoding (--draft DIR --k K --stats) adds its flags here and its answer function in
  # `make_answer_fn`.
  return ap


def make_answer_fn(args):
  """Returns answer(messages) -> str for the chosen decoding method."""
  from hybrid_jax.decode.generate import generate_text, load_for_generation
  model = load_for_generation(args.model)
  sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}

  def answer(messages):
    return generate_text(model, messages, max_new_tokens=args.max_new_tokens, **sampling)
  return answer


def _chat_loop(answer, messages: list, first: str | None, out=sys.stdout) -> None:
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
    print(reply, file=out, flush=True)
    pending = None


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if not args.chat and args.prompt is None:
    print("error: give --prompt TEXT, or --chat for an interactive conversation", file=sys.stderr)
    return 2
  from hybrid_jax.checkpoint import CheckpointError
  from hybrid_jax.config import ConfigError
  try:
    answer = make_answer_fn(args)
  except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 1
  messages = [{"role": "system", "content": args.system}] if args.system else []
  if args.chat:
    _chat_loop(answer, messages, args.prompt)
  else:
    messages.append({"role": "user", "content": args.prompt})
    print(answer(messages))
  return 0


if __name__ == "__main__":
  sys.exit(main())
