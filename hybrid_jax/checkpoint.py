"""Model checkpoint directories: Orbax params + config.json + tokenizer, written atomically.

Layout of a checkpoint directory DIR:
  DIR/params/        Orbax PyTree checkpoint of the param pytree (any nesting of dicts / lists of arrays)
  DIR/config.json    ModelConfig.save (written last: a directory with config.json is complete)
  DIR/tokenizer*     the Hugging Face tokenizer's save_pretrained files (optional)
  DIR/<name>.json    optional extra metadata (hybrids: e.g. the teacher's config)

Writes go to a sibling temp directory `DIR.tmp-XXXX` that is renamed into place at the end, so a crash or an
error never leaves something at DIR that looks like a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.errors import describe, read_json, read_json_object, reading
from hybrid_jax.model.hybrid import from_layer_list

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
# Orbax's plain JSON files inside PARAMS_DIR (read before the tensor store, so a bad one is named).
ORBAX_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA")
# A directory holds a tokenizer when one of these exists; all of TOKENIZER_FILES present are checked.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                   "vocab.json", "chat_template.json", "chat_template.jinja")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded; the message names the path and the problem."""


def ensure_replaceable(path: str | os.PathLike) -> None:
  """Raises FileExistsError unless `path` is absent, an empty directory, or a previous output (has config.json).

  Guards against `--output` naming an unrelated directory, which the atomic replace would delete.
  """
  p = os.fspath(path)
  if not os.path.lexists(p):
    return
  if not os.path.isdir(p) or os.path.islink(p):
    raise FileExistsError(f"output {p} exists and is not a directory; refusing to replace it")
  if os.listdir(p) and not os.path.isfile(os.path.join(p, CONFIG_FILE)):
    raise FileExistsError(f"output directory {p} is not empty and holds no model (no {CONFIG_FILE}); "
                          "refusing to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a fresh sibling temp dir; on success it replaces `path`, on any error it is removed.

  An existing `path` (see ensure_replaceable) is moved aside first and deleted only once the new directory is
  in place.
  """
  path = os.path.abspath(os.fspath(path))
  ensure_replaceable(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint gets ordinary permissions
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
    os.rmdir(old)
    os.replace(path, old)
  try:
    os.replace(tmp, path)
  except BaseException:
    if old is not None:
      os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def _to_numpy(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def write_params(directory: str, params: Any) -> None:
  """Saves a param pytree with Orbax into `directory` (which must not exist)."""
  import orbax.checkpoint as ocp
  # this process alone writes host arrays: no barrier with the other processes of a multi-process run
  me = jax.process_index()
  opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=opts),
                           multiprocessing_options=opts)
  ckptr.save(os.path.abspath(directory), _to_numpy(params))


def read_params(directory: str) -> Any:
  """Restores a param pytree saved by `write_params` as host numpy arrays (independent of devices).

  A missing or corrupt file raises CheckpointError naming it (its metadata file) or the directory and array.
  """
  import orbax.checkpoint as ocp
  from etils import epath
  directory = os.path.abspath(directory)
  for name in ORBAX_JSON_FILES:
    if os.path.exists(os.path.join(directory, name)):
      read_json(os.path.join(directory, name), CheckpointError)
  with reading_tensors(directory):
    # the handler's own metadata(): the checkpointer's would log a warning and return None on a bad file
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(directory, restore_args=restore_args)


@contextlib.contextmanager
def reading_tensors(directory: str, hint: str = "") -> Iterator[None]:
  """reading() for Orbax / tensorstore reads (their messages name the array and the file); `hint` ends the
  message (e.g. what the user can do instead).

  When one array fails, Orbax closes its event loop while other reads are still in flight. Each of those later
  completes into the closed loop and reports 'RuntimeError: Event loop is closed' as an unraisable exception
  from a tensorstore thread, and asyncio logs 'Task exception was never retrieved' for each failed read that
  nobody awaited: tracebacks on stderr, before or after the one error that matters. The filter for the first
  is installed before reading, since such a report can arrive before the failure reaches this frame; the
  second is silenced once a read has failed.
  """
  _drop_closed_loop_reports()
  try:
    yield
  except Exception as e:  # Orbax / tensorstore raise many types for a bad tensor store
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_reports)
    problem = describe(e).split(" [tensorstore_spec=")[0]  # the spec dump is hundreds of characters
    raise CheckpointError(f"{directory}: {problem}{hint}") from e


def _drop_closed_loop_reports() -> None:
  """Drops 'Event loop is closed' unraisable reports (only those); installed once per process."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(report):
    if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
      return
    previous(report)
  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


def _drop_unretrieved_task_reports(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith("Task exception was never retrieved")


def save_model(directory: str | os.PathLike, params: Any, cfg: ModelConfig, tokenizer: Any = None,
               extra: dict[str, Any] | None = None) -> str:
  """Writes a checkpoint directory atomically and returns its absolute path.

  params: any nested dict/list pytree of arrays. tokenizer: a Hugging Face tokenizer (save_pretrained) or None.
  extra: {file name: JSON-serialisable dict} of additional metadata files (e.g. 'teacher_config.json').
  """
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
  with atomic_dir(directory) as tmp:
    write_params(os.path.join(tmp, PARAMS_DIR), params)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
      # save_pretrained may write its own config-like files; ours is written below and wins.
    for name, obj in (extra or {}).items():
      if name == CONFIG_FILE or os.sep in name:
        raise ValueError(f"invalid extra metadata file name {name!r}")
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    cfg.save(os.path.join(tmp, CONFIG_FILE))  # last: marks the directory complete
  return os.path.abspath(directory)


def is_checkpoint(directory: str | os.PathLike) -> bool:
  """True when `directory` holds a complete hybrid_jax checkpoint (config.json + params)."""
  d = os.fspath(directory)
  return os.path.isfile(os.path.join(d, CONFIG_FILE)) and os.path.isdir(os.path.join(d, PARAMS_DIR))


def load_tokenizer(directory: str | os.PathLike):
  """The HF tokenizer saved in a checkpoint directory, or None when the directory has none.

  Each tokenizer file present is checked first (JSON parses, tokenizer.json builds, the chat template
  compiles), so a corrupt one raises CheckpointError naming that file rather than a library traceback later.
  """
  d = os.fspath(directory)
  if not any(os.path.exists(os.path.join(d, n)) for n in TOKENIZER_MARKERS):
    return None
  for name in TOKENIZER_FILES:
    path = os.path.join(d, name)
    if not os.path.exists(path):
      continue
    if name == "tokenizer.json":  # parsed and built by the tokenizers library (the large one: read once)
      import tokenizers
      with reading(path, CheckpointError):
        tokenizers.Tokenizer.from_file(path)
    elif name.endswith(".json"):
      read_json(path, CheckpointError)
    elif name == "chat_template.jinja":
      with reading(path, CheckpointError), open(path, encoding="utf-8") as f:
        f.read()
  from transformers import AutoTokenizer
  with reading(d, CheckpointError):  # what is left: files that are each valid but do not make a tokenizer
    tok = AutoTokenizer.from_pretrained(d)
  _check_chat_template(tok, d)
  return tok


def _check_chat_template(tok, directory: str) -> None:
  """Renders a one-message chat: a template with a syntax error raises CheckpointError naming its file."""
  if getattr(tok, "chat_template", None) is None:
    return
  import jinja2
  try:
    tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
  except jinja2.TemplateSyntaxError as e:
    where = next((n for n in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
                  if os.path.isfile(os.path.join(directory, n))), "")
    raise CheckpointError(f"{os.path.join(directory, where)}: chat template does not compile "
                          f"({describe(e)})") from e
  except Exception:  # noqa: BLE001 - a template may refuse this conversation (e.g. want a system turn)
    return


def load_model(directory: str | os.PathLike, dtype=None, with_tokenizer: bool = True
               ) -> tuple[dict, ModelConfig, Any]:
  """Loads (params, cfg, tokenizer) from a checkpoint directory.

  dtype: if given, floating-point params are cast to it (and cfg.param_dtype is set accordingly).
  The tokenizer is None when the checkpoint has none (or with_tokenizer=False).
  """
  d = os.fspath(directory)
  if not os.path.exists(d):
    raise FileNotFoundError(f"{d}: checkpoint directory not found")
  if not os.path.isdir(d):
    raise CheckpointError(f"{d}: not a directory (expected a hybrid_jax checkpoint directory)")
  cfg_path = os.path.join(d, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{d}: no {CONFIG_FILE}: not a (complete) hybrid_jax checkpoint")
  params_path = os.path.join(d, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise CheckpointError(f"{d}: no {PARAMS_DIR}/ directory: the checkpoint's parameters are missing")
  cfg = read_config(cfg_path)
  params = from_layer_list(read_params(params_path))  # checkpoints of earlier releases load too

  def cast(x):
    x = np.asarray(x)
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(x, dtype=dtype)
    return jnp.asarray(x)
  params = jax.tree.map(cast, params)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
  tokenizer = load_tokenizer(d) if with_tokenizer else None
  return params, cfg, tokenizer


def read_config(path: str | os.PathLike) -> ModelConfig:
  """A checkpoint's config.json; CheckpointError naming the file when it is unreadable or not a config."""
  raw = read_json_object(path, CheckpointError)
  try:
    return ModelConfig.from_dict(raw)
  except ConfigError as e:
    raise CheckpointError(f"{os.fspath(path)}: {e}") from None
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"{os.fspath(path)}: not a hybrid_jax model config ({describe(e)}); "
                          "a Hugging Face directory must be converted first (convert_torch.py)") from None


def read_metadata(directory: str | os.PathLike, name: str) -> dict | None:
  """An extra metadata JSON file of a checkpoint (see save_model's `extra`), or None if absent."""
  p = os.path.join(os.fspath(directory), name)
  if not os.path.exists(p):
    return None
  return read_json(p, CheckpointError)
