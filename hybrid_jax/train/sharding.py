"""Device mesh and parameter/batch sharding — the ONE place where sharding rules live.

Every parameter gets logical axis names derived from its path (`logical_axes`); one table (`LOGICAL_RULES`)
maps logical names to mesh axes ('data', 'fsdp', 'tensor'). A mesh axis that does not divide a dimension
is dropped for that parameter (it is then replicated along that axis): correct everywhere, and only the odd
small tensors (e.g. a 3-head dim on tensor=2) lose the split.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import ConfigError, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),   # data parallel over both; fsdp also shards the weights
    "embed": "fsdp",             # ZeRO-3 style: weights split along the model dim, gathered per matmul
    "vocab": "tensor",
    "heads": "tensor",           # q/k/v outputs, o inputs (head-major, so a split keeps heads whole)
    "mlp": "tensor",
    "ssm": "tensor",             # Mamba inner channels (d_inner / d_xb / conv channels)
    "norm": None,                # tiny vectors: replicate
    "length": None,
}


def maybe_initialize_distributed() -> None:
  """Multi-host: joins the JAX cluster when the environment says there are several processes.

  Recognises an explicit coordinator (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID) and the
  cluster environments jax.distributed auto-detects (SLURM, Open MPI, Cloud TPU) when their process count > 1.
  A Cloud TPU pod's VMs say so only to jax's own probe (their metadata server): HYBRID_JAX_DISTRIBUTED=1 asks
  for it there (GKE's TPU_WORKER_HOSTNAMES, when it lists several hosts, is read here too).
  """
  n = os.environ.get("JAX_NUM_PROCESSES") or os.environ.get("SLURM_NTASKS") or os.environ.get(
      "OMPI_COMM_WORLD_SIZE")
  tpu_pod = os.environ.get("HYBRID_JAX_DISTRIBUTED") == "1" or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or (n and int(n) > 1) or tpu_pod):
    return
  if jax.distributed.is_initialized():
    return
  kw = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kw = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
          "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
          "process_id": int(os.environ["JAX_PROCESS_ID"])}
  jax.distributed.initialize(**kw)


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves {'data': 1, 'fsdp': -1, 'tensor': 1} (-1 = the rest) against the device count."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"unknown mesh axes {unknown}; allowed: {list(MESH_AXES)}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got {dict(sizes)}")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % fixed:
      raise ConfigError(f"mesh {dict(sizes)}: {n_devices} devices do not divide by {fixed}")
    shape[shape.index(-1)] = n_devices // fixed
  if math.prod(shape) != n_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                      f"have {n_devices}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """One mesh with axes (data, fsdp, tensor); tensor is innermost so it maps to the fastest links."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(sizes or {"fsdp": -1}, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # noqa: BLE001 - simulated / odd topologies: plain order is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


# ---- logical axes of the parameters --------------------------------------------------------------

def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def path_strings(tree) -> Any:
  """Pytree of 'layers_3/mamba/A_log'-style strings, same structure as `tree`."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _path_str(p), tree)


def _mamba_axes(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple:
  """Mixer weights: the model dim is 'embed', inner channels are 'ssm', small dims (d_state, dt_rank,
  conv width, per-head scalars) are replicated. Matrices are [in, out]."""
  d = cfg.hidden_size
  if len(shape) == 0:
    return ()
  if len(shape) == 1:
    return ("ssm",) if shape[0] >= d // 2 and shape[0] > 64 else ("norm",)
  if len(shape) == 2:
    if "out_proj" in name:
      return ("ssm", "embed")
    a, b = shape
    if a == d and "conv" not in name:          # in_proj*, B_proj, C_proj, dt_proj_down: [D, X]
      return ("embed", "ssm" if b > cfg.dt_rank else None)
    if b >= a:                                  # dt_proj [dt_rank, C], conv [k, C]
      return (None, "ssm")
    return ("ssm", None)                        # A_log [C, N], conv [C, k]
  # e.g. conv weight [C, 1, k] or [k, 1, C]: shard the big dim
  big = int(np.argmax(shape))
  return tuple("ssm" if i == big else None for i in range(len(shape)))


def param_logical_axes(path: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple:
  """Logical axis names of one parameter from its path (the rule set, by leaf name)."""
  leaf = path.rsplit("/", 1)[-1]
  if path == "embed_tokens":
    return ("vocab", "embed")
  if path == "lm_head":
    return ("embed", "vocab")
  if leaf in ("norm", "input_layernorm", "post_attention_layernorm") and len(shape) == 1:
    return ("norm",)
  if "/self_attn/" in path:
    return ("heads", "embed") if leaf == "o_proj" else ("embed", "heads")
  if "/mlp/" in path:
    return ("mlp", "embed") if leaf == "down_proj" else ("embed", "mlp")
  if "/mamba/" in path:
    return _mamba_axes(path.split("/mamba/", 1)[1], shape, cfg)
  return (None,) * len(shape)  # unknown leaf: replicated (always correct)


def logical_axes(params, cfg: ModelConfig):
  """Pytree of logical-axis tuples for a param pytree."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: param_logical_axes(_path_str(p), tuple(x.shape), cfg), params)


def logical_to_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Logical axes -> PartitionSpec via LOGICAL_RULES, dropping mesh axes that do not divide a dim or are
  already used by an earlier dim."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    rule = LOGICAL_RULES.get(name) if name is not None else None
    mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    kept = []
    size = 1
    for a in mesh_axes:
      n = mesh.shape[a]
      if a in used or n == 1 or dim % (size * n):
        continue
      kept.append(a)
      size *= n
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def param_shardings(params, cfg: ModelConfig, mesh: Mesh):
  """NamedSharding per parameter (works on arrays or jax.ShapeDtypeStruct leaves)."""
  axes = logical_axes(params, cfg)
  return jax.tree.map(lambda ax, x: NamedSharding(mesh, logical_to_spec(ax, tuple(x.shape), mesh)),
                      axes, params, is_leaf=lambda t: isinstance(t, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
  """Places (or re-places) a param pytree on the mesh. Teacher and student use the same rules."""
  return jax.device_put(params, param_shardings(params, cfg, mesh))


def state_shardings(state, params, param_sh, mesh: Mesh):
  """Shardings for any pytree whose leaves mirror params (optimiser moments, EMA...): a leaf whose key path
  ends with a parameter's path and has its shape gets that parameter's sharding; anything else (counts,
  scalars) is replicated."""
  by_path = {}
  for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh)):
    by_path[tuple(_key(k) for k in p)] = (tuple(x.shape), s)
  rep = replicated(mesh)

  def pick(path, x):
    keys = tuple(_key(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == tuple(getattr(x, "shape", ())):
        return hit[1]
    return rep
  return jax.tree_util.tree_map_with_path(pick, state)


def _key(k) -> Any:
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  return str(k)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'); other dims replicated."""
  return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes. Each process passes its own
  slice of the global batch (multi-host); single-process this is a plain sharded device_put."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]

