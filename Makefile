# Shortcuts; the README's two commands are `bash scripts/demo.sh` and `bash scripts/test.sh`.
.PHONY: demo test bench bench-quick build dist clean

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

bench:
	bash scripts/bootstrap.sh && .venv/bin/python -m benchmarks

bench-quick:
	bash scripts/bootstrap.sh && .venv/bin/python -m benchmarks --quick

build:
	bash scripts/bootstrap.sh

# The sdist (with the pinned lwIP source) and a manylinux wheel built from it, in dist/.
dist:
	bash scripts/dist.sh

clean:
	rm -rf build dist native/_build netstack/_native*.so netstack/_native.c *.egg-info
