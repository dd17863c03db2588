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

setup-dev: $(PY)
	$(PY) -m pip install -q -e '.[cpu,dev]'

demo: setup
	$(VENV)/bin/retro-pipeline build --workdir demo

test: setup-dev
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q
