# `make test` and `make demo` set up everything they need in a local .venv.
# TORCH_SPEC: the CPU wheel that lies on this disk (CI); a GPU user with their own torch can pass TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Interpreter-bound tests are single-threaded Python: one worker per core, one torch thread each.
PYTEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv lint clean

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

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

demo: $(STAMP)
	$(PY) -m llama_adapter demo

clean:
	rm -rf $(VENV) build *.egg-info
