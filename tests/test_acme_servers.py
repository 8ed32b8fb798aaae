"""The proxy against ACME servers that are not Pebble: Caddy's ``acme_server`` (step-ca's ACME)
and acme2certifier, both real and started here.

Unlike Pebble, both validate on the names' real ports (80 for HTTP-01, 443 for TLS-ALPN-01).
The test names resolve to 127.0.0.1 (``/etc/hosts``, see ``tests.infra.wellknown``) and the
proxy listens on 127.0.0.1:80 and/or :443 (as root). Each CA answers a failed validation its
own way: Caddy keeps the challenge ``pending`` with an ``error`` (it retries when asked
again), acme2certifier makes it ``invalid`` with no error at all. Either must send the proxy
to its next challenge type at once.
"""
from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from pathlib import Path
from typing import Optional

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.autocert.challenges import ChallengeStore
from proxy.autocert.issuer import AcmeError, AcmeIssuer, IssuerSettings
from proxy.autocert.manager import new_certificate_key
from tests.infra.a2c import Acme2Certifier
from tests.infra.caddy_acme import CADDY, CaddyAcme
from tests.infra.proxyproc import free_port, tls_client_context
from tests.infra.wellknown import ensure_hosts, start_on_wellknown

pytestmark = pytest.mark.skipif(CADDY is None, reason="caddy (Debian package) is not installed")

ISSUE_TIMEOUT = 30.0   # generous: the machine is shared; the figures are in the test output
FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}
NAMES = ["c-http.h19.test", "c-alpn.h19.test", "c-both.h19.test",
         "a-http.h19.test", "a-alpn.h19.test", "a-both.h19.test", "issuer.h19.test"]


@pytest.fixture(scope="module", autouse=True)
def hosts():
    ensure_hosts(NAMES)


@pytest.fixture(scope="module")
def caddy_ca(tmp_path_factory):
    ca = CaddyAcme(tmp_path_factory.mktemp("caddy-acme")).start()
    yield ca
    ca.stop()


@pytest.fixture(scope="module")
def a2c_ca(tmp_path_factory):
    ca = Acme2Certifier(tmp_path_factory.mktemp("a2c")).start()
    yield ca
    ca.stop()


def issuer_cn(cert: x509.Certificate) -> str:
    attrs = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def served(host: str, port: int, name: str) -> Optional[x509.Certificate]:
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with tls_client_context().wrap_socket(raw, server_hostname=name) as s:
                return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    except (OSError, ssl.SSLError):
        return None


def wait_issued(proxy, host: str, port: int, name: str, issuer_prefix: str) -> x509.Certificate:
    deadline = time.monotonic() + ISSUE_TIMEOUT
    while time.monotonic() < deadline:
        cert = served(host, port, name)
        if cert is not None and issuer_cn(cert).startswith(issuer_prefix):
            assert x509.DNSName(name) in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
            return cert
        time.sleep(0.05)
    raise AssertionError(f"{name}: no certificate from {issuer_prefix!r} within {ISSUE_TIMEOUT}s:\n"
                         f"{proxy.log()[-5000:]}")


def config(ca, store: Path, name: str, address: str, redirect: Optional[str], **extra) -> dict:
    cfg = {
        "address": address,
        "autocert": True,
        "autocert_ca": ca.directory_url,
        "autocert_email": "admin@example.com",   # acme2certifier requires a contact
        "autocert_dir": str(store),
        "routes": [{"from": f"https://{name}", "response": {"status": 200, "body": "ok"}}],
    }
    if isinstance(ca, CaddyAcme):
        cfg["autocert_trusted_ca_file"] = str(ca.trusted_ca_file)
    if redirect:
        cfg["http_redirect_addr"] = redirect
    cfg.update(extra)
    return cfg


ISSUERS = {"caddy": "autocert-proxy test ACME CA", "a2c": "acme2certifier test CA"}
# how each CA leaves a challenge it could not validate (both must move the proxy on)
FAILED_AS = {"caddy": "challenge pending with an error", "a2c": "challenge invalid"}


@pytest.fixture(params=["caddy", "a2c"])
def acme_ca(request):
    """(kind, CA): each test runs against Caddy's acme_server and acme2certifier."""
    return request.param, request.getfixturevalue(f"{request.param}_ca")


def test_http_01_with_only_port_80_reachable_issues_at_once(acme_ca, start_proxy, tmp_path):
    """The issue's new user: TLS listener not on 443, HTTP listener on 80. HTTP-01 is what
    these ports make possible, so it goes first; TLS-ALPN-01 first used to wait 90 s for a
    challenge Caddy keeps pending (acme2certifier's invalid one was not taken as a reason to
    try HTTP-01 at all)."""
    kind, ca = acme_ca
    name, port = f"{kind[0]}-http.h19.test", free_port()
    started = time.monotonic()
    proxy = start_on_wellknown(start_proxy, config(ca, tmp_path / "ac", name, f"127.0.0.1:{port}",
                                                   "127.0.0.1:80"), [80], ("127.0.0.1", port), env=FAST)
    cert = wait_issued(proxy, "127.0.0.1", port, name, ISSUERS[kind])
    elapsed = time.monotonic() - started
    print(f"\nissuance from {kind} with only :80 reachable: {elapsed:.2f} s from start")
    log = proxy.log()
    assert f"answered HTTP-01 challenge for {name}" in log
    assert "tls-alpn-01" not in log
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    expected = dt.timedelta(hours=12) if kind == "caddy" else dt.timedelta(days=6)   # as configured
    assert abs(lifetime - expected) < dt.timedelta(hours=1), lifetime


def test_tls_alpn_01_alone(acme_ca, start_proxy, tmp_path):
    kind, ca = acme_ca
    name = f"{kind[0]}-alpn.h19.test"
    proxy = start_on_wellknown(start_proxy, config(ca, tmp_path / "ac", name, "127.0.0.1:443", None),
                               [443], ("127.0.0.1", 443), env=FAST)
    wait_issued(proxy, "127.0.0.1", 443, name, ISSUERS[kind])
    assert "answered HTTP-01" not in proxy.log()


def test_failed_tls_alpn_01_moves_on_to_http_01(acme_ca, start_proxy, tmp_path):
    """TLS listener on 443 but of another address than the name's (ports remapped): TLS-ALPN-01
    goes first, the CA cannot reach it - Caddy keeps the challenge pending with an error,
    acme2certifier makes it invalid with no problem document - and the proxy orders again at
    once with HTTP-01 on :80."""
    kind, ca = acme_ca
    name = f"{kind[0]}-both.h19.test"
    proxy = start_on_wellknown(start_proxy, config(ca, tmp_path / "ac", name, "127.0.0.2:443",
                                                   "127.0.0.1:80"), [80], ("127.0.0.2", 443), env=FAST)
    wait_issued(proxy, "127.0.0.2", 443, name, ISSUERS[kind])
    log = proxy.log()
    assert f"tls-alpn-01 validation failed for {name}" in log
    assert FAILED_AS[kind] in log
    assert f"answered HTTP-01 challenge for {name}" in log
    assert "timed out" not in log


def test_issuer_fails_at_once_on_a_challenge_pending_with_an_error(caddy_ca):
    """Nothing answers TLS-ALPN-01 for the name: the order fails with Caddy's problem document
    long before the order's timeout, marked as a validation failure."""
    settings = IssuerSettings(directory_url=caddy_ca.directory_url,
                              trusted_ca_pem=caddy_ca.trusted_ca_file.read_bytes(),
                              challenge_types=("tls-alpn-01",), timeout=60.0)
    store = ChallengeStore()
    events = []

    def present(ch):
        events.append("present")
        store.present(ch)

    def cleanup(ch):
        events.append("cleanup")
        store.remove(ch)

    with AcmeIssuer(settings) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["issuer.h19.test"], new_certificate_key(), present, cleanup)
    err = ei.value
    assert err.validation_failed
    assert "pending with an error" in str(err)
    assert err.problem_type == "urn:ietf:params:acme:error:connection"
    assert "timed out" not in str(err)
    assert events == ["present", "cleanup"] and len(store) == 0
