"""Training data: JSONL / Parquet / `datasets` readers, chat tokenisation with assistant-only loss masks,
packing with segment ids, and the Grain pipeline with checkpointable iterator state."""
from hybrid_jax.data.config import DataConfig
from hybrid_jax.data.pipeline import (
  DPO_KEYS,
  SFT_KEYS,
  load_eval_batches,
  load_records,
  make_dataset,
  merge_states,
)
from hybrid_jax.data.records import DataError, ReadReport, RecordSource, normalise, resolve_paths
from hybrid_jax.data.tokenize import Tokenize, chat_tokens, document_end_id, shift_mask, text_tokens

__all__ = [
  "DPO_KEYS", "SFT_KEYS", "DataConfig", "DataError", "ReadReport", "RecordSource", "Tokenize", "chat_tokens",
  "document_end_id", "load_eval_batches", "load_records", "make_dataset", "merge_states", "normalise",
  "resolve_paths", "shift_mask", "text_tokens",
]
