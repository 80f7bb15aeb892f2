# Two entry points: `make demo` trains the bundled example, `make test` runs the suite.
# Both create/refresh the virtualenv in .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv bench clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e '.[test,examples]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lepton train examples/breast_cancer_mlp.yaml --workers 2

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the fast tier: no test that starts a process (conftest.py marks those e2e); well under a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
