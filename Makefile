# Two commands for a fresh machine with Python 3.11 and pip: `make run`, `make test`.
PYTHON ?= python3
VENV ?= .venv
ARGS ?= --port 20000
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

# compat editable mode puts the checkout itself on sys.path: Twisted's plugin
# scan finds twisted/plugins/ and `trial tests` can import the tests package.
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n --pidfile= udptime $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
