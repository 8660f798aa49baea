"""Several processes, one training run: joining the JAX cluster, and ending every process when one is lost.

Every process runs the same command. They meet at a coordinator (process 0, HOST:PORT reachable by all):
  --coordinator HOST:PORT --num-processes N --process-id I
  (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment)
SLURM (srun), Open MPI (mpirun) and Cloud TPU pods need none of these: jax.distributed.initialize reads their
environment (on a TPU VM pod pass --num-processes alone, or let JAX_NUM_PROCESSES say it). On CPU the
processes exchange collectives over gloo.

A lost process (killed, crashed, its host gone) stops the run: JAX's coordination service declares a process
dead once its heartbeats stop for --heartbeat-timeout seconds, and a watchdog thread in every process then
exits with one line naming it; a process that fails with an error tells the others the same way. Without
the watchdog the survivors would wait in their next collective forever (or abort with a stack dump). The
service lives in process 0: when process 0 itself dies, the others stop at once with JAX's own error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

import jax

from hybrid_jax.config import ConfigError

HEARTBEAT_TIMEOUT_S = 100   # JAX's default: a process that misses heartbeats this long is declared dead
WATCH_INTERVAL_S = 1.0
LOST_PEER_EXIT = 3          # exit status of a process ended because another one was lost
_KEY = "hybrid_jax"         # prefix of this module's keys in the coordination service's key-value store

_watchdog: _Watchdog | None = None


def add_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("several processes (multi-host)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="address of process 0, where the processes meet (default: $JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run ($JAX_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 ($JAX_PROCESS_ID)")
  g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S, metavar="S",
                 help=f"a process silent this long is lost, and the run stops (default {HEARTBEAT_TIMEOUT_S})")


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ConfigError(f"${name} must be an integer, got {v!r}") from None


def _cluster_size() -> int:
  """Processes the launcher started, where it says so (SLURM, Open MPI, GKE TPU pods); 1 otherwise."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    n = _env_int(name)
    if n:
      return n
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return max(1, len([h for h in hosts.split(",") if h]))


def wants_cluster(num_processes: int | None = None) -> bool:
  """Whether to join a cluster: several processes by the flags or the launcher's environment, or
  HYBRID_JAX_DISTRIBUTED=1 (a Cloud TPU pod VM, whose hosts only jax's own probe of the metadata finds)."""
  return (num_processes or _cluster_size()) > 1 or os.environ.get("HYBRID_JAX_DISTRIBUTED") == "1"


def initialize(args: argparse.Namespace | None = None) -> None:
  """Joins the cluster when the flags or the environment describe several processes (else does nothing),
  and starts the lost-process watchdog. Call before anything touches a device."""
  global _watchdog
  if jax.distributed.is_initialized():
    return
  coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  n = getattr(args, "num_processes", None)
  n = _env_int("JAX_NUM_PROCESSES") if n is None else n
  pid = getattr(args, "process_id", None)
  pid = _env_int("JAX_PROCESS_ID") if pid is None else pid
  timeout = getattr(args, "heartbeat_timeout", None)
  timeout = HEARTBEAT_TIMEOUT_S if timeout is None else timeout
  if timeout < 1:
    raise ConfigError(f"--heartbeat-timeout must be >= 1 second, got {timeout}")
  if n is not None and n < 1:
    raise ConfigError(f"--num-processes must be >= 1, got {n}")
  if coordinator is not None and ":" not in coordinator:
    raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
  if coordinator is not None and (n is None or pid is None):
    raise ConfigError("--coordinator needs --num-processes and --process-id (or $JAX_NUM_PROCESSES and "
                      "$JAX_PROCESS_ID)")
  if pid is not None and n is None:
    raise ConfigError("--process-id needs --num-processes (or $JAX_NUM_PROCESSES)")
  if pid is not None and not 0 <= pid < n:
    raise ConfigError(f"--process-id {pid} is out of range for --num-processes {n}")
  if not wants_cluster(n):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices: collectives across processes
  # recoverable: a lost process is reported to the others (the watchdog ends them) instead of aborting them
  jax.config.update("jax_enable_recoverability", True)
  try:
    jax.distributed.initialize(coordinator, n, pid, heartbeat_timeout_seconds=timeout)
  except Exception as e:  # noqa: BLE001 - unreachable coordinator, bad cluster environment...
    raise ConfigError(f"could not join the cluster{f' at {coordinator}' if coordinator else ''}: "
                      f"{_first_line(e)}") from None
  if jax.default_backend() == "cpu":
    # one process may load a step from the persistent compilation cache while another compiles its own: on
    # CPU the two need not agree on their collectives, and the run hangs
    jax.config.update("jax_enable_compilation_cache", False)
  _watchdog = _Watchdog(timeout)
  _watchdog.start()


def is_primary() -> bool:
  """Process 0 writes logs, metrics, the progress bar and the final model."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op for one process). The watchdog keeps running meanwhile,
  so a process lost during the wait still ends the others."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"{_KEY}/{name}", 24 * 3600 * 1000)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
  """The body runs on process 0 first, then on the others (e.g. filling a shared cache once)."""
  if not is_primary():
    barrier(name)
  yield
  if is_primary():
    barrier(name)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (all processes must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
  """Around the whole run of one process: on success it tells the others it finished (so that its exit is
  not taken for a loss); on an error it tells them the error (they exit naming it). Process 0 then waits for
  the others to leave before its exit takes the coordination service down with it."""
  try:
    yield
  except BaseException as e:
    if _watchdog is not None:
      if isinstance(e, jax.errors.JaxRuntimeError):  # a collective broke: most likely a process was lost
        _watchdog.await_verdict()  # which the watchdog then reports (exiting) within the heartbeat timeout
      _watchdog.leave(failure=f"{type(e).__name__}: {_first_line(e)}")
    raise
  if _watchdog is not None:
    _watchdog.leave(failure=None)


# ---- the watchdog ------------------------------------------------------------------------------

def _client():
  from jax._src import distributed as jd  # the coordination-service client that initialize() created
  return jd.global_state.client


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _die(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  os._exit(LOST_PEER_EXIT)  # no clean-up: it would wait on the lost process


class _Watchdog:
  """Polls the coordination service for processes that are gone without having finished, or that failed.

  get_live_nodes() answers once every live process has asked (a rendezvous of the watchdog threads), so a
  busy process is never taken for a lost one; a dead one drops out when its heartbeats time out."""

  def __init__(self, heartbeat_timeout: int):
    self.client = _client()
    self.me, self.n = jax.process_index(), jax.process_count()
    self.timeout = heartbeat_timeout
    self.coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or "process 0"
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="hybrid_jax-watchdog", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def _run(self) -> None:
    everyone = list(range(self.n))
    while not self._stop.is_set():
      try:
        live = set(self.client.get_live_nodes(everyone))
        failed = dict(self.client.key_value_dir_get(f"{_KEY}/failed/"))
      except Exception as e:  # noqa: BLE001 - the service (in process 0) is gone
        if self._stop.is_set():
          return
        _die(f"lost the coordinator (process 0 of {self.n}): {_first_line(e)}. Restart every process with "
             "--resume to continue from the last complete checkpoint")
      if self._stop.is_set():
        return
      for key, msg in sorted(failed.items()):
        who = key.rsplit("/", 1)[-1]
        if who != str(self.me):
          _die(f"process {who} of {self.n} failed ({msg}); stopping this process too")
      lost = [p for p in everyone if p not in live and not self._finished(p)]
      if lost:
        _die(f"lost process {', '.join(map(str, lost))} of {self.n} (no heartbeat for {self.timeout} s: killed, "
             "crashed or unreachable). Restart every process with --resume to continue from the last complete "
             "checkpoint")
      self._stop.wait(WATCH_INTERVAL_S)

  def _finished(self, p: int) -> bool:
    try:
      self.client.key_value_try_get(f"{_KEY}/finished/{p}")
      return True
    except Exception:  # noqa: BLE001 - not found
      return False

  def await_verdict(self) -> None:
    self._thread.join(self.timeout + 10 * WATCH_INTERVAL_S)

  def leave(self, failure: str | None) -> None:
    """Stops watching and records how this process ends; process 0 then waits (bounded by the heartbeat
    timeout) until the others are gone, since its exit takes the coordination service down."""
    self._stop.set()
    key = f"{_KEY}/failed/{self.me}" if failure else f"{_KEY}/finished/{self.me}"
    try:
      self.client.key_value_set(key, failure or "ok")
      if self.me == 0:
        deadline = time.monotonic() + self.timeout + 10
        while len(self.client.get_live_nodes(list(range(self.n)))) > 1 and time.monotonic() < deadline:
          time.sleep(0.1)
    except Exception:  # noqa: BLE001, S110 - the service is gone already: nothing left to tell
      pass
