"""lm-evaluation-harness model `hybrid_jax`: a hybrid_jax checkpoint (teacher, hybrid, draft) as a harness LM.

  python -m hybrid_jax.evaluate --model DIR --tasks arc_easy,hellaswag        # our CLI (prints the table)
  python -m hybrid_jax.evaluate.lm_eval_cli --model hybrid_jax \\
      --model_args path=DIR,dtype=bfloat16,batch_size=16 --tasks arc_easy     # lm-eval's own CLI

Importing this module registers the class under the name `hybrid_jax` (the harness has no plugin discovery for
models, so the module must be imported before the harness looks the name up; `lm_eval_cli` does that).

The three request types follow lm-eval's `HFLM` (transformers) so that scores are comparable:
  loglikelihood          (context, continuation) -> (log p(continuation), is it the greedy continuation)
  loglikelihood_rolling  text -> log p(text), in windows of max_length tokens predicting each token once
  generate_until         (context, gen_kwargs) -> text, cut at the first stop sequence
Tokenisation (BOS handling, moving trailing spaces into the continuation), left truncation to max_length and
the chat template are HFLM's. Scoring packs requests longest-first into rows of a bucketed length (a power of
two) with segment ids, so a few compiled shapes serve a whole task and short requests share rows.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# The harness imports its built-in model table only while its registry is empty: load it before adding ours,
# or `--model hf` would stop resolving in this process.
import lm_eval.models  # noqa: F401
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from hybrid_jax.config import ModelConfig

Array = jax.Array
log = logging.getLogger(__name__)

MODEL_NAME = "hybrid_jax"


# ---- the model API: the only two places this module calls the model ----------------------------------------
def forward_logits(params: dict, cfg: ModelConfig, tokens: Array, segment_ids: Array) -> Array:
  """Logits [b, t, V] (fp32) of right-padded packed rows: tokens [b, t] int32, segment_ids [b, t] int32 with
  one id per packed request (positions restart at 0 in each) and 0 for padding."""
  from hybrid_jax.model import hybrid
  logits, _ = hybrid.forward(params, cfg, tokens, segment_ids=segment_ids)
  return logits


def generate_tokens(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    stop_ids: Sequence[int], prompt_length: int, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """New tokens of each prompt: up to max_new_tokens, ending with the first token in stop_ids if one came.

  Prompts are left-padded to prompt_length (a multiple of it: one compiled shape per bucket). The stopping
  token is kept (unlike `generate`, which drops it): a stop string may begin in the text before it.
  """
  from hybrid_jax.decode.generate import decode_loop, left_pad, prefill
  tokens, offsets = left_pad(prompts, 0, prompt_length)
  max_len = tokens.shape[1] + max_new_tokens
  last, cache = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(offsets), max_len)
  out, _, _ = decode_loop(params, cfg, last, cache, jax.random.PRNGKey(seed), jnp.asarray(stop_ids, jnp.int32),
                          max_new_tokens, float(temperature), int(top_k), float(top_p))
  stops = set(stop_ids)
  results = []
  for row in np.asarray(out).tolist():
    seq = []
    for t in row:
      if t < 0:
        break
      seq.append(t)
      if t in stops:
        break
    results.append(seq)
  return results


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rows(params: dict, cfg: ModelConfig, tokens: Array, segment_ids: Array, targets: Array
               ) -> tuple[Array, Array]:
  """log p(targets) [b, t] fp32 and whether each target is the argmax [b, t] bool, for packed rows."""
  logits = forward_logits(params, cfg, tokens, segment_ids)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


# ---- packing -----------------------------------------------------------------------------------------------
def length_bucket(n: int, cap: int, smallest: int = 64) -> int:
  """Row length for n tokens: the next power of two >= max(n, smallest), at most max(cap, n)."""
  b = max(smallest, 1 << max(n - 1, 0).bit_length())
  return max(min(b, cap), n)


@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """One scoring call: `rows` rows of `length` tokens; slots are (request index, row, start) triples."""
  length: int
  rows: int
  slots: tuple[tuple[int, int, int], ...]


def plan_batches(lengths: Sequence[int], rows: int, cap: int, *, pack: bool = True, smallest: int = 64,
                 max_batch_tokens: int = 0) -> list[PackedBatch]:
  """Places sequences of the given lengths into batches, longest first.

  Each batch has one bucketed row length (that of its longest sequence) and `rows` rows (fewer when
  rows * length would pass max_batch_tokens > 0). With pack, shorter sequences fill the rows' free space
  first-fit (each keeps its own segment); without, one sequence per row (right padding only).
  """
  if rows < 1:
    raise ValueError(f"rows must be positive, got {rows}")
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  batches: list[PackedBatch] = []
  length, fill, slots = 0, [], []
  for i in order:
    n = int(lengths[i])
    if n < 1:
      raise ValueError(f"sequence {i} is empty")
    row = next((r for r, f in enumerate(fill) if f + n <= length and (pack or f == 0)), None)
    if row is None:
      if slots:
        batches.append(PackedBatch(length, len(fill), tuple(slots)))
      length = length_bucket(n, cap, smallest)
      n_rows = rows if max_batch_tokens <= 0 else max(1, min(rows, max_batch_tokens // length))
      fill, slots, row = [0] * n_rows, [], 0
    slots.append((i, row, fill[row]))
    fill[row] += n
  if slots:
    batches.append(PackedBatch(length, len(fill), tuple(slots)))
  return batches


# ---- options -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HarnessOptions:
  """How requests are batched and bounded.

  batch_size: rows per scoring call and prompts per generation call (generation rounds it to a power of two).
  max_length: context window in tokens (0: the model's max_position_embeddings, as HFLM reads it).
  max_gen_toks: default cap on generated tokens (a task's gen_kwargs may set its own).
  pack: put several short requests into one row (segment ids keep them apart); off: one request per row.
  min_bucket: the shortest row length; longer rows are powers of two (one compile per length used).
  max_batch_tokens: cap on rows * row length per scoring call (0: none): long rows get fewer rows (the call
    holds [rows, length, vocab] fp32 logits: 8.4 GB at 16384 tokens for a 128k vocabulary).
  add_bos_token / prefix_token_id: as HFLM's (None: the tokenizer's own behaviour, BOS else EOS as prefix).
  seed: sampling seed for generate_until requests with do_sample.
  """
  batch_size: int = 16
  max_length: int = 0
  max_gen_toks: int = 256
  pack: bool = True
  min_bucket: int = 64
  max_batch_tokens: int = 16384
  add_bos_token: bool | None = None
  prefix_token_id: int | None = None
  seed: int = 0

  def __post_init__(self):
    for name in ("batch_size", "max_gen_toks", "min_bucket"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{MODEL_NAME} model_args: {name} must be a positive integer, got {v!r}")
    for name in ("max_length", "max_batch_tokens", "seed"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{MODEL_NAME} model_args: {name} must be a non-negative integer, got {v!r}")
    if not isinstance(self.pack, bool):
      raise ValueError(  # noqa: TRY004  (bad input: one ValueError type for every model_args problem)
          f"{MODEL_NAME} model_args: pack must be True or False, got {self.pack!r}")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """A generate_until request's gen_kwargs, normalised as HFLM does."""
  until: tuple[str, ...]
  max_gen_toks: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def generation_settings(gen_kwargs: dict, default_max_gen_toks: int, eos_text: str | None
                        ) -> GenerationSettings:
  """until (a string or list; the EOS text is added), max_gen_toks (or max_new_tokens), greedy unless
  do_sample.

  do_sample=True without a temperature samples at temperature 1 (transformers' default); top_k / top_p pass
  through; other keys are ignored with a warning.
  """
  kw = dict(gen_kwargs or {})
  until = kw.pop("until", None)
  until = [] if until is None else [until] if isinstance(until, str) else list(until)
  if not all(isinstance(s, str) for s in until):
    raise ValueError(f"gen_kwargs 'until' must be a string or a list of strings, got {until!r}")
  if eos_text and eos_text not in until:
    until.append(eos_text)
  max_gen = kw.pop("max_gen_toks", None)
  alias = kw.pop("max_new_tokens", None)
  max_gen = int(default_max_gen_toks if max_gen is None and alias is None else alias if max_gen is None
                else max_gen)
  do_sample = kw.pop("do_sample", None)
  temperature = float(kw.pop("temperature", 0.0) or 0.0)
  if do_sample is False:
    temperature = 0.0
  elif do_sample and temperature == 0.0:
    temperature = 1.0
  top_k = int(kw.pop("top_k", 0) or 0)
  top_p = float(kw.pop("top_p", 1.0) or 1.0)
  if kw:
    log.warning("%s ignores generation kwargs %s", MODEL_NAME, sorted(kw))
  if max_gen < 1:
    raise ValueError(f"gen_kwargs max_gen_toks must be positive, got {max_gen}")
  return GenerationSettings(tuple(until), max_gen, temperature, top_k, top_p)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """The text before the earliest occurrence of any stop sequence."""
  for s in until:
    if s:
      text = text.split(s)[0]
  return text


def _pow2_at_most(n: int, cap: int) -> int:
  return min(cap, 1 << max(n - 1, 0).bit_length())


# ---- the harness model -------------------------------------------------------------------------------------
@register_model(MODEL_NAME)
class HybridJaxLM(TemplateLM):
  """lm-eval model over a hybrid_jax checkpoint directory (or a loaded (params, cfg, tokenizer) triple).

  model_args: path=DIR (alias pretrained=DIR), dtype=bfloat16|float32|... (params and compute; default: the
  checkpoint's), tokenizer=DIR_OR_HUB_ID (when the checkpoint has none), chat_template_args (a dict; Python
  API only), and HarnessOptions' fields. Values given in model_args win over the CLI's --batch_size default.
  """

  def __init__(self, path: str | None = None, *, pretrained: str | None = None, model: tuple | None = None,
               dtype: str | None = None, tokenizer: Any = None, chat_template_args: dict | None = None,
               device: str | None = None, max_batch_size: int | None = None, batch_size: int | str = 16,
               **options):
    super().__init__()
    fields = {f.name for f in dataclasses.fields(HarnessOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise ValueError(f"{MODEL_NAME} model_args: unknown argument(s) {', '.join(unknown)} (known: path, "
                       f"dtype, tokenizer, {', '.join(sorted(fields))})")
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
      log.warning("%s: batch_size=%s is not supported; using 16", MODEL_NAME, batch_size)
      batch_size = 16
    self.options = HarnessOptions(batch_size=int(batch_size), **options)
    del device, max_batch_size  # JAX places the model on its default backend; batches have a fixed size
    path = path if path is not None else pretrained
    if model is not None:
      params, cfg, tok = model
    elif path is not None:
      params, cfg, tok = load_checkpoint(os.fspath(path), dtype)
    else:
      raise ValueError(f"{MODEL_NAME} model_args: give path=CHECKPOINT_DIR")
    if tokenizer is not None:
      tok = _load_tokenizer(tokenizer)
    if tok is None:
      raise ValueError(f"{path}: the checkpoint has no tokenizer; give tokenizer=DIR in model_args")
    self.params, self.cfg, self.tokenizer = params, cfg, tok
    self.path = None if path is None else os.path.abspath(os.fspath(path))
    self.chat_template_args = dict(chat_template_args or {})

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HybridJaxLM:
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> HybridJaxLM:
    # The CLI always passes batch_size (default 1): model_args given by the user take precedence.
    merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
    merged.update(arg_dict)
    return cls(**merged)

  # ---- properties the harness reads ------------------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    if self.tokenizer.eos_token_id is not None:
      return self.tokenizer.eos_token_id
    return self.cfg.eos_token_id[0]

  @property
  def prefix_token_id(self) -> int:
    if self.options.prefix_token_id is not None:
      return self.options.prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.eot_token_id

  @property
  def max_length(self) -> int:
    return self.options.max_length or self.cfg.max_position_embeddings

  @property
  def max_gen_toks(self) -> int:
    return self.options.max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.options.batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def get_model_info(self) -> dict:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    return {"model_num_parameters": n, "model_dtype": self.cfg.param_dtype, "model_path": self.path,
            "model_mamba_layers": list(self.cfg.ssm_layers)}

  # ---- text <-> tokens (HFLM's rules) ----------------------------------------------------------------------
  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    if add_special_tokens is not None:
      special = {"add_special_tokens": add_special_tokens}
    elif self.options.add_bos_token is not None:
      special = {"add_special_tokens": self.options.add_bos_token}
    else:
      special = {}
    bos_text = self.tokenizer.decode(self.prefix_token_id)
    if add_special_tokens is None and bos_text and string.startswith(bos_text):
      special["add_special_tokens"] = False  # a chat-templated string already starts with BOS
    ids = list(self.tokenizer.encode(string, **special))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
                          ) -> str:
    import jinja2

    def render(history):
      return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                add_generation_prompt=add_generation_prompt,
                                                continue_final_message=not add_generation_prompt,
                                                **self.chat_template_args)
    try:
      return render(chat_history)
    except jinja2.exceptions.TemplateError:
      log.warning("chat template failed; retrying without the system message")
      return render([m for m in chat_history if m["role"] != "system"])

  # ---- loglikelihood ---------------------------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """requests: ((context, continuation) or None, context tokens, continuation tokens) triples."""
    seqs, n_scored = [], []
    for _, ctx, cont in requests:
      if not cont:
        raise ValueError("loglikelihood: a continuation encodes to no tokens")
      if len(cont) > self.max_length:
        raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens exceeds max_length "
                         f"{self.max_length}")
      seqs.append((list(ctx) + list(cont))[-(self.max_length + 1):])  # left-truncated, as HFLM
      n_scored.append(len(cont))
    results = self.score_sequences(seqs, n_scored, disable_tqdm=disable_tqdm)
    for (request, _, _), answer in zip(requests, results):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return results

  def score_sequences(self, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], disable_tqdm: bool = True
                      ) -> list[tuple[float, bool]]:
    """(sum of log p of the last n_scored[i] tokens of seqs[i] given the ones before, all of them greedy).

    Each sequence runs as inputs seq[:-1] predicting seq[1:]; sequences must fit max_length + 1 tokens.
    """
    from tqdm import tqdm
    opts = self.options
    lengths = [len(s) - 1 for s in seqs]
    if any(n < 1 for n in lengths):
      raise ValueError("loglikelihood: every scored sequence needs a context token")
    plan = plan_batches(lengths, opts.batch_size, self.max_length, pack=opts.pack, smallest=opts.min_bucket,
                        max_batch_tokens=opts.max_batch_tokens)
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    bar = tqdm(total=len(seqs), disable=disable_tqdm, desc="loglikelihood")

    def collect(batch: PackedBatch, out) -> None:
      logp, greedy = (np.asarray(x) for x in out)
      for i, row, start in batch.slots:
        end = start + lengths[i]
        sl = slice(end - n_scored[i], end)
        results[i] = (float(logp[row, sl].astype(np.float64).sum()), bool(greedy[row, sl].all()))
      bar.update(len(batch.slots))

    pending = None
    for batch in plan:
      tokens = np.zeros((batch.rows, batch.length), np.int32)
      targets = np.zeros_like(tokens)
      segments = np.zeros_like(tokens)
      next_segment = [1] * batch.rows
      for i, row, start in batch.slots:
        seq = np.asarray(seqs[i], np.int32)
        tokens[row, start:start + lengths[i]] = seq[:-1]
        targets[row, start:start + lengths[i]] = seq[1:]
        segments[row, start:start + lengths[i]] = next_segment[row]
        next_segment[row] += 1
      out = score_rows(self.params, self.cfg, jnp.asarray(tokens), jnp.asarray(segments),
                       jnp.asarray(targets))
      if pending is not None:  # read the previous batch back while this one runs
        collect(*pending)
      pending = (batch, out)
    if pending is not None:
      collect(*pending)
    bar.close()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(lm_utils.make_disjoint_window, pairs):
        windows.append((None, ctx, cont))
        owner.append(k)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, scores):
      totals[k] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---- generation ------------------------------------------------------------------------------------------
  def _stop_token_ids(self, until: Sequence[str]) -> tuple[int, ...]:
    """EOS ids plus every stop string that is exactly one token: generation halts on them on the device."""
    ids = set(self.cfg.eos_token_id) | {self.eot_token_id}
    for s in until:
      enc = self.tokenizer.encode(s, add_special_tokens=False) if s else []
      if len(enc) == 1 and self.tokenizer.decode(enc) == s:
        ids.add(enc[0])
    return tuple(sorted(ids))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from tqdm import tqdm
    args = [req.args for req in requests]
    groups: dict[str, list[int]] = {}
    for k, (_, gen_kwargs) in enumerate(args):  # one batch never mixes different generation settings
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(k)
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    results: list[str | None] = [None] * len(args)
    bar = tqdm(total=len(args), disable=disable_tqdm, desc="generate_until")
    for members in groups.values():
      settings = generation_settings(args[members[0]][1], self.max_gen_toks, eos_text)
      max_ctx = self.max_length - settings.max_gen_toks
      if max_ctx <= 0:
        raise ValueError(f"generate_until: max_gen_toks={settings.max_gen_toks} leaves no room for a context "
                         f"within max_length={self.max_length}")
      encoded = {k: self.tok_encode(args[k][0], left_truncate_len=max_ctx) or [self.prefix_token_id]
                 for k in members}
      order = sorted(members, key=lambda k: (-len(encoded[k]), k))
      stop_ids = self._stop_token_ids(settings.until)
      for lo in range(0, len(order), self.batch_size):
        chunk = order[lo:lo + self.batch_size]
        prompts = [encoded[k] for k in chunk]
        rows = _pow2_at_most(len(prompts), self.batch_size)
        prompts += [prompts[-1]] * (rows - len(prompts))  # a fixed batch shape; the copies are discarded
        new = generate_tokens(self.params, self.cfg, prompts, settings.max_gen_toks, stop_ids=stop_ids,
                              prompt_length=length_bucket(len(prompts[0]), max_ctx, self.options.min_bucket),
                              temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                              seed=self.options.seed)
        for k, toks in zip(chunk, new):
          text = cut_at_stop(self.tok_decode(toks), settings.until)
          results[k] = text
          self.cache_hook.add_partial("generate_until", args[k], text)
        bar.update(len(chunk))
    bar.close()
    return results


def _load_tokenizer(name_or_path: Any):
  if not isinstance(name_or_path, (str, os.PathLike)):
    return name_or_path  # already a tokenizer
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.fspath(name_or_path))


def load_checkpoint(path: str, dtype: str | None = None) -> tuple[dict, ModelConfig, Any]:
  """(params, cfg, tokenizer) of a checkpoint; dtype casts the parameters and sets the compute dtype."""
  from hybrid_jax.checkpoint import load_model
  if dtype in (None, "", "auto"):
    return load_model(path)
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"{MODEL_NAME} model_args: dtype={dtype!r} is not a dtype (e.g. bfloat16, float32)"
                     ) from None
  params, cfg, tok = load_model(path, dtype=dt)
  return params, cfg.replace(dtype=dt.name), tok
