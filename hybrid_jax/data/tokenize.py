"""Tokenisation: chat templates with assistant-only loss masks, plain text, DPO pairs.

Target masks here are per token: target[i] = 1 when token i is something the model should learn to
produce (assistant turns including their end-of-turn token; every token of plain text). `shift_mask`
turns that into the training convention used by every array this package yields:

  loss_mask[t] = 1  <=>  the loss term  -log p(tokens[t+1] | tokens[:t+1])  counts,

i.e. loss_mask[t] = target[t+1] inside one document, and loss_mask is 0 on a document's last token, so no
label ever crosses a document boundary or lands on padding.

The assistant spans are found by rendering the chat template on growing prefixes of the conversation
(prefix-diff): the span of assistant message i is the text between render(msgs[:i], add_generation_prompt)
and render(msgs[:i+1]) (trailing whitespace excluded). This needs no {% generation %} markers, works with
ChatML (SmolLM2), Llama 3 and similar templates, and fails loudly when a template is not prefix-stable.

Plain text (and plain-text DPO completions) ends with the tokenizer's document separator, the token that
separates documents in pretraining text: a chat tokenizer's eos is often the end of a turn instead (SmolLM2-
Instruct: eos `<|im_end|>`, separator `<|endoftext|>`), which would teach the model to close a turn that was
never opened. See `document_end_id`; `data.text_eos_token` overrides the choice.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hybrid_jax.config import ConfigError
from hybrid_jax.data.records import DataError

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 1000
# Document separators of the common tokenizer families, in order of preference: GPT-2 / SmolLM / Qwen / Phi,
# Llama 3, Llama 2 / Mistral (there it is also the eos).
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def shift_mask(target: np.ndarray) -> np.ndarray:
  """[n] per-token targets -> [n] loss mask aligned to predict the next token (last position 0)."""
  out = np.zeros_like(target)
  out[:-1] = target[1:]
  return out


def _render(tokenizer, msgs, gen: bool = False) -> str:
  return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def chat_tokens(tokenizer, messages: list[dict[str, str]], train_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Renders + tokenises a conversation. Returns (ids [n] int32, target [n] int32) where target is 1 on the
  tokens of assistant messages with index >= train_from (the DPO prompt is messages[:train_from])."""
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError("the tokenizer has no chat template; 'messages'/'dpo' records need one")
  full = _render(tokenizer, messages)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant" or i < train_from:
      continue
    start_text = _render(tokenizer, messages[:i], gen=True) if i else ""
    end_text = _render(tokenizer, messages[:i + 1])
    if not (end_text.startswith(start_text) and full.startswith(end_text)):
      raise ValueError(f"chat template is not prefix-stable at message {i}: cannot locate the assistant "
                       "turn by prefix rendering")
    a, b = len(start_text), len(end_text.rstrip())
    if b > a:
      spans.append((a, b))
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  target = np.zeros(len(ids), np.int32)
  off = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)  # [n, 2] character [start, end)
  for a, b in spans:  # a token belongs to the turn when its characters overlap the span
    target |= ((off[:, 0] < b) & (off[:, 1] > a)).astype(np.int32)
  return ids, target


def _token_id(tokenizer, token: str) -> int | None:
  """The id of `token` when it is one token of the vocabulary, else None (unknown tokens map to unk)."""
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
    return None
  return int(tid)


def document_end_id(tokenizer, token: str | None = None) -> int | None:
  """The id appended to each plain-text document.

  token: a token to use instead (data.text_eos_token); it must be a single token of the vocabulary.
  Otherwise the first of DOCUMENT_SEPARATORS that the vocabulary holds, and failing those the tokenizer's eos
  (None when it has none: documents then get no end token).
  """
  if token is not None:
    tid = _token_id(tokenizer, token)
    if tid is None:
      raise ConfigError(f"data.text_eos_token {token!r} is not a token of the tokenizer's vocabulary")
    return tid
  for sep in DOCUMENT_SEPARATORS:
    tid = _token_id(tokenizer, sep)
    if tid is not None:
      return tid
  return tokenizer.eos_token_id


def text_tokens(tokenizer, text: str, bos: bool = True, eos: bool = True, end_id: int | None = None
                ) -> np.ndarray:
  """[n] int32 ids of plain text; with eos, ending in `end_id` (default: document_end_id(tokenizer))."""
  ids = list(tokenizer(text, add_special_tokens=bos)["input_ids"])
  end = (document_end_id(tokenizer) if end_id is None else end_id) if eos else None
  if end is not None and (not ids or ids[-1] != end):
    ids.append(end)
  return np.asarray(ids, np.int32)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
  return np.pad(a, (0, n - len(a))).astype(np.int32)


class Tokenize:
  """Grain map: (location, normalised example) -> dict of numpy arrays, or None (skipped, logged).

  SFT / text -> {"tokens": [n] int32, "loss_mask": [n] int32}, n <= seq_len (packed later).
  DPO        -> {"chosen_tokens", "chosen_mask", "chosen_segment_ids", and rejected_*}: each [seq_len] int32,
                padded with 0 (segment id 0); masks are shifted (see module doc) and 0 on the prompt.
  Counters (`skipped_too_long`, `truncated`, `skipped_bad`) are per process: with Grain workers each worker
  counts its own, and every event is logged as it happens.
  """

  def __init__(self, tokenizer, seq_len: int, too_long: str = "truncate", on_error: str = "raise",
               text_eos_token: str | None = None):
    self.tokenizer, self.seq_len, self.too_long, self.on_error = tokenizer, seq_len, too_long, on_error
    self.end_id = document_end_id(tokenizer, text_eos_token)  # resolved once: a missing token fails here
    self.skipped_too_long = self.truncated = self.skipped_bad = 0
    self._run_of_skips = 0  # consecutive skipped examples: an endless repeat of skips must not hang silently

  def __call__(self, item: tuple[str, dict[str, Any]]) -> dict[str, np.ndarray] | None:
    out = self._convert(item)
    self._run_of_skips = 0 if out is not None else self._run_of_skips + 1
    if self._run_of_skips >= MAX_CONSECUTIVE_SKIPS:
      raise DataError(item[0], f"the last {MAX_CONSECUTIVE_SKIPS} examples were all skipped (too long or "
                      "malformed); check data.seq_len / data.too_long")
    return out

  def _convert(self, item: tuple[str, dict[str, Any]]) -> dict[str, np.ndarray] | None:
    loc, ex = item
    try:
      if ex["kind"] == "dpo":
        return self._dpo(loc, ex)
      if ex["kind"] == "messages":
        ids, target = chat_tokens(self.tokenizer, ex["messages"])
      else:
        ids = text_tokens(self.tokenizer, ex["text"], end_id=self.end_id)
        target = np.ones_like(ids)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 - any template/tokenizer failure: report it with the record's file:line
      return self._bad(loc, f"{type(e).__name__}: {e}")
    if len(ids) > self.seq_len:
      if not self._long(loc, len(ids)):
        return None
      ids, target = ids[:self.seq_len], target[:self.seq_len]
    mask = shift_mask(target)
    if not mask.any():
      log.warning("%s: no trainable tokens within seq_len=%d; dropped", loc, self.seq_len)
      return None
    return {"tokens": ids, "loss_mask": mask}

  # -- helpers
  def _bad(self, loc: str, problem: str) -> None:
    if self.on_error == "raise":
      raise DataError(loc, problem)
    self.skipped_bad += 1
    log.warning("skipping record %s: %s (%d skipped in this process)", loc, problem, self.skipped_bad)

  def _long(self, loc: str, n: int) -> bool:
    """True: truncate it; False: skip it; raises for too_long='raise'."""
    problem = f"example has {n} tokens, more than seq_len={self.seq_len}"
    if self.too_long == "raise":
      raise DataError(loc, problem + " (data.too_long='raise')")
    if self.too_long == "skip":
      self.skipped_too_long += 1
      log.warning("%s: %s; skipped (%d too-long skipped in this process)", loc, problem, self.skipped_too_long)
      return False
    self.truncated += 1
    if self.truncated <= 20:
      log.warning("%s: %s; truncated", loc, problem)
    return True

  def _dpo_side(self, ex: dict, side: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, target, prompt length) of prompt + one completion."""
    if ex["chat"]:
      k = len(ex["prompt"])
      ids, target = chat_tokens(self.tokenizer, ex["prompt"] + ex[side], train_from=k)
      p = int(np.argmax(target)) if target.any() else len(ids)
      return ids, target, p
    p_ids = text_tokens(self.tokenizer, ex["prompt"], bos=True, eos=False)
    c_ids = text_tokens(self.tokenizer, ex[side], bos=False, eos=True, end_id=self.end_id)
    ids = np.concatenate([p_ids, c_ids]).astype(np.int32)
    return ids, np.concatenate([np.zeros_like(p_ids), np.ones_like(c_ids)]), len(p_ids)

  def _dpo(self, loc: str, ex: dict) -> dict[str, np.ndarray] | None:
    out = {}
    L = self.seq_len
    try:
      sides = {s: self._dpo_side(ex, s) for s in ("chosen", "rejected")}
    except Exception as e:  # noqa: BLE001 - as above
      return self._bad(loc, f"{type(e).__name__}: {e}")
    longest = max(len(v[0]) for v in sides.values())
    if longest > L and not self._long(loc, longest):
      return None
    for side, (ids, target, p) in sides.items():
      if len(ids) > L:  # keep the completion's start; cut the prompt from the left only when it must
        c = len(ids) - p
        c_keep = min(c, max(L - p, L // 2))
        p_keep = L - c_keep
        ids = np.concatenate([ids[p - p_keep:p], ids[p:p + c_keep]])
        target = np.concatenate([target[p - p_keep:p], target[p:p + c_keep]])
      mask = shift_mask(target)
      if not mask.any():
        return self._bad(loc, f"DPO {side!r} has no completion tokens within seq_len={L}")
      out[f"{side}_tokens"] = _pad(ids, L)
      out[f"{side}_mask"] = _pad(mask, L)
      out[f"{side}_segment_ids"] = _pad(np.ones(len(ids), np.int32), L)
    return out
