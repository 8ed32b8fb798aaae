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
