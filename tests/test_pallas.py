"""Pallas scan kernels, chunked scans and the multistep verification kernel vs the lax.scan references.

CPU only: the Pallas kernels run in interpret mode (automatic when the backend is cpu).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import pallas
from hybrid_jax.pallas import (
  KernelOptions,
  ScanImpl,
  common,
  decode_attention,
  multistep,
  ops,
  reference,
  scan,
  ssd,
)

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def m1_inputs(key, b, l, d, g, n, dtype=F32):
  k = jax.random.split(key, 10)
  rn = lambda kk, s, dt=dtype: jax.random.normal(kk, s, F32).astype(dt)
  return dict(x=rn(k[0], (b, l, d)), dt=rn(k[1], (b, l, d)), A=-jnp.exp(rn(k[2], (d, n), F32)),
              B=rn(k[3], (b, l, g, n)), C=rn(k[4], (b, l, g, n)), D=rn(k[5], (d,), F32),
              dt_bias=rn(k[6], (d,), F32), z=rn(k[7], (b, l, d)),
              reset=jax.random.bernoulli(k[8], 0.15, (b, l)), h0=rn(k[9], (b, d, n), F32))


def m2_inputs(key, b, l, h, p, g, n, dtype=F32):
  k = jax.random.split(key, 9)
  rn = lambda kk, s, dt=dtype: jax.random.normal(kk, s, F32).astype(dt)
  return dict(x=rn(k[0], (b, l, h, p)), dt=rn(k[1], (b, l, h)), A=-jnp.exp(rn(k[2], (h,), F32)),
              B=rn(k[3], (b, l, g, n)), C=rn(k[4], (b, l, g, n)), D=rn(k[5], (h,), F32),
              dt_bias=rn(k[6], (h,), F32), reset=jax.random.bernoulli(k[7], 0.15, (b, l)),
              h0=rn(k[8], (b, h, p, n), F32))


M1 = {"pallas": scan.selective_scan_pallas, "chunked": lambda *a, **k: scan.selective_scan_chunked(*a, **k, chunk=4)}
M2 = {"pallas": ssd.ssd_scan_pallas, "chunked": lambda *a, **k: ssd.ssd_scan_chunked(*a, **k, chunk=4)}


def test_interpret_on_cpu():
  assert jax.default_backend() == "cpu" and common.interpret_mode()


# -- training scans: forward -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
@pytest.mark.parametrize("shape", [(2, 11, 12, 3, 5), (1, 16, 32, 2, 16), (3, 7, 6, 6, 3)])
def test_selective_scan_matches_reference(impl, dtype, shape):
  inp = m1_inputs(jax.random.PRNGKey(sum(shape)), *shape, dtype=dtype)
  y, h = M1[impl](**inp)
  y_ref, h_ref = reference.selective_scan_ref(**inp)
  assert y.dtype == dtype and h.dtype == F32 and y.shape == y_ref.shape and h.shape == h_ref.shape
  assert rel(y, y_ref) <= TOL[dtype] and rel(h, h_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
@pytest.mark.parametrize("shape", [(2, 11, 6, 5, 3, 7), (1, 16, 4, 16, 2, 8), (2, 9, 3, 3, 1, 5)])
def test_ssd_scan_matches_reference(impl, dtype, shape):
  inp = m2_inputs(jax.random.PRNGKey(sum(shape)), *shape, dtype=dtype)
  y, h = M2[impl](**inp)
  y_ref, h_ref = reference.ssd_scan_ref(**inp)
  assert y.dtype == dtype and h.dtype == F32 and y.shape == y_ref.shape and h.shape == h_ref.shape
  assert rel(y, y_ref) <= TOL[dtype] and rel(h, h_ref) <= TOL[dtype]


# -- training scans: gradients ---------------------------------------------------------------------------
def _grads(fn, inp, names):
  def loss(*vals):
    y, h = fn(**dict(inp, **dict(zip(names, vals))))
    w = jnp.cos(jnp.arange(y.size, dtype=F32)).reshape(y.shape)
    return jnp.sum(y.astype(F32) * w) + jnp.sum(jnp.sin(h))
  return jax.grad(loss, argnums=tuple(range(len(names))))(*[inp[k] for k in names])


@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_selective_scan_grads(impl):
  # pallas: several checkpointed chunks, the last one padded
  fn = functools.partial(M1[impl], options=KernelOptions(bwd_chunk=4)) if impl == "pallas" else M1[impl]
  inp = m1_inputs(jax.random.PRNGKey(3), 2, 9, 6, 2, 3)
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "z", "h0"]
  for g, r, name in zip(_grads(fn, inp, names), _grads(reference.selective_scan_ref, inp, names), names):
    assert rel(g, r) <= 1e-5, name


@pytest.mark.parametrize("bwd,tile", [("kernel", 2048), ("kernel", 8), ("chunked", 8)])
def test_selective_scan_pallas_backward(bwd, tile):
  """impl 'pallas' with either backward (bwd_impl: the kernel, the chunk-parallel JAX one): outputs and
  gradients against the reference, with whole groups per program (2048) and a group's channels split over
  programs (8: 2 of 4 padded channels, so the kernel's dB / dC are summed over channel blocks), several
  checkpointed chunks, the last one padded, and resets."""
  fn = functools.partial(scan.selective_scan_pallas,
                         options=KernelOptions(bwd_chunk=4, bwd_impl=bwd, fwd_tile=tile, bwd_tile=tile))
  inp = m1_inputs(jax.random.PRNGKey(3), 2, 9, 6, 2, 3)
  y, h = fn(**inp)
  y_ref, h_ref = reference.selective_scan_ref(**inp)
  assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "z", "h0"]
  for g, r, name in zip(_grads(fn, inp, names), _grads(reference.selective_scan_ref, inp, names), names):
    assert rel(g, r) <= 1e-5, name


def test_selective_scan_backward_kernel_cuda_lowering():
  """The backward kernel lowers for CUDA (on this CPU host), with its CTA barriers around the state scratch
  (and the chunked backward has neither)."""
  inp = m1_inputs(jax.random.PRNGKey(5), 1, 8, 8, 2, 4, dtype=BF16)
  names = ["x", "dt", "B", "C"]

  def lowered(bwd_impl):
    def loss(*vals):
      y, h = scan.selective_scan_pallas(**dict(inp, **dict(zip(names, vals))), interpret=False,
                                        options=KernelOptions(bwd_impl=bwd_impl))
      return jnp.sum(y.astype(F32)) + jnp.sum(h)
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(names))))).trace(
        *[inp[k] for k in names]).lower(lowering_platforms=("cuda",)).as_text()
  text = lowered("kernel")
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel
  assert "gpu.barrier_scope" in text  # the serialized Triton module carries the barriers
  text = lowered("chunked")
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 1 and "gpu.barrier_scope" not in text


@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_ssd_scan_grads(impl):
  inp = m2_inputs(jax.random.PRNGKey(4), 2, 9, 4, 3, 2, 5)
  names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "h0"]
  for g, r, name in zip(_grads(M2[impl], inp, names), _grads(reference.ssd_scan_ref, inp, names), names):
    assert rel(g, r) <= 1e-5, name


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_ssd_kernel_several_chunks(dtype):
  """The chunk kernel over several chunks of 16 (the last one partial), resets and h0: the chunk start states
  come from the closed form across chunks."""
  inp = m2_inputs(jax.random.PRNGKey(21), 2, 45, 4, 24, 2, 20, dtype=dtype)
  core = functools.partial(ssd.kernel_core, chunk=16, interpret=True)
  y, h = ssd._front(core, *(inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "reset", "h0")))
  y_ref, h_ref = reference.ssd_scan_ref(**inp)
  assert rel(y, y_ref) <= TOL[dtype] and rel(h, h_ref) <= TOL[dtype]


def test_ssd_kernel_cuda_lowering():
  """The chunk kernels lower for CUDA (on this CPU host) as two Triton calls, their matmuls at the precision
  asked for, or (None) at JAX's default, which the tests set to 'highest'; differentiated, the chunked form
  runs instead (no kernel)."""
  inp = m2_inputs(jax.random.PRNGKey(22), 1, 40, 2, 64, 1, 64, dtype=BF16)
  names = ["x", "dt", "B", "C"]

  def run(*vals, options=None):
    y, h = ssd.ssd_scan_pallas(**dict(inp, **dict(zip(names, vals))), interpret=False, options=options)
    return jnp.sum(y.astype(F32)) + jnp.sum(h)
  lower = lambda f: f.trace(*[inp[k] for k in names]).lower(lowering_platforms=("cuda",)).as_text()
  assert lower(jax.jit(run)).count("custom_call @__gpu$xla.gpu.triton") == 2  # the chunk states, then y
  for tf32 in (True, False, None):
    jaxpr = str(jax.make_jaxpr(functools.partial(run, options=KernelOptions(ssd_tf32=tf32)))(
        *[inp[k] for k in names]))
    assert ("precision=(Precision.DEFAULT" in jaxpr) == bool(tf32)  # DEFAULT: TF32 in the Triton lowering
  assert "triton" not in lower(jax.jit(jax.grad(run, argnums=(0, 1, 2, 3))))


# -- reset and h0 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_reset_and_h0_honoured(variant, impl):
  """A reset at step 5 makes steps 5.. equal a fresh scan of them from a zero state; h0 changes the rest."""
  if variant == "mamba":
    inp, fn = m1_inputs(jax.random.PRNGKey(5), 1, 10, 6, 2, 4), M1[impl]
  else:
    inp, fn = m2_inputs(jax.random.PRNGKey(6), 1, 10, 2, 3, 1, 4), M2[impl]
  reset = jnp.zeros((1, 10), bool).at[0, 5].set(True)
  y, h = fn(**dict(inp, reset=reset))
  tail = {k: (v[:, 5:] if k not in ("A", "D", "dt_bias", "h0") and v is not None else v) for k, v in inp.items()}
  y_tail, h_tail = fn(**dict(tail, reset=None, h0=None))
  assert rel(y[:, 5:], y_tail) <= 1e-5 and rel(h, h_tail) <= 1e-5
  y_no_h0, _ = fn(**dict(inp, reset=reset, h0=None))
  assert rel(y_no_h0[:, :5], y[:, :5]) > 1e-3  # h0 matters before the reset ...
  assert rel(y_no_h0[:, 5:], y[:, 5:]) <= 1e-5  # ... and not after it


# -- dispatch --------------------------------------------------------------------------------------------
def test_dispatch():
  """Every impl (enum or string) gives the reference's values; 'pallas' runs a kernel, the others none (on
  CPU 'auto' is the reference); a bad impl is a one-line error."""
  inp = m1_inputs(jax.random.PRNGKey(8), 1, 5, 4, 2, 3)
  inp2 = m2_inputs(jax.random.PRNGKey(9), 1, 5, 2, 3, 1, 4)
  opts = KernelOptions()
  for fn, ref_fn, args, picks in ((pallas.selective_scan, reference.selective_scan_ref, inp,
                                   (opts.gpu_mamba, opts.tpu_mamba)),
                                  (pallas.ssd_scan, reference.ssd_scan_ref, inp2, (opts.gpu_mamba2, opts.tpu_mamba2))):
    ref = ref_fn(**args)
    for impl in (*ScanImpl, "auto", "reference", "pallas", "chunked"):
      assert rel(fn(**args, impl=impl)[0], ref[0]) <= 1e-5, impl
      jaxpr = str(jax.make_jaxpr(lambda a, fn=fn, impl=impl: fn(**a, impl=impl))(args))
      runs = ops._training_impl(impl, opts.target(), *picks)  # AUTO: the backend's pick (CPU: the reference)
      assert ("pallas_call" in jaxpr) == (runs is ScanImpl.PALLAS), impl
    with pytest.raises(ValueError, match="scan impl must be one of auto"):
      fn(**args, impl="triton")


def test_auto_by_backend(monkeypatch):
  """AUTO: on GPU and on TPU the options' per-variant picks (by default Mamba-1 'pallas', Mamba-2 'chunked'
  on both), elsewhere the reference; any other impl as given. The platform is KernelOptions.platform, else
  the default backend."""
  picks = {}
  for backend in ("gpu", "tpu", "cpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    opts = KernelOptions(gpu_mamba2="reference", tpu_mamba="chunked")
    m1 = (opts.target(), opts.gpu_mamba, opts.tpu_mamba)
    m2 = (opts.target(), opts.gpu_mamba2, opts.tpu_mamba2)
    picks[backend] = (ops._training_impl("auto", *m1), ops._training_impl("auto", *m2),
                      ops._training_impl("pallas", *m2))
  assert picks["gpu"] == (ScanImpl.PALLAS, ScanImpl.REFERENCE, ScanImpl.PALLAS)
  assert picks["tpu"] == (ScanImpl.CHUNKED, ScanImpl.CHUNKED, ScanImpl.PALLAS)
  assert picks["cpu"] == (ScanImpl.REFERENCE, ScanImpl.REFERENCE, ScanImpl.PALLAS)
  defaults = KernelOptions()
  assert (defaults.tpu_mamba, defaults.tpu_mamba2) == (ScanImpl.PALLAS, ScanImpl.CHUNKED)
  assert KernelOptions(gpu_mamba2="pallas").gpu_mamba2 is ScanImpl.PALLAS
  assert defaults.target() == "cpu"  # (default_backend still patched)
  assert KernelOptions(platform="cuda").target() == "gpu" and KernelOptions(platform="tpu").target() == "tpu"
  with pytest.raises(ValueError, match="KernelOptions.platform"):
    KernelOptions(platform="metal")


# -- multistep verification ------------------------------------------------------------------------------
def ms_inputs(key, variant, b, kc, k, dtype=F32, z=True):
  ks = jax.random.split(key, 13)
  rn = lambda kk, s, dt=dtype: jax.random.normal(kk, s, F32).astype(dt)
  if variant == "mamba":
    d, g, n = 12, 3, 5
    ch, sc, st, a_shape = (d,), (d,), (b, d, n), (d, n)
  else:
    h, p, g, n = 4, 3, 2, 5
    ch, sc, st, a_shape = (h, p), (h,), (b, h, p, n), (h,)
  return dict(state=rn(ks[0], st, F32), cache_x=rn(ks[1], (b, kc, *ch)), cache_dt=rn(ks[2], (b, kc, *sc)),
              cache_B=rn(ks[3], (b, kc, g, n)), n_accept=None, x=rn(ks[4], (b, k, *ch)),
              dt=rn(ks[5], (b, k, *sc)), B=rn(ks[6], (b, k, g, n)), C=rn(ks[7], (b, k, g, n)),
              A=-jnp.exp(rn(ks[8], a_shape, F32)), D=rn(ks[9], sc, F32), dt_bias=rn(ks[10], sc, F32),
              z=rn(ks[11], (b, k, *ch)) if z else None)


def sequential(inp, variant):
  """Sequential single-step updates (the references at l = 1): replay n_accept cached steps per sequence,
  then the new steps one at a time."""
  ys, ckpts = [], []
  for i in range(inp["state"].shape[0]):
    sl = lambda v, i=i: v[i:i + 1]
    h = sl(inp["state"])
    for k in range(int(inp["n_accept"][i])):
      step = dict(x=sl(inp["cache_x"])[:, k:k + 1], dt=sl(inp["cache_dt"])[:, k:k + 1], B=sl(inp["cache_B"])[:, k:k + 1])
      h = _one(variant, step, jnp.zeros_like(step["B"]), None, inp, h)[1]
    ckpts.append(h)
    y_i = []
    for k in range(inp["x"].shape[1]):
      step = dict(x=sl(inp["x"])[:, k:k + 1], dt=sl(inp["dt"])[:, k:k + 1], B=sl(inp["B"])[:, k:k + 1])
      z = None if inp["z"] is None else sl(inp["z"])[:, k:k + 1]
      y, h = _one(variant, step, sl(inp["C"])[:, k:k + 1], z, inp, h)
      y_i.append(y)
    ys.append(jnp.concatenate(y_i, 1))
  return jnp.concatenate(ys, 0), jnp.concatenate(ckpts, 0)


def _one(variant, step, c, z, inp, h):
  if variant == "mamba":
    return reference.selective_scan_ref(step["x"], step["dt"], inp["A"], step["B"], c, inp["D"], inp["dt_bias"],
                                        z=z, h0=h)
  y, h = reference.ssd_scan_ref(step["x"], step["dt"], inp["A"], step["B"], c, inp["D"], inp["dt_bias"], h0=h)
  if z is not None:
    y = (y.astype(F32) * jax.nn.silu(z.astype(F32))).astype(y.dtype)
  return y, h


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
@pytest.mark.parametrize("kc,k,n_accept", [(3, 4, (0, 2, 3)), (4, 1, (4, 0, 1)), (1, 3, (1, 1, 0)),
                                           (5, 5, (5, 5, 5))])
def test_multistep_matches_reference_and_sequential(variant, kc, k, n_accept):
  inp = ms_inputs(jax.random.PRNGKey(kc * 10 + k), variant, 3, kc, k)
  inp["n_accept"] = jnp.array(n_accept, jnp.int32)
  y, ck, cache = pallas.multistep_scan(**inp, impl="pallas")
  y_ref, ck_ref, _ = reference.multistep_scan_ref(**inp)
  y_seq, ck_seq = sequential(inp, variant)
  assert y.shape == inp["x"].shape and ck.shape == inp["state"].shape and ck.dtype == F32
  assert rel(y, y_ref) <= 1e-5 and rel(ck, ck_ref) <= 1e-5
  assert rel(y_ref, y_seq) <= 1e-5 and rel(ck_ref, ck_seq) <= 1e-5
  for a, b_ in zip(cache, (inp["x"], inp["dt"], inp["B"])):
    assert a is b_ or np.array_equal(np.asarray(a), np.asarray(b_))


@pytest.mark.parametrize("m1_tile,m2_tile,acc_y,fast_math", [((256, 4), (16, 4), True, True),
                                                             ((32, 1), (1, 1), False, False)])
def test_multistep_tilings(m1_tile, m2_tile, acc_y, fast_math):
  """Both ends of the tiling: large tiles (Mamba-1: several groups per program and padded groups; Mamba-2:
  more rows than P has) and small ones (a group's channels split over programs); y gathered in registers
  or stored per step; the per-step scalars with the fast or the libdevice math."""
  switches = KernelOptions(acc_y=acc_y, fast_math=fast_math)
  ks = jax.random.split(jax.random.PRNGKey(21), 13)
  rn = lambda kk, s: jax.random.normal(kk, s, F32)
  b, kc, k = 2, 2, 4
  n_acc = jnp.array([2, 1], jnp.int32)

  def check(inp, opts):
    y, ck, _ = pallas.multistep_scan(**inp, impl="pallas", options=opts)
    y_ref, ck_ref, _ = reference.multistep_scan_ref(**inp)
    assert rel(y, y_ref) <= 1e-5 and rel(ck, ck_ref) <= 1e-5

  # Mamba-1: d 48 = 3 groups x 16 channels, N 5 (-> 8): a group is 128 state elements
  d, g, n = 48, 3, 5
  m1 = dict(state=rn(ks[0], (b, d, n)), cache_x=rn(ks[1], (b, kc, d)), cache_dt=rn(ks[2], (b, kc, d)),
            cache_B=rn(ks[3], (b, kc, g, n)), n_accept=n_acc, x=rn(ks[4], (b, k, d)), dt=rn(ks[5], (b, k, d)),
            B=rn(ks[6], (b, k, g, n)), C=rn(ks[7], (b, k, g, n)), A=-jnp.exp(rn(ks[8], (d, n))),
            D=rn(ks[9], (d,)), dt_bias=rn(ks[10], (d,)), z=rn(ks[11], (b, k, d)))
  opts = dataclasses.replace(switches, tile_override=m1_tile)
  assert multistep._m1_tiling(b, g, 16, 8, opts) == ((2, 16, 4) if m1_tile[0] == 256 else (1, 4, 1))
  check(m1, opts)
  # Mamba-2: 2 heads, P 12, N 6: the row tile is capped at next_pow2(P) = 16
  h, p, g2, n2 = 2, 12, 1, 6
  m2 = dict(state=rn(ks[0], (b, h, p, n2)), cache_x=rn(ks[1], (b, kc, h, p)), cache_dt=rn(ks[2], (b, kc, h)),
            cache_B=rn(ks[3], (b, kc, g2, n2)), n_accept=n_acc, x=rn(ks[4], (b, k, h, p)),
            dt=rn(ks[5], (b, k, h)), B=rn(ks[6], (b, k, g2, n2)), C=rn(ks[7], (b, k, g2, n2)),
            A=-jnp.exp(rn(ks[8], (h,))), D=rn(ks[9], (h,)), dt_bias=rn(ks[10], (h,)), z=None)
  opts = dataclasses.replace(switches, tile_override=m2_tile)
  assert multistep._m2_tiling(b, p, 8, opts) == (*m2_tile, 8)  # 16 rows > P = 12: a padded tile
  check(m2, opts)


@pytest.mark.parametrize("width", [2, 4, 8])
def test_multistep_mamba2_column_chunks(width):
  """Mamba-2's state held as chunks of N columns (N 8: four, two or one chunk), per head against the
  reference; heads with mild to total decays over the steps."""
  opts = KernelOptions(tile_override=(4, 1, width))
  inp = ms_inputs(jax.random.PRNGKey(31), "mamba2", 2, 3, 4)
  tile = lambda v: jnp.concatenate([v, v[..., :3]], -1)  # N 5 -> 8
  inp.update(n_accept=jnp.array([3, 1], jnp.int32), state=tile(inp["state"]), cache_B=tile(inp["cache_B"]),
             B=tile(inp["B"]), C=tile(inp["C"]), A=-jnp.array([0.1, 1.0, 3.0, 300.0]))
  assert multistep._m2_tiling(2, 3, 8, opts) == (4, 1, width)
  y, ck, _ = pallas.multistep_scan(**inp, impl="pallas", options=opts)
  y_ref, ck_ref, _ = reference.multistep_scan_ref(**inp)
  for hh in range(4):
    assert rel(y[:, :, hh], y_ref[:, :, hh]) <= 1e-5 and rel(ck[:, hh], ck_ref[:, hh]) <= 1e-5, hh


def test_bf16_bits_to_f32_exact():
  """The kernels' bfloat16 -> float32 on the bits equals the conversion, for every bit pattern but NaNs."""
  v = jax.lax.bitcast_convert_type(jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16), BF16)
  got, want = np.asarray(multistep._to_f32(v)), np.asarray(v.astype(F32))
  keep = ~np.isnan(want)
  assert keep.sum() > 65000 and np.array_equal(got[keep].view(np.uint32), want[keep].view(np.uint32))


def test_softplus_fast_accuracy():
  """The kernel's fast softplus against float64 over the range dt + dt_bias takes (and the far tails)."""
  v = np.linspace(-40.0, 40.0, 400_001, dtype=np.float32)
  got = np.asarray(common.softplus_fast(jnp.asarray(v)), np.float64)
  want = np.logaddexp(0.0, v.astype(np.float64))
  assert np.max(np.abs(got - want) / want) <= 5e-6


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
@pytest.mark.parametrize("ptx", [True, False])
def test_multistep_cuda_lowering_explicit_fma(variant, ptx):
  """The kernel lowered for CUDA (on this CPU host) carries its FMAs, the softplus reciprocal and (Mamba-2)
  the per-lane scalars' shuffles as inline PTX (XLA's Triton pipeline would not contract a * b + c), and
  none with the switches off."""
  opts = KernelOptions(fma=ptx, ptx_rcp=ptx, lane_scalars=ptx)
  inp = ms_inputs(jax.random.PRNGKey(12), variant, 1, 2, 2, dtype=BF16, z=variant == "mamba")
  inp["n_accept"] = jnp.array([1], jnp.int32)
  f = jax.jit(lambda a: pallas.multistep_scan(**a, impl="pallas", interpret=False, options=opts))
  text = f.trace(inp).lower(lowering_platforms=("cuda",)).as_text()
  assert ("fma.rn.f32" in text) == ptx and ("rcp.approx.ftz.f32" in text) == ptx
  # the per-lane scalars and their shuffles: Mamba-2 only (Mamba-1's dt is per channel)
  assert ("shfl.sync.idx" in text) == ("%laneid" in text) == (ptx and variant == "mamba2")


def test_ptx_helpers_plain_outside_a_kernel():
  """common.fma / common.rcp without PTX are the plain expressions (what interpret mode runs)."""
  a, b, c = jnp.float32(1.5), jnp.full((3,), 2.0, F32), jnp.float32(-1.0)
  assert np.allclose(common.fma(a, b, c), [2.0, 2.0, 2.0]) and float(common.rcp(jnp.float32(4.0))) == 0.25


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_multistep_bf16_no_z(variant):
  inp = ms_inputs(jax.random.PRNGKey(11), variant, 2, 3, 4, dtype=BF16, z=False)
  inp["n_accept"] = jnp.array([1, 3], jnp.int32)
  y, ck, _ = pallas.multistep_scan(**inp, impl="pallas")
  y_ref, ck_ref, _ = reference.multistep_scan_ref(**inp)
  assert y.dtype == BF16 and rel(y, y_ref) <= 1e-2 and rel(ck, ck_ref) <= 1e-2


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_multistep_k1_is_single_step(variant):
  """K = 1, n_accept = 1: the cached step is applied, then one plain step from there."""
  inp = ms_inputs(jax.random.PRNGKey(12), variant, 2, 1, 1)
  inp["n_accept"] = jnp.ones((2,), jnp.int32)
  y, ck, _ = pallas.multistep_scan(**inp, impl="pallas")
  cached = dict(x=inp["cache_x"], dt=inp["cache_dt"], B=inp["cache_B"])
  _, h1 = _one(variant, cached, jnp.zeros_like(inp["cache_B"]), None, inp, inp["state"])
  y1, _ = _one(variant, dict(x=inp["x"], dt=inp["dt"], B=inp["B"]), inp["C"], inp["z"], inp, h1)
  assert rel(ck, h1) <= 1e-5 and rel(y, y1) <= 1e-5
  # and the next call with nothing accepted starts from that checkpoint unchanged
  nxt = dict(inp, state=ck, n_accept=jnp.zeros((2,), jnp.int32))
  assert rel(pallas.multistep_scan(**nxt, impl="pallas")[1], ck) == 0.0


# -- attention of a few queries over a KV cache -------------------------------------------------------------
def _dense_attention(q, k, v, mask):
  """The einsum path's semantics, written out (GQA as repeat_kv, fp32 softmax, masked keys at float32's min)."""
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2).astype(F32), jnp.repeat(v, rep, axis=2).astype(F32)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(F32), k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None], s, jnp.finfo(F32).min)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("b,t,h,kvh,s_len,hd,dtype", [(2, 1, 9, 3, 384, 64, F32), (2, 5, 8, 2, 128, 32, F32),
                                                      (1, 3, 4, 4, 192, 16, BF16)])
def test_decode_attention_matches_einsum(b, t, h, kvh, s_len, hd, dtype):
  """GQA decode step and verify-sized calls, left padding, a row that sees no key (it averages every value, as
  the einsum path does); bf16 to the rounding of its probabilities."""
  ks = jax.random.split(jax.random.PRNGKey(t), 3)
  q, k, v = (jax.random.normal(kk, shape, F32).astype(dtype)
             for kk, shape in zip(ks, [(b, t, h, hd), (b, s_len, kvh, hd), (b, s_len, kvh, hd)]))
  pos, off = jnp.array([s_len // 2 + 3, s_len - t][:b]), jnp.array([5, 0][:b])
  keys, queries = jnp.arange(s_len)[None, None], pos[:, None, None] + jnp.arange(t)[None, :, None]
  mask = (keys <= queries) & (keys >= off[:, None, None])
  mask = mask.at[0, t - 1].set(False)
  got = decode_attention.decode_attention(q, k, v, mask, interpret=True)
  assert got.shape == q.shape and got.dtype == dtype
  assert rel(got, _dense_attention(q, k, v, mask)) <= (1e-6 if dtype == F32 else 1e-2)


def test_decode_attention_shapes_and_cuda_lowering():
  """`supported` refuses what the kernel cannot take; the kernel lowers for CUDA (on this CPU host) as one
  Triton call with a cache length that is a multiple of the block but not a power of two."""
  assert decode_attention.supported(1, 9, 3, 384, 64) and decode_attention.supported(9, 32, 8, 2560, 64)
  assert not decode_attention.supported(1, 9, 3, 100, 64)  # not whole blocks of keys
  assert not decode_attention.supported(1, 9, 3, 384, 48)  # head dim not a power of two
  assert not decode_attention.supported(17, 32, 8, 2560, 64)  # 68 query rows per KV head
  args = [jax.ShapeDtypeStruct(shape, BF16) for shape in [(1, 1, 9, 64), (1, 384, 3, 64), (1, 384, 3, 64)]]
  f = jax.jit(lambda *a: decode_attention.decode_attention(*a, interpret=False))
  text = f.trace(*args, jax.ShapeDtypeStruct((1, 1, 384), jnp.bool_)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 1
