"""The Grain pipeline: records -> one stream per batch row -> shuffle/repeat -> tokenise -> pack -> batch.

Per-process batches (b = the rows this process holds, batch_size // process_count by default, L = seq_len),
all int32:
  SFT / text (packed):  tokens [b, L], segment_ids [b, L] (1, 2, ... per document, 0 = padding),
                        loss_mask [b, L] with loss_mask[t] = 1 iff -log p(tokens[t+1] | ...) counts
                        (0 on each document's last token and on padding: no label crosses a boundary).
                        Positions are implicit (they restart per segment, as model.hybrid.forward computes).
  DPO (one pair a row): chosen_tokens, chosen_mask, chosen_segment_ids, rejected_tokens, rejected_mask,
                        rejected_segment_ids, each [b, L]; masks follow the same convention, 0 on the prompt.
Labels are `tokens` shifted left by one inside the row: targets[:, t] = tokens[:, t+1] wherever loss_mask = 1.

Row streams: row r of every global batch comes from its own stream, which reads records r, r + batch_size,
r + 2 batch_size, ... of the (each epoch reshuffled) record sequence and packs them on its own. A process
reads only the streams of its rows, and the global batches do not depend on how many processes share them:
one process and eight give the same data in the same order, and a checkpoint's data position (one iterator
state per row) carries over exactly when the process count changes (`merge_states`).

The returned object is a grain.IterDataset; `iter(ds)` is a grain DatasetIterator whose get_state() /
set_state() resume the stream exactly (shuffle order, packing bins and epoch included).
"""
from __future__ import annotations

import itertools
import logging

import grain
import jax
import numpy as np
from grain import experimental as gx

from hybrid_jax.config import ConfigError
from hybrid_jax.data.config import DataConfig
from hybrid_jax.data.records import RecordSource
from hybrid_jax.data.tokenize import Tokenize

log = logging.getLogger(__name__)

SFT_KEYS = ("tokens", "segment_ids", "loss_mask")
DPO_KEYS = tuple(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "mask", "segment_ids"))


def load_records(cfg: DataConfig, split: str = "train") -> RecordSource:
  """The validated records of `split` ('train' | 'eval'); malformed ones handled per cfg.on_error.

  With eval_fraction, a fixed (cfg.seed-derived, shuffle-independent) share of `paths` is held out for eval.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if split == "eval" and cfg.eval_paths:
    return RecordSource(cfg.eval_paths, cfg.format, cfg.on_error)
  src = RecordSource(cfg.paths, cfg.format, cfg.on_error)
  if not cfg.eval_fraction:
    if split == "eval":
      raise ConfigError("no eval data: set data.eval_paths or data.eval_fraction")
    return src
  n = len(src)
  n_eval = max(1, round(cfg.eval_fraction * n))
  if n_eval >= n:
    raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} leaves no training records (of {n})")
  perm = np.random.default_rng([cfg.seed, 0x5EED]).permutation(n)
  return src.select(np.sort(perm[:n_eval] if split == "eval" else perm[n_eval:]))


def _packed_row(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = x["tokens_segment_ids"].astype(np.int32)
  return {"tokens": x["tokens"].astype(np.int32), "segment_ids": seg,
          "loss_mask": (x["loss_mask"] * (seg > 0)).astype(np.int32)}


class _RowStreams(grain.IterDataset):
  """Stacks one row from each stream into a batch. Training streams never end; in an eval pass a stream that
  has run out gives empty rows (segment 0, mask 0) until all have, so shapes stay static for jit."""

  def __init__(self, streams: list[grain.IterDataset], rows: list[int], batch_size: int,
               empty_row: dict[str, np.ndarray]):
    super().__init__(streams)
    self.rows, self.batch_size, self.empty_row = rows, batch_size, empty_row

  def __iter__(self) -> _RowStreamsIterator:
    return _RowStreamsIterator(self)


class _RowStreamsIterator(grain.DatasetIterator):

  def __init__(self, ds: _RowStreams):
    super().__init__([p.__iter__() for p in ds.parents])
    self._rows, self._batch_size, self._empty = ds.rows, ds.batch_size, ds.empty_row
    self._done = [False] * len(self._rows)

  def __next__(self) -> dict[str, np.ndarray]:
    out = []
    for i, it in enumerate(self._parents):
      if not self._done[i]:
        try:
          out.append(next(it))
          continue
        except StopIteration:
          self._done[i] = True
      out.append(self._empty)
    if all(self._done):
      raise StopIteration
    return {k: np.stack([r[k] for r in out]) for k in self._empty}

  def get_state(self) -> dict:
    """Each stream's state under its global row: states saved by any number of processes combine
    (merge_states) into the position of any other split of the rows."""
    return {"batch_size": self._batch_size,
            "row_streams": {str(r): it.get_state() for r, it in zip(self._rows, self._parents)}}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or "row_streams" not in state:
      raise ConfigError(_NOT_PER_ROW)
    if state.get("batch_size") != self._batch_size:
      raise ConfigError(f"the saved data position is for data.batch_size={state.get('batch_size')}, not "
                        f"{self._batch_size}: rows are read from other records")
    streams = state["row_streams"]
    missing = [r for r in self._rows if str(r) not in streams]
    if missing:
      raise ConfigError(f"the saved data position lacks the streams of batch rows {missing[:8]}")
    for r, it in zip(self._rows, self._parents):
      it.set_state(streams[str(r)])
    self._done = [False] * len(self._rows)


_NOT_PER_ROW = ("the checkpoint's data position is not kept per batch row (written with data.num_workers > 0 "
                "by another number of processes, or by an earlier version): resume it as it was saved")


def merge_states(states: list[dict]) -> dict:
  """Iterator states saved by every process of a run (any number of them) -> one state that any process can
  set: it picks the streams of its own rows. Raises ConfigError for states that are not per-row."""
  if not states or any(not isinstance(st, dict) or "row_streams" not in st for st in states):
    raise ConfigError(_NOT_PER_ROW)
  sizes = {st.get("batch_size") for st in states}
  if len(sizes) != 1:
    raise ConfigError(f"the saved data positions disagree on data.batch_size ({sorted(map(str, sizes))})")
  streams = {r: s for st in states for r, s in st["row_streams"].items()}
  return {"batch_size": sizes.pop(), "row_streams": streams}


def process_rows(batch_size: int, process_index: int, process_count: int) -> list[int]:
  """The global batch rows a process yields when processes hold contiguous, equal blocks of the batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
  if batch_size % process_count:
    raise ConfigError(f"data.batch_size={batch_size} is not a multiple of the {process_count} JAX processes")
  n = batch_size // process_count
  return list(range(process_index * n, (process_index + 1) * n))


def _empty_row(kind: str, seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros(seq_len, np.int32) for k in (DPO_KEYS if kind == "dpo" else SFT_KEYS)}


def _absl_flags_parsed():
  """Grain's worker processes read absl flags; outside an absl app nothing parses them, so accept the
  defaults (otherwise the first batch fails with UnparsedFlagAccessError)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(cfg: DataConfig, tokenizer, *, seed: int | None = None, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 records: RecordSource | None = None, rows: list[int] | None = None) -> grain.IterDataset:
  """Builds this process's stream of batches (see the module doc for the arrays and shapes).

  seed: shuffle / packing seed (default cfg.seed). split='train' repeats forever, reshuffling each epoch;
  split='eval' is one ordered pass; rows whose stream has run out are empty (padding) until every stream has.
  rows: the global batch rows (0 <= r < batch_size) this process yields, in order; default: the contiguous
  block process_index of process_count (jax.process_index() / jax.process_count() unless given). Each row's
  stream reads its own records (record i of an epoch goes to row i % batch_size).
  records: an already-loaded RecordSource (skips re-reading; e.g. to inspect `records.report` first).
  """
  seed = cfg.seed if seed is None else seed
  if rows is None:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = process_rows(cfg.batch_size, pi, pc)
  rows = [int(r) for r in rows]
  if not rows or any(not 0 <= r < cfg.batch_size for r in rows):
    raise ValueError(f"rows {rows} must be a non-empty list of batch rows in [0, {cfg.batch_size})")
  src = load_records(cfg, split) if records is None else records
  log.info("data %s: %r, rows %d..%d of %d", split, src, rows[0], rows[-1], cfg.batch_size)

  train = split == "train"
  ds = grain.MapDataset.source(src)
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed)
    ds = ds.repeat(None)  # reshuffled each epoch
  streams = [_row_stream(ds[r::cfg.batch_size], cfg, tokenizer, src.kind, seed, train) for r in rows]
  it = _RowStreams(streams, rows, cfg.batch_size, _empty_row(src.kind, cfg.seq_len))
  if cfg.num_workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  elif cfg.num_threads > 0:  # tokenising and packing the next batches overlaps the training step
    it = gx.ThreadPrefetchIterDataset(it, prefetch_buffer_size=max(1, cfg.prefetch // len(rows)))
  return it


def _row_stream(ds: grain.MapDataset, cfg: DataConfig, tokenizer, kind: str, seed: int,
                train: bool) -> grain.IterDataset:
  """One batch row's records -> tokenised (and packed) rows of seq_len, one at a time."""
  ds = ds.map(Tokenize(tokenizer, cfg.seq_len, cfg.too_long, cfg.on_error, cfg.text_eos_token))
  # read in the caller's thread: the batch-level prefetch (or the worker processes) runs all streams at once
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if kind != "dpo":
    L = cfg.seq_len
    it = gx.FirstFitPackIterDataset(it, length_struct={"tokens": L, "loss_mask": L},
                                    num_packing_bins=cfg.packing_bins, seed=seed,
                                    shuffle_bins=train and cfg.shuffle)
    it = it.map(_packed_row)
  return it


def load_eval_batches(cfg: DataConfig, tokenizer, n_max: int, *, rows: list[int] | None = None) -> list[dict]:
  """Up to n_max batches of the eval pass, as many on every process: the processes' streams run out at
  different times, so each pads with empty batches up to the largest count (their eval steps must pair up)."""
  src = load_records(cfg, "eval")
  rows = process_rows(cfg.batch_size, jax.process_index(), jax.process_count()) if rows is None else rows
  ds = make_dataset(cfg, tokenizer, split="eval", records=src, rows=rows)
  out = list(itertools.islice(iter(ds), n_max))
  n = len(out)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
  empty = {k: np.zeros((len(rows), cfg.seq_len), np.int32) for k in _empty_row(src.kind, cfg.seq_len)}
  return out + [empty] * (n - len(out))
