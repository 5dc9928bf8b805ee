#!/usr/bin/env bash
# README command 2: install what is missing, then lint and run every test (namespace tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
exec .venv/bin/python -m pytest -ra "$@"
