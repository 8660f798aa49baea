"""JAX's persistent compilation cache for the command-line tools.

A decode loop or a training step takes seconds to tens of seconds to compile; with the cache on, a second run
of the same shapes loads the executables from disk instead. The CLIs call `enable_compilation_cache()` once
at start-up. Where the cache lives:
  $HYBRID_JAX_COMPILATION_CACHE      a directory, or 0 / off / false / none to turn the cache off;
  otherwise ~/.cache/hybrid_jax/jax.
A directory already chosen through JAX's own setting (JAX_COMPILATION_CACHE_DIR) is left as it is.
"""
from __future__ import annotations

import os
import sys

ENV_VAR = "HYBRID_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "hybrid_jax", "jax")
_OFF = ("0", "off", "false", "no", "none")


def compilation_cache_dir() -> str | None:
  """The directory the cache would use (None: turned off by the environment variable)."""
  value = os.environ.get(ENV_VAR)
  if value is not None and value.strip().lower() in _OFF:
    return None
  return os.path.abspath(os.path.expanduser(value.strip() if value and value.strip() else DEFAULT_DIR))


def enable_compilation_cache(min_compile_seconds: float = 0.5) -> str | None:
  """Turns on the persistent compilation cache (once per process). Returns its directory (None: off).

  min_compile_seconds: only executables that took at least this long to compile are written (the many tiny
  ones cost more disk reads than they save). Never raises: a directory that cannot be created only warns.
  """
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:  # chosen by the user through JAX's own flag / environment variable
    return current
  path = compilation_cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"warning: compilation cache off ({path}: {e.strerror})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path
