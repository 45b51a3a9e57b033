# Two commands on a fresh machine: `make demo` (the bundled model, MTP on vs off) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The CPU kernels compile once here, at install (setup.py), against the environment's own PyTorch: its build
# requirements are installed first and the build runs without isolation, so PyTorch is not downloaded twice.
BUILD_REQS = "setuptools>=68" "ninja>=1.11" "$$(grep -o 'torch==[0-9.]*' pyproject.toml | head -n 1)"

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install -q $(BUILD_REQS)
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

# the test extras by name: `pip install -e '.[test]'` would build the kernels a second time
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))" > $(VENV)/test-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/test-requirements.txt
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
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/mtpx/kernels/_C*.so
