"""argparse `type=` validators for numeric flags: an out-of-range value is a one-line usage error (exit 2)
from the parser itself, before any model is loaded."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> int | float:
  try:
    value = kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"a finite number expected, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1."""
  value = _number(text, int)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
  return value


def non_negative_int(text: str) -> int:
  """An integer >= 0."""
  value = _number(text, int)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def non_negative_float(text: str) -> float:
  """A finite number >= 0."""
  value = _number(text, float)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
  return value


def fraction(text: str) -> float:
  """A number in [0, 1]."""
  value = _number(text, float)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
  return value


def probability_mass(text: str) -> float:
  """A number in (0, 1] (nucleus sampling's top-p: 0 would keep no token)."""
  value = _number(text, float)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
  return value
