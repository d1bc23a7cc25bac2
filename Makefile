# xpertctl — set-up, tests, demo, benchmarks. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= full

.PHONY: setup test demo corpus bench fixtures clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel on this disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

fixtures: setup
	$(BIN)/python fixtures/make_fixtures.py build/fixtures

corpus: setup
	$(BIN)/python -m xpertctl.demo_setup corpus

demo: setup
	DEMO=$(DEMO) $(BIN)/python -m xpertctl.demo_setup demo

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build .pytest_cache
