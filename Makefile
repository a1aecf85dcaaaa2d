# ppbridge: `make test` and `make demo` work from a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := setup.cfg setup.py twisted/plugins/ppbridge_plugins.py $(wildcard ppbridge/*.py)
PYTEST_ARGS ?=

.PHONY: install test test-trial demo bench typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A real (non-editable) install, as users get it: a PEP 660 editable install of this flat
# layout would hide the twistd plugins. Rebuild the plugin cache once installed.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# The same suite under Twisted's own runner.
test-trial: $(STAMP)
	$(BIN)/python -m twisted.trial tests

demo: $(STAMP)
	$(BIN)/ppbridge demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

typecheck: $(STAMP)
	$(BIN)/pip install --quiet mypy mypy-zope
	$(BIN)/mypy ppbridge

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* .pytest_cache
