# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-all setup clean

setup: $(VENV)/.installed

# Reinstall whenever the dependency list or the pins change.
$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(PY) -m vfusion3d_jax demo --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15

test-all: setup
	$(PY) -m pytest -n 2 --dist loadgroup -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache
