#!/bin/sh
# Installs autocert-proxy into .venv and runs it on config.example.yaml (ports 8443 and 8080,
# a self-signed default certificate, no ACME CA needed): try `curl -k https://localhost:8443/`.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q .
exec .venv/bin/autocert-proxy --config config.example.yaml
