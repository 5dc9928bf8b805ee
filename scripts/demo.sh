#!/usr/bin/env bash
# README command 1: install what is missing, then run x2ssh --vpn end to end in a namespace lab (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m benchmarks.demo "$@"
