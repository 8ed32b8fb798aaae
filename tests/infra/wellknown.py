"""What tests against CAs that validate on the real ports need: test names resolving to
127.0.0.1 through /etc/hosts, and 127.0.0.1:80 / :443 free for the proxy.

Caddy's ACME server (and any CA that, unlike Pebble, has no setting for its validation ports)
connects to port 80 (HTTP-01) or 443 (TLS-ALPN-01) of the address the name resolves to. The
tests run as root, add their names to /etc/hosts (only lines that are missing; lines written
by others are never touched) and put the proxy on 127.0.0.1:80 / :443. Other tests on this
machine may hold those ports for a while: ``wait_ports_free`` waits a little, then fails with
a message naming the port and its holder instead of hanging.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import time
from typing import Iterable

import pytest

HOSTS = os.environ.get("AUTOCERT_PROXY_TEST_HOSTS", "/etc/hosts")
MARK = "# autocert-proxy tests"


def _mapped(text: str) -> set[str]:
    out = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "127.0.0.1":
            out.update(f.lower() for f in fields[1:])
    return out


def ensure_hosts(names: Iterable[str]) -> None:
    """Map each of ``names`` to 127.0.0.1 in /etc/hosts unless a line already does (appends)."""
    names = [n.lower() for n in names]
    try:
        with open(HOSTS, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # other test processes append too
            f.seek(0)
            text = f.read()
            missing = [n for n in names if n not in _mapped(text)]
            if missing:
                sep = "" if not text or text.endswith("\n") else "\n"
                f.write(f"{sep}127.0.0.1 {' '.join(missing)} {MARK}\n")
    except PermissionError:
        pytest.skip(f"these tests need test names in {HOSTS} (run as root)")
    for n in names:
        addrs = {a[4][0] for a in socket.getaddrinfo(n, None, socket.AF_INET)}
        assert addrs == {"127.0.0.1"}, f"{n} resolves to {addrs}, not 127.0.0.1 ({HOSTS})"


def _holder(port: int) -> str:
    try:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out or "unknown"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def wait_ports_free(ports: Iterable[int], host: str = "127.0.0.1", timeout: float = 60.0) -> None:
    """Wait until every port is free on ``host``; after ``timeout`` fail the test, naming the holder."""
    ports = list(ports)
    deadline = time.monotonic() + timeout
    while True:
        busy = [p for p in ports if not port_free(p, host)]
        if not busy:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"{host}:{busy[0]} is busy after waiting {timeout:.0f}s (these tests need it "
                        f"because the CA validates there); held by: {_holder(busy[0])}")
        time.sleep(0.5)


def start_on_wellknown(start, config: dict, ports: Iterable[int], listen: tuple[str, int],
                       attempts: int = 5, timeout: float = 15.0, **kw):
    """``start(config, wait=False, name=..., **kw)`` (the ``start_proxy`` fixture) once ``ports``
    are free on 127.0.0.1, then wait until it listens on ``listen``; start it again if another
    process took a port between the look and the proxy's bind."""
    ports = list(ports)
    for attempt in range(attempts):
        wait_ports_free(ports)
        proxy = start(config, wait=False, name=f"proxy{attempt}", **kw)
        deadline = time.monotonic() + timeout
        # the TLS listener is bound first: with an HTTP listener, wait for its line too
        needed = "listening for HTTP (redirect" if config.get("http_redirect_addr") else ""
        while proxy.proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(listen, timeout=0.5):
                    pass
                if needed in proxy.log() and proxy.proc.poll() is None:
                    return proxy
            except OSError:
                pass
            time.sleep(0.05)
        if proxy.proc.poll() is None:
            raise TimeoutError(f"proxy did not listen on {listen} within {timeout}s:\n{proxy.log()[-3000:]}")
        if "address already in use" not in proxy.log() or attempt == attempts - 1:
            raise RuntimeError(f"proxy exited with {proxy.proc.returncode}:\n{proxy.log()[-3000:]}")
        time.sleep(1.0)
    raise AssertionError("unreachable")
