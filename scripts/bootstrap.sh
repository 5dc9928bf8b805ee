#!/usr/bin/env bash
# Install everything x2ssh's demo, tests and benchmarks need on a fresh Debian 12 machine (as root):
# Debian packages, a virtualenv in .venv with x2ssh installed editable (which fetches the pinned lwIP
# source and builds the native core). Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-dev gcc libc6-dev openssh-server openssh-client curl dnsutils iperf3
              dnsmasq-base tcpdump iproute2 sshuttle xz-utils ca-certificates procps psmisc nftables sudo
              apache2-utils iputils-ping dnsperf proxychains4
              gcc-mingw-w64-x86-64)  # the last: the native core's Windows cross-compile test
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own interpreter: a python3 from elsewhere on PATH (pyenv, /usr/local) could hide what a fresh
# machine hits.
PY=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,bench]'
.venv/bin/python -c "import netstack" >/dev/null
echo "bootstrap: ready (.venv)"
