"""Train state: step, params, optimiser state and RNG, sharded on the mesh."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hybrid_jax.config import ModelConfig
from hybrid_jax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimiser steps done
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data [2] (raw, so orbax can save it)

  def to_dict(self) -> dict:
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

  @classmethod
  def from_dict(cls, d: dict) -> TrainState:
    return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def state_shardings(state_shape: TrainState, model_cfg: ModelConfig, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of a (possibly abstract) TrainState."""
  psh = shd.param_shardings(state_shape.params, model_cfg, mesh)
  rep = shd.replicated(mesh)
  return TrainState(step=rep, params=psh,
                    opt_state=shd.state_shardings(state_shape.opt_state, state_shape.params, psh, mesh),
                    rng=rep)


def create_state(params, tx: optax.GradientTransformation, model_cfg: ModelConfig, mesh: Mesh,
                 seed: int) -> tuple[TrainState, TrainState]:
  """Places params on the mesh and builds the optimiser state there (jit with out_shardings, so moments are
  born sharded and never materialise on one device). Returns (state, its shardings)."""
  params = shd.shard_params(params, model_cfg, mesh)

  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(jax.random.key(seed)))
  shape = jax.eval_shape(init, params)
  sh = state_shardings(shape, model_cfg, mesh)
  state = jax.jit(init, out_shardings=sh)(params)
  return state, sh


def abstract_state(state_sh: TrainState, shape: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (the restore target for orbax)."""
  return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_sh, shape)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def count_opt_floats(opt_state) -> int:
  """Number of floats held by the optimiser state (frozen params contribute none)."""
  return sum(int(x.size) for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
