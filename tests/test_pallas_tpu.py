"""TPU (Mosaic) Pallas kernels vs the lax.scan references, in Pallas's TPU interpret mode on CPU.

The interpreter simulates TPU memory spaces, block bounds and the grid's dimension semantics; the Mosaic
lowering itself is checked by exporting each kernel for TPU. Compiles dominate the runtime: few, small shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.pallas import tpu_multistep, tpu_scan
from hybrid_jax.pallas.reference import multistep_scan_ref, selective_scan_ref, ssd_scan_ref

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}
# several time blocks (l = 37 -> 3 blocks of 16) and checkpoint chunks of 8
SMALL = tpu_scan.TpuScanOptions(time_block=16, ckpt_chunk=8)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


# Inputs from numpy and every computation jitted: jax.random and eager ops compile per shape (seconds each)
def normal(rng, shape, dtype=F32):
  return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))


def decay_rates(rng, shape):
  return jnp.asarray(-np.exp(rng.standard_normal(shape, np.float32)))


def resets(rng, shape):
  return jnp.asarray(rng.random(shape) < 0.15)


def m1_inputs(seed, b, l, d, g, n, dtype=F32):
  rng = np.random.default_rng(seed)
  return {"x": normal(rng, (b, l, d), dtype), "dt": normal(rng, (b, l, d), dtype),
          "A": decay_rates(rng, (d, n)), "B": normal(rng, (b, l, g, n), dtype),
          "C": normal(rng, (b, l, g, n), dtype), "D": normal(rng, (d,)), "dt_bias": normal(rng, (d,)),
          "z": normal(rng, (b, l, d), dtype), "reset": resets(rng, (b, l)), "h0": normal(rng, (b, d, n))}


def m2_inputs(seed, b, l, h, p, g, n, dtype=F32):
  rng = np.random.default_rng(seed)
  return {"x": normal(rng, (b, l, h, p), dtype), "dt": normal(rng, (b, l, h), dtype),
          "A": decay_rates(rng, (h,)), "B": normal(rng, (b, l, g, n), dtype),
          "C": normal(rng, (b, l, g, n), dtype), "D": normal(rng, (h,)), "dt_bias": normal(rng, (h,)),
          "reset": resets(rng, (b, l)), "h0": normal(rng, (b, h, p, n))}


def check_scan(fn, ref, inp, dtype):
  y, h = jax.jit(fn)(**inp)
  y_ref, h_ref = jax.jit(ref)(**inp)
  assert y.dtype == dtype and h.dtype == F32 and y.shape == y_ref.shape and h.shape == h_ref.shape
  assert rel(y, y_ref) <= TOL[dtype] and rel(h, h_ref) <= TOL[dtype]


# -- the training scans: forward ------------------------------------------------------------------------
# (dtype, (b, l, d, G, N), options): 3 groups of 8 channels and 13 padded groups in one 128-lane program,
# N = 5 padded to 8, 37 steps = 3 time blocks (the last padded); bf16, one group wider than a program (200
# channels padded to 256: two programs of 128 lanes, B / C broadcast to the lanes)
@pytest.mark.parametrize("dtype,shape,options", [
    (F32, (2, 37, 24, 3, 5), SMALL),
    (BF16, (1, 21, 200, 1, 16), tpu_scan.TpuScanOptions(time_block=8, ckpt_chunk=8, lane_block=128)),
])
def test_selective_scan_tpu_matches_reference(dtype, shape, options):
  inp = m1_inputs(sum(shape), *shape, dtype=dtype)
  check_scan(lambda **a: tpu_scan.selective_scan_tpu(**a, options=options), selective_scan_ref, inp, dtype)


# (dtype, (b, l, H, P, G, N), options): a head per group, N = 5; P = 5 (groups of 2 heads: 10 channels
# padded to 16, 8 groups per program: B / C through the bf16 expansion matmul), N = 16, the default blocks
@pytest.mark.parametrize("dtype,shape,options", [
    (F32, (2, 37, 3, 8, 3, 5), SMALL),
    (BF16, (1, 37, 4, 5, 2, 16), tpu_scan.TpuScanOptions()),
])
def test_ssd_scan_tpu_matches_reference(dtype, shape, options):
  inp = m2_inputs(sum(shape), *shape, dtype=dtype)
  check_scan(lambda **a: tpu_scan.ssd_scan_tpu(**a, options=options), ssd_scan_ref, inp, dtype)


# -- the training scans: gradients ----------------------------------------------------------------------
def grads(fn, inp, names):
  def loss(*vals):
    y, h = fn(**dict(inp, **dict(zip(names, vals))))
    w = jnp.cos(jnp.arange(y.size, dtype=F32)).reshape(y.shape)
    return jnp.sum(y.astype(F32) * w) + jnp.sum(jnp.sin(h))
  return jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*[inp[k] for k in names])


def test_selective_scan_tpu_grads():
  """The backward from the kernel's checkpoints: 29 steps = 4 chunks of 8 (the last padded) in 2 time
  blocks, resets and h0."""
  inp = m1_inputs(3, 2, 29, 24, 3, 5)
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "z", "h0"]
  got = grads(lambda **a: tpu_scan.selective_scan_tpu(**a, options=SMALL), inp, names)
  for g, r, name in zip(got, grads(selective_scan_ref, inp, names), names):
    assert rel(g, r) <= 1e-5, name


def test_ssd_scan_tpu_grads():
  inp = m2_inputs(4, 2, 29, 3, 8, 3, 5)
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "h0"]
  got = grads(lambda **a: tpu_scan.ssd_scan_tpu(**a, options=SMALL), inp, names)
  # the chunked backward's own error: dt_bias's gradient (a sum of cancelling terms) is 4e-5 off here
  for g, r, name in zip(got, grads(ssd_scan_ref, inp, names), names):
    assert rel(g, r) <= 1e-4, name


# -- multistep verification -----------------------------------------------------------------------------
def ms_inputs(seed, variant, b, kc, k, dims, dtype=F32, z=True):
  rng = np.random.default_rng(seed)
  if variant == "mamba":
    d, g, n = dims
    ch, sc, st, a_shape = (d,), (d,), (b, d, n), (d, n)
  else:
    h, p, g, n = dims
    ch, sc, st, a_shape = (h, p), (h,), (b, h, p, n), (h,)
  return {"state": normal(rng, st), "cache_x": normal(rng, (b, kc, *ch), dtype),
          "cache_dt": normal(rng, (b, kc, *sc), dtype), "cache_B": normal(rng, (b, kc, g, n), dtype),
          "n_accept": None, "x": normal(rng, (b, k, *ch), dtype), "dt": normal(rng, (b, k, *sc), dtype),
          "B": normal(rng, (b, k, g, n), dtype), "C": normal(rng, (b, k, g, n), dtype),
          "A": decay_rates(rng, a_shape), "D": normal(rng, sc), "dt_bias": normal(rng, sc),
          "z": normal(rng, (b, k, *ch), dtype) if z else None}


# (variant, dims, K_c, K, n_accept, dtype, z, options); Mamba-1 dims (d, G, N), Mamba-2 (H, P, G, N).
# Mamba-1 bf16: two programs of 128 lanes (10 groups of 16 channels, padded to 16 groups)
@pytest.mark.parametrize("variant,dims,kc,k,n_accept,dtype,z,options", [
    ("mamba", (24, 3, 5), 3, 4, (0, 2, 3), F32, True, None),
    ("mamba2", (4, 3, 2, 5), 4, 1, (4, 0, 1), F32, True, None),
    ("mamba", (160, 10, 16), 2, 3, (2, 1, 0), BF16, False, tpu_multistep.TpuVerifyOptions(lane_block=128)),
])
def test_multistep_tpu_matches_reference(variant, dims, kc, k, n_accept, dtype, z, options):
  inp = ms_inputs(kc * 10 + k, variant, 3, kc, k, dims, dtype, z)
  inp["n_accept"] = jnp.array(n_accept, jnp.int32)
  y, ck, cache = jax.jit(lambda a: tpu_multistep.multistep_scan_tpu(**a, options=options))(inp)
  y_ref, ck_ref, _ = jax.jit(multistep_scan_ref)(**inp)
  assert y.dtype == dtype and y.shape == inp["x"].shape and ck.shape == inp["state"].shape and ck.dtype == F32
  assert rel(y, y_ref) <= TOL[dtype] and rel(ck, ck_ref) <= TOL[dtype]
  for a, b_ in zip(cache, (inp["x"], inp["dt"], inp["B"])):
    assert np.array_equal(np.asarray(a), np.asarray(b_))


# -- the comparisons can fail ---------------------------------------------------------------------------
def test_wrong_block_index_fails():
  """An index map off by one (step inputs from the next time block / the next sequence) must break the
  comparison that the right one passes."""
  inp = m1_inputs(7, 2, 37, 24, 3, 5)
  shifted = tpu_scan.TpuScanOptions(time_block=16, ckpt_chunk=8, block_shift=1)
  y, h = jax.jit(lambda **a: tpu_scan.selective_scan_tpu(**a, options=shifted))(**inp)
  y_ref, h_ref = jax.jit(selective_scan_ref)(**inp)
  assert rel(y, y_ref) > 1e-2 and rel(h, h_ref) > 1e-2
  ms = ms_inputs(8, "mamba", 2, 2, 3, (24, 3, 5))
  ms["n_accept"] = jnp.array([2, 1], jnp.int32)
  shifted = tpu_multistep.TpuVerifyOptions(block_shift=1)
  y, ck, _ = jax.jit(lambda a: tpu_multistep.multistep_scan_tpu(**a, options=shifted))(ms)
  y_ref, ck_ref, _ = jax.jit(multistep_scan_ref)(**ms)
  assert rel(y, y_ref) > 1e-2 and rel(ck, ck_ref) > 1e-2


# -- Mosaic lowering -------------------------------------------------------------------------------------
def _exported_text(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def test_kernels_lower_for_tpu():
  """Every kernel, and the scans' gradients (whose forward is the kernel), export for TPU as Mosaic custom
  calls: the Pallas-to-Mosaic lowering runs on this CPU host."""
  m1 = m1_inputs(9, 2, 24, 24, 3, 16, dtype=BF16)
  m1_args = [m1[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "reset", "h0")]
  m2 = m2_inputs(10, 2, 24, 4, 8, 2, 16, dtype=BF16)
  m2_args = [m2[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "reset", "h0")]

  for fn, args in ((tpu_scan.selective_scan_tpu, m1_args), (tpu_scan.ssd_scan_tpu, m2_args)):
    def loss(*a, fn=fn):
      y, h = fn(*a, interpret=False)
      return jnp.sum(y.astype(F32)) + jnp.sum(h)
    # value and gradients: the gradients alone need no forward kernel for Mamba-2 (its backward recomputes)
    assert _exported_text(lambda *a, fn=fn: fn(*a, interpret=False), *args).count("tpu_custom_call") == 1
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, len(args) - 1))  # x, dt, A, B, C and h0
    assert _exported_text(grad, *args).count("tpu_custom_call") == 1
  for variant, dims in (("mamba", (24, 3, 16)), ("mamba2", (4, 8, 2, 16))):
    ms = ms_inputs(11, variant, 2, 2, 3, dims, BF16)
    ms["n_accept"] = jnp.array([2, 0], jnp.int32)
    text = _exported_text(lambda a: tpu_multistep.multistep_scan_tpu(**a, interpret=False), ms)
    assert text.count("tpu_custom_call") == 1


def test_bad_options_raise():
  with pytest.raises(ValueError, match="time_block"):
    tpu_scan.TpuScanOptions(time_block=20, ckpt_chunk=8)
  with pytest.raises(ValueError, match="ckpt_chunk"):
    tpu_scan.TpuScanOptions(ckpt_chunk=12)
  with pytest.raises(ValueError, match="lane_block"):
    tpu_multistep.TpuVerifyOptions(lane_block=192)
  with pytest.raises(ValueError, match="groups"):
    tpu_scan.ChannelLayout(24, 5, 16, 0, 8192)
