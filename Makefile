# Two commands for a fresh machine (see README.md):
#   make demo   create .venv, generate the built-in dataset and run the main job
#   make test   create .venv and run the test suite on CPU
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/recis-jax-demo

.PHONY: env demo test bench-io clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@set -e; base=$$(scripts/find_python.sh); echo "using $$base"; \
	  $$base -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/recis-jax demo --workdir $(WORKDIR)

test: env
	$(PY) -m pytest -q tests

bench-io: env
	$(PY) benchmarks/io.py

clean:
	rm -rf $(VENV) .pytest_cache
