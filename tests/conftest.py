"""Test set-up: 8 simulated CPU devices (sharding tests), fp32 matmuls, the local default teacher."""
import os

# 8 simulated CPU devices for the sharding tests. The suite compiles hundreds of tiny programs, and LLVM's
# optimisation of them costs more than running them: without it the suite takes about 30% less time.
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true")
_user_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_user_flags] + [f for f in _TEST_XLA_FLAGS
                                                    if f.split("=")[0] not in _user_flags]).strip()
# CLI mains called in-process would turn JAX's persistent compilation cache on for the rest of the session
# (and write to the user's ~/.cache); tests that need the cache set it themselves.
os.environ.setdefault("HYBRID_JAX_COMPILATION_CACHE", "off")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEACHER = os.path.join(REPO, ".cache", "teachers", "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def teacher_dir():
  """The converted SmolLM2-135M-Instruct checkpoint (`make teacher` makes it)."""
  path = os.environ.get("HYBRID_JAX_TEACHER", DEFAULT_TEACHER)
  if not os.path.exists(os.path.join(path, "config.json")):
    pytest.fail(f"default teacher missing at {path}: run `make teacher`")
  return path


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every XLA:CPU executable keeps its own memory
  mappings; one process running the whole suite otherwise reaches the kernel's limit on mappings
  (vm.max_map_count, 65530 by default) and the next compilation aborts."""
  yield
  jax.clear_caches()


# The longest files first: `pytest -n 2 --dist loadfile` hands files to the two workers in collection order, and
# a long file collected last keeps one worker busy while the other idles. Order inside a file is kept.
LONGEST_FIRST = ("test_speculative.py", "test_pallas.py", "test_multihost.py", "test_hybrid.py", "test_train.py",
                 "test_harness.py", "test_cli_errors.py", "test_default_data.py", "test_llama_parity.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
