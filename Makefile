# Two entry points: `make demo` trains the bundled example, `make test` checks and tests everything.
# Both create/refresh the virtualenv in .venv and install what they need.
#   make test       lint + typecheck, then the whole suite (about 27 minutes on 2 cores)
#   make test-fast  the tests that start no process (conftest.py marks the others e2e): under a minute
#   make lint       ruff check and ruff format --check on $(LINT_PATHS)
#   make typecheck  mypy on lepton/ (configured in pyproject.toml)
#   make bench      benchmarks/throughput.py
#   make clean      remove .venv and runs/
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := lepton tests benchmarks examples

.PHONY: demo test test-fast lint typecheck venv bench clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e '.[test,examples]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lepton train examples/breast_cancer_mlp.yaml --workers 2

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" tests

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy lepton

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
