#!/bin/sh
# Installs everything the tests need on a fresh Debian 12 machine (as root) and runs the whole suite.
# Debian packages: pebble (ACME CA), curl + openssl (clients, OCSP responder), caddy + nginx (peers
# for the Caddy-storage test and the benchmarks), wrk, systemd (systemd-analyze, systemd-sysusers)
# and prometheus (promtool) for the packaging tests. Python packages: the project with its test extra
# (moto server for S3, fake-gcs-server for GCS) in .venv.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for pkg in pebble curl openssl caddy nginx wrk python3-venv systemd prometheus; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
fi
# Debian's caddy, nginx and prometheus packages start system services; the tests start their own.
systemctl stop caddy nginx prometheus 2>/dev/null || true
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# (the editable install also compiles the request path in place with Cython: setup.py)
.venv/bin/pip install -q -e '.[test]'
# sslyze in an environment of its own (it pins an older cryptography): tests/infra/sslyze.py
.venv/bin/python -m tests.infra.sslyze >/dev/null
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ $# -eq 0 ]; then
    # The proxy tests again with h11, the strict reference HTTP parser (the run above used the
    # default, httptools via proxy/http/fastcodec.py), smuggling cases included.
    AUTOCERT_PROXY_HTTP_PARSER=h11 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_proxy.py tests/test_lifecycle.py tests/test_tls.py tests/test_metrics.py || status=$?
    # The request path's tests again on its Python source (the run above used the modules
    # setup.py compiled; the source is what runs where nothing could be compiled).
    AUTOCERT_PROXY_PURE_PYTHON=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_proxy.py tests/test_fastcodec.py tests/test_codec.py tests/test_tls_transport.py \
        tests/test_tls.py tests/test_build.py || status=$?
fi
exit $status
