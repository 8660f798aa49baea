#!/usr/bin/env python
"""Thin CLI: `python convert_torch.py SRC --output DIR` and the other conversion modes (see
hybrid_jax/convert/cli.py, or --help)."""
import sys

from hybrid_jax.convert.cli import build_parser, main  # noqa: F401  (build_parser: tests call it)

if __name__ == "__main__":
  sys.exit(main())
