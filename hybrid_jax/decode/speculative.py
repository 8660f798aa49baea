"""Speculative decoding (docs/DESIGN.md §5): a draft model proposes k tokens, the target verifies them in one call.

One round, per sequence (L = tokens in the target's cache; `pending` = the last emitted token, not yet in any
cache; `prev` = the token at L - 1):
  1. draft: one call on [prev, pending] at position L - 1 (re-running prev costs nothing extra on a memory-
     bound step and lets the draft catch up after a fully accepted round), then k - 1 one-token calls;
     -> draft tokens d_1..d_k and, when sampling, the draft distributions q_1..q_k.
  2. target: ONE call on [pending, d_1..d_k] (k + 1 tokens) -> distributions p_1..p_{k+1}.
  3. acceptance (`greedy_accept` / `sampling_accept`): the first n draft tokens are accepted, then one more
     token comes from the target (its correction, a residual resample, or the bonus token when n = k).
  4. rollback: both caches' pos are set per sequence (target L + n + 1, draft L + n); Mamba layers replay the
     valid cached steps at their next call (hybrid_jax/model/mixer.py).
Model-free draft: `NgramDraft` (prompt lookup) replaces step 1 by a search of the sequence so far for the last
n tokens; its proposals are deterministic (a one-hot q), so greedy and sampled outputs stay exact.
Everything, prefill included, runs in one jitted function; the rounds are a lax.while_loop (no host round trip
per token). Sequences advance by different amounts; a finished sequence keeps running with no advance.

Benchmarking / research hook: `draft_hook(logits, gen_idx, key, hook_args) -> logits` rewrites each draft
distribution before its token is picked (gen_idx [b]: the index among the generated tokens at which the proposal
would land). The draft model still runs in full. Exactness does not depend on the proposals (greedy output is the
target's; sampling accepts against the rewritten q), so a hook changes only speed. `controlled_acceptance_hook`
proposes a known continuation with probability alpha per token: measured speedups at a chosen acceptance rate.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig
from hybrid_jax.decode.generate import fill_cache, last_logits, left_pad
from hybrid_jax.decode.sampling import is_greedy, processed_logprobs, sample_logits
from hybrid_jax.model import hybrid

Array = jax.Array
DraftHook = Callable[[Array, Array, Array, Any], Array]  # (logits [b, V], gen_idx [b], key, hook_args) -> logits


# ------------------------------------------------------------------------------------------------
# Acceptance rules
def _leading_true(ok: Array) -> Array:
  """[b, k] bool -> [b] int32: length of the all-True prefix."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def greedy_accept(draft_tokens: Array, target_logits: Array, limit: Array | None = None
                  ) -> tuple[Array, Array]:
  """Exact-match acceptance. draft_tokens [b, k]; target_logits [b, k+1, V]; limit (scalar int, optional):
  only the first `limit` draft tokens were proposed (the rest are padding, never accepted).

  Returns (n [b] accepted draft tokens, next [b]: the target's argmax after them: its correction at the first
  mismatch, or the bonus token when all proposals match).
  """
  best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [b, k+1]
  ok = draft_tokens == best[:, :-1]
  if limit is not None:
    ok = ok & (jnp.arange(ok.shape[1]) < limit)
  n = _leading_true(ok)
  return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def sampling_accept(key: Array, draft_tokens: Array, draft_logp: Array, target_logp: Array,
                    limit: Array | None = None) -> tuple[Array, Array]:
  """Speculative sampling (Leviathan et al. / Chen et al.): the output is distributed exactly as the target's.

  draft_tokens [b, k] sampled from draft_logp [b, k, V]; target_logp [b, k+1, V] (both already processed
  by temperature / top-k / top-p). d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first
  rejection the next token is drawn from normalize(max(0, p - q)); after k acceptances from p_{k+1}.
  limit (scalar int, optional): only the first `limit` tokens were proposed; after `limit` acceptances the
  next token comes from p_{limit+1}. Returns (n [b], next [b]).
  """
  b, k = draft_tokens.shape
  k_u, k_next = jax.random.split(key)
  p = jnp.exp(target_logp.astype(jnp.float32))
  q = jnp.exp(draft_logp.astype(jnp.float32))
  p_tok = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [b, k]
  q_tok = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_u, (b, k))
  ok = u * q_tok < p_tok  # u < p/q without dividing by q
  if limit is not None:
    ok = ok & (jnp.arange(k) < limit)
  n = _leading_true(ok)
  q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # position k: no draft, residual = p
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [b, V]
  q_n = jnp.take_along_axis(q_ext, n[:, None, None], axis=1)[:, 0]
  if limit is not None:  # past the proposals: no draft there either
    q_n = jnp.where((n < limit)[:, None], q_n, 0.0)
  resid = jnp.maximum(p_n - q_n, 0.0)
  # p == q exactly leaves no residual mass, but then rejection has probability 0; fall back to p for safety.
  resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_n)
  nxt = jax.random.categorical(k_next, jnp.log(resid), axis=-1).astype(jnp.int32)
  return n, nxt


def choose_k(accepted: Array, rejected: Array, k_max: int, draft_cost: float) -> Array:
  """Round length for measured acceptance: argmax over k in 1..k_max of the expected speedup
      (1 - a^(k+1)) / ((1 - a) (1 + c k))
  (tokens per target call over the round's cost in target calls; c = draft_cost, one draft step's cost as a
  fraction of a target call; the target's verification is taken as flat in k, as in a memory-bound step).
  a = (accepted + 1) / (accepted + rejected + 2): the per-token acceptance measured so far (accepted proposals
  and rounds that ended in a rejection), with a uniform prior. Returns k (int32 scalar).
  """
  a = (accepted.astype(jnp.float32) + 1.0) / (accepted + rejected + 2.0).astype(jnp.float32)
  ks = jnp.arange(1, k_max + 1, dtype=jnp.float32)
  speedup = (1.0 - a ** (ks + 1.0)) / ((1.0 - a) * (1.0 + draft_cost * ks))
  return (jnp.argmax(speedup) + 1).astype(jnp.int32)


def controlled_acceptance_hook(logits: Array, gen_idx: Array, key: Array, hook_args: tuple[Array, Array]
                               ) -> Array:
  """A `draft_hook` for benchmarks: acceptance at a chosen rate, with the draft's full cost.

  hook_args = (cont [b, n] int32: the target's own greedy continuation of each prompt, alpha: scalar).
  Each proposal is cont[gen_idx] with probability alpha (i.i.d. per token) and otherwise a wrong token (the
  draft's own argmax, or the next id where that happens to be right). Greedy verification then accepts each
  proposal with probability alpha given the earlier ones: mean accepted length sum_{i<=k} alpha^i.
  Returns one-hot logits (0 on the proposal, -inf elsewhere).
  """
  cont, alpha = hook_args
  v = logits.shape[-1]
  right = jnp.take_along_axis(cont, jnp.clip(gen_idx, 0, cont.shape[1] - 1)[:, None], axis=1)[:, 0]
  own = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # uses the logits: the draft's LM head is not dead code
  wrong = jnp.where(own == right, (right + 1) % v, own)
  tok = jnp.where(jax.random.uniform(key, right.shape) < alpha, right, wrong)
  return jnp.where(jnp.arange(v)[None, :] == tok[:, None], 0.0, -jnp.inf)


# ------------------------------------------------------------------------------------------------
# Prompt lookup: a draft without a model
@dataclasses.dataclass(frozen=True)
class NgramDraft:
  """Prompt-lookup (n-gram) draft: costs no model call. Each round proposes the k tokens that followed the
  most recent earlier occurrence of the last n tokens of the sequence (prompt + generated so far); without
  one, of the last n - 1 tokens, ... down to min_n. Pays off where answers copy from the prompt or repeat
  themselves (code edits, summaries, extraction, lists). Pass it as the draft: `speculative_generate(params,
  cfg, NgramDraft(3), None, ...)`."""
  n: int = 3
  min_n: int = 1

  def __post_init__(self):
    if not 1 <= self.min_n <= self.n:
      raise ValueError(f"NgramDraft needs 1 <= min_n <= n, got n={self.n}, min_n={self.min_n}")


def ngram_propose(hist: Array, end: Array, k: int, n: int = 3, min_n: int = 1) -> tuple[Array, Array]:
  """The proposals of `NgramDraft(n, min_n)`.

  hist [b, T] int32: each row's tokens, -1 where there is none (left padding, not generated yet); end [b]:
  the row's length (its last token at end - 1). A match ends at some j <= end - 2 and agrees with the last m
  tokens (min_n <= m <= n); the longest m wins, then the latest j. The proposal continues after j with
  period s = end - 1 - j: token i is hist[j + 1 + i % s] (the plain continuation, or the matched pattern
  repeated where the continuation reaches the end of the sequence). Without a match: the last token, k times.
  Returns (proposals [b, k] int32, matched length m [b], 0 when nothing matched).
  """
  b, t = hist.shape
  idx = jnp.arange(t, dtype=jnp.int32)[None, :]
  agree = jnp.ones((b, t), bool)  # hist[j - i'] == hist[end - 1 - i'] for every i' <= i
  run = jnp.zeros((b, t), jnp.int32)  # length of the agreement ending at j, capped at n
  for i in range(n):
    q_pos = end - 1 - i
    q = jnp.take_along_axis(hist, jnp.clip(q_pos, 0, t - 1)[:, None], axis=1)  # [b, 1]
    shifted = jnp.pad(hist, ((0, 0), (i, 0)), constant_values=-1)[:, :t]  # shifted[:, j] = hist[:, j - i]
    agree = agree & (shifted == q) & ((q_pos >= 0) & (q[:, 0] >= 0))[:, None]
    run = run + agree.astype(jnp.int32)
  score = jnp.where((idx <= end[:, None] - 2) & (run >= min_n), run * t + idx, -1)
  best = jnp.argmax(score, axis=1).astype(jnp.int32)
  found = jnp.max(score, axis=1) >= 0
  period = jnp.maximum(end - 1 - best, 1)
  src = best[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None, :] % period[:, None]
  prop = jnp.take_along_axis(hist, jnp.clip(src, 0, t - 1), axis=1)
  last = jnp.take_along_axis(hist, jnp.clip(end - 1, 0, t - 1)[:, None], axis=1)
  prop = jnp.maximum(jnp.where(found[:, None], prop, last), 0)  # always a valid token id
  return prop, jnp.where(found, jnp.take_along_axis(run, best[:, None], axis=1)[:, 0], 0)


def layer_skip_draft(params: dict, cfg: ModelConfig, layers: Sequence[int]) -> tuple[dict, ModelConfig]:
  """A self-draft: the target's embedding, final norm, head and the decoder layers listed (in order), with no
  weights of its own (the arrays are the target's). Returns (draft params, draft config) for
  `speculative_generate`; it keeps its own caches like any draft model."""
  layers = sorted({int(i) for i in layers})
  if not layers or layers[0] < 0 or layers[-1] >= cfg.num_hidden_layers:
    raise ValueError(f"layer_skip_draft: layers must be a non-empty subset of 0..{cfg.num_hidden_layers - 1},"
                     f" got {layers}")
  dparams = {name: value for name, value in params.items() if not name.startswith("layers_")}
  dparams.update({f"layers_{new}": params[f"layers_{old}"] for new, old in enumerate(layers)})
  attn = None
  if cfg.attn_layers is not None:
    attn = tuple(new for new, old in enumerate(layers) if cfg.is_attention(old))
  return dparams, cfg.replace(num_hidden_layers=len(layers), attn_layers=attn)


def shared_layers(params: dict, draft_params: dict | None) -> tuple[int, ...] | None:
  """For a draft made of the target's own arrays (`layer_skip_draft`): the target layer of each draft layer;
  None for any other draft (an object-identity check, so a copy does not count)."""
  if not isinstance(draft_params, dict):
    return None
  if any(params.get(name) is not v for name, v in draft_params.items() if not name.startswith("layers_")):
    return None
  index = {id(v): int(name[len("layers_"):]) for name, v in params.items() if name.startswith("layers_")}
  try:
    return tuple(index[id(draft_params[f"layers_{i}"])] for i in range(hybrid.num_layers(draft_params)))
  except KeyError:
    return None


def resolve_draft(spec: str, params: dict, cfg: ModelConfig, ngram_n: int = 3):
  """A draft named by a string, for the target (params, cfg): 'ngram' (prompt lookup, `NgramDraft(ngram_n)`),
  'self:0,1,2' (`layer_skip_draft` of those target layers) or a checkpoint directory. Returns what
  `speculative_generate` takes as (draft_params, draft_cfg): an (NgramDraft, None) or a (params, cfg) pair."""
  if spec == "ngram":
    return NgramDraft(ngram_n), None
  if spec.startswith("self:"):
    try:
      layers = [int(i) for i in spec[len("self:"):].split(",") if i.strip()]
    except ValueError:
      raise ValueError(f"draft {spec!r}: expected self:LAYER,LAYER,...") from None
    return layer_skip_draft(params, cfg, layers)
  from hybrid_jax.checkpoint import load_model
  dparams, dcfg, _ = load_model(spec)
  return dparams, dcfg


# ------------------------------------------------------------------------------------------------
# The jitted loop
def _is_eos(tok: Array, eos: Array) -> Array:
  if eos.shape[0] == 0:
    return jnp.zeros(tok.shape, bool)
  return jnp.any(tok[..., None] == eos, axis=-1)


@functools.partial(jax.jit, static_argnames=("tcfg", "dcfg", "k", "max_new_tokens", "max_len", "temperature",
                                             "top_k", "top_p", "draft_hook", "draft_cost",
                                             "kernel_options", "draft_layers"))
def speculative_loop(tparams: dict, tcfg: ModelConfig, dparams: dict | None, dcfg: ModelConfig | NgramDraft,
                     tokens: Array, offsets: Array, key: Array, eos: Array, hook_args: Any = None, *, k: int,
                     max_new_tokens: int, max_len: int, temperature: float, top_k: int, top_p: float,
                     draft_hook: DraftHook | None = None, draft_cost: float | None = None, kernel_options=None,
                     draft_layers: tuple[int, ...] | None = None) -> tuple[Array, Array, dict]:
  """Prefill + speculative rounds until every row has max_new_tokens tokens or an EOS.

  tokens [b, P] left-padded prompts, offsets [b] their padding counts, eos [n_eos] int32. dparams / dcfg: the
  draft model, or None / an NgramDraft (no model: proposals looked up in the sequence). draft_hook (static)
  and hook_args (traced pytree, model drafts only): see the module docstring. draft_cost (static; None: every
  round proposes k tokens): round length chosen each round by `choose_k` (at most k) from the acceptance
  measured so far, for a draft step costing draft_cost target calls. draft_layers (static): for a draft whose
  layers are target layers (`layer_skip_draft`; `shared_layers` finds them), which ones: its decoding layout
  is then taken from the target's instead of packed again.
  Returns out [b, max_new_tokens] (-1 past a row's end), n_out [b], and stats counters (device scalars).
  """
  b, plen = tokens.shape
  # the rounds' calls run in the decoding layout (hybrid.pack_params), made once after the prefill
  fwd = functools.partial(hybrid.forward, kernel_options=kernel_options, packed=True)  # kernel_options: static
  ngram = isinstance(dcfg, NgramDraft)
  adaptive = draft_cost is not None
  greedy = is_greedy(temperature)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  logp_of = functools.partial(processed_logprobs, temperature=temperature, top_k=top_k, top_p=top_p)

  # Prefill: the target on the whole prompt, the draft on all but the last token (its first round call
  # starts at L - 1 with [prev, pending]).
  tcache = hybrid.init_cache(tcfg, b, max_len).replace(offset=offsets.astype(jnp.int32))
  last_hidden, tcache = fill_cache(tparams, tcfg, tokens, tcache, kernel_options=kernel_options)
  tcache, dcache = hybrid.speculative_cache(tcfg, tcache, k), None
  if not ngram:
    dcache = hybrid.init_cache(dcfg, b, max_len).replace(offset=offsets.astype(jnp.int32))
    if plen > 1:
      _, dcache = fill_cache(dparams, dcfg, tokens[:, :-1], dcache, kernel_options=kernel_options)
    dcache = hybrid.speculative_cache(dcfg, dcache, k)
  prompt_hist = jnp.where(jnp.arange(plen)[None, :] >= offsets[:, None], tokens.astype(jnp.int32), -1)
  key, sub = jax.random.split(key)
  first = sample(last_logits(tparams, tcfg, last_hidden[:, None]), sub)
  tpacked = hybrid.pack_params(tparams, tcfg)
  if ngram:
    dpacked = None
  elif draft_layers is not None:  # the target's packed arrays, not a second copy of them
    dpacked = {name: v for name, v in tpacked.items() if not name.startswith("layers_")}
    dpacked.update({f"layers_{i}": tpacked[f"layers_{j}"] for i, j in enumerate(draft_layers)})
  else:
    dpacked = hybrid.pack_params(dparams, dcfg)
  out = jnp.full((b, max_new_tokens + k + 1), -1, jnp.int32).at[:, 0].set(first)
  done = _is_eos(first, eos) | (max_new_tokens <= 1)
  zero = jnp.int32(0)
  state = {"tcache": tcache, "dcache": dcache, "out": out, "n_out": jnp.ones((b,), jnp.int32), "done": done,
           "prev": tokens[:, -1].astype(jnp.int32), "pending": first, "key": key,
           "rounds": zero, "accepted": zero, "seq_rounds": zero, "rejected": zero, "proposed": zero,
           "k_sum": zero, "k_eff": choose_k(zero, zero, k, draft_cost) if adaptive else jnp.int32(k)}

  def draft_pick(logits, key, gen_idx):
    """logits [b, V] -> (token [b], processed log-probs [b, V] or None when greedy)."""
    if draft_hook is not None:  # fold_in: the pick's own key (sampling) stays as without a hook
      logits = draft_hook(logits, gen_idx, jax.random.fold_in(key, 1), hook_args)
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    lp = logp_of(logits)
    return jax.random.categorical(key, lp, axis=-1).astype(jnp.int32), lp

  def model_draft(st, k_first, k_draft):
    """-> draft [b, k], q [b, k, V] (None when greedy), the draft's cache."""
    dl, dcache = fwd(dpacked, dcfg, jnp.stack([st["prev"], st["pending"]], axis=1),
                                cache=st["dcache"], speculative="commit")
    d1, q1 = draft_pick(dl[:, -1], k_first, st["n_out"])

    def draft_step(carry, xs):
      step_key, i = xs

      def step(carry):
        tok, dc = carry
        lg, dc = fwd(dpacked, dcfg, tok[:, None], cache=dc, speculative="append")
        nxt, q = draft_pick(lg[:, 0], step_key, st["n_out"] + i)
        return (nxt, dc), (nxt, q)

      def skip(carry):  # past this round's length: no draft call, a placeholder never accepted
        return carry, (carry[0], None if greedy else jnp.full((b, dcfg.vocab_size), -jnp.inf, jnp.float32))

      return jax.lax.cond(i < st["k_eff"], step, skip, carry) if adaptive else step(carry)

    (_, dcache), (ds, qs) = jax.lax.scan(draft_step, (d1, dcache),
                                         (jax.random.split(k_draft, k - 1), jnp.arange(1, k, dtype=jnp.int32)))
    draft = jnp.concatenate([d1[:, None], ds.T], axis=1)  # [b, k]
    q = None if greedy else jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
    return draft, q, dcache

  def ngram_draft(st):
    """-> draft [b, k], q [b, k, V] (a deterministic proposal: one-hot; None when greedy), no cache."""
    hist = jnp.concatenate([prompt_hist, st["out"]], axis=1)  # out is -1 past each row's n_out
    draft, _ = ngram_propose(hist, plen + st["n_out"], k, dcfg.n, dcfg.min_n)
    v = tcfg.vocab_size
    q = None if greedy else jnp.where(jnp.arange(v) == draft[..., None], 0.0, -jnp.inf)
    return draft, q, None

  def body(st):
    key, k_first, k_draft, k_acc = jax.random.split(st["key"], 4)
    L = st["tcache"].pos
    # 1. draft k tokens
    draft, q, dcache = ngram_draft(st) if ngram else model_draft(st, k_first, k_draft)
    # 2. verify all k in one target call
    tl, tcache = fwd(tpacked, tcfg, jnp.concatenate([st["pending"][:, None], draft], axis=1),
                     cache=st["tcache"], speculative="commit")
    # 3. accept
    k_eff = st["k_eff"]
    limit = k_eff if adaptive else None
    if greedy:
      n, nxt = greedy_accept(draft, tl, limit)
    else:
      n, nxt = sampling_accept(k_acc, draft, q, logp_of(tl), limit)
    # emit d_1..d_n, next; stop at EOS / max_new_tokens
    j = jnp.arange(k + 1)[None, :]
    cand = jnp.where(j < n[:, None], jnp.pad(draft, ((0, 0), (0, 1))), nxt[:, None])
    eos_at = jnp.where(_is_eos(cand, eos) & (j <= n[:, None]), j, k + 1).min(axis=1)
    count = jnp.minimum(jnp.minimum(n + 1, eos_at + 1), max_new_tokens - st["n_out"])
    count = jnp.where(st["done"], 0, count)
    row = jnp.where(j < count[:, None], cand, -1)
    out = jax.vmap(lambda o, r, s: jax.lax.dynamic_update_slice_in_dim(o, r, s, axis=0))(
        st["out"], row, st["n_out"])
    n_out = st["n_out"] + count
    done = st["done"] | (eos_at < count) | (n_out >= max_new_tokens)
    # 4. roll back: prev/pending/caches move by n + 1 for the rows that were still running
    adv = jnp.where(st["done"], 0, n + 1)
    last_acc = jnp.take_along_axis(draft, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    prev = jnp.where(adv == 0, st["prev"], jnp.where(n == 0, st["pending"], last_acc))
    pending = jnp.where(adv == 0, st["pending"], nxt)
    active = ~st["done"]
    dcache = None if ngram else dcache.replace(pos=L + adv - 1)
    accepted = st["accepted"] + jnp.sum(jnp.where(active, n, 0))
    rejected = st["rejected"] + jnp.sum((active & (n < k_eff)).astype(jnp.int32))
    return {"tcache": tcache.replace(pos=L + adv), "dcache": dcache, "out": out,
            "n_out": n_out, "done": done, "prev": prev, "pending": pending, "key": key,
            "rounds": st["rounds"] + 1, "accepted": accepted,
            "seq_rounds": st["seq_rounds"] + jnp.sum(active.astype(jnp.int32)), "rejected": rejected,
            "proposed": st["proposed"] + jnp.sum(active.astype(jnp.int32)) * k_eff,
            "k_sum": st["k_sum"] + k_eff,
            "k_eff": choose_k(accepted, rejected, k, draft_cost) if adaptive else k_eff}

  st = jax.lax.while_loop(lambda st: ~jnp.all(st["done"]), body, state)
  stats = {name: st[name] for name in ("rounds", "accepted", "seq_rounds", "proposed", "k_sum", "k_eff")}
  return st["out"][:, :max_new_tokens], st["n_out"], stats


# ------------------------------------------------------------------------------------------------
# API
def speculative_generate(target_params: dict, target_cfg: ModelConfig, draft_params: dict | NgramDraft,
                         draft_cfg: ModelConfig | None, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         k: int | str = 4, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, eos_ids: Sequence[int] | None = None, pad_id: int = 0,
                         pad_multiple: int = 16, draft_hook: DraftHook | None = None, hook_args: Any = None,
                         k_max: int = 8, draft_cost: float | None = None, kernel_options=None
                         ) -> tuple[list[list[int]], dict]:
  """Generates like `hybrid_jax.decode.generate.generate` (same output: the new tokens of each prompt, cut
  before the first EOS; identical tokens when greedy), with a draft model proposing k tokens per target call.
  draft_params / draft_cfg: the draft model; or an `NgramDraft` and None (prompt lookup, no model).
  draft_hook / hook_args: benchmarking and research only (module docstring); one compilation serves all
  hook_args of the same shapes. k = "auto": each round proposes `choose_k` tokens (1..k_max) for the
  acceptance measured so far and a draft step costing draft_cost target calls (default: the draft's
  parameter bytes over the target's, as for memory-bound steps; 0 for an NgramDraft).

  Returns (tokens per prompt, stats): accepted_per_step (mean accepted draft tokens per verification, over
  running sequences), tokens_per_step (that + 1), acceptance_rate (accepted / proposed), target_calls
  (verification calls + the prefill), draft_calls, rounds, generated_tokens, k, mean_k (proposals per
  round), k_final (the last round's), compile_seconds (0 when cached), seconds and tokens_per_s (execution
  only: generated tokens of all prompts / seconds).
  """
  adaptive = k == "auto"
  if adaptive:
    k = k_max
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be 'auto' or an integer >= 1, got {k!r}")
  ngram = isinstance(draft_params, NgramDraft)
  if ngram:
    if draft_hook is not None:
      raise ValueError("draft_hook rewrites a draft model's logits; an NgramDraft has none")
    draft_params, draft_cfg = None, draft_params
  elif draft_cfg.vocab_size != target_cfg.vocab_size:
    raise ValueError(f"draft vocab {draft_cfg.vocab_size} != target vocab {target_cfg.vocab_size}: the two "
                     "models must share a tokenizer")
  if not adaptive:
    draft_cost = None
  elif draft_cost is None:
    draft_cost = 0.0 if ngram else _param_bytes(draft_params) / _param_bytes(target_params)
  if max_new_tokens <= 0:
    return [[] for _ in prompts], {}
  eos = tuple(target_cfg.eos_token_id if eos_ids is None else eos_ids)
  tokens, offsets = left_pad(prompts, pad_id, pad_multiple)
  max_len = tokens.shape[1] + max_new_tokens + k + 1  # a verify call writes k + 1 past the last token
  args = (target_params, draft_params, jnp.asarray(tokens), jnp.asarray(offsets), jax.random.PRNGKey(seed),
          jnp.asarray(eos, jnp.int32), hook_args)
  statics = {"k": k, "max_new_tokens": max_new_tokens, "max_len": max_len, "temperature": float(temperature),
             "top_k": int(top_k), "top_p": float(top_p), "draft_hook": draft_hook,
             "draft_cost": None if draft_cost is None else float(draft_cost), "kernel_options": kernel_options,
             "draft_layers": shared_layers(target_params, draft_params)}
  t0 = time.perf_counter()
  run = _compiled_loop(target_cfg, draft_cfg, args, statics)
  t1 = time.perf_counter()
  out, n_out, st = jax.block_until_ready(run(*args))
  t2 = time.perf_counter()
  results = []
  for row, n in zip(np.asarray(out), np.asarray(n_out)):
    seq = []
    for t in row[:n].tolist():
      if t in eos:
        break
      seq.append(t)
    results.append(seq)
  rounds, accepted, seq_rounds, proposed, k_sum = (int(st[name]) for name in
                                                   ("rounds", "accepted", "seq_rounds", "proposed", "k_sum"))
  per_step = accepted / max(seq_rounds, 1)
  stats = {"accepted_per_step": per_step, "tokens_per_step": per_step + 1.0,
           "acceptance_rate": accepted / max(proposed, 1), "target_calls": rounds + 1,
           "draft_calls": 0 if ngram else k_sum + 1, "rounds": rounds, "generated_tokens": int(np.sum(n_out)),
           "k": "auto" if adaptive else k, "mean_k": proposed / max(seq_rounds, 1),
           "k_final": int(st["k_eff"]),
           "compile_seconds": t1 - t0, "seconds": t2 - t1, "tokens_per_s": int(np.sum(n_out)) / (t2 - t1)}
  return results, stats


def _param_bytes(params: dict) -> int:
  return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(params))


_COMPILED: dict = {}


def _compiled_loop(tcfg: ModelConfig, dcfg: ModelConfig, args: tuple, statics: dict):
  """speculative_loop compiled ahead of time (so stats can time execution apart from compilation), cached
  per configs, static arguments and argument shapes/dtypes."""
  tparams, dparams, *arrays = args
  sig = jax.tree_util.tree_map(lambda a: (jnp.shape(a), jnp.result_type(a)), (tparams, dparams, arrays))
  key = (tcfg, dcfg, tuple(sorted(statics.items())), str(sig))
  if key not in _COMPILED:
    if len(_COMPILED) >= 8:  # bounded: drop the oldest executable
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = speculative_loop.lower(tparams, tcfg, dparams, dcfg, *arrays, **statics).compile()
  return _COMPILED[key]


def speculative_generate_text(model, draft, messages, max_new_tokens: int = 256, k: int | str = 4,
                              **sampling) -> tuple[str, dict]:
  """`generate_text` with speculative decoding: (answer, stats of `speculative_generate`).

  model / draft: checkpoint directories or (params, cfg, tokenizer) tuples; the draft needs no tokenizer
  of its own (it must share the target's vocabulary). draft may also be an `NgramDraft` (no model), or a pair
  from `resolve_draft`.
  """
  import os

  from hybrid_jax.decode.generate import chat_ids, load_for_generation
  params, cfg, tok = load_for_generation(model)
  if isinstance(draft, NgramDraft):
    dparams, dcfg = draft, None
  elif isinstance(draft, (str, os.PathLike)):
    from hybrid_jax.checkpoint import load_model
    dparams, dcfg, _ = load_model(os.fspath(draft))
  else:
    dparams, dcfg = draft[0], draft[1]
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  eos = sampling.pop("eos_ids", None)
  if eos is None:  # the same stop set as generate_text
    eos = tuple(dict.fromkeys(tuple(cfg.eos_token_id) + ((tok.eos_token_id,) if tok.eos_token_id is not None
                                                           else ())))
  new, stats = speculative_generate(params, cfg, dparams, dcfg, [chat_ids(tok, messages)], max_new_tokens, k,
                                    eos_ids=eos, **sampling)
  return tok.decode(new[0], skip_special_tokens=True).strip(), stats
