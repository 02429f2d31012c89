# The two commands: `make demo` and `make test`. Both create the environment when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= $(shell nproc)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: env demo test lint format bench clean-results

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; anything else would pull CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

env: $(STAMP)

demo: env
	$(VENV)/bin/snakemake --cores $(CORES) --printshellcmds
	# The HTML report (every benchmark figure and table, with CIs) from the finished run.
	$(VENV)/bin/snakemake --report results/report.html
	@# Job time per stage, from the provenance records (the audit's last section).
	@sed -n '/^## Run time/,$$p' results/audit/audit.md
	@echo "Demo finished: results are in $(CURDIR)/results (benchmark table:" \
	      "results/benchmarks/summary.md, HTML report: results/report.html," \
	      "models: results/models/, cohorts: results/cohorts/," \
	      "shards: results/shards/, audit: results/audit/audit.md," \
	      "MLflow: sqlite:///$(CURDIR)/results/mlflow.db)"

# pytest exits 5 when it collected nothing; that is not a failure of the suite.
test: env
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: env
	$(VENV)/bin/ruff check src tests bench workflow
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint --cores 1

format: env
	$(VENV)/bin/ruff check --fix src tests bench workflow
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/snakefmt Snakefile rules

bench: env
	$(PY) bench/bench_data.py

clean-results:
	rm -rf results resources logs benchmarks .snakemake
