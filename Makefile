# Two commands for a fresh machine with Python 3.11 and pip: `make run`, `make test`.
PYTHON ?= python3
VENV ?= .venv
ARGS ?= --port 20000
BIN := $(VENV)/bin

.PHONY: run test lint bench bench-quick clean

# Two stamps in one venv: running the server installs only the server and its
# dependencies; the tests, lint and benchmark add the [test] extra on top.
# compat editable mode puts the checkout itself on sys.path: Twisted's plugin
# scan finds twisted/plugins/ and `trial tests` can import the tests package.
$(VENV)/.installed-server: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-server
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed-server
	$(BIN)/twistd -n --pidfile= udptime $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The full benchmark: minutes of load on every core, and it rewrites the
# committed bench/results/ (results.json, .md, .png).
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

# A short smoke run of the same benchmark into bench/build/results-quick/.
bench-quick: $(VENV)/.installed-test
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
