# `make test` and `make demo` set up everything they need in a local .venv.
# TORCH_SPEC: the CPU wheel that lies on this disk (CI); a GPU user with their own torch can pass TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Interpreter-bound tests are single-threaded Python: one worker per core, one torch thread each.
PYTEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The GPU machines run triton 3.6: a second venv compiles the kernels with it (no GPU needed). Its interpreter
# breaks on numpy >= 2.4; only the compile tests run there, but the pin keeps the venv usable for CPU tests too.
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.installed

.PHONY: test demo venv lint clean compile-check-triton36

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "installing $(TORCH_SPEC) into $(VENV) (first run only; a minute or more)"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	@echo "installing llama-adapter and its test extra into $(VENV) (pip install -e .[test]; first run only)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

$(STAMP36): setup.py
	@test -x $(PY36) || $(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install -q "$(TORCH_SPEC)" "triton==3.6.0" "numpy<2.4" pytest
	$(PY36) -m pip install -q --no-deps -e .
	touch $(STAMP36)

# tests/test_kernel_compile.py under triton 3.6 (what the GPU machines run): compile errors, spills, duplicated work.
compile-check-triton36: $(STAMP36)
	$(PY36) -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py

demo: $(STAMP)
	$(PY) -m llama_adapter demo

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info
