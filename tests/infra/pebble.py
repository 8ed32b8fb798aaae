"""Pebble (Let's Encrypt's test ACME CA) and pebble-challtestsrv (its DNS) for tests.

Everything listens on 127.0.0.1 on ports chosen at runtime. Pebble's own HTTPS listener gets
a certificate from a throw-away ``TestCA``; clients must trust ``Pebble.trusted_ca_file`` (what
``autocert_trusted_ca_file`` points to). Names resolve to 127.0.0.1 only (``-defaultIPv6 ''``),
so Pebble validates HTTP-01 on ``127.0.0.1:http_port`` and TLS-ALPN-01 on ``127.0.0.1:tls_port``.

Counting what the CA did: Pebble logs to stdout/stderr, which we append to ``pebble.log`` in
the work directory (never truncated, so counts span restarts). Pebble 2.4 writes exactly one
line per event::

    Added order "<id>" to the db                        -> order_count()
    There are now N accounts in memory                  -> account_count() (new accounts only)
    Pulled a task from the Tasks queue: ...Value:"<name>"... -> validated_names()
    Issued certificate serial <hex> for order <id>      -> issued_serials()

Pebble logs no names for a new order; per-name counting uses the validation tasks (one per
answered challenge; with ``authz_reuse=0`` one per order and name). ``tests/test_issuer.py``
checks these counters against issuances it made, so a Pebble whose log format changed fails
there first.

Usage::

    def test_x(pebble_factory):
        ca = pebble_factory(eab={"kid-1": "<b64url>"}, nonce_reject=50)
        ca.directory_url, ca.trusted_ca_file, ca.issuing_root_pem()
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.infra.pki import TestCA

PEBBLE_BIN = os.environ.get("PEBBLE_BIN", "/usr/bin/pebble")
CHALLTESTSRV_BIN = os.environ.get("PEBBLE_CHALLTESTSRV_BIN", "/usr/bin/pebble-challtestsrv")

READY_TIMEOUT = 20.0  # seconds; Pebble starts in 0.35-1.2 s here

_ORDER_ADDED = re.compile(r'Added order "([^"]+)" to the db')
_ACCOUNTS_NOW = re.compile(r"There are now (\d+) accounts in memory")
_VALIDATION = re.compile(r'Pulled a task from the Tasks queue: .*?Identifier:acme\.Identifier\{Type:"(\w+)", Value:"([^"]+)"\}')
_ISSUED = re.compile(r"Issued certificate serial ([0-9a-f]+) for order")


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP right now (DNS needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def _kill(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def start_challtestsrv(dns_port: int, mgmt_port: int, log_path: Path) -> subprocess.Popen:
    """pebble-challtestsrv as a test CA's DNS server: every name is 127.0.0.1, IPv4 only."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [CHALLTESTSRV_BIN, "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{mgmt_port}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_acme_directory(url: str, procs: dict[str, Optional[subprocess.Popen]], log: Callable[[], str],
                        cafile: Optional[Path] = None, ready: Callable[[], bool] = lambda: True,
                        timeout: float = READY_TIMEOUT) -> None:
    """Until the ACME directory at ``url`` answers (HTTPS trusting ``cafile``, once it exists)
    and ``ready()``; a RuntimeError with the log when one of ``procs`` exits, or at ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; log:\n{log()[-5000:]}")
        try:
            ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
            with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                if r.status == 200 and b"newOrder" in r.read() and ready():
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s ({last}); log:\n{log()[-5000:]}")


class Pebble:
    """A Pebble CA plus its DNS server, started by ``start()`` and stopped by ``stop()``.

    ``stop()`` then ``start()`` brings the CA back on the same ports (simulating an outage);
    Pebble keeps no state across a restart (accounts, orders and the issuing root are new).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: Optional[int] = None,
        tls_port: Optional[int] = None,
        eab: Optional[dict[str, str]] = None,
        ocsp_responder_url: str = "",
        nonce_reject: int = 0,
        authz_reuse: int = 0,
        extra_env: Optional[dict[str, str]] = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or free_port()
        self.tls_port = tls_port or free_port()
        self.acme_port = free_port()
        self.mgmt_port = free_port()
        self.dns_port = free_port()
        self.dns_mgmt_port = free_port()
        self.eab = dict(eab or {})
        self.ocsp_responder_url = ocsp_responder_url
        self.nonce_reject = nonce_reject
        self.authz_reuse = authz_reuse
        self.extra_env = dict(extra_env or {})

        self.ca = TestCA(self.workdir / "pebble-tls", name="Pebble listener test CA")
        self.listener_cert = self.ca.issue(["localhost", "127.0.0.1"], filename="pebble-listener")
        self.config_path = self.workdir / "pebble-config.json"
        self.log_path = self.workdir / "pebble.log"
        self.dns_log_path = self.workdir / "challtestsrv.log"
        self._write_config()
        self._pebble: Optional[subprocess.Popen] = None
        self._dns: Optional[subprocess.Popen] = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.mgmt_port}"

    @property
    def trusted_ca_pem(self) -> bytes:
        """The CA of Pebble's HTTPS listener (not the CA that issues ACME certificates)."""
        return self.ca.cert_pem

    @property
    def trusted_ca_file(self) -> Path:
        return self.ca.cert_path

    # -- lifecycle -------------------------------------------------------------------------
    def _write_config(self) -> None:
        cfg = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": str(self.listener_cert.cert_path),
                "privateKey": str(self.listener_cert.key_path),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": self.ocsp_responder_url,
                "externalAccountBindingRequired": bool(self.eab),
            }
        }
        if self.eab:
            cfg["pebble"]["externalAccountMACKeys"] = self.eab
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def start(self) -> "Pebble":
        if self.running:
            return self
        self._dns = start_challtestsrv(self.dns_port, self.dns_mgmt_port, self.dns_log_path)
        env = dict(os.environ)
        env.update({
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject),
            "PEBBLE_AUTHZREUSE": str(self.authz_reuse),
        })
        env.update(self.extra_env)
        log = open(self.log_path, "ab")
        self._pebble = subprocess.Popen(
            [PEBBLE_BIN, "-config", str(self.config_path),
             "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.workdir,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        wait_acme_directory(self.directory_url, {"pebble": self._pebble, "pebble-challtestsrv": self._dns},
                            self.log, cafile=self.trusted_ca_file, ready=self._dns_ready)

    def _dns_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dns_mgmt_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        _kill(self._pebble)
        _kill(self._dns)
        self._pebble = self._dns = None

    @property
    def running(self) -> bool:
        return self._pebble is not None and self._pebble.poll() is None

    def __enter__(self) -> "Pebble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the CA did ---------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def order_count(self) -> int:
        """Orders Pebble created since the fixture was made (all restarts)."""
        return len(_ORDER_ADDED.findall(self.log()))

    def account_count(self) -> int:
        """Accounts Pebble registered since the fixture was made (all restarts)."""
        return len(_ACCOUNTS_NOW.findall(self.log()))

    def validated_names(self) -> list[str]:
        """One entry per challenge the CA was asked to validate, oldest first.

        With ``authz_reuse=0`` (the default) every order validates each of its names, so
        ``validated_names().count(name)`` is the number of orders that got as far as
        answering a challenge for ``name``: "exactly one order per name" is
        ``Counter(validated_names())`` having all ones.
        """
        return [m.group(2) for m in _VALIDATION.finditer(self.log())]

    def issued_serials(self) -> list[int]:
        """Serials of every certificate Pebble issued, oldest first."""
        return [int(m.group(1), 16) for m in _ISSUED.finditer(self.log())]

    def issuing_root_pem(self, index: int = 0) -> bytes:
        """The root that signs issued certificates (new on every start)."""
        ctx = ssl.create_default_context(cafile=str(self.trusted_ca_file))
        with urllib.request.urlopen(f"{self.management_url}/roots/{index}", context=ctx,
                                    timeout=5) as r:
            return r.read()

    def issuing_intermediate_pem(self, index: int = 0) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.trusted_ca_file))
        with urllib.request.urlopen(f"{self.management_url}/intermediates/{index}",
                                    context=ctx, timeout=5) as r:
            return r.read()

    def cert_status(self, serial: int) -> dict:
        ctx = ssl.create_default_context(cafile=str(self.trusted_ca_file))
        url = f"{self.management_url}/cert-status-by-serial/{serial:x}"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return json.loads(r.read())


@pytest.fixture
def pebble_factory(tmp_path_factory) -> Iterator[Callable[..., Pebble]]:
    """Call with Pebble's keyword arguments; returns a started Pebble, stopped at teardown."""
    started: list[Pebble] = []

    def make(**kwargs) -> Pebble:
        p = Pebble(tmp_path_factory.mktemp("pebble"), **kwargs)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def pebble(pebble_factory) -> Pebble:
    return pebble_factory()
