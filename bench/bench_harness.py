"""lm-evaluation-harness loglikelihood throughput: our harness model vs lm-eval's HFLM on the same weights.

Measures requests/s of `loglikelihood` (where multiple-choice tasks such as arc, hellaswag, piqa, winogrande
and mmlu spend their time) for N requests, each the text of a random context of --ctx-tokens tokens followed
by a continuation of --cont-tokens tokens. Both sides run the harness's own request path (tokenisation
included) on the same weights: the model is exported with hybrid_jax's converter to a transformers directory
that HFLM loads onto the torch device (log-softmax in fp32, as ours). Reported per side: requests/s and
tokens/s of a timed pass after a warm-up (ours: one full pass, which compiles the few packed shapes, timed
separately; HFLM: two batches), and the largest |difference| between the two sides' log-likelihoods. Ours
also reports how many scoring calls it made and how full their rows were (packing).

Model: --model DIR (any hybrid_jax checkpoint; HFLM only for pure Llamas), or by default random weights of
Llama-3.2-1B's shape (16 layers, hidden 2048, vocab 128256). Without a tokenizer in the checkpoint, a
word-level tokenizer over the whole vocabulary is made up (one token per word).

  python bench/bench_harness.py                                   # GPU: random 1B-shaped Llama, bf16
  python bench/bench_harness.py --model ckpt/llama1b --n 1000 --batch-size 16
  python bench/bench_harness.py --no-pack                         # one request per row
  python bench/bench_harness.py --tiny                            # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from hybrid_jax.config import ModelConfig

# Llama-3.2-1B's shape; the tiny one runs on CPU in seconds.
SHAPES = {
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
           "rope_type": "llama3", "rope_factor": 32.0, "rope_original_max_position": 8192,
           "max_position_embeddings": 131072, "tie_word_embeddings": True},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
}
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 of the made-up tokenizer


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=None,
                  help="hybrid_jax checkpoint directory (default: random 1B-shaped Llama)")
  ap.add_argument("--tiny", action="store_true", help="tiny random model, fewer requests: a CPU smoke test")
  ap.add_argument("--n", type=int, default=None, help="requests (default 1000; 64 with --tiny)")
  ap.add_argument("--batch-size", type=int, default=16, help="rows per call, both sides")
  ap.add_argument("--dtype", default=None,
                  help="params/compute dtype (default bfloat16; float32 with --tiny)")
  ap.add_argument("--ctx-tokens", default=None, help="context length range LO:HI (default 32:512; 8:96 tiny)")
  ap.add_argument("--cont-tokens", default="1:16", help="continuation length range LO:HI")
  ap.add_argument("--no-pack", action="store_true", help="ours: one request per row instead of packing rows")
  ap.add_argument("--skip-hf", action="store_true", help="only time hybrid_jax")
  ap.add_argument("--hf-device", default=None,
                  help="torch device for HFLM (default cuda if available, else cpu)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  return ap


def span(text: str, name: str) -> tuple[int, int]:
  try:
    lo, hi = (int(x) for x in text.split(":"))
  except ValueError:
    raise SystemExit(f"error: --{name} must be LO:HI, got {text!r}") from None
  if not 1 <= lo <= hi:
    raise SystemExit(f"error: --{name} needs 1 <= LO <= HI, got {text!r}")
  return lo, hi


def word_tokenizer(vocab_size: int):
  """A whitespace word-level tokenizer whose ids cover the whole vocabulary (ids 0-2 are unk / bos / eos)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                 eos_token=SPECIALS[2], pad_token=SPECIALS[2])


def load_model(args, dtype: str):
  """(params, cfg, tokenizer) of --model or of a random model of the chosen shape."""
  from hybrid_jax.evaluate.harness import load_checkpoint
  if args.model:
    params, cfg, tok = load_checkpoint(args.model, dtype)
    return params, cfg, tok if tok is not None else word_tokenizer(cfg.vocab_size)
  from hybrid_jax.model import hybrid
  cfg = ModelConfig(**SHAPES["tiny" if args.tiny else "1b"], bos_token_id=1, eos_token_id=(2,), dtype=dtype,
                    param_dtype=dtype)
  params = hybrid.init_params(cfg, jax.random.PRNGKey(args.seed))
  return params, cfg, word_tokenizer(cfg.vocab_size)


def make_requests(n: int, tok, vocab_size: int, ctx: tuple[int, int], cont: tuple[int, int], seed: int
                  ) -> list:
  """n loglikelihood Instances: the text of random non-special tokens, contexts and continuations of about the
  given token counts (exactly, with the made-up word tokenizer)."""
  from lm_eval.api.instance import Instance
  rng = np.random.default_rng(seed)
  special = set(tok.all_special_ids)
  pool = np.asarray([i for i in range(min(vocab_size, len(tok))) if i not in special])

  def text(lo_hi):
    return tok.decode(rng.choice(pool, int(rng.integers(lo_hi[0], lo_hi[1] + 1))).tolist())
  return [Instance(request_type="loglikelihood", doc={}, idx=i, arguments=(text(ctx), " " + text(cont)))
          for i in range(n)]


def timed(fn, requests) -> tuple[list, float]:
  t0 = time.perf_counter()
  out = fn(requests)
  return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  n = args.n or (64 if args.tiny else 1000)
  dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
  ctx = span(args.ctx_tokens or ("8:96" if args.tiny else "32:512"), "ctx-tokens")
  cont = span(args.cont_tokens, "cont-tokens")
  from hybrid_jax.evaluate.harness import HybridJaxLM, plan_batches
  params, cfg, tok = load_model(args, dtype)
  requests = make_requests(n, tok, cfg.vocab_size, ctx, cont, args.seed)
  print(f"model: {args.model or ('random tiny' if args.tiny else 'random Llama-3.2-1B shape')}, "
        f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6:.1f}M params, {dtype}, "
        f"Mamba layers {list(cfg.ssm_layers) or 'none'}; JAX on {jax.devices()[0].device_kind}")
  print(f"{n} loglikelihood requests: context {ctx[0]}-{ctx[1]} tokens, continuation {cont[0]}-{cont[1]} "
        f"tokens, batch size {args.batch_size}")
  report: dict = {"n": n, "dtype": dtype, "batch_size": args.batch_size, "ctx_tokens": ctx,
                  "cont_tokens": cont, "model": args.model or ("tiny" if args.tiny else "random-1b")}

  ours = HybridJaxLM(model=(params, cfg, tok), batch_size=args.batch_size, pack=not args.no_pack)
  first, t_first = timed(ours.loglikelihood, requests)
  ours_ll, t_ours = timed(ours.loglikelihood, requests)
  pairs = [ours._encode_pair(*r.args) for r in requests]
  lengths = [min(len(c) + len(x), ours.max_length + 1) - 1 for c, x in pairs]
  o = ours.options
  plan = plan_batches(lengths, o.batch_size, ours.max_length, pack=o.pack, smallest=o.min_bucket,
                      max_batch_tokens=o.max_batch_tokens)
  fill = sum(lengths) / sum(b.rows * b.length for b in plan)
  n_tokens = sum(lengths)
  print(f"hybrid_jax: {n / t_ours:9.1f} requests/s  {n_tokens / t_ours:10.0f} tokens/s  ({t_ours:.2f} s; "
        f"first pass with compilation {t_first:.2f} s; {len(plan)} calls, "
        f"{len({b.length for b in plan})} row lengths, "
        f"rows {100 * fill:.0f}% full)")
  report["hybrid_jax"] = {"requests_per_s": n / t_ours, "seconds": t_ours, "first_pass_seconds": t_first,
                          "calls": len(plan), "row_fill": fill, "device": jax.devices()[0].device_kind}
  assert np.allclose([a for a, _ in first], [a for a, _ in ours_ll], atol=1e-3)

  if args.skip_hf:
    pass
  elif cfg.is_hybrid:
    print("HFLM: skipped (transformers has no model for a hybrid checkpoint)")
  else:
    import torch
    from lm_eval.models.huggingface import HFLM

    from hybrid_jax.convert import export_hf
    device = args.hf_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and jax.default_backend() != "cpu":
      print("note: torch has no GPU here, HFLM runs on the CPU (not comparable; --skip-hf skips it)")
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir = export_hf(params, cfg, os.path.join(tmp, "hf"), tokenizer=tok)
      hf = HFLM(pretrained=hf_dir, device=device, dtype=dtype, batch_size=args.batch_size,
                softmax_dtype="float32", max_length=ours.max_length)
      hf.loglikelihood(requests[:2 * args.batch_size])  # warm-up
      hf_ll, t_hf = timed(hf.loglikelihood, requests)
    diff = max(abs(a - b) for (a, _), (b, _) in zip(ours_ll, hf_ll))
    same_greedy = np.mean([g == h for (_, g), (_, h) in zip(ours_ll, hf_ll)])
    print(f"HFLM:       {n / t_hf:9.1f} requests/s  {n_tokens / t_hf:10.0f} tokens/s  "
          f"({t_hf:.2f} s on {device})")
    print(f"speedup {t_hf / t_ours:.2f}x; max |loglikelihood difference| {diff:.3g}, is_greedy agrees on "
          f"{100 * same_greedy:.1f}%")
    report["hflm"] = {"requests_per_s": n / t_hf, "seconds": t_hf, "device": device}
    report.update(speedup=t_hf / t_ours, max_abs_diff=diff, greedy_agreement=float(same_greedy))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
