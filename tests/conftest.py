"""Shared fixtures: a test PKI, a real upstream, and the proxy started from its CLI."""
from __future__ import annotations

import os

import pytest

from tests.infra.pki import TestCA
from tests.infra.build import stale_builds
from tests.infra.proxyproc import ProxyProcess
from tests.infra.upstream import UpstreamServer


def pytest_configure(config):
    """The compiled request path (setup.py) is built in place by an editable install: a
    module edited after that build, or one setup.py no longer names, would not be what runs.
    Refuse to test a stale build."""
    if os.environ.get("AUTOCERT_PROXY_PURE_PYTHON"):
        return   # the sources run
    stale = stale_builds()
    if stale:
        raise pytest.UsageError(
            f"the compiled modules in proxy/ are stale: {'; '.join(stale)}. Rebuild with "
            "`.venv/bin/pip install --no-deps -e .` (or run with AUTOCERT_PROXY_PURE_PYTHON=1)")


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "pki")


@pytest.fixture
def upstream():
    server = UpstreamServer()
    yield server
    server.stop()


@pytest.fixture
def start_proxy(tmp_path):
    """start_proxy(config_dict, env=None, name="proxy") -> running ProxyProcess (stopped at teardown)."""
    started = []

    def start(config: dict, env=None, name: str = "proxy", wait: bool = True) -> ProxyProcess:
        p = ProxyProcess(tmp_path / name, config, env=env, name=name)
        started.append(p)
        return p.start(wait=wait)

    yield start
    for p in started:
        p.stop()
