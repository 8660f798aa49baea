"""The Grain pipeline: records -> process shard -> shuffle/repeat -> tokenise -> pack -> batch.

Per-process batches (b = batch_size // process_count, L = seq_len), all int32:
  SFT / text (packed):  tokens [b, L], segment_ids [b, L] (1, 2, ... per document, 0 = padding),
                        loss_mask [b, L] with loss_mask[t] = 1 iff -log p(tokens[t+1] | ...) counts
                        (0 on each document's last token and on padding: no label crosses a boundary).
                        Positions are implicit (they restart per segment, as model.hybrid.forward computes).
  DPO (one pair a row): chosen_tokens, chosen_mask, chosen_segment_ids, rejected_tokens, rejected_mask,
                        rejected_segment_ids, each [b, L]; masks follow the same convention, 0 on the prompt.
Labels are `tokens` shifted left by one inside the row: targets[:, t] = tokens[:, t+1] wherever loss_mask = 1.

The returned object is a grain.IterDataset; `iter(ds)` is a grain DatasetIterator whose get_state() /
set_state() resume the stream exactly (shuffle order, packing bins and epoch included).
"""
from __future__ import annotations

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


class _PadBatch:
  """Pads a short final eval batch with empty rows (segment 0, mask 0) so shapes stay static for jit."""

  def __init__(self, rows: int):
    self.rows = rows

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.pad(v, [(0, self.rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _absl_flags_parsed():
  """Grain's worker processes read absl flags; outside an absl app nothing parses them, so accept the
  defaults (otherwise the first batch fails with UnparsedFlagAccessError)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(cfg: DataConfig, tokenizer, *, seed: int | None = None, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 records: RecordSource | None = None) -> grain.IterDataset:
  """Builds this process's stream of batches (see the module doc for the arrays and shapes).

  seed: shuffle / packing seed (default cfg.seed). split='train' repeats forever, reshuffling each epoch;
  split='eval' is one ordered pass whose last batch is padded with empty rows.
  process_index / process_count: default jax.process_index() / jax.process_count(); each process reads a
  disjoint shard (record i goes to process i % process_count) and yields batch_size // process_count rows.
  records: an already-loaded RecordSource (skips re-reading; e.g. to inspect `records.report` first).
  """
  seed = cfg.seed if seed is None else seed
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} out of range for process_count={pc}")
  if cfg.batch_size % pc:
    raise ConfigError(f"data.batch_size={cfg.batch_size} is not a multiple of the {pc} JAX processes")
  rows = cfg.batch_size // pc
  src = load_records(cfg, split) if records is None else records
  if len(src) < pc:
    raise ConfigError(f"{len(src)} records cannot be shared by {pc} processes")
  log.info("data %s: %r, process %d/%d, %d rows a batch", split, src, pi, pc, rows)

  train = split == "train"
  ds = grain.MapDataset.source(src)[pi::pc]
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed)
    ds = ds.repeat(None)  # reshuffled each epoch
  ds = ds.map(Tokenize(tokenizer, cfg.seq_len, cfg.too_long, cfg.on_error, cfg.text_eos_token))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
  if src.kind != "dpo":
    L = cfg.seq_len
    it = gx.FirstFitPackIterDataset(it, length_struct={"tokens": L, "loss_mask": L},
                                    num_packing_bins=cfg.packing_bins, seed=seed,
                                    shuffle_bins=train and cfg.shuffle)
    it = it.map(_packed_row)
  it = it.batch(rows, drop_remainder=train)
  if not train:
    it = it.map(_PadBatch(rows))
  if cfg.num_workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return it
