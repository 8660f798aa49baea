"""The kernels package as a leaf with explicit options: it imports no other part of hybrid_jax, its tuning is
a hashable value (`KernelOptions`) rather than module state, and nothing patches kernel modules."""
import ast
import dataclasses
import glob
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import pallas
from hybrid_jax.pallas import KernelOptions, ScanImpl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "hybrid_jax", "pallas")
F32, BF16 = jnp.float32, jnp.bfloat16


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


# -- (a) a leaf package ----------------------------------------------------------------------------------
# Every hybrid_jax package but the kernels' is blocked (hybrid_jax.config stays: the top-level package
# imports it); then the kernels run their references and dispatch.
_BLOCKED_IMPORT = r"""
import importlib.abc, os, sys
root = os.path.join(sys.argv[1], "hybrid_jax")
blocked = sorted("hybrid_jax." + os.path.splitext(n)[0] for n in os.listdir(root)
                 if n not in ("__init__.py", "config.py", "pallas", "__pycache__") and not n.startswith("."))
assert {"hybrid_jax.model", "hybrid_jax.decode", "hybrid_jax.train"} <= set(blocked), blocked

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + ".") for b in blocked):
      raise ImportError(f"blocked: {name}")
    return None

sys.meta_path.insert(0, Blocker())
import jax, jax.numpy as jnp
from hybrid_jax import pallas
k = jax.random.split(jax.random.PRNGKey(0), 5)
x, dt = jax.random.normal(k[0], (1, 3, 4)), jax.random.normal(k[1], (1, 3, 4))
B, C = jax.random.normal(k[2], (1, 3, 2, 2)), jax.random.normal(k[3], (1, 3, 2, 2))
A, D, bias = -jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(4)
y_ref, h_ref = pallas.selective_scan_ref(x, dt, A, B, C, D, bias)
y, h = pallas.selective_scan(x, dt, A, B, C, D, bias, impl=pallas.ScanImpl.CHUNKED)
assert float(jnp.max(jnp.abs(y - y_ref))) < 1e-5 and float(jnp.max(jnp.abs(h - h_ref))) < 1e-5
loaded = sorted(m for m in sys.modules if m.startswith("hybrid_jax"))
others = [m for m in loaded
          if m not in ("hybrid_jax", "hybrid_jax.config") and not m.startswith("hybrid_jax.pallas")]
assert not others, others
print("ok", len(loaded))
"""


def test_package_imports_without_the_rest_of_hybrid_jax():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, REPO], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
  assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def _package_sources():
  paths = sorted(glob.glob(os.path.join(PACKAGE, "*.py")))
  return {path: ast.parse(pathlib.Path(path).read_text(), path) for path in paths}


def test_package_sources_import_no_other_hybrid_jax_and_keep_no_global_state():
  """Statically: no import of hybrid_jax outside the package, no `global` statement, and no module-level
  name reassigned (the switches are KernelOptions fields now)."""
  for path, tree in _package_sources().items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        mods = [node.module or ""]
      else:
        mods = []
      for mod in mods:
        assert not mod.startswith("hybrid_jax") or mod.startswith("hybrid_jax.pallas"), (path, mod)
      assert not isinstance(node, ast.Global), (path, node.lineno)
    assigns = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    top = [t.id for n in assigns for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
           if isinstance(t, ast.Name)]
    assert len(top) == len(set(top)), (path, top)


# -- (b) no patching of kernel modules -------------------------------------------------------------------
def kernel_module_patches(root: str) -> list[str]:
  """setattr / monkeypatch.setattr / attribute assignments aimed at a module of hybrid_jax.pallas (or a name
  imported from it) in root's bench/ and tests/ (Python files, and the `python -c` snippets of shell
  scripts), as 'path:line'. The builtin setattr also counts on an object that is not an imported name (a
  function's `module` argument, say): it could be a kernel module."""
  hits = []
  for path in sorted(glob.glob(os.path.join(root, "bench", "**", "*.py"), recursive=True)
                     + glob.glob(os.path.join(root, "tests", "**", "*.py"), recursive=True)):
    tree = ast.parse(pathlib.Path(path).read_text(), path)
    aliases, imported = {"hybrid_jax.pallas"}, set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
      if isinstance(node, ast.Import):
        aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("hybrid_jax.pallas")}
      elif isinstance(node, ast.ImportFrom) and node.module:
        if node.module.startswith("hybrid_jax.pallas"):
          aliases |= {a.asname or a.name for a in node.names}
        elif node.module == "hybrid_jax":
          aliases |= {a.asname or a.name for a in node.names if a.name == "pallas"}

    def aimed(target, aliases=frozenset(aliases)) -> bool:
      if isinstance(target, ast.Constant) and isinstance(target.value, str):
        return target.value.startswith("hybrid_jax.pallas")
      parts = []
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      if not isinstance(target, ast.Name):
        return False
      dotted = ".".join([target.id, *reversed(parts)])
      return any(dotted == a or dotted.startswith(a + ".") for a in aliases)

    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and node.args:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        target = node.args[0]
        unknown = isinstance(f, ast.Name) and not (isinstance(target, ast.Name) and target.id in imported)
        if name in ("setattr", "delattr") and (aimed(target) or unknown):
          hits.append(f"{os.path.relpath(path, root)}:{node.lineno}")
      elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
          if isinstance(t, ast.Attribute) and aimed(t.value):
            hits.append(f"{os.path.relpath(path, root)}:{node.lineno}")
  for path in sorted(glob.glob(os.path.join(root, "bench", "*.sh"))):
    text = pathlib.Path(path).read_text()
    for alias in set(re.findall(r"import (hybrid_jax\.pallas[\w.]*)(?: as (\w+))?", text)):
      name = re.escape(alias[1] or alias[0])
      for m in re.finditer(rf"(?<![\w.]){name}\.\w+\s*=(?!=)|setattr\(\s*{name}\b", text):
        hits.append(f"{os.path.relpath(path, root)}:{text.count(chr(10), 0, m.start()) + 1}")
  return hits


def test_no_setattr_on_kernel_modules():
  assert kernel_module_patches(REPO) == []


def test_patch_finder_finds_patches(tmp_path):
  """The finder above flags every form it looks for (so an empty result means something)."""
  (tmp_path / "bench").mkdir()
  (tmp_path / "tests").mkdir()
  (tmp_path / "bench" / "a.py").write_text(
      "from hybrid_jax.pallas import multistep as ms\nimport hybrid_jax.pallas.scan as s\nimport jax\n"
      "ms.FAST_MATH = False\nsetattr(s, 'BWD_IMPL', 'chunked')\njax.config.x = 1\n"
      "def with_settings(module, name):\n  setattr(module, name, 0)\n  setattr(jax, name, 0)\n")
  (tmp_path / "tests" / "test_a.py").write_text(
      "from hybrid_jax import pallas\ndef test(monkeypatch):\n  monkeypatch.setattr(pallas.scan, 'X', 1)\n"
      "  monkeypatch.setattr('hybrid_jax.pallas.multistep.ACC_Y', False)\n"
      "  monkeypatch.setattr(dict, 'x', 1)\n")
  (tmp_path / "bench" / "run.sh").write_text(
      "python3 -c \"import hybrid_jax.pallas.scan as s; s.BWD_IMPL = 1\"\n")
  assert kernel_module_patches(str(tmp_path)) == ["bench/a.py:4", "bench/a.py:5", "bench/a.py:8",
                                                  "tests/test_a.py:3", "tests/test_a.py:4", "bench/run.sh:1"]


# -- (c) options are values ------------------------------------------------------------------------------
def test_options_hashable_and_validated():
  a, b = KernelOptions(), KernelOptions(fast_math=False, tile_override=[32, 1])
  assert hash(a) == hash(KernelOptions()) and a == KernelOptions() and a != b
  assert b.tile_override == (32, 1) and len({a, b, KernelOptions()}) == 2
  assert dataclasses.replace(a, bwd_impl="chunked").bwd_impl == "chunked" and a.bwd_impl == "kernel"
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.fast_math = False
  for bad in ({"bwd_impl": "scan"}, {"gpu_mamba": "auto"}, {"gpu_mamba2": "triton"}, {"bwd_chunk": 0},
              {"tpu_mamba2": "auto"}, {"platform": "metal"}):
    with pytest.raises(ValueError, match="KernelOptions"):
      KernelOptions(**bad)
  assert ScanImpl("pallas") is ScanImpl.PALLAS and ScanImpl.CHUNKED == "chunked"


def _m1_inputs(key, b=2, l=9, d=6, g=2, n=3):
  k = jax.random.split(key, 10)
  rn = lambda kk, s: jax.random.normal(kk, s, F32)
  return dict(x=rn(k[0], (b, l, d)), dt=rn(k[1], (b, l, d)), A=-jnp.exp(rn(k[2], (d, n))),
              B=rn(k[3], (b, l, g, n)), C=rn(k[4], (b, l, g, n)), D=rn(k[5], (d,)), dt_bias=rn(k[6], (d,)),
              z=rn(k[7], (b, l, d)), reset=jax.random.bernoulli(k[8], 0.15, (b, l)), h0=rn(k[9], (b, d, n)))


def test_two_options_two_programs_same_numerics():
  """A jitted scan with the options static: equal options reuse a trace, different ones trace anew (forward
  and the custom VJP's backward), and in interpret mode both give the same values and gradients."""
  inp = _m1_inputs(jax.random.PRNGKey(3))
  names = ("x", "dt", "B", "C", "h0")
  traces = []

  def run(vals, options):
    traces.append(options)

    def loss(*v):
      y, h = pallas.selective_scan(**dict(inp, **dict(zip(names, v))), impl="pallas", options=options)
      w = jnp.cos(jnp.arange(y.size, dtype=F32)).reshape(y.shape)
      return jnp.sum(y * w) + jnp.sum(jnp.sin(h)), (y, h)
    return jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True)(*vals)

  run = jax.jit(run, static_argnames="options")
  vals = tuple(inp[k] for k in names)
  default = KernelOptions()
  other = KernelOptions(bwd_impl="chunked", bwd_chunk=4, fwd_tile=8, bwd_tile=8)
  g1, (y1, h1) = run(vals, options=default)
  g2, (y2, h2) = run(vals, options=other)
  run(vals, options=KernelOptions())
  assert traces == [default, other]
  y_ref, _ = pallas.selective_scan_ref(**inp)
  assert rel(y1, y_ref) <= 1e-5 and rel(y2, y1) <= 1e-5 and rel(h2, h1) <= 1e-5
  for a, b, name in zip(g1, g2, names):
    assert rel(b, a) <= 1e-5, name


@pytest.mark.parametrize("variant", ["mamba", "mamba2"])
def test_multistep_switches_same_numerics(variant):
  """The verify kernel with every switch off and a small tile against the defaults (interpret mode)."""
  ks = jax.random.split(jax.random.PRNGKey(7), 12)
  rn = lambda kk, s: jax.random.normal(kk, s, F32)
  b, kc, k = 2, 3, 4
  if variant == "mamba":
    ch, sc, st, a = (12,), (12,), (b, 12, 5), -jnp.exp(rn(ks[8], (12, 5)))
    g, n, z = 3, 5, rn(ks[11], (b, k, 12))
  else:
    ch, sc, st, a = (4, 3), (4,), (b, 4, 3, 5), -jnp.exp(rn(ks[8], (4,)))
    g, n, z = 2, 5, None
  inp = dict(state=rn(ks[0], st), cache_x=rn(ks[1], (b, kc, *ch)), cache_dt=rn(ks[2], (b, kc, *sc)),
             cache_B=rn(ks[3], (b, kc, g, n)), n_accept=jnp.array([3, 1], jnp.int32),
             x=rn(ks[4], (b, k, *ch)), dt=rn(ks[5], (b, k, *sc)), B=rn(ks[6], (b, k, g, n)),
             C=rn(ks[7], (b, k, g, n)), A=a, D=rn(ks[9], sc), dt_bias=rn(ks[10], sc), z=z)
  off = KernelOptions(acc_y=False, fast_math=False, bits_bf16=False, fma=False, ptx_rcp=False,
                      lane_scalars=False, tile_override=(32, 1) if variant == "mamba" else (1, 1))
  y1, c1, _ = pallas.multistep_scan(**inp, impl=ScanImpl.PALLAS)
  y2, c2, _ = pallas.multistep_scan(**inp, impl="pallas", options=off)
  y_ref, c_ref, _ = pallas.multistep_scan_ref(**inp)
  assert rel(y1, y_ref) <= 1e-5 and rel(c1, c_ref) <= 1e-5
  assert rel(y2, y1) <= 1e-5 and rel(c2, c1) <= 1e-5
