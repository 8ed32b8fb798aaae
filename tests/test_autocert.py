"""Autocert end to end: the proxy started from its CLI gets certificates from a real Pebble.

Pebble validates TLS-ALPN-01 on ``127.0.0.1:<tls_port>`` and HTTP-01 on
``127.0.0.1:<http_port>``; the proxy's ``address`` is put on the first and its
``http_redirect_addr`` (when a test wants HTTP-01) on the second. Most tests share one Pebble
(``shared_ca``, module scope) and therefore one proxy port; each test has its own
``autocert_dir``, and counts orders/accounts as deltas of Pebble's log.
"""
from __future__ import annotations

import base64
import datetime as dt
import http.client
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.autocert.issuer import issuer_id
from tests.infra.pebble import Pebble, pebble_factory  # noqa: F401  (fixture)
from tests.infra.pki import TestCA
from tests.infra.proxyproc import REPO, ProxyProcess, free_port, served_certificate, stop_process

SELF_SIGNED_CN = "autocert-proxy.invalid"
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z")
ISSUE_TIMEOUT = 20.0

# Quick maintenance checks; a retry base long enough that a failure is not retried mid-test.
FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def distinct_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 right now, all different (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def issuer_cn(cert: x509.Certificate) -> str:
    attrs = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def subject_cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def from_pebble(cert: x509.Certificate) -> bool:
    return issuer_cn(cert).startswith("Pebble Intermediate CA")


def served(port: int, name: str) -> Optional[x509.Certificate]:
    try:
        return served_certificate(port, name)
    except (OSError, ssl.SSLError):
        return None


def wait_served(port: int, name: str, pred: Callable[[x509.Certificate], bool],
                timeout: float = ISSUE_TIMEOUT, log: Callable[[], str] = lambda: "") -> x509.Certificate:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = served(port, name)
        if last is not None and pred(last):
            return last
        time.sleep(0.05)
    # (the log without this wait's own probe connections, which fill it at debug level)
    text = "\n".join(line for line in log().splitlines() if "TLS connection from 127.0.0.1" not in line)
    raise AssertionError(f"{name}: wanted certificate not served within {timeout}s; last served: "
                         f"{last and (subject_cn(last), issuer_cn(last), hex(last.serial_number))}\n"
                         f"{text[-6000:]}")


def wait_pebble_cert(proxy: ProxyProcess, name: str, **kw) -> x509.Certificate:
    cert = wait_served(proxy.port, name, from_pebble, log=proxy.log, **kw)
    assert x509.DNSName(name) in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return cert


def assert_self_signed(proxy: ProxyProcess, name: str) -> None:
    cert = served_certificate(proxy.port, name)
    assert subject_cn(cert) == SELF_SIGNED_CN and not from_pebble(cert), (subject_cn(cert), issuer_cn(cert))


def write_root(ca: Pebble, path: Path) -> Path:
    path.write_bytes(ca.issuing_root_pem())
    return path


def ac_config(ca: Pebble, store: Path, names, upstream_url: str = "http://127.0.0.1:9",
              **extra) -> dict:
    cfg = {
        "_port": ca.tls_port,
        "autocert": True,
        "autocert_ca": ca.directory_url,
        "autocert_trusted_ca_file": str(ca.trusted_ca_file),
        "autocert_dir": str(store),
        "routes": [{"from": f"https://{n}", "to": upstream_url} for n in names],
    }
    cfg.update(extra)
    return cfg


def cli(proxy: ProxyProcess, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``autocert-proxy <args> --config <the proxy's file>`` with the proxy's environment."""
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", str(proxy.config_path)],
                          cwd=str(REPO), env=proxy.env, capture_output=True, text=True, timeout=timeout)


def certs_rows(proxy: ProxyProcess) -> dict[str, str]:
    """``autocert-proxy certs`` output: name -> its whole line."""
    out = cli(proxy, "certs")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and lines[0].split()[:2] == ["NAME", "SOURCE"], out.stdout
    return {ln.split()[0]: ln for ln in lines[1:] if ln.strip()}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def stored_cert(store: Path, ca: Pebble, name: str) -> x509.Certificate:
    d = store / "certificates" / issuer_id(ca.directory_url) / name
    return x509.load_pem_x509_certificate((d / f"{name}.crt").read_bytes())


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory):
    ca = Pebble(tmp_path_factory.mktemp("shared-pebble"), tls_port=free_port(), http_port=free_port())
    ca.start()
    yield ca
    ca.stop()


# --------------------------------------------------------------------------------------------
# issuance through each challenge type
# --------------------------------------------------------------------------------------------
def test_tls_alpn_01_alone_issues_a_certificate_curl_trusts(shared_ca, start_proxy, upstream, tmp_path):
    """No HTTP listener at all: only TLS-ALPN-01 on the TLS listener can satisfy Pebble."""
    orders = shared_ca.order_count()
    proxy = start_proxy(ac_config(shared_ca, tmp_path / "ac", ["alpn.test"], upstream.url), env=FAST)
    cert = wait_pebble_cert(proxy, "alpn.test")
    root = write_root(shared_ca, tmp_path / "root.pem")
    out = proxy.curl("alpn.test", "/hello", cacert=root)
    assert out.returncode == 0, out.stderr
    assert b'"path": "/hello"' in out.stdout
    assert shared_ca.order_count() == orders + 1
    assert "answered HTTP-01" not in proxy.log()
    assert hex(cert.serial_number)[2:] in {f"{s:x}" for s in shared_ca.issued_serials()}


def test_http_01_alone_issues_a_certificate(pebble_factory, start_proxy, upstream, tmp_path):
    """Pebble's TLS-ALPN-01 port is closed, so only HTTP-01 on the redirect listener can work."""
    http_port, closed, proxy_port = distinct_ports(3)
    ca = pebble_factory(http_port=http_port, tls_port=closed)
    proxy = start_proxy(ac_config(ca, tmp_path / "ac", ["h1.test"], upstream.url, _port=proxy_port,
                                  http_redirect_addr=f"127.0.0.1:{http_port}"), env=FAST)
    wait_pebble_cert(proxy, "h1.test")
    log = proxy.log()
    assert "answered HTTP-01 challenge for h1.test" in log
    assert "tls-alpn-01 validation failed for h1.test" in log
    out = proxy.curl("h1.test", "/", cacert=write_root(ca, tmp_path / "root.pem"))
    assert out.returncode == 0, out.stderr
    assert ca.order_count() == 2   # the TLS-ALPN-01 attempt, then HTTP-01


# --------------------------------------------------------------------------------------------
# External Account Binding, trust, nonces
# --------------------------------------------------------------------------------------------
def test_eab_required_right_key_issues_missing_or_wrong_key_is_a_clear_error(pebble_factory, start_proxy, tmp_path):
    port = free_port()
    key = b64url(secrets.token_bytes(48))
    ca = pebble_factory(tls_port=port, eab={"kid-1": key})

    # no EAB at all
    p1 = start_proxy(ac_config(ca, tmp_path / "ac1", ["eab.test"]), env=FAST, name="noeab")
    p1.wait_log("requires External Account Binding")
    assert_self_signed(p1, "eab.test")
    assert "autocert_eab_key_id" in p1.log()
    row = certs_rows(p1)["eab.test"]
    assert "External Account Binding" in row and "(not obtained yet)" in row
    p1.stop()

    # a MAC key the CA did not issue
    p2 = start_proxy(ac_config(ca, tmp_path / "ac2", ["eab.test"], autocert_eab_key_id="kid-1",
                               autocert_eab_mac_key=b64url(secrets.token_bytes(48))), env=FAST, name="wrongeab")
    p2.wait_log("obtaining a certificate for eab.test failed")
    log = p2.log()
    assert "rejected the External Account Binding" in log and "'kid-1'" in log, log[-3000:]
    assert_self_signed(p2, "eab.test")
    assert "External Account Binding" in certs_rows(p2)["eab.test"]
    p2.stop()
    assert ca.account_count() == 0

    # the right one
    p3 = start_proxy(ac_config(ca, tmp_path / "ac3", ["eab.test"], autocert_eab_key_id="kid-1",
                               autocert_eab_mac_key=key), env=FAST, name="eab")
    wait_pebble_cert(p3, "eab.test")
    assert ca.account_count() == 1


def test_wrong_trusted_ca_is_a_clear_tls_error(shared_ca, start_proxy, tmp_path):
    other = TestCA(tmp_path / "other-ca", name="Some other CA")
    cfg = ac_config(shared_ca, tmp_path / "ac", ["trust.test"], autocert_trusted_ca_file=str(other.cert_path))
    orders = shared_ca.order_count()
    proxy = start_proxy(cfg, env=FAST)
    proxy.wait_log("obtaining a certificate for trust.test failed")
    line = next(ln for ln in proxy.log().splitlines() if "obtaining a certificate for trust.test failed" in ln)
    assert "certificate verification failed" in line and "autocert_trusted_ca" in line, line
    assert shared_ca.directory_url in line
    assert_self_signed(proxy, "trust.test")
    assert shared_ca.order_count() == orders
    row = certs_rows(proxy)["trust.test"]
    assert "certificate verification failed" in row
    # no certificate: not_after and next renewal are "-"; next attempt is in the future
    stamps = TIMESTAMP.findall(row)
    assert len(stamps) >= 1, row
    next_attempt = dt.datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert next_attempt > dt.datetime.now(dt.timezone.utc), row


def test_half_the_nonces_rejected_still_issues_for_three_names(pebble_factory, start_proxy, tmp_path):
    port = free_port()
    ca = pebble_factory(tls_port=port, nonce_reject=50)
    names = ["n1.test", "n2.test", "n3.test"]
    proxy = start_proxy(ac_config(ca, tmp_path / "ac", names, log_level="debug"), env=FAST)
    for n in names:
        wait_pebble_cert(proxy, n, timeout=40)
    log = proxy.log()
    assert "obtaining a certificate for" not in log, log[-3000:]   # no failed attempt at all
    assert log.count("autocert: obtained a certificate for") == 3
    assert sorted(set(ca.validated_names())) == names
    # Pebble really rejected nonces (it does not log them; our issuer does, at debug level)
    assert "CA rejected our nonce" in log


# --------------------------------------------------------------------------------------------
# reuse, renewal, outages
# --------------------------------------------------------------------------------------------
def test_restart_reuses_account_and_certificate(shared_ca, start_proxy, tmp_path):
    store = tmp_path / "ac"
    orders, accounts = shared_ca.order_count(), shared_ca.account_count()
    p1 = start_proxy(ac_config(shared_ca, store, ["r.test"]), env=FAST, name="first")
    first = wait_pebble_cert(p1, "r.test")
    p1.stop()
    assert (shared_ca.order_count(), shared_ca.account_count()) == (orders + 1, accounts + 1)

    # Same directory: the stored certificate is served from the first handshake on, no order.
    p2 = start_proxy(ac_config(shared_ca, store, ["r.test"]), env=FAST, name="second")
    again = served_certificate(p2.port, "r.test")
    assert again.serial_number == first.serial_number
    time.sleep(1.0)   # five maintenance checks
    assert (shared_ca.order_count(), shared_ca.account_count()) == (orders + 1, accounts + 1)
    p2.stop()

    # A new name on the next start is ordered on the stored account.
    validated = len(shared_ca.validated_names())
    p3 = start_proxy(ac_config(shared_ca, store, ["r.test", "r2.test"]), env=FAST, name="third")
    wait_pebble_cert(p3, "r2.test")
    assert served_certificate(p3.port, "r.test").serial_number == first.serial_number
    assert shared_ca.account_count() == accounts + 1
    assert shared_ca.order_count() == orders + 2
    assert set(shared_ca.validated_names()[validated:]) == {"r2.test"}


def _keepalive_connection(port: int, name: str, cafile: Path) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=name)
    return conn


def _get(conn: http.client.HTTPSConnection, name: str, path: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": name})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_forced_renewal_swaps_certificate_and_keeps_open_connections(shared_ca, start_proxy, upstream, tmp_path):
    proxy = start_proxy(ac_config(shared_ca, tmp_path / "ac", ["renew.test"], upstream.url), env=FAST)
    old = wait_pebble_cert(proxy, "renew.test")
    root = write_root(shared_ca, tmp_path / "root.pem")
    conn = _keepalive_connection(proxy.port, "renew.test", root)
    sock = conn.sock
    assert _get(conn, "renew.test", "/before")[0] == 200
    orders = shared_ca.order_count()

    out = cli(proxy, "renew", "renew.test")
    assert out.returncode == 0, out.stderr
    assert "renewal requested: renew.test" in out.stdout
    new = wait_served(proxy.port, "renew.test", lambda c: c.serial_number != old.serial_number, log=proxy.log)
    assert from_pebble(new)
    assert shared_ca.order_count() == orders + 1
    assert "renewal of renew.test requested" in proxy.log()

    # the connection opened before the swap is still the same and still works
    status, body = _get(conn, "renew.test", "/after")
    assert status == 200 and b'"path": "/after"' in body
    assert conn.sock is sock
    assert x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number == old.serial_number
    conn.close()
    assert curl_ok(proxy, "renew.test", root)
    # the request was consumed: no second renewal
    time.sleep(1.0)
    assert shared_ca.order_count() == orders + 1


def curl_ok(proxy: ProxyProcess, name: str, root: Path) -> bool:
    out = proxy.curl(name, "/", cacert=root)
    return out.returncode == 0


def test_ca_down_at_start_serves_self_signed_then_the_real_certificate(start_proxy, tmp_path):
    port = free_port()
    ca = Pebble(tmp_path / "pebble", tls_port=port)   # not started: the CA is down
    try:
        proxy = start_proxy(ac_config(ca, tmp_path / "ac", ["down.test"]),
                            env={**FAST, "AUTOCERT_PROXY_RETRY_BASE": "1"})
        assert_self_signed(proxy, "down.test")
        proxy.wait_log("obtaining a certificate for down.test failed")
        assert "cannot reach the CA" in proxy.log()
        assert_self_signed(proxy, "down.test")
        ca.start()
        wait_pebble_cert(proxy, "down.test", timeout=30)
        assert proxy.proc.poll() is None
    finally:
        ca.stop()


# --------------------------------------------------------------------------------------------
# must-staple, manual certificates, switching CA
# --------------------------------------------------------------------------------------------
CSR_SPY = """
import os
from cryptography.hazmat.primitives import serialization
import proxy.autocert.issuer as _issuer

_real = _issuer.build_csr

def _spy(*args, **kwargs):
    der = _real(*args, **kwargs)
    with open(os.environ["CSR_SPY_FILE"], "ab") as f:
        f.write(der.hex().encode() + b"\\n")
    return der

_issuer.build_csr = _spy
"""


def csr_spy_env(tmp_path: Path) -> tuple[dict, Path]:
    """Environment that makes the proxy process record every CSR it sends (via sitecustomize)."""
    d = tmp_path / "csr-spy"
    d.mkdir()
    (d / "sitecustomize.py").write_text(CSR_SPY)
    out = tmp_path / "csrs.txt"
    path = os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CSR_SPY_FILE": str(out)}, out


def sent_csrs(path: Path) -> list[x509.CertificateSigningRequest]:
    if not path.exists():
        return []
    return [x509.load_der_x509_csr(bytes.fromhex(ln)) for ln in path.read_text().split()]


@pytest.mark.parametrize("must_staple", [True, False])
def test_must_staple_puts_tls_feature_in_the_csr_and_certificate(shared_ca, start_proxy, tmp_path, must_staple):
    store = tmp_path / "ac"
    spy_env, csr_file = csr_spy_env(tmp_path)
    proxy = start_proxy(ac_config(shared_ca, store, ["staple.test"], autocert_must_staple=must_staple),
                        env={**FAST, **spy_env})
    proxy.wait_log("obtained a certificate for staple.test", timeout=ISSUE_TIMEOUT)
    csrs = sent_csrs(csr_file)
    assert len(csrs) == 1
    if not must_staple:
        with pytest.raises(x509.ExtensionNotFound):
            csrs[0].extensions.get_extension_for_class(x509.TLSFeature)
        cert = wait_pebble_cert(proxy, "staple.test")
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.TLSFeature)
        return
    assert list(csrs[0].extensions.get_extension_for_class(x509.TLSFeature).value) == \
        [x509.TLSFeatureType.status_request]
    cert = stored_cert(store, shared_ca, "staple.test")
    try:
        feature = cert.extensions.get_extension_for_class(x509.TLSFeature).value
    except x509.ExtensionNotFound:
        # Pebble 2.4 (Debian) accepts the CSR but drops the extension: the proxy must say so,
        # and (no must-staple, so no staple needed) serve the certificate.
        assert "without the OCSP must-staple extension" in proxy.log()
        assert wait_pebble_cert(proxy, "staple.test").serial_number == cert.serial_number
    else:
        assert list(feature) == [x509.TLSFeatureType.status_request]
        # Pebble's certificates carry no OCSP URL here, so no staple can exist: a must-staple
        # certificate without one is not served (clients would reject it).
        assert_self_signed(proxy, "staple.test")


def test_valid_manual_certificate_wins_for_its_name(shared_ca, start_proxy, tmp_path):
    pki = TestCA(tmp_path / "pki", name="Manual test CA")
    manual = pki.issue(["manual.test"], filename="manual")
    validated = len(shared_ca.validated_names())
    cfg = ac_config(shared_ca, tmp_path / "ac", ["manual.test", "auto.test"],
                    certificates=[{"cert": str(manual.cert_path), "key": str(manual.key_path)}])
    proxy = start_proxy(cfg, env=FAST)
    wait_pebble_cert(proxy, "auto.test")
    assert served_certificate(proxy.port, "manual.test").serial_number == manual.cert.serial_number
    time.sleep(0.6)
    assert set(shared_ca.validated_names()[validated:]) == {"auto.test"}
    assert not (tmp_path / "ac" / "certificates" / issuer_id(shared_ca.directory_url) / "manual.test").exists()
    rows = certs_rows(proxy)
    assert rows["manual.test"].split()[1] == "manual"
    assert rows["auto.test"].split()[1] == "acme"


def test_expired_manual_certificate_is_replaced_with_a_warning(shared_ca, start_proxy, tmp_path):
    pki = TestCA(tmp_path / "pki", name="Manual test CA")
    now = dt.datetime.now(dt.timezone.utc)
    expired = pki.issue(["old.test"], filename="old", not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    cfg = ac_config(shared_ca, tmp_path / "ac", ["old.test"],
                    certificates=[{"cert": str(expired.cert_path), "key": str(expired.key_path)}])
    proxy = start_proxy(cfg, env=FAST)
    cert = wait_pebble_cert(proxy, "old.test")
    assert cert.serial_number != expired.cert.serial_number
    warning = [ln for ln in proxy.log().splitlines() if "WARNING" in ln and "manual certificate for old.test" in ln]
    assert warning and "expired" in warning[0], proxy.log()[-3000:]


def test_switching_the_ca_obtains_a_new_certificate(shared_ca, pebble_factory, start_proxy, tmp_path):
    other = pebble_factory(tls_port=shared_ca.tls_port, http_port=shared_ca.http_port)
    bundle = tmp_path / "both-listener-cas.pem"
    bundle.write_bytes(shared_ca.trusted_ca_pem + other.trusted_ca_pem)
    store = tmp_path / "ac"
    cfg = ac_config(shared_ca, store, ["switch.test"], autocert_trusted_ca_file=str(bundle))
    proxy = start_proxy(cfg, env=FAST)
    first = wait_pebble_cert(proxy, "switch.test")

    # reload with the other CA
    cfg2 = dict(proxy.config, autocert_ca=other.directory_url)
    proxy.write_config(cfg2)
    proxy.reload()
    second = wait_served(proxy.port, "switch.test",
                         lambda c: from_pebble(c) and issuer_cn(c) != issuer_cn(first), log=proxy.log)
    assert other.order_count() == 1
    assert curl_ok(proxy, "switch.test", write_root(other, tmp_path / "other-root.pem"))
    assert not curl_ok(proxy, "switch.test", write_root(shared_ca, tmp_path / "first-root.pem"))
    proxy.stop()

    # a restart on the new CA serves the new CA's certificate without ordering again
    p2 = start_proxy(cfg2 | {"_port": shared_ca.tls_port}, env=FAST, name="restart")
    assert served_certificate(p2.port, "switch.test").serial_number == second.serial_number
    time.sleep(0.6)
    assert other.order_count() == 1


# --------------------------------------------------------------------------------------------
# visible state and storage
# --------------------------------------------------------------------------------------------
def test_certs_command_lists_issuer_and_not_after(shared_ca, start_proxy, tmp_path):
    proxy = start_proxy(ac_config(shared_ca, tmp_path / "ac", ["st1.test", "st2.test"]), env=FAST)
    c1 = wait_pebble_cert(proxy, "st1.test")
    wait_pebble_cert(proxy, "st2.test")
    rows = certs_rows(proxy)
    assert set(rows) == {"st1.test", "st2.test"}
    row = rows["st1.test"]
    assert row.split()[1] == "acme"
    assert issuer_cn(c1) in row
    assert c1.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ") in row
    lifetime = c1.not_valid_after_utc - c1.not_valid_before_utc
    renew_at = c1.not_valid_after_utc - lifetime / 3
    assert renew_at.strftime("%Y-%m-%d") in row
    assert row.rstrip().endswith("-")   # no error


def test_storage_layout_and_private_key_modes(shared_ca, start_proxy, tmp_path):
    store = tmp_path / "ac"
    proxy = start_proxy(ac_config(shared_ca, store, ["files.test"], autocert_email="ops@example.com"), env=FAST)
    cert = wait_pebble_cert(proxy, "files.test")
    iid = issuer_id(shared_ca.directory_url)
    d = store / "certificates" / iid / "files.test"
    assert stored_cert(store, shared_ca, "files.test").serial_number == cert.serial_number
    assert (d / "files.test.json").exists()
    account_key = store / "acme" / iid / "users" / "ops@example.com" / "ops.key"
    assert account_key.exists() and (account_key.with_suffix(".json")).exists()
    for key in (d / "files.test.key", account_key):
        assert (key.stat().st_mode & 0o777) == 0o600, (key, oct(key.stat().st_mode))
    leftovers = [p for p in store.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))]
    assert not leftovers


# --------------------------------------------------------------------------------------------
# a directory Caddy filled
# --------------------------------------------------------------------------------------------
CADDY = shutil.which("caddy")


def caddyfile(ca: Pebble, store: Path, name: str) -> str:
    return f"""{{
    admin off
    acme_ca {ca.directory_url}
    acme_ca_root {ca.trusted_ca_file}
    storage file_system {store}
    https_port {ca.tls_port}
    http_port {ca.http_port}
    skip_install_trust
}}
{name} {{
    bind 127.0.0.1
    respond "hi"
}}
"""


def run_caddy(ca: Pebble, workdir: Path, store: Path, name: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "Caddyfile").write_text(caddyfile(ca, store, name))
    env = dict(os.environ, HOME=str(workdir), XDG_DATA_HOME=str(workdir / "data"),
               XDG_CONFIG_HOME=str(workdir / "config"))
    log = open(workdir / "caddy.log", "wb")
    try:
        return subprocess.Popen([CADDY, "run", "--config", str(workdir / "Caddyfile"), "--adapter", "caddyfile"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


@pytest.mark.skipif(CADDY is None, reason="caddy (Debian package) is not installed")
def test_directory_filled_by_caddy_is_served_without_a_new_order(shared_ca, start_proxy, tmp_path):
    store = tmp_path / "shared-store"
    name = "caddy.test"
    crt = store / "certificates" / issuer_id(shared_ca.directory_url) / name / f"{name}.crt"
    orders = shared_ca.order_count()
    caddy = run_caddy(shared_ca, tmp_path / "caddy", store, name)
    try:
        deadline = time.monotonic() + 30
        while not crt.exists() and time.monotonic() < deadline and caddy.poll() is None:
            time.sleep(0.05)
    finally:
        stop_process(caddy)
    caddy_log = (tmp_path / "caddy" / "caddy.log").read_text(errors="replace")
    assert crt.exists(), f"caddy stored no certificate at {crt}:\n{caddy_log[-3000:]}"
    caddy_serial = x509.load_pem_x509_certificate(crt.read_bytes()).serial_number
    assert shared_ca.order_count() == orders + 1

    proxy = start_proxy(ac_config(shared_ca, store, [name]), env=FAST)
    assert served_certificate(proxy.port, name).serial_number == caddy_serial
    time.sleep(1.0)   # five maintenance checks: none may order
    assert shared_ca.order_count() == orders + 1
    assert served_certificate(proxy.port, name).serial_number == caddy_serial
    assert curl_ok(proxy, name, write_root(shared_ca, tmp_path / "root.pem"))


# --------------------------------------------------------------------------------------------
# backoff kept in storage; reloads
# --------------------------------------------------------------------------------------------
def test_backoff_survives_a_restart_and_renew_overrides_it(shared_ca, start_proxy, tmp_path):
    """A crash loop must not hammer the CA: the next attempt time is read back from storage."""
    store = tmp_path / "ac"
    bad = TestCA(tmp_path / "other-ca", name="Some other CA")
    good_cfg = ac_config(shared_ca, store, ["backoff.test"])
    p1 = start_proxy(dict(good_cfg, autocert_trusted_ca_file=str(bad.cert_path)), env=FAST, name="failing")
    p1.wait_log("obtaining a certificate for backoff.test failed")
    p1.stop()
    orders = shared_ca.order_count()

    # Restart with a working configuration: the stored backoff (~5 min) still holds.
    p2 = start_proxy(good_cfg, env=FAST, name="restarted")
    time.sleep(1.0)   # five maintenance checks
    assert_self_signed(p2, "backoff.test")
    assert shared_ca.order_count() == orders
    assert p2.log().count("obtaining a certificate for backoff.test") == 0
    row = certs_rows(p2)["backoff.test"]
    assert "certificate verification failed" in row

    # An operator's explicit renew request does not wait for the backoff.
    out = cli(p2, "renew", "backoff.test")
    assert out.returncode == 0, out.stderr
    wait_pebble_cert(p2, "backoff.test")
    assert shared_ca.order_count() == orders + 1
    assert certs_rows(p2)["backoff.test"].rstrip().endswith("-")   # error cleared


def test_reload_with_a_new_route_obtains_its_certificate(shared_ca, start_proxy, tmp_path):
    proxy = start_proxy(ac_config(shared_ca, tmp_path / "ac", ["one.test"]),
                        env={**FAST, "AUTOCERT_PROXY_CHECK_INTERVAL": "3600"})
    wait_pebble_cert(proxy, "one.test")
    cfg = dict(proxy.config)
    cfg["routes"] = cfg["routes"] + [{"from": "https://two.test", "to": "http://127.0.0.1:9"}]
    proxy.write_config(cfg)
    proxy.reload()
    proxy.wait_log("configuration reloaded")
    wait_pebble_cert(proxy, "two.test")


def test_fixing_the_trusted_ca_and_reloading_issues_at_once(shared_ca, start_proxy, tmp_path):
    """A reload that changes autocert settings (here the trusted CA) uses them at once."""
    bad = TestCA(tmp_path / "other-ca", name="Some other CA")
    good_cfg = ac_config(shared_ca, tmp_path / "ac", ["fix.test"])
    proxy = start_proxy(dict(good_cfg, autocert_trusted_ca_file=str(bad.cert_path)), env=FAST)
    proxy.wait_log("obtaining a certificate for fix.test failed")
    proxy.write_config(dict(proxy.config, autocert_trusted_ca_file=str(shared_ca.trusted_ca_file)))
    proxy.reload()
    proxy.wait_log("configuration reloaded")
    wait_pebble_cert(proxy, "fix.test")
    assert proxy.log().count("obtaining a certificate for fix.test failed") == 1


def test_fixing_the_eab_key_and_reloading_issues_at_once(pebble_factory, start_proxy, tmp_path):
    key = b64url(secrets.token_bytes(48))
    ca = pebble_factory(tls_port=free_port(), eab={"kid-1": key})
    cfg = ac_config(ca, tmp_path / "ac", ["eabfix.test"], autocert_eab_key_id="kid-1",
                    autocert_eab_mac_key=b64url(secrets.token_bytes(48)))
    proxy = start_proxy(cfg, env=FAST)
    proxy.wait_log("obtaining a certificate for eabfix.test failed")
    proxy.write_config(dict(proxy.config, autocert_eab_mac_key=key))
    proxy.reload()
    proxy.wait_log("configuration reloaded")
    wait_pebble_cert(proxy, "eabfix.test")
