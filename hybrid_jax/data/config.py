"""Data configuration: one small frozen dataclass, built from the recipe's `data:` mapping."""
from __future__ import annotations

import dataclasses
from typing import Any

from hybrid_jax.config import ConfigError

FORMATS = ("auto", "messages", "text", "dpo")
ON_ERROR = ("skip", "raise")
TOO_LONG = ("truncate", "skip", "raise")


def _as_paths(value: Any, name: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise ConfigError(f"data.{name} must be a path or a list of paths, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the examples are and how they become batches.

  paths / eval_paths: files, directories or globs (JSONL, Parquet, or a `datasets.save_to_disk` directory).
  format: 'auto' detects per record ('messages' | 'text' | 'dpo' by the keys present); chat and text records mix.
  seq_len: tokens per packed row (SFT/text) or per chosen/rejected sequence (DPO).
  batch_size: GLOBAL batch; each JAX process yields the rows its devices hold (batch_size // process_count).
  on_error: malformed record -> 'skip' (warning naming file:line, counted) or 'raise' (DataError naming file:line).
  too_long: example longer than seq_len -> 'truncate' | 'skip' (warning) | 'raise'.
  eval_fraction: held-out share of `paths` for evaluation when no eval_paths are given (0 = no eval split).
  num_workers: Grain worker processes (0 = load in the main process; the default, right for CPU runs).
    Workers are started with 'spawn': the training script must guard its entry with `if __name__ == '__main__':`.
  num_threads / prefetch: > 0: the next batches are tokenised and packed in a background thread, up to
    `prefetch` rows ahead (the row streams share it); 0: in the training loop's thread.
  packing_bins: open bins of the first-fit packer (more bins -> fuller rows, more memory).
  text_eos_token: the token that ends each plain-text document (`text` records, plain-text DPO completions);
    null: the tokenizer's document separator (`<|endoftext|>`, `<|end_of_text|>` or `</s>`, whichever its
    vocabulary holds), else its eos. A chat tokenizer's eos usually ends a turn (SmolLM2: `<|im_end|>`).
  """
  paths: tuple[str, ...] = ()
  format: str = "auto"
  seq_len: int = 512
  batch_size: int = 8
  shuffle: bool = True
  seed: int = 0
  on_error: str = "raise"
  too_long: str = "truncate"
  eval_fraction: float = 0.0
  eval_paths: tuple[str, ...] = ()
  num_workers: int = 0
  num_threads: int = 4
  prefetch: int = 64
  packing_bins: int = 8
  text_eos_token: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "paths", _as_paths(self.paths, "paths"))
    object.__setattr__(self, "eval_paths", _as_paths(self.eval_paths, "eval_paths"))
    if self.format not in FORMATS:
      raise ConfigError(f"data.format must be one of {'|'.join(FORMATS)}, got {self.format!r}")
    if self.on_error not in ON_ERROR:
      raise ConfigError(f"data.on_error must be one of {'|'.join(ON_ERROR)}, got {self.on_error!r}")
    if self.too_long not in TOO_LONG:
      raise ConfigError(f"data.too_long must be one of {'|'.join(TOO_LONG)}, got {self.too_long!r}")
    for name in ("seq_len", "batch_size", "packing_bins"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"data.{name} must be a positive integer, got {v!r}")
    for name in ("num_workers", "num_threads", "prefetch", "seed"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"data.{name} must be a non-negative integer, got {v!r}")
    if self.seq_len < 2:
      raise ConfigError(f"data.seq_len must be >= 2 (next-token targets), got {self.seq_len}")
    eos = self.text_eos_token
    if eos is not None and (not isinstance(eos, str) or not eos):
      raise ConfigError(f"data.text_eos_token must be a token string or null, got {eos!r}")
    if not isinstance(self.shuffle, bool):
      raise ConfigError(f"data.shuffle must be true or false, got {self.shuffle!r}")
    if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
        or not 0.0 <= self.eval_fraction < 1.0:
      raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
    if self.eval_fraction and self.eval_paths:
      raise ConfigError("data.eval_fraction and data.eval_paths are exclusive: give one of them")

  @classmethod
  def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
    """Builds from a recipe mapping; unknown keys are rejected by name."""
    d = dict(d or {})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
      raise ConfigError(f"unknown config key(s): {', '.join('data.' + k for k in unknown)} "
                        f"(allowed in data: {', '.join(sorted(allowed))})")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["paths"], d["eval_paths"] = list(self.paths), list(self.eval_paths)
    return d
