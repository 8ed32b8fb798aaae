"""metrics_address: Prometheus counters a user scrapes from the running proxy."""
from __future__ import annotations

import subprocess
import time

from tests.infra.proxyproc import free_port


def curl(*args: str) -> subprocess.CompletedProcess:
    """curl, again while the connection is refused: the metrics listener opens a moment after
    the TLS listener that start_proxy waits for (curl's own --retry would also repeat a 503)."""
    deadline = time.monotonic() + 5
    while True:
        out = subprocess.run(["curl", "-sS", "--max-time", "5", *args], capture_output=True, timeout=10)
        if out.returncode != 7 or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def scrape(port: int) -> str:
    out = curl(f"http://127.0.0.1:{port}/metrics")
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


def probe(port: int, path: str) -> tuple[int, bytes]:
    out = curl("-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}")
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code), body


def test_health_probes_answer_200_while_serving_and_503_while_draining(start_proxy, upstream):
    """/healthz and /readyz (Pomerium's probe names) on the metrics listener: 200 while the
    listeners are open; once SIGTERM has closed them, 503 for as long as requests in flight
    are drained, so that a load balancer stops sending traffic before the process is gone."""
    import signal
    from tests.test_lifecycle import _curl_bg, _refused, _wait
    mport = free_port()
    p = start_proxy({"metrics_address": f"127.0.0.1:{mport}",
                     "routes": [{"from": "https://a.test", "to": upstream.url}]})
    assert probe(mport, "/healthz") == (200, b"ok\n")
    _wait(lambda: probe(mport, "/readyz") == (200, b"ok\n"), what="/readyz 200")
    slow = _curl_bg(p, "a.test", "/slow?s=3")
    _wait(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), what="slow request at upstream")
    p.signal(signal.SIGTERM)
    _wait(lambda: _refused(p.port), timeout=2.5, what="TLS listener closed")
    assert probe(mport, "/healthz") == (503, b"draining\n")
    assert probe(mport, "/readyz") == (503, b"draining\n")
    assert "autocert_proxy_connections_open" in scrape(mport)   # metrics still scraped
    assert slow.poll() is None, "the request in flight ended before the probes were asked"
    out, err = slow.communicate(timeout=15)
    assert out.endswith(b"\n200"), (out, err)
    assert p.proc.wait(15) == 0
    assert _refused(mport)


def test_probe_answers_by_phase():
    """Start-up (listeners open, certificates in storage still loading) cannot be held from
    outside long enough to probe it: the mapping itself, without sockets."""
    from proxy.http.metrics_listener import DRAINING, SERVING, STARTING, probe as answer
    assert answer(b"/healthz", STARTING) == (200, b"ok\n")
    assert answer(b"/readyz", STARTING) == (503, b"starting\n")
    assert answer(b"/healthz", SERVING) == answer(b"/readyz", SERVING) == (200, b"ok\n")
    assert answer(b"/healthz", DRAINING) == answer(b"/readyz", DRAINING) == (503, b"draining\n")
    assert answer(b"/metrics", SERVING) is None and answer(b"/healthz/x", SERVING) is None
