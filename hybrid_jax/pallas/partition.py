"""A kernel per shard of a partitioned program (`KernelOptions.mesh`).

XLA has no partitioning rule for a Mosaic kernel (a TPU custom call): inside a program sharded over a mesh of
more than one device, jax lowers one only under shard_map. `per_shard` runs a scan that way over the whole
mesh: the batch axis split over the options' `batch_axes`, the channels (Mamba-1 channels, Mamba-2 heads) and
their B/C groups over `channel_axes`, each mesh axis only where it divides (a mesh axis that does not, or that
neither names, holds the whole extent: its devices compute the same values). The scans never mix sequences,
and a shard of whole B/C groups holds exactly the channels that read them, so a shard is the same scan on
fewer rows and channels.

Arguments are described by layouts, one letter per dimension: b batch, c channel (or head), g B/C group, any
other letter unsplit (e.g. "blc" for x [b, l, d], "blgn" for B). None arguments pass through.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def _fit(mesh, names: Sequence[str], size: int) -> tuple[str, ...]:
  """The mesh axes of `names` (in order) over which `size` splits evenly; size-1 axes are left out."""
  kept, n = [], 1
  for name in names:
    k = dict(mesh.shape).get(name, 1)
    if k > 1 and size % (n * k) == 0:
      kept.append(name)
      n *= k
  return tuple(kept)


def per_shard(fn: Callable, mesh, batch_axes: Sequence[str], channel_axes: Sequence[str], args: Sequence,
              layouts: Sequence[str], out_layouts: Sequence[str]):
  """fn(*args) (None args allowed) under shard_map over `mesh`; returns fn's outputs (a tuple laid out as
  out_layouts). Without a mesh of more than one device: fn(*args)."""
  if mesh is None or mesh.size == 1:
    return fn(*args)
  sizes = {}
  for a, layout in zip(args, layouts):
    if a is not None:
      for dim, n in zip(layout, a.shape):
        sizes.setdefault(dim, n)
  split = {"b": _fit(mesh, batch_axes, sizes.get("b", 1)), "g": _fit(mesh, channel_axes, sizes.get("g", 1))}
  # channels split with their groups (a group's channels are contiguous: d = G * channels per group)
  split["c"] = split["g"] if sizes.get("c", 0) % math.prod(mesh.shape[a] for a in split["g"]) == 0 else ()
  spec = lambda layout: P(*((split[d] or None) if d in split else None for d in layout))
  present = [i for i, a in enumerate(args) if a is not None]

  def body(*given):
    full = list(args)
    for i, v in zip(present, given):
      full[i] = v
    return tuple(fn(*full))

  # check_vma off: the kernels' out_shapes carry no per-axis variance (jax asks for it on every pallas_call
  # output). Values and gradients against the unsharded scan: tests/test_export.py
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(spec(layouts[i]) for i in present),
                       out_specs=tuple(spec(layout) for layout in out_layouts), check_vma=False
                       )(*(args[i] for i in present))
