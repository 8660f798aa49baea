#!/usr/bin/env python
"""Thin CLI: `python train.py --stage=align|distill|sft|dpo --config configs/X.yaml [--teacher DIR] [--init DIR]
[--output DIR] [--resume] [key=value ...]` (see hybrid_jax/train/cli.py)."""
import sys

from hybrid_jax.train.cli import main

if __name__ == "__main__":
  sys.exit(main())
