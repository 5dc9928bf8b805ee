# Shortcuts; the README's two commands are `bash scripts/demo.sh` and `bash scripts/test.sh`.
.PHONY: demo test bench bench-quick build clean

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

clean:
	rm -rf build native/_build netstack/_native*.so netstack/_native.c *.egg-info
