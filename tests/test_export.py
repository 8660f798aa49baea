"""Every program lowers for TPU and for GPU from this CPU host.

`jax.export` for platform 'tpu' and 'cuda', with `KernelOptions.platform` set to it: dispatch picks as on that
platform and the Pallas kernels lower for it (Mosaic `tpu_custom_call`s, Triton `__gpu$xla.gpu.triton` calls),
not in interpret mode. Programs, from shapes only (nothing runs): the distill train step and the DPO step
sharded over 8 devices (data 1 x fsdp 2 x tensor 4), prefill + decode loop, and the speculative loop; tiny
Mamba-1 and Mamba-2 hybrids. And the per-shard split of the TPU kernels' arguments (`partition`), run here
with the reference scans in their place.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.decode import speculative
from hybrid_jax.decode.generate import decode_loop, prefill
from hybrid_jax.model import hybrid
from hybrid_jax.pallas import KernelOptions, ops, partition, reference
from hybrid_jax.train import config as tcfg
from hybrid_jax.train import optim, stages
from hybrid_jax.train import sharding as shd
from hybrid_jax.train import state as st

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

PLATFORMS = ("tpu", "cuda")
TRITON = "__gpu$xla.gpu.triton"
V, L, B = 64, 16, 8
TEACHER = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
# Mamba-1: 4 B/C groups (d_xb 16 / N 4) of 8 channels; Mamba-2: 4 heads = groups of N = P = 8. Both split
# over tensor = 4 in the sharded steps.
MAMBA1 = TEACHER.replace(attn_layers=(1,), ssm=SSMConfig(d_state=4))
MAMBA2 = TEACHER.replace(attn_layers=(1,), ssm=SSMConfig(variant="mamba2", d_state=8))


def export(fn, platform: str, *args) -> jax.export.Exported:
  # Triton calls have no export compatibility guarantee; lowering is what is checked here
  return jax.export.export(fn, platforms=[platform],
                           disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)


def kernels(text: str) -> tuple[list[str], int]:
  """(the Mosaic kernels' names, the number of Triton calls) in a lowered module's text."""
  return re.findall(r'kernel_name = "(\w+)"', text), text.count(f"custom_call @{TRITON}(")


def abstract_params(cfg: ModelConfig):
  return jax.eval_shape(lambda: hybrid.init_params(cfg, jax.random.key(0)))


def sharded_step(stage: str, student: ModelConfig, frozen: ModelConfig, options: KernelOptions | None, mesh):
  """(the jitted train step with the loop's shardings, its abstract arguments)."""
  cfg = tcfg.from_dict({"stage": stage, "data": {"batch_size": B, "seq_len": L},
                        "loss": {"kl_weight": 0.5, "ce_weight": 1.0} if stage != "dpo" else {}})
  params, frozen_params = abstract_params(student), abstract_params(frozen)
  mask = optim.trainable_mask(params, optim.trainable_pattern(stage, cfg.optim))
  tx = optim.make_optimizer(cfg.optim, 10, mask)
  state = jax.eval_shape(lambda p: st.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                   rng=jax.random.key_data(jax.random.key(0))), params)
  state_sh = st.state_shardings(state, student, mesh)
  step = stages.make_train_step(stages.make_loss_fn(cfg, student, frozen, options), tx, mask,
                                optim.lr_schedule(cfg.optim, 10), 1)
  keys = stages.DPO_KEYS if stage == "dpo" else stages.LM_KEYS
  batch = {k: jax.ShapeDtypeStruct((B, L), jnp.int32) for k in keys}
  jitted = jax.jit(step, in_shardings=(state_sh, {k: shd.batch_sharding(mesh) for k in keys},
                                       shd.param_shardings(frozen_params, frozen, mesh)),
                   out_shardings=(state_sh, shd.replicated(mesh)))
  return jitted, (state, batch, frozen_params)


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})


# (stage, student, scan impl, Mosaic calls, Triton calls): Mamba-1 AUTO (the kernel; on GPU also its backward
# kernel; on TPU the backward is plain JAX); Mamba-2 as PALLAS (AUTO takes the chunked form on both platforms,
# see the decode test): differentiated, the chunked form runs on GPU (no kernel) and the Mosaic kernel's
# backward is the chunked form's on TPU; DPO with Mamba-1 AUTO: the policy's forward and
# backward and the reference's forward
STEPS = [("distill", MAMBA1, "auto", 1, 2), ("distill", MAMBA2, "pallas", 1, 0), ("dpo", MAMBA1, "auto", 2, 3)]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("stage,student,impl,n_mosaic,n_triton", STEPS,
                         ids=["distill-mamba", "distill-mamba2", "dpo-mamba"])
def test_sharded_train_steps_lower(mesh, platform, stage, student, impl, n_mosaic, n_triton):
  student = student.replace(ssm=dataclasses.replace(student.ssm, scan_impl=impl))
  frozen = student if stage == "dpo" else TEACHER
  jitted, args = sharded_step(stage, student, frozen, KernelOptions(platform=platform, mesh=mesh), mesh)
  exported = export(jitted, platform, *args)
  assert exported.nr_devices == 8
  mosaic, triton = kernels(exported.mlir_module())
  if platform == "tpu":
    assert mosaic == ["_scan_kernel"] * n_mosaic and triton == 0
  else:
    assert not mosaic and triton == n_triton


def test_mosaic_kernels_need_the_mesh(mesh):
  """Without the mesh in the options the Mosaic kernel is left to XLA's partitioner, which jax refuses for
  TPU custom calls: what `partition.per_shard` is for."""
  jitted, args = sharded_step("distill", MAMBA1, TEACHER, KernelOptions(platform="tpu"), mesh)
  with pytest.raises(NotImplementedError, match="shard_map"):
    export(jitted, "tpu", *args)


TOKENS = jax.ShapeDtypeStruct((2, 8), jnp.int32)
OFFSETS = jax.ShapeDtypeStruct((2,), jnp.int32)
KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)
EOS = jax.ShapeDtypeStruct((1,), jnp.int32)


def decode_program(cfg: ModelConfig, options: KernelOptions | None):
  def run(params, tokens, offsets, key, eos):
    last, cache = prefill(params, cfg, tokens, offsets, 12, kernel_options=options)
    return decode_loop(params, cfg, last, cache, key, eos, 4, 0.0, 0, 1.0, kernel_options=options)
  return jax.jit(run)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_lowers(platform):
  """Prefill + decode loop: the Mamba-1 prefill scan is a kernel (AUTO); Mamba-2's is its two chunk kernels on
  GPU and the chunked form on TPU, and every one-token decode step the reference step."""
  options = KernelOptions(platform=platform)
  mosaic, triton = kernels(export(decode_program(MAMBA1, options), platform, abstract_params(MAMBA1), TOKENS,
                                  OFFSETS, KEY, EOS).mlir_module())
  assert (mosaic, triton > 0) == ((["_scan_kernel"], False) if platform == "tpu" else ([], True))
  text = export(decode_program(MAMBA2, options), platform, abstract_params(MAMBA2), TOKENS, OFFSETS, KEY,
                EOS).mlir_module()
  assert kernels(text) == ([], 0 if platform == "tpu" else 2)


def test_platform_option_decides():
  """Control: without KernelOptions.platform, dispatch picks for this CPU host (the reference scans)."""
  text = export(decode_program(MAMBA1, None), "tpu", abstract_params(MAMBA1), TOKENS, OFFSETS, KEY,
                EOS).mlir_module()
  assert kernels(text) == ([], 0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_speculative_loop_lowers(platform):
  """The whole speculative loop (prefill, rounds of draft and verify) with a Mamba-1 target and a Mamba-2
  draft, AUTO: the target's prefill scan, on GPU the draft's (two chunk kernels), and the verify calls
  (target commit, draft commit and append) are kernels."""
  options = KernelOptions(platform=platform)

  def run(tparams, dparams, tokens, offsets, key, eos):
    return speculative.speculative_loop(tparams, MAMBA1, dparams, MAMBA2, tokens, offsets, key, eos, k=2,
                                        max_new_tokens=3, max_len=14, temperature=0.0, top_k=0, top_p=1.0,
                                        kernel_options=options)

  text = export(jax.jit(run), platform, abstract_params(MAMBA1), abstract_params(MAMBA2), TOKENS, OFFSETS, KEY,
                EOS).mlir_module()
  mosaic, triton = kernels(text)
  if platform == "tpu":
    assert sorted(mosaic) == ["_scan_kernel"] + ["_verify_kernel"] * 3 and triton == 0
  else:
    assert not mosaic and triton == 6


# -- the per-shard split: values and gradients of the reference scans through it ----------------------------
def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


def scan_args(variant: str, b: int, g: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  l, n = 5, 3
  reset = jnp.asarray(rng.random((b, l)) < 0.2)
  if variant == "mamba":
    d = 4 * g
    return (_normal(rng, b, l, d), _normal(rng, b, l, d), -jnp.exp(_normal(rng, d, n)), _normal(rng, b, l, g, n),
            _normal(rng, b, l, g, n), _normal(rng, d), _normal(rng, d), _normal(rng, b, l, d), reset,
            _normal(rng, b, d, n))
  h, p = 2 * g, 3
  return (_normal(rng, b, l, h, p), _normal(rng, b, l, h), -jnp.exp(_normal(rng, h)), _normal(rng, b, l, g, n),
          _normal(rng, b, l, g, n), _normal(rng, h), _normal(rng, h), reset, _normal(rng, b, h, p, n))


# (b, groups): batch over fsdp and groups over tensor; neither divides (the mesh axes hold whole extents)
@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
@pytest.mark.parametrize("b,g,split", [(4, 4, True), (3, 2, False)])
def test_per_shard_scans_match(mesh, variant, b, g, split):
  ref, layout = ((reference.selective_scan_ref, ops.M1_SCAN_LAYOUT) if variant == "mamba" else
                 (reference.ssd_scan_ref, ops.M2_SCAN_LAYOUT))
  args = scan_args(variant, b, g)
  sharded = lambda *a: partition.per_shard(ref, mesh, ("data", "fsdp"), ("tensor",), a, *layout)
  specs = re.search(r"in_specs=(.*?)\n", str(jax.make_jaxpr(sharded)(*args))).group(1)
  assert ("'tensor'" in specs and "'fsdp'" in specs) == split, specs

  def loss(fn, *a):
    y, h = fn(*a)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)) + jnp.sum(jnp.sin(h))
  diff = tuple(i for i, a in enumerate(args) if a.dtype == jnp.float32)
  got = jax.jit(jax.value_and_grad(lambda *a: loss(sharded, *a), argnums=diff))(*args)
  want = jax.jit(jax.value_and_grad(lambda *a: loss(ref, *a), argnums=diff))(*args)
  assert rel(got[0], want[0]) <= 1e-5
  for i, gw, gr in zip(diff, got[1], want[1]):
    assert rel(gw, gr) <= 1e-5, i


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_per_shard_verify_matches(mesh, variant):
  rng = np.random.default_rng(1)
  b, kc, k, g, n = 4, 2, 3, 4, 3
  if variant == "mamba":
    ch, sc, state, a = (8,), (8,), (b, 8, n), -jnp.exp(_normal(rng, 8, n))
  else:
    ch, sc, state, a = (8, 2), (8,), (b, 8, 2, n), -jnp.exp(_normal(rng, 8))
  args = (_normal(rng, *state), _normal(rng, b, kc, *ch), _normal(rng, b, kc, *sc), _normal(rng, b, kc, g, n),
          jnp.array([2, 0, 1, 2], jnp.int32), _normal(rng, b, k, *ch), _normal(rng, b, k, *sc),
          _normal(rng, b, k, g, n), _normal(rng, b, k, g, n), a, _normal(rng, *sc), _normal(rng, *sc),
          _normal(rng, b, k, *ch))
  layout = ops.M1_VERIFY_LAYOUT if variant == "mamba" else ops.M2_VERIFY_LAYOUT
  ref = lambda *a: reference.multistep_scan_ref(*a)[:2]
  got = jax.jit(lambda *a: partition.per_shard(ref, mesh, ("data", "fsdp"), ("tensor",), a, *layout))(*args)
  want = jax.jit(ref)(*args)
  assert rel(got[0], want[0]) <= 1e-5 and rel(got[1], want[1]) <= 1e-5


def test_tpu_pod_joins_the_cluster(monkeypatch):
  """A pod launch (README: HYBRID_JAX_DISTRIBUTED=1, or GKE's host list) joins a cluster; one host does not."""
  from hybrid_jax.train import distributed
  for name in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
               "TPU_WORKER_HOSTNAMES", "HYBRID_JAX_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.wants_cluster()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "pod-w-0")
  assert not distributed.wants_cluster()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "pod-w-0,pod-w-1")
  assert distributed.wants_cluster()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("HYBRID_JAX_DISTRIBUTED", "1")
  assert distributed.wants_cluster()
