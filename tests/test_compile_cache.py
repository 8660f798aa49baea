"""Where the CLIs' persistent compilation cache lives, and turning it off."""
import os

from hybrid_jax.compile_cache import ENV_VAR, compilation_cache_dir


def test_cache_dir_default_custom_and_off(monkeypatch, tmp_path):
  monkeypatch.delenv(ENV_VAR, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compilation_cache_dir() == os.path.join(str(tmp_path), ".cache", "hybrid_jax", "jax")
  monkeypatch.setenv(ENV_VAR, str(tmp_path / "jit"))
  assert compilation_cache_dir() == str(tmp_path / "jit")
  for off in ("0", "off", "OFF", "false", "none"):
    monkeypatch.setenv(ENV_VAR, off)
    assert compilation_cache_dir() is None
