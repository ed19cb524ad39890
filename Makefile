# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch; installed before the project so no CUDA build is pulled in.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow lint bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[dev,ray]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/metarl demo

test: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check metarl envs agents experiments tests
	$(VENV)/bin/mypy metarl

bench: $(VENV)/.dev
	$(VENV)/bin/metarl bench adapt

clean:
	rm -rf $(VENV) runs .pytest_cache
