# `make test` sets up .venv from nothing (reusing it when present) and runs every tier but `slow`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST := $(PY) -m pytest
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test test-slow demo bench clean

$(VENV)/.installed: setup.py pyproject.toml constraints.txt $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0 setuptools wheel
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-deps ai2-olmo==0.6.0
	# mosaicml-streaming pins numpy<2.2 and transformers<5: only its MDS reader/writer and their codecs.
	$(PIP) install -q -c constraints.txt --no-deps mosaicml-streaming Brotli python-snappy cramjam zstd catalogue
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PYTEST) -m "not slow" -q --durations=15

test-slow: venv
	$(PYTEST) -m slow -q --durations=15

demo: venv
	$(PY) -m instella_plugin.demo

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info instella_plugin/kernels/*.so
