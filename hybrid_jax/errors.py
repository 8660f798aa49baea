"""Errors about the user's files: one line that names the path and says what is wrong with it.

Loaders wrap each file's read in `reading(path, ErrorType)`, so any failure of the underlying library (a
truncated JSON, an unreadable file, a corrupt tensor store) surfaces as `ErrorType("<path>: <problem>")`,
and the command lines print `error_line(e)` (`error: <path>: <problem>`) instead of a traceback.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator


def describe(e: BaseException) -> str:
  """What went wrong, in one line, without the path (the caller names it)."""
  if isinstance(e, json.JSONDecodeError):
    return f"invalid JSON: {e.msg}: line {e.lineno} column {e.colno}"
  if isinstance(e, UnicodeDecodeError):
    return f"not UTF-8 text ({e.reason} at byte {e.start})"
  if isinstance(e, IsADirectoryError):
    return "is a directory, expected a file"
  if isinstance(e, NotADirectoryError):
    return "is not a directory"
  message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
  text = " ".join(str(message).split())  # some libraries (tensorstore) spread one message over several lines
  if isinstance(e, KeyError):
    text = f"missing key {text}"
  return text or type(e).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[None]:
  """Runs the read of `path`; any failure inside becomes `error('<path>: <problem>')` (an `error` passes)."""
  try:
    yield
  except error:
    raise
  except Exception as e:  # readers raise many types; all of them mean "this file is bad"
    raise error(f"{os.fspath(path)}: {describe(e)}") from e


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError):
  """The parsed JSON file at `path`; a missing, unreadable or invalid file raises `error` naming it."""
  with reading(path, error), open(path, encoding="utf-8") as f:
    return json.load(f)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
  """read_json for files that must hold a JSON object (configs)."""
  obj = read_json(path, error)
  if not isinstance(obj, dict):
    raise error(f"{os.fspath(path)}: expected a JSON object, found {type(obj).__name__}")
  return obj


def error_line(e: BaseException) -> str:
  """`error: <message>` for a command line's stderr: one line; OS errors name their file."""
  if isinstance(e, OSError) and e.filename is not None:
    return f"error: {os.fspath(e.filename)}: {describe(e)}"
  return f"error: {' '.join(str(e).split()) or type(e).__name__}"
