"""Reading training records: JSONL, Parquet and `datasets.save_to_disk` directories.

Records are validated and normalised once, up front (so a malformed record is reported by file:line before
training starts); the source then keeps only a reference per valid record (file, byte offset / row) and
re-reads it on access, so memory does not grow with the data set.

Record formats (TRL / alignment-handbook):
  messages: {"messages": [{"role": ..., "content": str}, ...]}        -> chat SFT, loss on assistant turns
  text:     {"text": str}                                              -> plain LM, loss on every token
  dpo:      {"prompt"?: str | messages, "chosen": str | messages, "rejected": str | messages}
            chosen/rejected may repeat the prompt messages (UltraFeedback style) or hold only the completion;
            without `prompt`, the common leading messages of chosen and rejected are the prompt.

Normalised examples are plain dicts (picklable for Grain workers):
  {"kind": "messages", "messages": [{"role", "content"}, ...]}
  {"kind": "text", "text": str}
  {"kind": "dpo", "chat": True,  "prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}  (completions)
  {"kind": "dpo", "chat": False, "prompt": str, "chosen": str, "rejected": str}
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from hybrid_jax.errors import describe

log = logging.getLogger(__name__)

JSONL_EXT = (".jsonl", ".json")
PARQUET_EXT = (".parquet",)
MAX_WARNINGS = 20  # per source; the summary line always carries the full count


class DataError(ValueError):
  """A record or file that cannot be used. `location` is 'file:line' (JSONL) or 'file:row N' (tables)."""

  def __init__(self, location: str, problem: str):
    super().__init__(f"{location}: {problem}")
    self.location, self.problem = location, problem


class _Bad(Exception):
  """Internal: a record-level problem, before its location is attached."""


# ---- files ---------------------------------------------------------------------------------------

def _is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json")) or \
      os.path.isfile(os.path.join(path, "dataset_dict.json")) or \
      os.path.isfile(os.path.join(path, "state.json"))


def resolve_paths(paths: tuple[str, ...] | list[str] | str) -> list[tuple[str, str]]:
  """Expands files / directories / globs into [(kind, path)], kind in 'jsonl' | 'parquet' | 'hf'.

  Raises FileNotFoundError naming the path for a missing file, an empty glob or a directory without data.
  """
  if isinstance(paths, str):
    paths = (paths,)
  if not paths:
    raise FileNotFoundError("no data paths given (data.paths is empty)")
  out: list[tuple[str, str]] = []
  for p in paths:
    p = os.path.expanduser(p)
    if any(c in p for c in "*?["):
      matches = sorted(glob.glob(p, recursive=True))
      if not matches:
        raise FileNotFoundError(f"{p}: no data files match this glob")
      candidates = matches
    else:
      candidates = [p]
    for c in candidates:
      if os.path.isdir(c):
        if _is_hf_dir(c):
          out.append(("hf", c))
          continue
        found = sorted(os.path.join(r, f) for r, _, fs in os.walk(c) for f in fs
                       if f.endswith(JSONL_EXT + PARQUET_EXT))
        if not found:
          raise FileNotFoundError(f"{c}: data directory without .jsonl/.json/.parquet files, and not a "
                                  "`datasets.save_to_disk` directory")
        out.extend(_file_kind(f) for f in found)
      elif os.path.isfile(c):
        out.append(_file_kind(c))
      else:
        raise FileNotFoundError(f"{c}: data file not found")
  return out


def _file_kind(path: str) -> tuple[str, str]:
  if path.endswith(JSONL_EXT):
    return ("jsonl", path)
  if path.endswith(PARQUET_EXT):
    return ("parquet", path)
  raise DataError(path, "unsupported file type (expected .jsonl, .json (JSON Lines) or .parquet)")


def _load_hf(path: str):
  try:
    import datasets  # optional dependency
  except ImportError as e:
    raise ImportError(f"{path!r} is a Hugging Face `datasets.save_to_disk` directory, but the `datasets` "
                      "package is not installed: `pip install datasets`, or export the data to JSONL/Parquet") from e
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # datasets / pyarrow raise many types for a damaged directory
    raise DataError(path, f"cannot load this `datasets` directory: {describe(e)}") from e
  if isinstance(ds, datasets.DatasetDict):
    if "train" not in ds:
      raise DataError(path, f"DatasetDict without a 'train' split (splits: {sorted(ds)}); point at one split")
    ds = ds["train"]
  return ds


# ---- record validation ---------------------------------------------------------------------------

def _messages(value: Any, field: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise _Bad(f"field {field!r} must be a non-empty list of {{role, content}} messages, got "
               f"{type(value).__name__}")
  msgs = []
  for i, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise _Bad(f"{field}[{i}] must be a mapping with 'role' and 'content'")
    if not isinstance(m["role"], str) or not isinstance(m["content"], str):
      raise _Bad(f"{field}[{i}]: 'role' and 'content' must be strings, got "
                 f"{type(m['role']).__name__}/{type(m['content']).__name__}")
    msgs.append({"role": m["role"], "content": m["content"]})
  return msgs


def _str_or_messages(rec: dict, field: str) -> str | list[dict[str, str]]:
  if field not in rec or rec[field] is None:
    raise _Bad(f"DPO record without {field!r}")
  v = rec[field]
  if isinstance(v, str):
    return v
  if isinstance(v, list):
    return _messages(v, field)
  raise _Bad(f"field {field!r} must be a string or a list of messages, got {type(v).__name__}")


def _detect(rec: dict) -> str:
  if "chosen" in rec or "rejected" in rec:
    return "dpo"
  if "messages" in rec:
    return "messages"
  if "text" in rec:
    return "text"
  raise _Bad(f"cannot tell the record format: no 'messages', 'text' or 'chosen'/'rejected' field "
             f"(keys: {sorted(rec)[:10]})")


def _normalise_dpo(rec: dict) -> dict[str, Any]:
  chosen, rejected = _str_or_messages(rec, "chosen"), _str_or_messages(rec, "rejected")
  prompt = _str_or_messages(rec, "prompt") if rec.get("prompt") is not None else None
  chat = any(isinstance(v, list) for v in (prompt, chosen, rejected))
  if not chat:
    return {"kind": "dpo", "chat": False, "prompt": prompt or "", "chosen": chosen, "rejected": rejected}
  as_list = lambda v, role: [{"role": role, "content": v}] if isinstance(v, str) else v
  chosen, rejected = as_list(chosen, "assistant"), as_list(rejected, "assistant")
  if prompt is None:  # implicit prompt: the shared leading messages
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  else:
    prompt = as_list(prompt, "user")
    k = len(prompt)
    if chosen[:k] == prompt:  # completions that repeat the prompt (UltraFeedback-binarized layout)
      chosen = chosen[k:]
    if rejected[:k] == prompt:
      rejected = rejected[k:]
  if not prompt:
    raise _Bad("DPO record has an empty prompt")
  for name, c in (("chosen", chosen), ("rejected", rejected)):
    if not any(m["role"] == "assistant" for m in c):
      raise _Bad(f"DPO {name!r} has no assistant message after the prompt")
  return {"kind": "dpo", "chat": True, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalise(rec: Any, fmt: str = "auto") -> dict[str, Any]:
  """Validates one raw record against `fmt` ('auto' | 'messages' | 'text' | 'dpo'); raises _Bad."""
  if not isinstance(rec, dict):
    raise _Bad(f"record must be a JSON object, got {type(rec).__name__}")
  kind = _detect(rec) if fmt == "auto" else fmt
  if kind == "messages":
    if "messages" not in rec:
      raise _Bad("missing field 'messages'")
    msgs = _messages(rec["messages"], "messages")
    if not any(m["role"] == "assistant" for m in msgs):
      raise _Bad("conversation has no assistant message (nothing to train on)")
    return {"kind": "messages", "messages": msgs}
  if kind == "text":
    if "text" not in rec:
      raise _Bad("missing field 'text'")
    if not isinstance(rec["text"], str):
      raise _Bad(f"field 'text' must be a string, got {type(rec['text']).__name__}")
    if not rec["text"]:
      raise _Bad("field 'text' is empty")
    return {"kind": "text", "text": rec["text"]}
  return _normalise_dpo(rec)


# ---- the source ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ReadReport:
  """What the up-front pass found: counts per file and every skipped record (location, problem)."""
  num_records: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  kinds: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)


class RecordSource:
  """Random-access source of normalised records (a Grain RandomAccessDataSource).

  source[i] -> (location: str, example: dict). Only references are kept; records are re-read on access.
  """

  def __init__(self, paths, fmt: str = "auto", on_error: str = "raise"):
    self.fmt, self.on_error = fmt, on_error
    self.files = resolve_paths(paths)
    self.refs: list[tuple[int, int, int]] = []  # (file index, byte offset | row, line number | row)
    self.report = ReadReport()
    self._cache: dict[int, Any] = {}  # per-process open tables / datasets; dropped when pickled
    for fi, (kind, path) in enumerate(self.files):
      scan = self._scan_jsonl if kind == "jsonl" else self._scan_table
      for ref, loc, raw in scan(fi, kind, path):
        self._admit(ref, loc, raw)
    self._finish()

  # -- up-front pass
  def _scan_jsonl(self, fi: int, kind: str, path: str) -> Iterator[tuple[tuple, str, Any]]:
    try:
      f = open(path, "rb")  # noqa: SIM115 - closed below; only opening is guarded
    except OSError as e:
      raise DataError(path, describe(e)) from None
    with f:
      offset, lineno = 0, 0
      for line in f:
        lineno += 1
        start, offset = offset, offset + len(line)
        if not line.strip():
          continue
        loc = f"{path}:{lineno}"
        try:
          raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raw = _Bad(f"invalid JSON: {e}")
        yield (fi, start, lineno), loc, raw

  def _scan_table(self, fi: int, kind: str, path: str) -> Iterator[tuple[tuple, str, Any]]:
    table = self._table(fi)
    for r in range(len(table)):
      yield (fi, r, r), f"{path}:row {r}", self._row(fi, r)

  def _admit(self, ref: tuple[int, int, int], loc: str, raw: Any):
    try:
      if isinstance(raw, _Bad):
        raise raw
      ex = normalise(raw, self.fmt)
    except _Bad as e:
      if self.on_error == "raise":
        raise DataError(loc, str(e)) from None
      self.report.skipped.append((loc, str(e)))
      if len(self.report.skipped) <= MAX_WARNINGS:
        log.warning("skipping malformed record %s: %s", loc, e)
      return
    self.refs.append(ref)
    self.report.num_records += 1
    self.report.kinds[ex["kind"]] = self.report.kinds.get(ex["kind"], 0) + 1

  def _finish(self):
    names = ", ".join(p for _, p in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
    if self.report.skipped:
      log.warning("skipped %d malformed record(s) of %d in %s (on_error='skip')",
                  self.report.num_skipped, self.report.num_skipped + self.report.num_records, names)
    if not self.refs:
      raise DataError(names, f"no usable records (skipped {self.report.num_skipped} malformed)")
    if self.fmt == "auto" and "dpo" in self.report.kinds and len(self.report.kinds) > 1:
      # chat and plain text mix (both are language-model rows); preference pairs make rows of another shape
      raise DataError(names, f"records of mixed formats {self.report.kinds}: preference pairs cannot be mixed "
                      "with chat or text records; set data.format or split the data")

  @property
  def kind(self) -> str:
    """'dpo' (preference pairs) or the language-model format of the records: 'messages' | 'text', 'messages'
    when both are present."""
    kinds = self.report.kinds
    return "dpo" if "dpo" in kinds else "messages" if "messages" in kinds else "text"

  # -- random access
  def _table(self, fi: int):
    if fi not in self._cache:
      kind, path = self.files[fi]
      if kind == "parquet":
        import pyarrow.parquet as pq
        try:
          self._cache[fi] = pq.read_table(path, memory_map=True)
        except Exception as e:  # pyarrow raises several types for corrupt files
          raise DataError(path, f"cannot read Parquet file: {e}") from e
      else:
        self._cache[fi] = _load_hf(path)
    return self._cache[fi]

  def _row(self, fi: int, r: int) -> dict:
    t = self._table(fi)
    return t.slice(r, 1).to_pylist()[0] if self.files[fi][0] == "parquet" else t[r]

  def __len__(self) -> int:
    return len(self.refs)

  def __getitem__(self, i: int) -> tuple[str, dict[str, Any]]:
    fi, a, b = self.refs[i]
    kind, path = self.files[fi]
    if kind == "jsonl":
      with open(path, "rb") as f:
        f.seek(a)
        raw, loc = json.loads(f.readline()), f"{path}:{b}"
    else:
      raw, loc = self._row(fi, a), f"{path}:row {b}"
    return loc, normalise(raw, self.fmt)

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}

  def __repr__(self) -> str:
    return f"RecordSource({len(self)} records from {len(self.files)} file(s), kinds={self.report.kinds})"

  def select(self, indices) -> RecordSource:
    """A source over the records at `indices` (same files; used for the held-out eval split)."""
    new = object.__new__(RecordSource)
    new.__dict__.update(self.__getstate__())
    new.refs = [self.refs[int(i)] for i in indices]
    return new
