# mmer: two commands for a fresh machine (see README).
#   make repro      - create the environment if missing, make the embedded corpus, run `dvc repro` (all results)
#   make test       - create the environment if missing, run every notebook's tests and the integration tests
# For developers:
#   make test-fast  - everything but the slow integration tests (pipeline, resume, paper-mode rehearsal)
#   make bench      - per-paper epoch cost: cached vs live encoders, loop overhead, throughput, memory
#   make export     - regenerate mmer/ from the notebooks and clean the notebooks before committing
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Nothing may fetch weights or data from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: env repro test test-fast bench export
env: $(VENV)/.installed

# Every version from the lock file constraints.txt; torch first and alone, so a CPU machine takes the CPU wheel and
# nothing pulls CUDA builds.
$(VENV)/.installed: settings.ini setup.py constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

repro: env
	dvc repro
	python -m mmer.pipeline timing >/dev/null
	@cat results/tables/*.md results/timing.md

test: env
	python -m pytest -q --durations=12 tests

test-fast: env
	python -m pytest -q -n 2 --durations=5 -m "not slow" tests

bench: env
	python -m mmer.bench

export: env
	nbdev_export && nbdev_clean
