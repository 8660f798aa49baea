"""The embedded default data set: chat conversations written by the teacher itself (nothing is downloaded).

Two generation passes over the teacher, both batched through hybrid_jax.decode.generate:
  1. instruction: for example i, a (topic, style) pair drawn deterministically from the built-in lists below
     is turned into a request "Write <style> about <topic>..." and the teacher writes the user question
     (sampled, fixed seed per batch, for variety); an unusable question falls back to a templated one.
  2. answer: the teacher answers its own question through its chat template (greedy by default).
The records are `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` JSONL: the last
n_eval conversations form the held-out eval split. Results are cached under
cache_dir/default_data/<key>/ where the key hashes the teacher's identity and every generation setting, so
a later run with the same settings reuses the files. Everything is deterministic given the settings.

`ensure_default_texts` adds plain documents, `{"text": ...}`: the teacher continues a title (topic x kind of
document, no chat template), sampled, so a recipe can train on more kinds of prose than chat answers.

For DPO, `ensure_default_dpo_data` pairs the same questions with chosen = the teacher's answer and
rejected = the student's own (greedy) answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

VERSION = 2  # bump when the generation procedure changes: old caches are then not reused

TOPICS = (
    "the ocean", "volcanoes", "baking bread", "chess", "the moon", "rainforests", "bicycles", "music",
    "photosynthesis", "the human heart", "saving money", "learning a language", "gardening", "cats", "dogs",
    "the solar system", "recycling", "healthy sleep", "electricity", "ancient Egypt", "computers",
    "the weather", "coffee", "mountains", "friendship", "writing a letter", "time management", "bees",
    "rivers", "the internet", "painting", "football", "cooking pasta", "dinosaurs", "trains",
    "public speaking", "the water cycle", "birds", "exercise", "reading books", "the brain", "deserts",
    "volunteering", "magnets", "cheese", "libraries", "earthquakes", "camping", "stars", "vaccines",
    "fractions", "airplanes", "tea", "honesty", "robots", "forests", "the piano", "recipes for soup",
    "rainbows", "museums", "the alphabet", "penguins", "budgeting", "kindness",
)

# (style, opener): the teacher is asked for a question and its reply is started with the opener, so a
# 135M model writes a question (it otherwise often answers or chats instead).
STYLES = (
    ("a short question", "What"),
    ("a 'how does' question", "How does"),
    ("a 'why' question", "Why"),
    ("a request for practical tips", "What are three tips for"),
    ("a request to explain a basic idea simply", "Can you explain"),
    ("a request for a short definition", "What is"),
    ("a request for an example", "Can you give an example of"),
    ("a request for a short list", "Can you list a few"),
)

# A short system turn replaces the template's default one in the question pass only (fewer prefill tokens);
# answers use the plain chat template, exactly as the training data is later tokenized.
QUESTION_SYSTEM = "You write questions."
QUESTION_REQUEST = "Write {style} about {topic}. Reply with only the question."
FALLBACK_QUESTION = "Can you explain something interesting about {topic} in a few sentences?"


@dataclasses.dataclass(frozen=True)
class GenSettings:
  """Everything that determines the generated data (all of it goes into the cache key)."""
  # Sized for 2 CPU cores (~3 min): decoding SmolLM2-135M costs ~13 ms per row-token there, prefill ~3 ms.
  n_train: int = 112
  n_eval: int = 16
  seed: int = 0
  max_new_tokens: int = 48          # answer length cap
  question_tokens: int = 24         # question length cap
  question_temperature: float = 0.8
  question_top_p: float = 0.95
  answer_temperature: float = 0.0   # 0 = greedy
  answer_top_p: float = 1.0
  batch_size: int = 64


# ---- helpers ------------------------------------------------------------------------------------

def _log(msg: str) -> None:
  print(f"[default_data] {msg}", file=sys.stderr, flush=True)


def fingerprint(model_dir: str, with_mtime: bool = False) -> str:
  """Identity of a checkpoint directory: its config/tokenizer files' contents and its params files' sizes.

  with_mtime: also the params files' modification times (a student checkpoint rewritten in place keeps
  the same sizes). Parameters are not read, so a cache hit costs no model load.
  """
  h = hashlib.sha256()
  for name in ("config.json", "chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
    p = os.path.join(model_dir, name)
    if os.path.isfile(p):
      h.update(name.encode())
      with open(p, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  root = os.path.join(model_dir, "params")
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for fn in sorted(filenames):
      p = os.path.join(dirpath, fn)
      st = os.stat(p)
      h.update(f"{os.path.relpath(p, root)}:{st.st_size}".encode())
      if with_mtime:
        h.update(f":{st.st_mtime_ns}".encode())
  return h.hexdigest()


def _key(obj: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan(n: int, seed: int) -> list[tuple[str, tuple[str, str]]]:
  """(topic, style) for each of n examples: a seeded permutation of all pairs, cycled."""
  pairs = [(t, s) for t in TOPICS for s in STYLES]
  order = np.random.default_rng(seed).permutation(len(pairs))
  return [pairs[order[i % len(pairs)]] for i in range(n)]


_PREFIX = re.compile(r"^(question|request|q|user|prompt)\s*[:\-]\s*", re.IGNORECASE)
_SPEAKER = re.compile(r"^[A-Za-z][\w ]{0,24}:\s+(?=\S)")  # 'Inquisitive student: ...'



def clean_question(text: str, topic: str) -> str:
  """First line up to its first '?', without quotes / 'Question:' prefixes; a templated question if unusable."""
  line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
  line = _SPEAKER.sub("", _PREFIX.sub("", line)).strip().strip('"“”\'').strip()
  if "?" in line:
    line = line[:line.index("?") + 1]
  elif line and line[-1] not in ".!":
    line += "?"
  if not 12 <= len(line) <= 300 or sum(c.isalpha() for c in line) < 0.6 * len(line):
    return FALLBACK_QUESTION.format(topic=topic)
  return line


def clean_answer(text: str, truncated: bool) -> str:
  """Strips whitespace; a truncated answer is cut back to its last full sentence when one ends past half."""
  text = text.strip()
  if truncated:
    end = max(text.rfind(c) for c in ".!?")
    if end >= len(text) // 2:
      text = text[:end + 1]
  return text


def _eos_ids(cfg, tok) -> tuple[int, ...]:
  ids = tuple(cfg.eos_token_id) + ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
  return tuple(dict.fromkeys(int(i) for i in ids))


def _batched_generate(params, cfg, prompts: Sequence[list[int]], max_new: int, temperature: float,
                      top_p: float, seed: int, batch_size: int, eos: tuple[int, ...], what: str
                      ) -> list[list[int]]:
  """generate() over fixed-size chunks; chunk j samples with seed + j. The last chunk is padded with
  copies of its first prompt so every call has the same batch shape (one compilation)."""
  from hybrid_jax.decode.generate import generate
  out: list[list[int]] = []
  n_chunks = -(-len(prompts) // batch_size)
  for j in range(n_chunks):
    chunk = list(prompts[j * batch_size:(j + 1) * batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (min(batch_size, len(prompts)) - real)
    t0 = time.perf_counter()
    res = generate(params, cfg, chunk, max_new, temperature=temperature, top_p=top_p, seed=seed + j,
                   eos_ids=eos, pad_multiple=32)
    out += res[:real]
    _log(f"{what}: batch {j + 1}/{n_chunks} ({real} rows) in {time.perf_counter() - t0:.1f}s")
  return out


def _chat_ids(tok, messages) -> list[int]:
  from hybrid_jax.decode.generate import chat_ids
  return chat_ids(tok, messages)


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _publish(tmp: str, final: str) -> None:
  """Moves a finished directory into place; if another process won the race, keeps theirs."""
  try:
    os.replace(tmp, final)
  except OSError:
    if os.path.isfile(os.path.join(final, "meta.json")):
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      raise


def _write_cache(final: str, splits: dict[str, list[dict]], meta: dict) -> None:
  """Writes each split as <name>.jsonl and meta.json (last: it marks the directory complete) into a temporary
  sibling of `final`, then moves it into place."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final))
  for name, rows in splits.items():
    _write_jsonl(os.path.join(tmp, f"{name}.jsonl"), rows)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  _publish(tmp, final)


def _paths(d: str) -> dict[str, str]:
  return {"train": os.path.join(d, "train.jsonl"), "eval": os.path.join(d, "eval.jsonl"), "dir": d}


# ---- SFT / distillation data ------------------------------------------------------------------

def generate_conversations(params, cfg, tok, settings: GenSettings) -> tuple[list[dict], dict[str, Any]]:
  """Runs both passes; returns the conversations (in plan order) and generation statistics."""
  n = settings.n_train + settings.n_eval
  eos = _eos_ids(cfg, tok)
  items = plan(n, settings.seed)
  t0 = time.perf_counter()
  # chat prompt + the opener as the start of the reply (tokenized separately: the prompt ends in '\n')
  reqs = [_chat_ids(tok, [{"role": "system", "content": QUESTION_SYSTEM},
                          {"role": "user", "content": QUESTION_REQUEST.format(style=s, topic=t)}])
          + tok.encode(opener, add_special_tokens=False) for t, (s, opener) in items]
  q_ids = _batched_generate(params, cfg, reqs, settings.question_tokens, settings.question_temperature,
                            settings.question_top_p, settings.seed, settings.batch_size, eos, "questions")
  questions = [clean_question(opener + tok.decode(q, skip_special_tokens=True), t)
               for q, (t, (_, opener)) in zip(q_ids, items)]
  t1 = time.perf_counter()
  prompts = [_chat_ids(tok, [{"role": "user", "content": q}]) for q in questions]
  a_ids = _batched_generate(params, cfg, prompts, settings.max_new_tokens, settings.answer_temperature,
                            settings.answer_top_p, settings.seed + 10_000, settings.batch_size, eos, "answers")
  t2 = time.perf_counter()
  rows, empty, truncated = [], 0, 0
  for q, a in zip(questions, a_ids):
    cut = len(a) >= settings.max_new_tokens
    truncated += cut
    ans = clean_answer(tok.decode(a, skip_special_tokens=True), cut)
    if not ans:
      empty += 1
      ans = "I'm not sure."  # keeps n fixed; an empty assistant turn would have nothing to train on
    rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
  stats = {"question_s": round(t1 - t0, 2), "answer_s": round(t2 - t1, 2),
           "fallback_questions": sum(q.startswith(FALLBACK_QUESTION[:20]) for q in questions),
           "empty_answers": empty, "truncated_answers": truncated,
           "answer_tokens": int(sum(len(a) for a in a_ids))}
  return rows, stats


def ensure_default_data(teacher_dir: str, cache_dir: str, n_train: int = 112, n_eval: int = 16,
                        seed: int = 0, max_new_tokens: int = 48, batch_size: int = 64,
                        **settings: Any) -> dict[str, str]:
  """{'train': path, 'eval': path, 'dir': cache dir} of the teacher-written chat data; generated once.

  Extra GenSettings fields (question_temperature, answer_temperature, ...) may be passed as keywords.
  Generation loads the teacher with hybrid_jax.checkpoint.load_model; a cache hit loads nothing.
  """
  gs = GenSettings(n_train=n_train, n_eval=n_eval, seed=seed, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, **settings)
  if gs.n_train < 1 or gs.n_eval < 0:
    raise ValueError(f"need n_train >= 1 and n_eval >= 0, got {gs.n_train}, {gs.n_eval}")
  final = _teacher_generated("sft", teacher_dir, cache_dir, gs, f"{gs.n_train}+{gs.n_eval} conversations",
                             lambda params, cfg, tok: generate_conversations(params, cfg, tok, gs),
                             {"train": slice(0, gs.n_train), "eval": slice(gs.n_train, None)})
  return _paths(final)


def _teacher_generated(kind: str, teacher_dir: str, cache_dir: str, settings, what: str, make,
                       splits: dict[str, slice]) -> str:
  """The cache directory of data the teacher writes, keyed by the teacher's identity and every setting: found,
  nothing is loaded; missing, the teacher is loaded, `make(params, cfg, tok)` -> (rows, stats) generates the
  rows, and `splits` (name -> slice of the rows) are written atomically with a meta.json."""
  teacher_dir = os.path.abspath(os.fspath(teacher_dir))
  ident = {"version": VERSION, "kind": kind, "teacher": fingerprint(teacher_dir),
           "settings": dataclasses.asdict(settings)}
  final = os.path.join(os.fspath(cache_dir), "default_data", f"{kind}-{_key(ident)}")
  if os.path.isfile(os.path.join(final, "meta.json")):
    return final
  from hybrid_jax.checkpoint import load_model
  t0 = time.perf_counter()
  params, cfg, tok = load_model(teacher_dir)
  if tok is None:
    raise ValueError(f"{teacher_dir} has no tokenizer: the default data needs the teacher's tokenizer and chat "
                     "template")
  _log(f"generating {what} with the teacher at {teacher_dir} (cached under {final})")
  rows, stats = make(params, cfg, tok)
  stats["total_s"] = round(time.perf_counter() - t0, 2)
  _write_cache(final, {name: rows[part] for name, part in splits.items()},
               {**ident, "teacher_dir": teacher_dir, "stats": stats})
  _log(f"{what} done in {stats['total_s']}s: {stats}")
  return final


# ---- plain-text documents -----------------------------------------------------------------------

# Titles the teacher continues as plain documents (no chat template): prose of other kinds than chat answers.
TEXT_TITLES = ("{Topic}", "An introduction to {topic}", "The history of {topic}", "How {topic} works",
               "A short story about {topic}", "Common questions about {topic}", "Notes on {topic}",
               "Why {topic} matters")


@dataclasses.dataclass(frozen=True)
class TextSettings:
  """Everything that determines the generated documents (all of it goes into the cache key)."""
  n: int = 64
  seed: int = 0
  max_new_tokens: int = 192
  temperature: float = 1.0          # the teacher's own distribution (top-p trims its unlikeliest tail)
  top_p: float = 0.95
  batch_size: int = 64


def text_plan(n: int, seed: int) -> list[str]:
  """The title of each of n documents: a seeded permutation of every (topic, title) pair, cycled."""
  titles = [t.format(topic=topic, Topic=topic[0].upper() + topic[1:]) for topic in TOPICS for t in TEXT_TITLES]
  order = np.random.default_rng(seed).permutation(len(titles))
  return [titles[order[i % len(titles)]] for i in range(n)]


def generate_texts(params, cfg, tok, settings: TextSettings) -> tuple[list[dict], dict[str, Any]]:
  """`{"text": title + the teacher's sampled continuation}` records (cut back to a sentence end when the token
  cap cut them) and generation statistics."""
  titles = text_plan(settings.n, settings.seed)
  prompts = [tok.encode(f"{t}\n\n") for t in titles]
  t0 = time.perf_counter()
  ids = _batched_generate(params, cfg, prompts, settings.max_new_tokens, settings.temperature, settings.top_p,
                          settings.seed + 20_000, settings.batch_size, _eos_ids(cfg, tok), "texts")
  rows = [{"text": f"{t}\n\n" + clean_answer(tok.decode(x, skip_special_tokens=True),
                                               len(x) >= settings.max_new_tokens)}
          for t, x in zip(titles, ids)]
  return rows, {"text_s": round(time.perf_counter() - t0, 2), "tokens": int(sum(len(x) for x in ids))}


def ensure_default_texts(teacher_dir: str, cache_dir: str, **settings: Any) -> dict[str, str]:
  """{'train': path, 'dir': cache dir} of teacher-written plain-text documents (TextSettings fields as
  keywords); generated once, like ensure_default_data."""
  ts = TextSettings(**settings)
  if ts.n < 1:
    raise ValueError(f"need n >= 1 documents, got {ts.n}")
  final = _teacher_generated("text", teacher_dir, cache_dir, ts, f"{ts.n} documents",
                             lambda params, cfg, tok: generate_texts(params, cfg, tok, ts), {"train": slice(None)})
  return {"train": os.path.join(final, "train.jsonl"), "dir": final}


# ---- DPO data --------------------------------------------------------------------------------------

def ensure_default_dpo_data(teacher_dir: str, student_dir: str, cache_dir: str, n_train: int = 112,
                            n_eval: int = 16, seed: int = 0, max_new_tokens: int = 48, batch_size: int = 64,
                            **settings: Any) -> dict[str, str]:
  """{'train', 'eval', 'dir'}: `prompt`/`chosen`/`rejected` JSONL (chat message lists) where chosen is the
  teacher's answer from the default data and rejected is the student's own greedy answer.

  Pairs whose two answers are identical are dropped (no preference signal); the count is in meta.json.
  The student's identity includes its params files' modification times, so retraining it in place
  regenerates the pairs.
  """
  sft = ensure_default_data(teacher_dir, cache_dir, n_train, n_eval, seed, max_new_tokens, batch_size,
                            **settings)
  student_dir = os.path.abspath(os.fspath(student_dir))
  ident = {"version": VERSION, "kind": "dpo", "sft": os.path.basename(sft["dir"]),
           "student": fingerprint(student_dir, with_mtime=True)}
  final = os.path.join(os.fspath(cache_dir), "default_data", f"dpo-{_key(ident)}")
  if os.path.isfile(os.path.join(final, "meta.json")):
    return _paths(final)

  from hybrid_jax.checkpoint import load_model, load_tokenizer
  t0 = time.perf_counter()
  params, cfg, tok = load_model(student_dir)
  tok = tok or load_tokenizer(teacher_dir)  # a student shares the teacher's vocabulary
  eos = _eos_ids(cfg, tok)
  splits = {name: _read_jsonl(sft[name]) for name in ("train", "eval")}
  questions = [r["messages"][0]["content"] for name in ("train", "eval") for r in splits[name]]
  prompts = [_chat_ids(tok, [{"role": "user", "content": q}]) for q in questions]
  _log(f"student answers for {len(prompts)} DPO prompts ({student_dir})")
  ids = _batched_generate(params, cfg, prompts, max_new_tokens, 0.0, 1.0, seed, batch_size, eos,
                          "student answers")
  answers = iter(ids)
  out, dropped = {}, 0
  for name in ("train", "eval"):
    rows = []
    for r in splits[name]:
      a = next(answers)
      rejected = clean_answer(tok.decode(a, skip_special_tokens=True), len(a) >= max_new_tokens)
      chosen = r["messages"][1]["content"]
      if rejected.strip() == chosen.strip():
        dropped += 1
        continue
      rows.append({"prompt": [r["messages"][0]],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected or "..."}]})
    out[name] = rows
  stats = {"dropped_identical": dropped, "train": len(out["train"]), "eval": len(out["eval"]),
           "total_s": round(time.perf_counter() - t0, 2)}
  _write_cache(final, out, {**ident, "teacher_dir": os.path.abspath(teacher_dir), "student_dir": student_dir,
                            "stats": stats})
  _log(f"DPO pairs done: {stats}")
  return _paths(final)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m hybrid_jax.data.default_data TEACHER_DIR [--cache .cache] [--n-train N] ...`: prints paths."""
  import argparse
  ap = argparse.ArgumentParser(description="Generate (or reuse) the teacher-written default chat data.")
  ap.add_argument("teacher_dir")
  ap.add_argument("--cache", default=".cache")
  ap.add_argument("--n-train", type=int, default=GenSettings.n_train)
  ap.add_argument("--n-eval", type=int, default=GenSettings.n_eval)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max-new-tokens", type=int, default=GenSettings.max_new_tokens)
  ap.add_argument("--batch-size", type=int, default=GenSettings.batch_size)
  ap.add_argument("--answer-temperature", type=float, default=GenSettings.answer_temperature,
                  help="0 = greedy answers; > 0 samples them")
  ap.add_argument("--answer-top-p", type=float, default=GenSettings.answer_top_p)
  ap.add_argument("--n-text", type=int, default=0, help="also N plain-text documents the teacher writes")
  ap.add_argument("--student", default=None, help="also make DPO pairs against this student checkpoint")
  a = ap.parse_args(argv)
  kw = {"n_train": a.n_train, "n_eval": a.n_eval, "seed": a.seed, "max_new_tokens": a.max_new_tokens,
        "batch_size": a.batch_size, "answer_temperature": a.answer_temperature, "answer_top_p": a.answer_top_p}
  if a.student:
    paths = ensure_default_dpo_data(a.teacher_dir, a.student, a.cache, **kw)
  else:
    paths = ensure_default_data(a.teacher_dir, a.cache, **kw)
  if a.n_text:
    paths["text"] = ensure_default_texts(a.teacher_dir, a.cache, n=a.n_text, seed=a.seed,
                                         batch_size=a.batch_size)["train"]
  print(json.dumps(paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())

