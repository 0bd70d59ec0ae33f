# FedDALE developer entry points. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q
# Hashed locks (docs/deploy.md, "Locked dependencies"): torch's CPU wheel, then everything else.
LOCKS  := locks/torch.txt locks/dev.txt
SERVICES := services/coordinator services/client-node services/student-trainer services/detector
STAMP  := $(VENV)/.installed
# Real HDFS sessions beside the checkout when present (../shared/data/hdfs), else the profile's own
# choice (a prepared import, or the synthetic generator). `make demo DATA=synthetic` picks explicitly.
DATA   ?= $(if $(wildcard ../shared/data/hdfs/sessions.csv),hdfs-csv:../shared/data/hdfs)
DATA_ARG := $(if $(DATA),--data $(DATA))

.PHONY: venv lock demo simulate test test-fast bench clean

# The locks are complete (every dependency pinned, with hashes), so pip installs them with --no-deps;
# the project's own packages are editable, from source, --no-deps and built with the locked setuptools.
$(STAMP): $(LOCKS) shared/pyproject.toml $(wildcard services/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-deps --require-hashes $(foreach l,$(LOCKS),-r $(l))
	$(PIP) --no-deps --no-build-isolation -e shared $(foreach s,$(SERVICES),$(if $(wildcard $(s)/pyproject.toml),-e $(s)))
	touch $(STAMP)

venv: $(STAMP)

# Regenerate locks/*.txt from locks/*.in and the pyproject.toml files (scripts/lock.sh; UPGRADE=1
# moves every pin to the newest allowed release). Needs the package index; commit the result.
lock: $(STAMP)
	UV=$(BIN)/uv PYTHON=$(BIN)/python bash scripts/lock.sh

demo: $(STAMP)
	$(BIN)/feddale demo $(DATA_ARG)

simulate: $(STAMP)
	$(BIN)/feddale simulate --config cpu $(DATA_ARG)

bench: $(STAMP)
	$(BIN)/feddale bench --config bench $(DATA_ARG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real and not e2e and not containers"

clean:
	rm -rf $(VENV) runs .pytest_cache
