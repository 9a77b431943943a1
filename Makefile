# Two commands for a fresh machine (see README.md):
#   make train  create .venv, generate the built-in dataset, train + evaluate DeepFM
#   make test   create .venv and run the test suite on CPU
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/recis-jax-deepfm

.PHONY: env train demo test bench-io clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@set -e; base=$$(scripts/find_python.sh); echo "using $$base"; \
	  $$base -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

env: $(VENV)/.installed

train: env
	$(VENV)/bin/recis-jax train --config configs/deepfm.py --workdir $(WORKDIR)

demo: train

test: env
	$(PY) -m pytest -q tests

bench-io: env
	$(PY) benchmarks/io.py

clean:
	rm -rf $(VENV) .pytest_cache
