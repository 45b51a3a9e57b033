# Two commands on a fresh machine: `make demo` (the bundled model, MTP on vs off) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/mtpx demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -rs --durations=15

bench: $(VENV)/.installed
	$(BIN)/mtpx bench --model demo --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
