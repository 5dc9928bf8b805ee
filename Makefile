# The two commands in the README: `make demo` and `make test`. Both bootstrap what they need first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap build demo test lint bench bench-quick clean

bootstrap:
	bash scripts/bootstrap.sh

build: bootstrap
	$(PY) -m pip install -q -e '.[test,bench]'

demo: bootstrap
	$(PY) -m benchmarks.demo

test: bootstrap
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -ra

bench: bootstrap
	$(PY) -m benchmarks

bench-quick: bootstrap
	$(PY) -m benchmarks --quick

clean:
	rm -rf build native/_build netstack/_native*.so netstack/_native.c *.egg-info
