# One command to set up and run the main job, one to set up and run the tests.
#   make report   creates .venv, installs modiff (with the peer engines), runs the pipeline on
#                 the offline default preset
#   make test     creates .venv, installs modiff with test extras, runs ruff and the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
export XDG_CACHE_HOME ?= $(CURDIR)/.cache
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup report full-table adopt-dvc generate test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,peers]'
	touch $@

setup: $(VENV)/.installed

report: setup
	$(BIN)/snakemake --cores $(CORES) results/report.md

full-table: setup   # the paper's whole table on the digits preset (see workflow/full_table.yaml)
	@# every job but the benchmark, as many at once as there are cores; then the benchmark alone
	$(BIN)/snakemake --cores $(CORES) results/report.md --omit-from bench --configfile workflow/full_table.yaml
	$(BIN)/snakemake --cores $(CORES) results/report.md --configfile workflow/full_table.yaml

adopt-dvc: setup   # after dvc repro/pull/checkout: Snakemake takes DVC's checked outputs as done
	bash workflow/scripts/adopt_dvc_outputs.sh results/report.md

generate: setup   # after a code change: dvc.yaml, its code fingerprints, params.schema.json
	$(BIN)/modiff generate

test: setup
	$(BIN)/ruff check modiff tests scripts
	$(BIN)/ruff format --check modiff tests scripts
	$(BIN)/pytest --durations=12

lint: setup
	$(BIN)/ruff check modiff tests scripts
	$(BIN)/snakemake --lint

clean:
	rm -rf results/* data/checkpoints data/fid_cache .snakemake
