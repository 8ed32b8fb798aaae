"""Shared fixtures: a test PKI, a real upstream, and the proxy started from its CLI."""
from __future__ import annotations

import pytest

from tests.infra.pki import TestCA
from tests.infra.proxyproc import ProxyProcess
from tests.infra.upstream import UpstreamServer


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
