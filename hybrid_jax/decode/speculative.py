"""Speculative decoding (SPEC section 4): a draft model proposes k tokens, the target verifies them in one call.

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
Everything, prefill included, runs in one jitted function; the rounds are a lax.while_loop (no host round trip
per token). Sequences advance by different amounts; a finished sequence keeps running with no advance.

Benchmarking / research hook: `draft_hook(logits, gen_idx, key, hook_args) -> logits` rewrites each draft
distribution before its token is picked (gen_idx [b]: the index among the generated tokens at which the proposal
would land). The draft model still runs in full. Exactness does not depend on the proposals (greedy output is the
target's; sampling accepts against the rewritten q), so a hook changes only speed. `controlled_acceptance_hook`
proposes a known continuation with probability alpha per token: measured speedups at a chosen acceptance rate.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ModelConfig
from hybrid_jax.decode.generate import left_pad
from hybrid_jax.decode.sampling import is_greedy, processed_logprobs, sample_logits
from hybrid_jax.model import hybrid

Array = jax.Array
DraftHook = Callable[[Array, Array, Array, Any], Array]  # (logits [b, V], gen_idx [b], key, hook_args) -> logits


# ------------------------------------------------------------------------------------------------
# Acceptance rules
def _leading_true(ok: Array) -> Array:
  """[b, k] bool -> [b] int32: length of the all-True prefix."""
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def greedy_accept(draft_tokens: Array, target_logits: Array) -> tuple[Array, Array]:
  """Exact-match acceptance. draft_tokens [b, k]; target_logits [b, k+1, V].

  Returns (n [b] accepted draft tokens, next [b]: the target's argmax after them: its correction at the first
  mismatch, or the bonus token when all k match).
  """
  best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [b, k+1]
  n = _leading_true(draft_tokens == best[:, :-1])
  return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def sampling_accept(key: Array, draft_tokens: Array, draft_logp: Array, target_logp: Array
                    ) -> tuple[Array, Array]:
  """Speculative sampling (Leviathan et al. / Chen et al.): the output is distributed exactly as the target's.

  draft_tokens [b, k] sampled from draft_logp [b, k, V]; target_logp [b, k+1, V] (both already processed
  by temperature / top-k / top-p). d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first
  rejection the next token is drawn from normalize(max(0, p - q)); after k acceptances from p_{k+1}.
  Returns (n [b], next [b]).
  """
  b, k = draft_tokens.shape
  k_u, k_next = jax.random.split(key)
  p = jnp.exp(target_logp.astype(jnp.float32))
  q = jnp.exp(draft_logp.astype(jnp.float32))
  p_tok = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [b, k]
  q_tok = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_u, (b, k))
  n = _leading_true(u * q_tok < p_tok)  # u < p/q without dividing by q
  q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # position k: no draft, residual = p
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [b, V]
  q_n = jnp.take_along_axis(q_ext, n[:, None, None], axis=1)[:, 0]
  resid = jnp.maximum(p_n - q_n, 0.0)
  # p == q exactly leaves no residual mass, but then rejection has probability 0; fall back to p for safety.
  resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_n)
  nxt = jax.random.categorical(k_next, jnp.log(resid), axis=-1).astype(jnp.int32)
  return n, nxt


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
# The jitted loop
def _is_eos(tok: Array, eos: Array) -> Array:
  if eos.shape[0] == 0:
    return jnp.zeros(tok.shape, bool)
  return jnp.any(tok[..., None] == eos, axis=-1)


@functools.partial(jax.jit, static_argnames=("tcfg", "dcfg", "k", "max_new_tokens", "max_len", "temperature",
                                             "top_k", "top_p", "draft_hook", "kernel_options"))
def speculative_loop(tparams: dict, tcfg: ModelConfig, dparams: dict, dcfg: ModelConfig, tokens: Array,
                     offsets: Array, key: Array, eos: Array, hook_args: Any = None, *, k: int,
                     max_new_tokens: int, max_len: int, temperature: float, top_k: int, top_p: float,
                     draft_hook: DraftHook | None = None, kernel_options=None) -> tuple[Array, Array, dict]:
  """Prefill + speculative rounds until every row has max_new_tokens tokens or an EOS.

  tokens [b, P] left-padded prompts, offsets [b] their padding counts, eos [n_eos] int32. draft_hook (static)
  and hook_args (traced pytree): see the module docstring. kernel_options: the SSM kernels' `KernelOptions`
  (static; None: the defaults), for target and draft.
  Returns out [b, max_new_tokens] (-1 past a row's end), n_out [b], and stats counters (device scalars).
  """
  b, plen = tokens.shape
  fwd = functools.partial(hybrid.forward, kernel_options=kernel_options)
  greedy = is_greedy(temperature)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  logp_of = functools.partial(processed_logprobs, temperature=temperature, top_k=top_k, top_p=top_p)

  # Prefill: the target on the whole prompt, the draft on all but the last token (its first round call
  # starts at L - 1 with [prev, pending]).
  tcache = hybrid.init_cache(tcfg, b, max_len).replace(offset=offsets.astype(jnp.int32))
  logits, tcache = fwd(tparams, tcfg, tokens, cache=tcache)
  dcache = hybrid.init_cache(dcfg, b, max_len).replace(offset=offsets.astype(jnp.int32))
  if plen > 1:
    _, dcache = fwd(dparams, dcfg, tokens[:, :-1], cache=dcache, return_hidden=True)
  tcache, dcache = hybrid.speculative_cache(tcfg, tcache, k), hybrid.speculative_cache(dcfg, dcache, k)
  key, sub = jax.random.split(key)
  first = sample(logits[:, -1], sub)
  out = jnp.full((b, max_new_tokens + k + 1), -1, jnp.int32).at[:, 0].set(first)
  done = _is_eos(first, eos) | (max_new_tokens <= 1)
  zero = jnp.int32(0)
  state = {"tcache": tcache, "dcache": dcache, "out": out, "n_out": jnp.ones((b,), jnp.int32), "done": done,
           "prev": tokens[:, -1].astype(jnp.int32), "pending": first, "key": key,
           "rounds": zero, "accepted": zero, "seq_rounds": zero}

  def draft_pick(logits, key, gen_idx):
    """logits [b, V] -> (token [b], processed log-probs [b, V] or None when greedy)."""
    if draft_hook is not None:  # fold_in: the pick's own key (sampling) stays as without a hook
      logits = draft_hook(logits, gen_idx, jax.random.fold_in(key, 1), hook_args)
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    lp = logp_of(logits)
    return jax.random.categorical(key, lp, axis=-1).astype(jnp.int32), lp

  def body(st):
    key, k_first, k_draft, k_acc = jax.random.split(st["key"], 4)
    L = st["tcache"].pos
    # 1. draft k tokens
    dl, dcache = fwd(dparams, dcfg, jnp.stack([st["prev"], st["pending"]], axis=1), cache=st["dcache"],
                     speculative="commit")
    d1, q1 = draft_pick(dl[:, -1], k_first, st["n_out"])

    def draft_step(carry, xs):
      tok, dc = carry
      step_key, i = xs
      lg, dc = fwd(dparams, dcfg, tok[:, None], cache=dc, speculative="append")
      nxt, q = draft_pick(lg[:, 0], step_key, st["n_out"] + i)
      return (nxt, dc), (nxt, q)

    (_, dcache), (ds, qs) = jax.lax.scan(draft_step, (d1, dcache),
                                         (jax.random.split(k_draft, k - 1), jnp.arange(1, k, dtype=jnp.int32)))
    draft = jnp.concatenate([d1[:, None], ds.T], axis=1)  # [b, k]
    # 2. verify all k in one target call
    tl, tcache = fwd(tparams, tcfg, jnp.concatenate([st["pending"][:, None], draft], axis=1),
                     cache=st["tcache"], speculative="commit")
    # 3. accept
    if greedy:
      n, nxt = greedy_accept(draft, tl)
    else:
      q = jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
      n, nxt = sampling_accept(k_acc, draft, q, logp_of(tl))
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
    return {"tcache": tcache.replace(pos=L + adv), "dcache": dcache.replace(pos=L + adv - 1), "out": out,
            "n_out": n_out, "done": done, "prev": prev, "pending": pending, "key": key,
            "rounds": st["rounds"] + 1, "accepted": st["accepted"] + jnp.sum(jnp.where(active, n, 0)),
            "seq_rounds": st["seq_rounds"] + jnp.sum(active.astype(jnp.int32))}

  st = jax.lax.while_loop(lambda st: ~jnp.all(st["done"]), body, state)
  stats = {name: st[name] for name in ("rounds", "accepted", "seq_rounds")}
  return st["out"][:, :max_new_tokens], st["n_out"], stats


# ------------------------------------------------------------------------------------------------
# API
def speculative_generate(target_params: dict, target_cfg: ModelConfig, draft_params: dict,
                         draft_cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         k: int = 4, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, eos_ids: Sequence[int] | None = None, pad_id: int = 0,
                         pad_multiple: int = 16, draft_hook: DraftHook | None = None, hook_args: Any = None,
                         kernel_options=None) -> tuple[list[list[int]], dict]:
  """Generates like `hybrid_jax.decode.generate.generate` (same output: the new tokens of each prompt, cut
  before the first EOS; identical tokens when greedy), with a draft model proposing k tokens per target call.
  draft_hook / hook_args: benchmarking and research only (module docstring); one compilation serves all
  hook_args of the same shapes. kernel_options: the SSM kernels' `KernelOptions` (None: the defaults).

  Returns (tokens per prompt, stats): accepted_per_step (mean accepted draft tokens per verification, over
  running sequences), tokens_per_step (that + 1), acceptance_rate (accepted / proposed), target_calls
  (verification calls + the prefill), draft_calls, rounds, generated_tokens, compile_seconds (0 when
  cached), seconds and tokens_per_s (execution only: generated tokens of all prompts / seconds).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if draft_cfg.vocab_size != target_cfg.vocab_size:
    raise ValueError(f"draft vocab {draft_cfg.vocab_size} != target vocab {target_cfg.vocab_size}: the two "
                     "models must share a tokenizer")
  if max_new_tokens <= 0:
    return [[] for _ in prompts], {}
  eos = tuple(target_cfg.eos_token_id if eos_ids is None else eos_ids)
  tokens, offsets = left_pad(prompts, pad_id, pad_multiple)
  max_len = tokens.shape[1] + max_new_tokens + k + 1  # a verify call writes k + 1 past the last token
  args = (target_params, draft_params, jnp.asarray(tokens), jnp.asarray(offsets), jax.random.PRNGKey(seed),
          jnp.asarray(eos, jnp.int32), hook_args)
  statics = {"k": k, "max_new_tokens": max_new_tokens, "max_len": max_len, "temperature": float(temperature),
             "top_k": int(top_k), "top_p": float(top_p), "draft_hook": draft_hook,
             "kernel_options": kernel_options}
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
  rounds, accepted, seq_rounds = (int(st[name]) for name in ("rounds", "accepted", "seq_rounds"))
  per_step = accepted / max(seq_rounds, 1)
  stats = {"accepted_per_step": per_step, "tokens_per_step": per_step + 1.0,
           "acceptance_rate": accepted / max(seq_rounds * k, 1), "target_calls": rounds + 1,
           "draft_calls": rounds * k + 1, "rounds": rounds, "generated_tokens": int(np.sum(n_out)), "k": k,
           "compile_seconds": t1 - t0, "seconds": t2 - t1, "tokens_per_s": int(np.sum(n_out)) / (t2 - t1)}
  return results, stats


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


def speculative_generate_text(model, draft, messages, max_new_tokens: int = 256, k: int = 4,
                              **sampling) -> tuple[str, dict]:
  """`generate_text` with speculative decoding: (answer, stats of `speculative_generate`).

  model / draft: checkpoint directories or (params, cfg, tokenizer) tuples; the draft needs no tokenizer
  of its own (it must share the target's vocabulary).
  """
  import os

  from hybrid_jax.decode.generate import chat_ids, load_for_generation
  params, cfg, tok = load_for_generation(model)
  if isinstance(draft, (str, os.PathLike)):
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
