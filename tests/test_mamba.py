"""Mamba-1 / Mamba-2 mixers against the independent PyTorch loops of docs/DESIGN.md §3.1-3.2 (tests/mamba_torch_ref.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mamba_torch_ref import TorchMamba1, TorchMamba2

from hybrid_jax import pallas
from hybrid_jax.config import ModelConfig, SSMConfig
from hybrid_jax.convert.mambainllama import mixer_to_torch
from hybrid_jax.model import hybrid
from hybrid_jax.model.conv import causal_conv
from hybrid_jax.model.hybrid import full_context
from hybrid_jax.model.mamba import Mamba
from hybrid_jax.model.mamba2 import Mamba2

B, T = 2, 7


def tiny_cfg(variant: str, **ssm) -> ModelConfig:
  # D=32, H=4, hd=8, Hkv=2: d_inner=32, d_xb=16, GQA/group repeat 2.
  ssm = {"scan_impl": "reference", **ssm}
  if variant == "mamba":
    s = SSMConfig(variant="mamba", d_state=8, **ssm)
  else:
    s = SSMConfig(variant="mamba2", d_state=8, ngroups=4, **ssm)
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_layers=(0,), ssm=s)


def _mod(variant, cfg):
  return (Mamba if variant == "mamba" else Mamba2)(cfg)


def _params(variant, cfg, seed=0):
  p = hybrid.init_mixer_params(cfg, 1, jax.random.PRNGKey(seed))
  # Non-trivial values for everything the init leaves at constants (D = 1, norm = 1, A_log rows equal).
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def _torch(variant, cfg, p, **kw):
  if variant == "mamba":
    m = TorchMamba1(cfg.hidden_size, cfg.d_inner, cfg.d_xb, cfg.ssm.d_state, cfg.dt_rank, **kw)
  else:
    m = TorchMamba2(cfg.hidden_size, cfg.d_inner, cfg.d_xb, cfg.ssm.ngroups, cfg.ssm.d_state)
  sd = {k: torch.from_numpy(np.array(v, np.float64)) for k, v in mixer_to_torch(p).items()}
  m = m.double()
  m.load_state_dict(sd, strict=True)
  return m


def _run_jax(variant, cfg, p, u, seg=None):
  y = _mod(variant, cfg).apply({"params": p}, u, full_context(cfg, u.shape[:2], seg))
  return np.asarray(y)


@pytest.mark.parametrize("variant,impl", [("mamba", "reference"), ("mamba2", "reference"), ("mamba2", "pallas")])
def test_mixer_matches_torch_loop(variant, impl):
  """The mixer's full-sequence path against the torch loop, with the reference scan and (Mamba-2) with the
  Pallas chunk kernels (interpret mode on CPU)."""
  cfg = tiny_cfg(variant, scan_impl=impl)
  p = _params(variant, cfg)
  u = jax.random.normal(jax.random.PRNGKey(3), (B, T, cfg.hidden_size))
  y = _run_jax(variant, cfg, p, u)
  with torch.no_grad():
    ref = _torch(variant, cfg, p)(torch.from_numpy(np.array(u, np.float64))).numpy()
  assert np.abs(ref).max() > 1e-2
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_mamba1_dt_bias_counts_twice():
  """The released Mamba-1 layers add dt_proj.bias twice; a single-bias loop must disagree."""
  cfg = tiny_cfg("mamba")
  p = _params("mamba", cfg)
  p["dt_proj"]["bias"] = p["dt_proj"]["bias"] + 1.0  # make the second bias clearly matter
  u = jax.random.normal(jax.random.PRNGKey(4), (B, T, cfg.hidden_size))
  y = _run_jax("mamba", cfg, p, u)
  x = torch.from_numpy(np.array(u, np.float64))
  with torch.no_grad():
    twice = _torch("mamba", cfg, p)(x).numpy()
    once = _torch("mamba", cfg, p, double_dt_bias=False)(x).numpy()
  np.testing.assert_allclose(y, twice, atol=1e-5, rtol=1e-5)
  assert np.abs(y - once).max() > 1e-3


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_state_carry_equals_full(variant):
  """Chunked calls carrying {'conv', 'ssm'} (prefill 3, then 1-token steps) == one full call."""
  cfg = tiny_cfg(variant)
  mod = _mod(variant, cfg)
  p = _params(variant, cfg)
  u = jax.random.normal(jax.random.PRNGKey(5), (B, T, cfg.hidden_size))
  full = _run_jax(variant, cfg, p, u)
  state = mod.init_state(B, T, jnp.float32)
  outs = []
  for lo, hi in [(0, 3)] + [(i, i + 1) for i in range(3, T)]:
    y, state = mod.apply({"params": p}, u[:, lo:hi], full_context(cfg, (B, hi - lo)), state, method="cached")
    outs.append(np.asarray(y))
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_single_step_scan_is_plain_elementwise(variant):
  """l = 1 (every cached decode step): whatever impl, no kernel launch and no loop, and the reference's values
  (a kernel here pads time to its chunk; the chunked SSD runs ~10 matmuls for one step)."""
  ks = jax.random.split(jax.random.PRNGKey(12), 8)
  rn = lambda k, s: jax.random.normal(k, s, jnp.float32)
  if variant == "mamba":
    d, g, n = 8, 2, 4
    inp = {"x": rn(ks[0], (B, 1, d)), "dt": rn(ks[1], (B, 1, d)), "A": -jnp.exp(rn(ks[2], (d, n))),
           "B": rn(ks[3], (B, 1, g, n)), "C": rn(ks[4], (B, 1, g, n)), "D": rn(ks[5], (d,)),
           "dt_bias": rn(ks[6], (d,)), "z": rn(ks[7], (B, 1, d)), "h0": rn(ks[0], (B, d, n))}
    fn, ref = pallas.selective_scan, pallas.selective_scan_ref
  else:
    h, n = 2, 3
    inp = {"x": rn(ks[0], (B, 1, h, n)), "dt": rn(ks[1], (B, 1, h)), "A": -jnp.exp(rn(ks[2], (h,))),
           "B": rn(ks[3], (B, 1, 1, n)), "C": rn(ks[4], (B, 1, 1, n)), "D": rn(ks[5], (h,)),
           "dt_bias": rn(ks[6], (h,)), "h0": rn(ks[7], (B, h, n, n))}
    fn, ref = pallas.ssd_scan, pallas.ssd_scan_ref
  want = ref(**inp)  # the one-step path (checked against the lax.scan path below)
  for impl in ("auto", "pallas", "chunked", "reference"):
    jaxpr = str(jax.make_jaxpr(lambda inp, impl=impl: fn(**inp, impl=impl))(inp))
    assert "pallas_call" not in jaxpr and "scan" not in jaxpr and "while" not in jaxpr, impl
    got = fn(**inp, impl=impl)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  # and the reference's one-step path equals its multi-step lax.scan on the same step
  two = {k: (jnp.concatenate([v, v], axis=1) if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
  y2, _ = ref(**two)
  np.testing.assert_allclose(y2[:, :1], want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_segments_isolated(variant):
  """Two packed documents in one row == each alone (conv taps and scan state do not cross)."""
  cfg = tiny_cfg(variant)
  p = _params(variant, cfg)
  u = jax.random.normal(jax.random.PRNGKey(6), (1, T, cfg.hidden_size))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]], jnp.int32)
  y = _run_jax(variant, cfg, p, u, seg)
  np.testing.assert_allclose(y[:, :3], _run_jax(variant, cfg, p, u[:, :3]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y[:, 3:], _run_jax(variant, cfg, p, u[:, 3:]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_pieces_compose_and_replay(variant):
  """conv_input -> conv -> scan_inputs -> scan -> output composes to the mixer, and scanning cached inputs
  from a saved state replays the later steps exactly (what the speculative path does)."""
  cfg = tiny_cfg(variant)
  p = _params(variant, cfg)
  u = jax.random.normal(jax.random.PRNGKey(7), (B, T, cfg.hidden_size))
  no_reset = jnp.zeros((B, T), bool)

  def pieces(m):
    xr, rest = m.conv_input(u)
    xc, _ = causal_conv(xr, m.conv1d.weight, m.conv1d.bias)
    inp = m.scan_inputs(xc, rest)
    y, h = m.scan(inp, no_reset, None)
    _, h4 = m.scan(jax.tree.map(lambda a: a[:, :4], inp), no_reset[:, :4], None)
    y2, h2 = m.scan(jax.tree.map(lambda a: a[:, 4:], inp), no_reset[:, 4:], h4)
    return m.output(y, inp), y, h, y2, h2

  out, y, h, y2, h2 = _mod(variant, cfg).apply({"params": p}, method=pieces)
  np.testing.assert_allclose(np.asarray(out), _run_jax(variant, cfg, p, u), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y[:, 4:]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(h2), np.asarray(h), atol=1e-6)


def test_init_follows_reference():
  for variant in ("mamba", "mamba2"):
    cfg = tiny_cfg(variant)
    p = hybrid.init_mixer_params(cfg, 1, jax.random.PRNGKey(0))
    bias = p["dt_proj"]["bias"] if variant == "mamba" else p["dt_bias"]
    dt = np.asarray(jax.nn.softplus(bias))
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6 and dt.min() < dt.max()
    assert np.all(np.asarray(p["D"]) == 1)
    if variant == "mamba":
      np.testing.assert_allclose(np.exp(np.asarray(p["A_log"]))[3], np.arange(1, 9), rtol=1e-6)
    else:
      a = np.exp(np.asarray(p["A_log"]))
      assert a.min() >= 1 and a.max() <= 16
    assert np.abs(np.asarray(p["conv1d"]["weight"])).max() <= 0.5  # U(+-1/sqrt(K)), K = 4
