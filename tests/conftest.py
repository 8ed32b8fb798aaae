"""Shared fixtures: a test PKI, a real upstream, and the proxy started from its CLI."""
from __future__ import annotations

import os

import pytest

from tests.infra.pki import TestCA
from tests.infra.proxyproc import REPO, ProxyProcess
from tests.infra.upstream import UpstreamServer


def pytest_configure(config):
    """The compiled request path (setup.py) is built in place by an editable install: a
    module edited after that build would not be what runs. Refuse to test a stale build."""
    if os.environ.get("AUTOCERT_PROXY_PURE_PYTHON"):
        return   # the sources run
    stale = []
    for so in (REPO / "proxy").rglob("*.so"):
        for ext in (".py", ".pxd"):
            source = so.with_name(so.name.split(".", 1)[0] + ext)
            if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
                stale.append(str(source.relative_to(REPO)))
    if stale:
        raise pytest.UsageError(
            f"{', '.join(sorted(stale))} changed after its compiled module was built: rebuild "
            "with `.venv/bin/pip install --no-deps -e .` (or run with AUTOCERT_PROXY_PURE_PYTHON=1)")


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
