"""metrics_address: Prometheus counters a user scrapes from the running proxy."""
from __future__ import annotations

import subprocess

from tests.infra.proxyproc import free_port


def scrape(port: int) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"],
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


def test_metrics_count_requests_and_certificates(start_proxy, ca):
    leaf = ca.issue(["m.test"])
    mport = free_port()
    p = start_proxy({
        "metrics_address": f"127.0.0.1:{mport}",
        "certificates": [{"cert": str(leaf.cert_path), "key": str(leaf.key_path)}],
        "routes": [{"from": "https://m.test", "response": {"status": 200, "body": "ok"}}],
    })
    for _ in range(3):
        assert p.curl("m.test", "/").returncode == 0
    assert p.curl("other.test", "/").returncode == 0   # 404: no route
    text = scrape(mport)
    assert 'autocert_proxy_http_requests_total{code="200"} 3' in text
    assert 'autocert_proxy_http_requests_total{code="404"} 1' in text
    expiry = f'autocert_proxy_certificate_not_after_seconds{{name="m.test",source="manual"}} {leaf.cert.not_valid_after_utc.timestamp():g}'
    assert expiry in text
    # anything else on the metrics listener is a 404
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{mport}/x"],
                         capture_output=True, timeout=10)
    assert out.stdout == b"404"


def test_failed_handshakes_are_counted(start_proxy):
    mport = free_port()
    p = start_proxy({"metrics_address": f"127.0.0.1:{mport}",
                     "routes": [{"from": "https://m.test", "response": {"status": 200}}]})
    import socket
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: m.test\r\n\r\n")   # plain HTTP on the TLS port
        s.recv(100)
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if "autocert_proxy_tls_handshake_errors_total 1" in scrape(mport):
            return
        time.sleep(0.1)
    raise AssertionError(scrape(mport))


def test_open_connections_count_those_without_a_request(start_proxy):
    """autocert_proxy_connections_open counts every client connection: one mid-handshake,
    one handshaked that has asked nothing yet, and one with a request served (kept alive);
    each leaves the count when it closes."""
    import re
    import socket
    import time
    from tests.infra.proxyproc import tls_client_context
    mport = free_port()
    p = start_proxy({"metrics_address": f"127.0.0.1:{mport}",
                     "routes": [{"from": "https://localhost", "response": {"status": 200, "body": "ok"}}]})

    def open_count() -> float:
        m = re.search(r"^autocert_proxy_connections_open (\S+)$", scrape(mport), re.M)
        assert m, scrape(mport)
        return float(m.group(1))

    def wait_for(n: float) -> None:
        deadline = time.monotonic() + 5
        while open_count() != n:
            assert time.monotonic() < deadline, (open_count(), n)
            time.sleep(0.05)

    base = open_count()   # (the scrape's own connection is counted too)
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)   # no ClientHello
    quiet = tls_client_context().wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=5),
                                             server_hostname="localhost")
    served = tls_client_context().wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=5),
                                              server_hostname="localhost")
    served.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert served.recv(4096).startswith(b"HTTP/1.1 200")
    wait_for(base + 3)
    for s in (raw, quiet, served):
        s.close()
    wait_for(base)
