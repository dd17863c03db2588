# Two commands on a fresh machine: `make demo` sets up and runs the demo build, `make test` the test suite.
# Both install into $(VENV) (CPU torch first: torch==2.13.0 comes from local disk on these machines).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup setup-dev

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0

setup: $(PY)
	$(PY) -m pip install -q -e '.[cpu]'

# megatron-core 0.13.1 is the reference the tests check Megatron compatibility against. It pins numpy < 2
# (its dataset code runs on numpy 2), so it goes in without its dependencies; its wheel is built for
# CPython 3.11 only, and those tests skip, saying so, where it is missing.
# The browser tests drive Debian's chromium (Playwright cannot download its own browser offline); as root it is
# installed here, elsewhere those tests say how to get it.
setup-dev: $(PY)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no chromium: the browser tests cannot run (apt-get install chromium)" >&2
	$(PY) -m pip install -q --no-deps --only-binary=:all: megatron-core==0.13.1 || \
	  echo "megatron-core 0.13.1 has no wheel for this Python: the Megatron reference tests will skip" >&2

demo: setup
	$(VENV)/bin/retro-pipeline build --workdir demo

# The tests come in two tiers (markers in pyproject.toml): plain `pytest` runs the fast one (unit tests, small
# builds: about two minutes on 2 cores); the slow one (marked `slow`, and `cluster` for tests that start Ray
# clusters of their own) holds the end-to-end builds, kill-and-resume runs and training to a measured gain.
# `make test` runs both: `-m ''` replaces the default `-m 'not slow and not cluster'`. Slow tier alone:
# `$(PY) -m pytest -m slow`.
test: setup-dev
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m ''
