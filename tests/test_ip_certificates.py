"""IP-address certificates (RFC 8738): a route ``from: https://<IP>`` gets a certificate for
the address from a real Pebble (which validates IP identifiers: HTTP-01 on the address's
httpPort, TLS-ALPN-01 on its tlsPort with the reverse-mapping name as SNI), and a client that
connects to the address without SNI - as browsers and curl do for an IP - gets it: chosen by
the address the connection came in on.

The proxy listens on 127.0.0.2 (a loopback address other than 127.0.0.1, so the choice is
visibly by address). The engine test runs one engine behind listeners on 127.0.0.2 and
127.0.0.3 at once: each address its own certificate.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import time

import pytest
from cryptography import x509

from proxy.autocert.challenges import Challenge, ChallengeStore, ip_from_sni, sni_name, tls_alpn_certificate
from proxy.tls.certcache import MANUAL, Certificate, CertificateCache
from tests.infra.pebble import free_port, pebble_factory  # noqa: F401  (fixture)
from tests.infra.pki import TestCA
from tests.infra.proxyproc import tls_client_context

FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}
IP = "127.0.0.2"


def cert_without_sni(host: str, port: int) -> x509.Certificate:
    with socket.create_connection((host, port), timeout=10) as raw:
        with tls_client_context().wrap_socket(raw) as s:   # no server_hostname: no SNI
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def ip_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def wait_listening(proxy, host: str, port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proxy.proc.poll() is None, proxy.log()[-3000:]
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"proxy not listening on {host}:{port}:\n{proxy.log()[-3000:]}")


def curl_ip(port: int, root_pem: bytes, tmp_path) -> subprocess.CompletedProcess:
    root = tmp_path / "root.pem"
    root.write_bytes(root_pem)
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(root), f"https://{IP}:{port}/"],
                          capture_output=True, timeout=20)


def ip_config(ca, tmp_path, port: int, **extra) -> dict:
    cfg = {"_port": port, "address": f"{IP}:{port}", "autocert": True, "autocert_ca": ca.directory_url,
           "autocert_trusted_ca_file": str(ca.trusted_ca_file), "autocert_dir": str(tmp_path / "ac"),
           "routes": [{"from": f"https://{IP}", "response": {"status": 200, "body": "by address"}},
                      {"from": "https://named.test", "response": {"status": 200, "body": "by name"}}]}
    cfg.update(extra)
    return cfg


def test_ip_route_by_tls_alpn_01_served_without_sni(pebble_factory, start_proxy, tmp_path):
    ca = pebble_factory(tls_port=free_port())
    proxy = start_proxy(ip_config(ca, tmp_path, ca.tls_port), env=FAST, wait=False)
    wait_listening(proxy, IP, ca.tls_port)
    proxy.wait_log(f"obtained a certificate for {IP}", timeout=30)
    cert = cert_without_sni(IP, ca.tls_port)
    assert ip_sans(cert) == [IP]
    assert "Pebble" in cert.issuer.rfc4514_string()
    out = curl_ip(ca.tls_port, ca.issuing_root_pem(), tmp_path)
    assert out.returncode == 0 and out.stdout == b"by address", out.stderr
    log = proxy.log()
    assert "acme-tls/1 handshake" not in log and "HTTP-01" not in log
    assert "tls-alpn-01 validation failed" not in log


def test_ip_route_by_http_01(pebble_factory, start_proxy, tmp_path):
    http_port, closed, port = free_port(), free_port(), free_port()
    ca = pebble_factory(http_port=http_port, tls_port=closed)
    proxy = start_proxy(ip_config(ca, tmp_path, port, http_redirect_addr=f"{IP}:{http_port}"),
                        env=FAST, wait=False)
    wait_listening(proxy, IP, port)
    proxy.wait_log(f"obtained a certificate for {IP}", timeout=30)
    assert f"answered HTTP-01 challenge for {IP}" in proxy.log()
    assert ip_sans(cert_without_sni(IP, port)) == [IP]


# ------------------------------------------------------------------------------ the engine
async def test_one_engine_serves_each_local_address_its_own_certificate(tmp_path):
    engine_mod = pytest.importorskip("proxy.tls.engine")
    socketstream = pytest.importorskip("proxy.tls.socketstream")
    pki = TestCA(tmp_path / "pki")
    a, b, named = pki.issue(["127.0.0.2"]), pki.issue(["127.0.0.3"]), pki.issue(["named.test"])
    cache = CertificateCache()
    cache.replace_manual([Certificate(chain_pem=i.cert_pem, key_pem=i.key_pem, source=MANUAL)
                          for i in (named, a, b)])
    assert cache.ip_names == {"127.0.0.2", "127.0.0.3"}
    engine = engine_mod.TLSEngine(cache)
    port = free_port()
    servers = [await socketstream.start_tls_server(
        lambda: socketstream.TLSServerStream(engine.new_connection), host, port)
        for host in ("127.0.0.2", "127.0.0.3")]

    def serial(host: str, sni=None) -> int:
        with socket.create_connection((host, port), timeout=10) as raw:
            with tls_client_context().wrap_socket(raw, server_hostname=sni) as s:
                return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    try:
        got = await asyncio.to_thread(lambda: {
            "2": serial("127.0.0.2"), "3": serial("127.0.0.3"),
            "2-named": serial("127.0.0.2", "named.test"), "2-unknown": serial("127.0.0.2", "other.test")})
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()
    assert got["2"] == a.cert.serial_number
    assert got["3"] == b.cert.serial_number
    assert got["2-named"] == named.cert.serial_number        # SNI still decides first
    assert got["2-unknown"] == a.cert.serial_number          # an unknown name: the address's


def test_local_ip_of_a_socket():
    engine_mod = pytest.importorskip("proxy.tls.engine")
    with socket.socket() as srv:
        srv.bind(("127.0.0.2", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()):
            conn, _ = srv.accept()
            with conn:
                assert engine_mod.local_ip(conn.fileno()) == "127.0.0.2"
                assert conn.fileno() >= 0   # still ours: only asked, not taken
    with socket.socket(socket.AF_INET6) as s6:
        s6.bind(("::ffff:127.0.0.2", 0))
        assert engine_mod.local_ip(s6.fileno()) == "127.0.0.2"   # IPv4-mapped as IPv4


# ------------------------------------------------------------------------------ challenges
def test_tls_alpn_01_for_an_ip_answers_its_reverse_name_with_an_ip_san():
    store = ChallengeStore()
    ch = Challenge("tls-alpn-01", "203.0.113.7", "tok", "tok.thumb")
    store.present(ch)
    cert, _ = store.tls_alpn_objects("7.113.0.203.in-addr.arpa")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.7")]
    assert san.get_values_for_type(x509.DNSName) == []
    store.remove(ch)
    assert store.tls_alpn_objects("7.113.0.203.in-addr.arpa") is None
    assert sni_name("2001:db8::1").endswith(".ip6.arpa") and ip_from_sni(sni_name("2001:db8::1")) == "2001:db8::1"
    assert ip_from_sni("example.com") is None and ip_from_sni("1.2.3.in-addr.arpa") is None
    pem, _ = tls_alpn_certificate("example.com", "k")
    dns = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert dns.value.get_values_for_type(x509.DNSName) == ["example.com"]
