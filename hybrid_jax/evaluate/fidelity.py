"""How close a distilled student stays to its teacher, on text no recipe trains on.

Three measurements, all deterministic, all offline:
  * held-out perplexity, KL(teacher || student) and top-1 next-token agreement on
    - teacher-written conversations: the default data generator (hybrid_jax.data.default_data) run with its own
      seed, HELDOUT_SEED, which no recipe uses (recipes generate with seed 0), scored on the answer tokens;
    - human-written text: prose paragraphs of the Python documentation shipped with the interpreter
      (`pydoc_data.topics`, the language reference's topics; code blocks, grammar rules and headings removed),
      every token scored. The text is fixed by the Python version, which the results record;
  * greedy answers of teacher and student to fixed prompts (PROMPTS), side by side.
`evaluate_fidelity` returns all of it as a dict; `format_table` renders it. Perplexities come from
`hybrid_jax.train.evaluate.evaluate` (token-weighted over the whole set). Each document is one row (no
packing), cut at `seq_len` tokens.

  python -m hybrid_jax.evaluate.fidelity --model runs/distill_default/model --teacher TEACHER_DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

HELDOUT_SEED = 1009  # the held-out conversations' generation seed (every recipe generates with seed 0)
TEXT_SOURCE = "pydoc_data.topics"

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is photosynthesis?",
    "How do I boil an egg?",
)


@dataclasses.dataclass(frozen=True)
class FidelityOptions:
  """What to measure. The defaults take a few minutes on a 2-core CPU (the conversations are generated once
  and cached under cache_dir)."""
  n_conversations: int = 32     # teacher-written held-out conversations
  answer_tokens: int = 48       # answer length cap when the teacher writes them
  n_text: int = 32              # human-written paragraphs
  seq_len: int = 256            # tokens per scored document (longer ones are cut)
  batch_size: int = 8
  n_answers: int = 3            # prompts of PROMPTS answered side by side (0: none)
  max_new_tokens: int = 48      # per side-by-side answer
  cache_dir: str = ".cache"
  seed: int = HELDOUT_SEED

  def __post_init__(self):
    for name in ("n_conversations", "n_text", "n_answers"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("answer_tokens", "seq_len", "batch_size", "max_new_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.n_answers > len(PROMPTS):
      raise ValueError(f"n_answers must be <= {len(PROMPTS)} (the fixed prompts), got {self.n_answers}")


# ---- the held-out sets ---------------------------------------------------------------------------

def heldout_conversations(teacher_dir: str, options: FidelityOptions) -> list[list[dict[str, str]]]:
  """The teacher's own conversations (message lists) generated with options.seed: same procedure as the
  training data, different questions. Cached by default_data (a second call loads nothing)."""
  from hybrid_jax.data import default_data
  if options.n_conversations == 0:
    return []
  paths = default_data.ensure_default_data(
      teacher_dir, options.cache_dir, n_train=options.n_conversations, n_eval=0, seed=options.seed,
      max_new_tokens=options.answer_tokens, batch_size=min(options.n_conversations, 64))
  with open(paths["train"], encoding="utf-8") as f:
    return [json.loads(line)["messages"] for line in f if line.strip()]


_CODE_OR_HEADING = re.compile(r"^(\s|[*=~^-]{3,}\s*$)")  # indented (code, grammar) or a heading underline


def human_text(n: int, min_words: int = 40) -> list[str]:
  """n prose paragraphs of the Python documentation (`pydoc_data.topics`), spread evenly over its topics in
  sorted order: blocks with indented lines (code, grammar) or heading underlines are skipped, the lines of a
  paragraph joined by spaces. [n] strings; the same for one Python version."""
  from pydoc_data.topics import topics
  paragraphs = []
  for name in sorted(topics):
    for block in re.split(r"\n[ \t]*\n", topics[name]):
      lines = [ln for ln in block.splitlines() if ln.strip()]
      if not lines or any(_CODE_OR_HEADING.match(ln) for ln in lines) or "::=" in block:
        continue
      text = " ".join(ln.strip() for ln in lines)
      if len(text.split()) >= min_words:
        paragraphs.append(text)
  if n > len(paragraphs):
    raise ValueError(f"{TEXT_SOURCE} has {len(paragraphs)} prose paragraphs, fewer than the {n} asked for")
  return [paragraphs[i * len(paragraphs) // n] for i in range(n)]


def _batches(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int
             ) -> list[dict[str, np.ndarray]]:
  """(ids, per-token target) documents -> padded batches, one document a row ({'tokens', 'segment_ids',
  'loss_mask'} [batch_size, seq_len]; the last batch is filled with empty rows)."""
  from hybrid_jax.data.tokenize import shift_mask
  out = []
  for start in range(0, len(docs), batch_size):
    toks, seg, mask = (np.zeros((batch_size, seq_len), np.int32) for _ in range(3))
    for r, (ids, target) in enumerate(docs[start:start + batch_size]):
      ids, target = ids[:seq_len], target[:seq_len]
      n = len(ids)
      toks[r, :n], seg[r, :n], mask[r, :n] = ids, 1, shift_mask(target)
    out.append({"tokens": toks, "segment_ids": seg, "loss_mask": mask})
  return out


def conversation_batches(tokenizer, conversations, seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Chat-templated conversations scored on their assistant tokens (as the training data)."""
  from hybrid_jax.data.tokenize import chat_tokens
  return _batches([chat_tokens(tokenizer, c) for c in conversations], seq_len, batch_size)


def text_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Plain texts, every token scored."""
  from hybrid_jax.data.tokenize import text_tokens
  docs = []
  for t in texts:
    ids = text_tokens(tokenizer, t)
    docs.append((ids, np.ones_like(ids)))
  return _batches(docs, seq_len, batch_size)


# ---- answers ------------------------------------------------------------------------------------

def greedy_answers(model: tuple, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
  """Greedy answers of model = (params, cfg, tokenizer) to user prompts, through its chat template."""
  from hybrid_jax.decode.generate import chat_ids, generate
  params, cfg, tok = model
  eos = tuple(dict.fromkeys(tuple(cfg.eos_token_id) + ((tok.eos_token_id,) if tok.eos_token_id is not None
                                                         else ())))
  ids = [chat_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
  new = generate(params, cfg, ids, max_new_tokens, eos_ids=eos)
  return [tok.decode(a, skip_special_tokens=True).strip() for a in new]


# ---- all of it ----------------------------------------------------------------------------------

def _scores(student: tuple, teacher: tuple, batches) -> dict[str, float]:
  from hybrid_jax.train.evaluate import evaluate
  res = evaluate(student[0], student[1], batches, teacher[0], teacher[1])
  res["ppl_ratio"] = res["student_ppl"] / res["teacher_ppl"]
  return res


def evaluate_fidelity(student: tuple, teacher: tuple, *, conversations: Sequence | None = None,
                      texts: Sequence[str] | None = None, teacher_dir: str | None = None,
                      options: FidelityOptions = FidelityOptions()) -> dict[str, Any]:
  """Student vs teacher on the held-out sets and the fixed prompts.

  student, teacher: (params, cfg, tokenizer). conversations (message lists) and texts default to
  `heldout_conversations(teacher_dir, options)` and `human_text(options.n_text)`.
  Returns {'conversations': scores, 'text': scores, 'answers': [{'prompt', 'teacher', 'student'}],
  'settings': {...}}, where scores = train.evaluate's dict (student_ppl, teacher_ppl, kl, top1_agreement,
  n_tokens, ...) plus 'ppl_ratio' (student / teacher) and 'documents'; a set with no documents is left out.
  """
  import platform
  tok = teacher[2] if teacher[2] is not None else student[2]
  if tok is None:
    raise ValueError("evaluate_fidelity needs a tokenizer (the teacher's or the student's checkpoint has none)")
  if conversations is None:
    if teacher_dir is None:
      raise ValueError("give conversations, or teacher_dir to generate the held-out conversations")
    conversations = heldout_conversations(teacher_dir, options)
  if texts is None:
    texts = human_text(options.n_text) if options.n_text else []
  out: dict[str, Any] = {}
  sets = (("conversations", conversation_batches, conversations), ("text", text_batches, texts))
  for name, make, docs in sets:
    if docs:
      out[name] = {**_scores(student, teacher, make(tok, docs, options.seq_len, options.batch_size)),
                   "documents": len(docs)}
  prompts = list(PROMPTS[:options.n_answers])
  out["answers"] = []
  if prompts:
    t_ans = greedy_answers((teacher[0], teacher[1], tok), prompts, options.max_new_tokens)
    s_ans = greedy_answers((student[0], student[1], tok), prompts, options.max_new_tokens)
    out["answers"] = [{"prompt": p, "teacher": t, "student": s} for p, t, s in zip(prompts, t_ans, s_ans)]
  out["settings"] = {**dataclasses.asdict(options), "text_source": TEXT_SOURCE,
                     "python": platform.python_version()}
  return out


SET_NAMES = {"conversations": "teacher-written conversations (answer tokens)",
             "text": f"human-written text ({TEXT_SOURCE}, every token)"}


def format_table(result: dict[str, Any], answers: int | None = None) -> str:
  """Markdown: one row per held-out set, then the side-by-side answers (the first `answers`; None: all)."""
  header = ("| held-out set | documents | tokens | teacher ppl | student ppl | student / teacher | "
            "KL(teacher || student) / token | top-1 agreement |")
  lines = [header, "|---|---|---|---|---|---|---|---|"]
  for key, label in SET_NAMES.items():
    r = result.get(key)
    if r is None:
      continue
    lines.append(f"| {label} | {r['documents']} | {int(r['n_tokens'])} | {r['teacher_ppl']:.3f} | "
                 f"{r['student_ppl']:.3f} | {r['ppl_ratio']:.2f}x | {r['kl']:.4f} | "
                 f"{100 * r['top1_agreement']:.1f}% |")
  shown = result.get("answers", [])[:answers] if answers is not None else result.get("answers", [])
  for a in shown:
    lines += ["", f"**{a['prompt']}**", f"- teacher: {_one_line(a['teacher'])}",
              f"- student: {_one_line(a['student'])}"]
  return "\n".join(lines)


def _one_line(text: str) -> str:
  return " ".join(text.split()) or "(empty)"


# ---- command line -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m hybrid_jax.evaluate.fidelity",
                               description="Held-out perplexity, KL, top-1 agreement and greedy answers of a "
                                           "student next to its teacher.")
  ap.add_argument("--model", help="the student's checkpoint directory (required unless --data-only)")
  ap.add_argument("--teacher", required=True, help="the teacher's checkpoint directory")
  ap.add_argument("--cache-dir", default=".cache", help="where the held-out conversations are cached")
  ap.add_argument("--conversations", type=int, default=FidelityOptions.n_conversations)
  ap.add_argument("--texts", type=int, default=FidelityOptions.n_text)
  ap.add_argument("--seq-len", type=int, default=FidelityOptions.seq_len)
  ap.add_argument("--batch-size", type=int, default=FidelityOptions.batch_size)
  ap.add_argument("--answers", type=int, default=FidelityOptions.n_answers, help="fixed prompts answered")
  ap.add_argument("--max-new-tokens", type=int, default=FidelityOptions.max_new_tokens)
  ap.add_argument("--json", default=None, help="also write the result dict here")
  ap.add_argument("--data-only", action="store_true",
                  help="generate the held-out conversations into --cache-dir (when missing) and exit")
  a = ap.parse_args(argv)
  if not a.model and not a.data_only:
    ap.error("--model is required")
  from hybrid_jax.checkpoint import CheckpointError, load_model
  try:
    options = FidelityOptions(n_conversations=a.conversations, n_text=a.texts, seq_len=a.seq_len,
                              batch_size=a.batch_size, n_answers=a.answers, max_new_tokens=a.max_new_tokens,
                              cache_dir=a.cache_dir)
    if a.data_only:
      print(f"{len(heldout_conversations(a.teacher, options))} held-out conversations in {a.cache_dir}")
      return 0
    student, teacher = load_model(a.model), load_model(a.teacher)
    if student[1].vocab_size != teacher[1].vocab_size:
      raise ValueError(f"--model {a.model} and --teacher {a.teacher} have different vocabularies")
    result = evaluate_fidelity(student, teacher, teacher_dir=a.teacher, options=options)
  except (ValueError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(result))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
