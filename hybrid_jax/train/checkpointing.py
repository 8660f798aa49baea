"""Training checkpoints: Orbax CheckpointManager with three items per step.

  state: params, optimiser state, step, RNG (sharded arrays; restored straight into the target shardings, so
         a checkpoint written on 8 devices restores on 1 and vice versa)
  data:  the Grain iterator state, one JSON file per process; the per-row stream states (hybrid_jax.data)
         of all files combine, so a run saved by N processes resumes with M at the same data position
  meta:  small JSON (step, stage, train config) for humans and sanity checks

Orbax writes each step into a temporary directory and renames it when complete, and `latest_step()` only sees
finished steps: a crash mid-save never leaves a corrupted latest checkpoint. Saves are asynchronous (arrays
are copied to host, then written in the background); `wait()` before exiting.

Several processes: every process writes its own shards and data file into the step's temporary directory and
process 0 renames it once all have finished, so the rule above holds for the run as a whole (the directory
must be on a file system every process sees).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from typing import Any, Self

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from hybrid_jax.checkpoint import reading_tensors
from hybrid_jax.train.state import TrainState


class _IteratorSnapshot:
  """The iterator's state captured at save time (async saves must not see later `next()` calls).

  grain's handler JSON-encodes `get_state()` bytes for non-Dataset iterators, which is what we return."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (file process_I-of-N.json per process), restoring across process counts: when this
  process's own file is missing, the states of all files are merged and the iterator picks its rows."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item)
    from hybrid_jax.data import merge_states
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
      raise FileNotFoundError(f"no data position in {directory}")
    item.set_state(merge_states([json.loads(f.read_text()) for f in files]))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for TrainState + data iterator + meta."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self.mgr = ocp.CheckpointManager(
        self.directory, options=opts,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": _DataHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, state: TrainState, iterator, meta: dict[str, Any], force: bool = True) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.mgr.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state.to_dict()), "meta": ocp.args.JsonSave(dict(meta, step=step))}
    if iterator is not None:
      items["data"] = _DataSave(_IteratorSnapshot(iterator))
    return self.mgr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract: TrainState, iterator, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores into `abstract`'s shapes/dtypes/shardings; sets `iterator`'s state in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract.to_dict()), "meta": ocp.args.JsonRestore()}
    has_data = "data" in self.item_names(step)
    if iterator is not None and has_data:
      items["data"] = _DataRestore(iterator)
    earlier = [s for s in self.mgr.all_steps() if s < step]
    hint = (f"; the checkpoint of step {max(earlier)} is in {self.directory}: move {step} aside to resume from it"
            if earlier else "")
    with reading_tensors(os.path.join(self.directory, str(step)), hint):
      out = self.mgr.restore(step, args=ocp.args.Composite(**items))
    return TrainState.from_dict(out["state"]), dict(out["meta"] or {})

  def item_names(self, step: int) -> list[str]:
    path = os.path.join(self.directory, str(step))
    return sorted(os.listdir(path)) if os.path.isdir(path) else []

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


class StopFlag:
  """SIGTERM / SIGINT set a flag instead of killing the process: the loop saves a checkpoint and exits.

  A second Ctrl-C while the flag is set restores the default behaviour (so a stuck save can still be killed).
  """

  def __init__(self):
    self.stop = False
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def _handler(self, signum, frame):
    if self.stop and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.stop, self.signum = True, signum

  def __enter__(self) -> Self:
    if threading.current_thread() is threading.main_thread():  # signals only install on the main thread
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old.clear()
