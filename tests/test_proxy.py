"""The reverse proxy end to end: the CLI-started proxy between real clients and a real upstream."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import time

import pytest

from tests.infra.proxyproc import ProxyProcess, free_port, tls_client_context, wait_port
from tests.infra.upstream import UpstreamServer, WebSocketEchoServer

HOST = "app.test"


# --------------------------------------------------------------------------- helpers

def tls_socket(port: int, host: str = HOST, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return tls_client_context().wrap_socket(raw, server_hostname=host)


def read_until_close(sock, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends; and whether it closed the connection (vs. timeout)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return out, False
        except (ConnectionResetError, ssl.SSLError):
            return out, True
        if not data:
            return out, True
        out += data
    return out, False


def raw_exchange(port: int, data: bytes, host: str = HOST, timeout: float = 10.0) -> tuple[bytes, bool]:
    with tls_socket(port, host, timeout) as s:
        s.sendall(data)
        return read_until_close(s, timeout)


def https(port: int, host: str = HOST, timeout: float = 10.0) -> http.client.HTTPSConnection:
    """A keep-alive client connection that reaches the proxy with SNI/Host ``host``."""
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls_client_context())
    # Resolve ``host`` to 127.0.0.1 while keeping it as SNI and Host.
    conn._create_connection = lambda addr, timeout=None, source_address=None: \
        socket.create_connection(("127.0.0.1", port), timeout)
    return conn


def get_json(conn: http.client.HTTPSConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 200, (resp.status, data)
    return json.loads(data)


def route(to, **extra) -> dict:
    return {"from": f"https://{HOST}", "to": to, **extra}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One proxy and upstream for the tests that need nothing special (starting costs ~1 s)."""
    up = UpstreamServer()
    p = ProxyProcess(tmp_path_factory.mktemp("shared"), {"routes": [route(up.url)]}).start()
    yield p, up
    p.stop()
    up.stop()


@pytest.fixture
def upstream(shared):
    shared[1].requests.clear()
    return shared[1]


@pytest.fixture
def proxy(shared, upstream):
    assert shared[0].proc.poll() is None, shared[0].log()[-3000:]
    return shared[0]


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# --------------------------------------------------------------------------- basic traffic

def test_get_through_proxy(proxy, upstream):
    r = proxy.curl(HOST, "/echo?x=1")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["method"] == "GET" and seen["path"] == "/echo?x=1"
    assert len(upstream.requests) == 1


def test_post_body_reaches_upstream(proxy, upstream, tmp_path):
    body = os.urandom(300_000)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = proxy.curl(HOST, "/echo", "--data-binary", f"@{f}")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["method"] == "POST"
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body(proxy, upstream, tmp_path):
    body = os.urandom(100_000)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = proxy.curl(HOST, "/echo", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["headers"].get("transfer-encoding") == "chunked"
    assert "content-length" not in seen["headers"]
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_response(proxy):
    r = proxy.curl(HOST, "/chunked?n=5", "-i")
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(5))


def test_head_request_keeps_connection_usable(proxy, upstream):
    conn = https(proxy.port)
    for _ in range(2):
        conn.request("HEAD", "/echo")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("content-length")) > 0
        assert resp.read() == b""
    sock = conn.sock
    seen = get_json(conn, "GET", "/echo")
    assert conn.sock is sock            # the same connection served all three
    assert seen["method"] == "GET"
    assert [r["method"] for r in upstream.requests] == ["HEAD", "HEAD", "GET"]
    conn.close()


def test_pipelined_requests(proxy, upstream):
    reqs = b"".join(f"GET /echo?n={i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(3))
    reqs += f"GET /echo?n=3 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    out, closed = raw_exchange(proxy.port, reqs)
    assert closed
    assert out.count(b"HTTP/1.1 200 OK") == 4, out
    for i in range(4):
        assert f'"path": "/echo?n={i}"'.encode() in out
    positions = [out.index(f'/echo?n={i}"'.encode()) for i in range(4)]
    assert positions == sorted(positions)   # answered in order
    assert [r["path"] for r in upstream.requests] == [f"/echo?n={i}" for i in range(4)]


def test_expect_100_continue(proxy, upstream, tmp_path):
    body = os.urandom(2 * 1024 * 1024)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = proxy.curl(HOST, "/echo", "-v", "-H", "Expect: 100-continue", "--data-binary", f"@{f}",
                   "--expect100-timeout", "30")
    assert r.returncode == 0, r.stderr
    assert b"< HTTP/1.1 100 Continue" in r.stderr, r.stderr[-2000:]
    seen = json.loads(r.stdout)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in seen["headers"]


# --------------------------------------------------------------------------- large bodies

BIG_MIB = 200


def test_large_streamed_upload_and_download(proxy, upstream, tmp_path):
    pid = proxy.proc.pid
    assert proxy.curl(HOST, "/echo").returncode == 0
    base_rss = vm_kib(pid, "VmRSS")

    # Upload: 200 MiB with a Content-Length, then 200 MiB chunked; the upstream checks sha256.
    f = tmp_path / "big"
    h = hashlib.sha256()
    with open(f, "wb") as out:
        block = os.urandom(1024 * 1024)
        for i in range(BIG_MIB):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            out.write(chunk)
    r = proxy.curl(HOST, "/echo", "--data-binary", f"@{f}", timeout=120)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["body_length"] == BIG_MIB * 1024 * 1024
    assert seen["body_sha256"] == h.hexdigest()

    r = proxy.curl(HOST, "/echo", "-T", str(f), "-H", "Transfer-Encoding: chunked", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["body_sha256"] == h.hexdigest()
    f.unlink()

    # Download: 200 MiB of "x" hashed as it arrives.
    cmd = ["curl", "-sS", "--max-time", "120", "-k", "--resolve", f"{HOST}:{proxy.port}:127.0.0.1",
           f"https://{HOST}:{proxy.port}/big?mb={BIG_MIB}"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as p:
        got = hashlib.sha256()
        n = 0
        while True:
            data = p.stdout.read(1 << 20)
            if not data:
                break
            got.update(data)
            n += len(data)
        assert p.wait(10) == 0
    assert n == BIG_MIB * 1024 * 1024
    assert got.hexdigest() == hashlib.sha256(b"x" * n).hexdigest()

    peak = vm_kib(pid, "VmHWM")
    # 200 MiB moved each way; the proxy's peak memory grew by far less than one body.
    assert peak - base_rss < 48 * 1024, (base_rss, peak)


def test_idle_connections_do_not_keep_a_large_responses_buffers(proxy):
    """A keep-alive connection that downloaded 1 MiB and went idle must not hold on to the
    TLS buffers of that transfer (a memory BIO keeps its largest size: 285 KiB per connection
    was measured before the proxy renewed them), and keeps working afterwards."""
    pid = proxy.proc.pid

    def download(conn):
        conn.request("GET", "/big?mb=1")
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and len(body) == 1024 * 1024 and body == b"x" * len(body)

    warm = https(proxy.port)           # the heap's first growth is not per connection
    download(warm)
    warm.close()
    time.sleep(0.3)
    n = 40
    conns = [https(proxy.port) for _ in range(n)]
    for c in conns:
        c.request("GET", "/echo")
        c.getresponse().read()
    time.sleep(0.3)
    before = vm_kib(pid, "VmRSS")
    for c in conns:
        download(c)
    time.sleep(0.5)
    grown = vm_kib(pid, "VmRSS") - before
    for c in conns:                    # every connection still serves requests
        c.request("GET", "/echo?again=1")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["path"] == "/echo?again=1"
        c.close()
    assert grown < n * 100, f"{grown} KiB more for {n} idle connections"


# --------------------------------------------------------------------------- websocket

def test_websocket_echo_through_proxy(start_proxy):
    from websockets.sync.client import connect
    ws_server = WebSocketEchoServer()
    try:
        p = start_proxy({"routes": [{**route(ws_server.url), "allow_websockets": True}]})
        ctx = tls_client_context()
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        with connect(f"wss://{HOST}:{p.port}/chat", ssl=ctx, sock=sock, server_hostname=HOST,
                     open_timeout=10, close_timeout=5) as ws:
            for msg in ("hello", "x" * 200_000, b"\x00\x01binary"):
                ws.send(msg)
                assert ws.recv(timeout=10) == msg
    finally:
        ws_server.stop()


# --------------------------------------------------------------------------- headers

def test_forwarded_headers(proxy, upstream):
    r = proxy.curl(HOST, "/echo", "-H", "X-Forwarded-For: 203.0.113.9")
    seen = json.loads(r.stdout)["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"{HOST}:{proxy.port}"
    assert seen["host"] == f"127.0.0.1:{upstream.port}"   # preserve_host_header is off


def test_forwarded_headers_cannot_be_spoofed(proxy, upstream):
    r = proxy.curl(HOST, "/echo", "-H", "X-Forwarded-Proto: http", "-H", "X-Forwarded-Host: evil")
    seen = json.loads(r.stdout)["headers"]
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"{HOST}:{proxy.port}"


def test_hop_by_hop_headers_not_forwarded(proxy, upstream):
    req = (f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\n"
           f"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
           f"X-End-To-End: kept\r\n\r\n").encode()
    with tls_socket(proxy.port) as s:
        s.sendall(req)
        s.settimeout(10)
        data = b""
        while b"}" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    seen = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
    for name in ("x-hop", "keep-alive", "te", "proxy-connection"):
        assert name not in seen, seen
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"   # the proxy's own, if any
    assert seen["x-end-to-end"] == "kept"


def test_hop_by_hop_response_headers_not_forwarded(start_proxy):
    """An upstream's Connection-named and Keep-Alive headers stay between it and the proxy."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    import threading

    def serve():
        c, _ = lsock.accept()
        with c:
            c.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(4096)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Up-Hop\r\nX-Up-Hop: 1\r\n"
                      b"Keep-Alive: timeout=5\r\nX-Up-Kept: 1\r\n\r\nok")
            time.sleep(0.5)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        p = start_proxy({"routes": [route(f"http://127.0.0.1:{port}")]})
        r = p.curl(HOST, "/", "-i")
        head = r.stdout.split(b"\r\n\r\n")[0].lower()
        assert b"x-up-kept: 1" in head
        assert b"x-up-hop" not in head and b"keep-alive: timeout" not in head
    finally:
        t.join(5)
        lsock.close()


def test_preserve_host_header(start_proxy, upstream):
    p = start_proxy({"routes": [route(upstream.url, preserve_host_header=True)]})
    seen = json.loads(p.curl(HOST, "/echo").stdout)["headers"]
    assert seen["host"] == f"{HOST}:{p.port}"


def test_load_balancing_over_to_list(start_proxy):
    ups = [UpstreamServer() for _ in range(2)]
    try:
        p = start_proxy({"routes": [route([u.url for u in ups])]})
        conn = https(p.port)
        for _ in range(6):
            get_json(conn, "GET", "/echo")
        conn.close()
        assert [len(u.requests) for u in ups] == [3, 3]
    finally:
        for u in ups:
            u.stop()


def test_identical_requests_are_forwarded_for_each_client_and_upstream(start_proxy):
    """A client repeats the same headers with every request, and the proxy reuses what it
    derived from them the last time: what reaches each upstream must still carry that
    upstream's Host and that client's address."""
    ups = [UpstreamServer() for _ in range(2)]
    try:
        p = start_proxy({"routes": [route([u.url for u in ups])]})
        authorities = {f"127.0.0.1:{u.port}" for u in ups}
        for source in ("127.0.0.1", "127.0.0.2"):
            conn = http.client.HTTPSConnection(HOST, p.port, timeout=10, context=tls_client_context())
            conn._create_connection = lambda addr, timeout=None, source_address=None, source=source: \
                socket.create_connection(("127.0.0.1", p.port), timeout, source_address=(source, 0))
            hosts = []
            for _ in range(4):
                seen = get_json(conn, "GET", "/echo", headers={"X-Forwarded-For": "203.0.113.9"})["headers"]
                assert seen["x-forwarded-for"] == f"203.0.113.9, {source}"
                hosts.append(seen["host"])
            conn.close()
            assert set(hosts) == authorities and hosts[0] != hosts[1], hosts   # round-robin, each its own Host
    finally:
        for u in ups:
            u.stop()


def test_upstream_keepalive_reuse(proxy, upstream):
    for _ in range(8):   # eight separate client connections
        r = proxy.curl(HOST, "/echo")
        assert r.returncode == 0
    assert len(upstream.requests) == 8
    assert len(upstream.client_ports()) < 8, upstream.client_ports()


def test_route_by_path_prefix(start_proxy):
    a, b = UpstreamServer(), UpstreamServer()
    try:
        p = start_proxy({"routes": [
            {"from": f"https://{HOST}/api", "to": b.url},
            {"from": f"https://{HOST}", "to": a.url},
        ]})
        for path in ("/api", "/api/x", "/apix", "/"):
            assert p.curl(HOST, path).returncode == 0
        assert [r["path"] for r in b.requests] == ["/api", "/api/x"]
        assert [r["path"] for r in a.requests] == ["/apix", "/"]
    finally:
        a.stop()
        b.stop()



def _paths(up) -> list:
    return [r["path"] for r in up.requests]


def test_pomerium_path_rules_first_match_in_file_order(start_proxy):
    """prefix is a raw string prefix, path exact, regex the whole path; duplicate froms are
    tried in file order unless regex_priority_order lifts one."""
    ups = [UpstreamServer() for _ in range(5)]
    try:
        p = start_proxy({"routes": [
            route(ups[0].url, prefix="/api"),
            route(ups[1].url, path="/exact"),
            route(ups[2].url, regex="/v[0-9]+/.*"),
            route(ups[3].url, regex="/exact.*", regex_priority_order=10),
            route(ups[4].url),
        ]})
        for path in ("/api", "/apix/1", "/exact", "/exact/y", "/v2/a", "/vx/a", "/", "/v2/a?q=/exact"):
            assert p.curl(HOST, path).returncode == 0
        assert _paths(ups[0]) == ["/api", "/apix/1"]
        assert _paths(ups[1]) == []   # lifted above it by regex_priority_order
        assert _paths(ups[2]) == ["/v2/a", "/v2/a?q=/exact"]
        assert _paths(ups[3]) == ["/exact", "/exact/y"]
        assert _paths(ups[4]) == ["/vx/a", "/"]
    finally:
        for u in ups:
            u.stop()


def test_pomerium_wildcard_anywhere_and_from_port(start_proxy):
    a, b, c, d = UpstreamServer(), UpstreamServer(), UpstreamServer(), UpstreamServer()
    try:
        port = free_port()
        p = start_proxy({"_port": port, "routes": [
            {"from": "https://ported.test:1", "to": a.url},   # another port: never this listener
            {"from": f"https://ported.test:{port}", "to": b.url},
            {"from": "https://*.wild.test", "to": c.url},
            {"from": "https://app-*.test", "to": d.url},
        ]})
        assert p.curl("ported.test", "/with-port").returncode == 0
        raw, _ = raw_exchange(p.port, b"GET /no-port HTTP/1.1\r\nHost: ported.test\r\nConnection: close\r\n\r\n",
                              host="ported.test")
        assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
        for host in ("a.wild.test", "a.b.wild.test", "app-1.test"):
            assert p.curl(host, f"/{host}").returncode == 0
        assert p.curl("wild.test", "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"404"
        assert _paths(a) == []
        assert _paths(b) == ["/with-port", "/no-port"]
        assert _paths(c) == ["/a.wild.test", "/a.b.wild.test"]
        assert _paths(d) == ["/app-1.test"]
    finally:
        for u in (a, b, c, d):
            u.stop()


def test_upgrade_forwarded_only_where_the_route_allows_it(start_proxy):
    """Pomerium's allow_websockets/allow_spdy/allow_upgrades are off by default: elsewhere the
    upstream sees a plain request without Upgrade (as Envoy sends it)."""
    up = UpstreamServer()
    try:
        p = start_proxy({"routes": [
            {"from": "https://plain.test", "to": up.url},
            {"from": "https://spdy.test", "to": up.url, "allow_spdy": True},
        ]})
        for host in ("plain.test", "spdy.test"):
            raw, _ = raw_exchange(p.port, f"GET /{host} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                                  f"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  f"Sec-WebSocket-Version: 13\r\n\r\n".encode(), host=host, timeout=3)
            assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
        raw, _ = raw_exchange(p.port, b"GET /spdy HTTP/1.1\r\nHost: spdy.test\r\nConnection: Upgrade\r\n"
                              b"Upgrade: spdy/3.1\r\n\r\n", host="spdy.test", timeout=3)
        seen = [dict(r["headers"]) for r in up.requests]
        assert len(seen) == 3
        assert "upgrade" not in seen[0] and "upgrade" not in seen[1]
        assert "upgrade" not in seen[0].get("connection", "").lower()
        assert seen[2].get("upgrade") == "spdy/3.1"
    finally:
        up.stop()


# --------------------------------------------------------------------------- errors

def test_404_no_route(proxy, upstream):
    r = proxy.curl("other.test", "/x", "-i")
    assert r.stdout.startswith(b"HTTP/1.1 404"), r.stdout
    assert b"No route" in r.stdout
    assert upstream.requests == []


def test_404_no_route_with_body_keeps_connection(proxy, upstream):
    conn = https(proxy.port, host="other.test")
    conn.request("POST", "/x", body=b"a" * 10000)
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    sock = conn.sock
    conn.request("GET", "/y")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    assert conn.sock is sock
    conn.close()


def test_502_upstream_refused(start_proxy):
    p = start_proxy({"routes": [route(f"http://127.0.0.1:{free_port()}")]})
    r = p.curl(HOST, "/", "-i")
    assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout
    assert b"refused" in r.stdout
    # With a request body too.
    r = p.curl(HOST, "/", "-i", "--data-binary", "x" * 1000)
    assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout


def test_504_upstream_timeout(start_proxy, upstream):
    p = start_proxy({"default_upstream_timeout": "1s", "routes": [route(upstream.url)]})
    r = p.curl(HOST, "/slow?s=5", "-i")
    assert r.stdout.startswith(b"HTTP/1.1 504"), r.stdout
    # The proxy stays healthy afterwards.
    assert p.curl(HOST, "/echo").returncode == 0


def test_direct_response_route(start_proxy):
    p = start_proxy({"routes": [{"from": f"https://{HOST}", "response": {"status": 418, "body": "teapot"}}]})
    r = p.curl(HOST, "/", "-i")
    assert r.stdout.startswith(b"HTTP/1.1 418")
    assert r.stdout.endswith(b"teapot")


# --------------------------------------------------------------------------- request targets and hosts

def _upstream_saw(up: UpstreamServer) -> list:
    return [(r["path"], dict(r["headers"])["host"], dict(r["headers"])["x-forwarded-host"]) for r in up.requests]


def test_absolute_form_target_is_routed_by_its_authority(start_proxy):
    """RFC 9112 3.2.2: the authority of an absolute-form target, not Host, names the host; the
    upstream gets origin-form (as from nginx), whichever of the two hosts is routed."""
    judge, internal = UpstreamServer(), UpstreamServer()
    try:
        p = start_proxy({"routes": [{"from": "https://judge.test", "to": judge.url},
                                    {"from": "https://internal.test", "to": internal.url,
                                     "preserve_host_header": True}]})
        get = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        # Host names judge.test, the target internal.test
        out, _ = raw_exchange(p.port, get % (b"http://internal.test/x?y=1", b"judge.test"), host="judge.test")
        assert out.startswith(b"HTTP/1.1 200"), out[:300]
        assert _upstream_saw(internal) == [("/x?y=1", "internal.test", "internal.test")]
        assert judge.requests == []
        # the reverse: Host names internal.test, the target judge.test
        out, _ = raw_exchange(p.port, get % (b"https://judge.test/c24", b"internal.test"), host="internal.test")
        assert out.startswith(b"HTTP/1.1 200"), out[:300]
        assert _upstream_saw(judge) == [("/c24", f"127.0.0.1:{judge.port}", "judge.test")]
        assert len(internal.requests) == 1
        # no path, a port and upper case in the target
        out, _ = raw_exchange(p.port, get % (b"HTTP://Internal.Test:8443?q=1", b"judge.test"))
        assert out.startswith(b"HTTP/1.1 200"), out[:300]
        assert _upstream_saw(internal)[-1] == ("/?q=1", "Internal.Test:8443", "Internal.Test:8443")
        # a target host without a route: 404 for it, though Host has one
        out, _ = raw_exchange(p.port, get % (b"https://nowhere.test/c24", b"judge.test"))
        assert out.startswith(b"HTTP/1.1 404"), out[:300]
        assert b"No route for nowhere.test/c24." in out
        assert len(judge.requests) == 1 and len(internal.requests) == 2
    finally:
        judge.stop()
        internal.stop()


@pytest.mark.parametrize("request_line", [
    b"OPTIONS * HTTP/1.1",                         # asterisk-form
    b"CONNECT app.test:443 HTTP/1.1",              # authority-form
    b"CONNECT /echo HTTP/1.1",
    b"GET app.test/echo HTTP/1.1",                 # no scheme
    b"GET ftp://app.test/echo HTTP/1.1",
    b"GET http://user@app.test/echo HTTP/1.1",     # userinfo (RFC 9110 4.2.4)
    b"GET http:///echo HTTP/1.1",                  # no host
    b"GET http://app.test:https/echo HTTP/1.1",    # not a port
])
def test_targets_a_reverse_proxy_does_not_forward_are_400(proxy, upstream, request_line):
    out, closed = raw_exchange(proxy.port, request_line + f"\r\nHost: {HOST}\r\n\r\n".encode())
    assert closed
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    assert out.count(b"HTTP/1.1") == 1, out
    time.sleep(0.2)   # the upstream thread would have recorded by now
    assert upstream.requests == []


MARKUP = b"<svg/onload=alert(1)>"


@pytest.mark.parametrize("sent, status", [
    (b"GET /" + MARKUP + b"?q=" + MARKUP + b" HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n", 404),
    (b"GET / HTTP/1.1\r\nHost: a" + MARKUP + b"\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: app.test:" + MARKUP + b"\r\n\r\n", 400),
    (b"GET http://a" + MARKUP + b"/ HTTP/1.1\r\nHost: app.test\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: app.test\r\n" + MARKUP + b": 1\r\n\r\n", 400),
])
def test_what_a_client_sent_is_escaped_in_error_pages(proxy, upstream, sent, status):
    out, _ = raw_exchange(proxy.port, sent)
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:300]
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"text/html" in head and b"<svg" not in out, out
    time.sleep(0.2)
    assert upstream.requests == []


# --------------------------------------------------------------------------- smuggling

SMUGGLING = {
    "cl_and_te": b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_and_cl": b"POST /echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                 b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    "two_lengths": b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "two_lengths_one_header": b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "bad_chunk_size": b"POST /echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "bare_lf_head": b"GET /echo HTTP/1.1\nHost: %s\n\n",
    "bare_lf_one_line": b"GET /echo HTTP/1.1\r\nHost: %s\nX-A: 1\r\n\r\n",
    "te_not_chunked": b"POST /echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"POST /echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "negative_length": b"POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: -1\r\n\r\n",
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_smuggling_rejected_and_upstream_sees_nothing(proxy, upstream, case):
    out, closed = raw_exchange(proxy.port, SMUGGLING[case] % HOST.encode())
    assert closed, f"connection left open after {case}: {out!r}"
    status = out.split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 400", b"HTTP/1.1 501")), out
    if case in ("cl_and_te", "te_and_cl", "two_lengths", "two_lengths_one_header", "bad_chunk_size", "bare_lf_head",
                "bare_lf_one_line"):
        assert status.startswith(b"HTTP/1.1 400"), out
    assert out.count(b"HTTP/1.1") == 1, out           # nothing answered after the rejection
    time.sleep(0.2)   # the upstream thread would have recorded by now
    assert upstream.requests == []
    assert proxy.proc.poll() is None


def test_obs_fold_is_rejected_or_unfolded(proxy, upstream):
    """RFC 9112 5.2: reject obs-fold with 400, or replace it with a space before forwarding."""
    req = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nX-A: 1\r\n continued\r\nConnection: close\r\n\r\n"
    out, closed = raw_exchange(proxy.port, req.encode())
    assert closed
    if out.startswith(b"HTTP/1.1 400"):
        assert upstream.requests == []
    else:
        assert out.startswith(b"HTTP/1.1 200"), out
        assert dict(upstream.requests[0]["headers"])["x-a"] == "1 continued"


def test_smuggling_after_valid_pipelined_request(proxy, upstream):
    good = f"GET /echo?first HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    bad = SMUGGLING["cl_and_te"] % HOST.encode()
    out, closed = raw_exchange(proxy.port, good + bad)
    assert closed
    assert out.startswith(b"HTTP/1.1 200"), out
    assert b"HTTP/1.1 400" in out
    assert [r["path"] for r in upstream.requests] == ["/echo?first"]


def test_smuggling_on_direct_response_route(start_proxy):
    p = start_proxy({"routes": [{"from": f"https://{HOST}", "response": {"status": 200, "body": "ok"}}]})
    out, closed = raw_exchange(p.port, SMUGGLING["cl_and_te"] % HOST.encode())
    assert closed and out.startswith(b"HTTP/1.1 400"), out
    assert b"/smuggled" not in out and out.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("connection, framing, body", [
    (b"Content-Length", b"Content-Length: 5", b"hello"),
    (b"keep-alive, content-length", b"Content-Length: 5", b"hello"),
    (b"Transfer-Encoding", b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
])
def test_connection_naming_a_framing_header_is_400_not_502(proxy, upstream, connection, framing, body):
    """A framing header named in Connection is hop-by-hop by that rule; removing it would
    change the body's framing. The client's mistake is answered 400, not blamed on the upstream."""
    marker = f"framing-{time.monotonic_ns()}"
    req = b"POST /echo?%s HTTP/1.1\r\nHost: %s\r\nConnection: %s\r\n%s\r\n\r\n%s" % (
        marker.encode(), HOST.encode(), connection, framing, body)
    out, closed = raw_exchange(proxy.port, req)
    assert closed
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    assert out.count(b"HTTP/1.1") == 1, out
    proxy.wait_log(marker)   # (its access log line)
    time.sleep(0.2)
    assert upstream.requests == []
    assert not [l for l in proxy.log().splitlines() if "WARNING" in l and "upstream" in l]


# --------------------------------------------------------------------------- timeouts

def test_slow_request_head_times_out(start_proxy, upstream):
    p = start_proxy({"timeout_read_header": "1s", "routes": [route(upstream.url)]})
    with tls_socket(p.port) as s:
        s.sendall(f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\n".encode())   # half a head
        started = time.monotonic()
        out, closed = read_until_close(s, timeout=10)
    assert closed
    assert out == b"" or out.startswith(b"HTTP/1.1 408"), out
    assert time.monotonic() - started < 9
    assert upstream.requests == []


def test_a_new_connections_head_timeout_counts_from_the_start(start_proxy, upstream):
    """The head timeout of a new connection bounds the wait for the first byte and the rest
    of the head together: a head begun late has only what is left of it."""
    p = start_proxy({"timeout_read_header": "1s", "routes": [route(upstream.url)]})
    with tls_socket(p.port) as s:
        started = time.monotonic()   # (the handshake is done: the server's head timeout runs)
        time.sleep(0.6)
        s.sendall(b"GET /echo HTTP/1.1\r\n")   # part of a head
        out, closed = read_until_close(s, timeout=10)
        elapsed = time.monotonic() - started
    assert closed and out.startswith(b"HTTP/1.1 408"), out
    assert elapsed < 1.4, elapsed   # not 1 s again from the first byte (1.6 s)
    assert upstream.requests == []


def test_slow_head_dribbled_byte_by_byte_times_out(start_proxy, upstream):
    """Sending one byte at a time must not extend the head deadline forever."""
    p = start_proxy({"timeout_read_header": "1s", "routes": [route(upstream.url)]})
    head = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nX-Padding: {'a' * 200}\r\n\r\n".encode()
    with tls_socket(p.port) as s:
        s.settimeout(0.3)
        started = time.monotonic()
        closed = False
        for b in head:
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                closed = True
                break
            try:
                data = s.recv(4096)
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed = True
                    break
            except (socket.timeout, TimeoutError):
                pass
            except (ConnectionResetError, ssl.SSLError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 8:
                break
    assert closed, "a head dribbled over ~14s was still being accepted"
    assert upstream.requests == []


def test_idle_keepalive_connection_closed(start_proxy, upstream):
    p = start_proxy({"timeout_idle": "1s", "routes": [route(upstream.url)]})
    conn = https(p.port)
    get_json(conn, "GET", "/echo")
    sock = conn.sock
    started = time.monotonic()
    out, closed = read_until_close(sock, timeout=10)
    assert closed and out == b""
    assert time.monotonic() - started < 9
    conn.close()


def test_keepalive_within_idle_timeout(start_proxy, upstream):
    p = start_proxy({"timeout_idle": "5s", "routes": [route(upstream.url)]})
    conn = https(p.port)
    get_json(conn, "GET", "/echo")
    sock = conn.sock
    time.sleep(1)
    get_json(conn, "GET", "/echo")
    assert conn.sock is sock
    conn.close()


# --------------------------------------------------------------------------- redirect listener

@pytest.fixture(scope="module")
def redirect_proxy(tmp_path_factory):
    rport = free_port()
    p = ProxyProcess(tmp_path_factory.mktemp("redirect"), {
        "http_redirect_addr": f"127.0.0.1:{rport}",
        "routes": [{"from": f"https://{HOST}", "response": {"status": 200, "body": "ok"}}]}).start()
    wait_port(rport)
    yield p
    p.stop()


def _plain(port: int, method: str, path: str, host: str = "www.example.com", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Host": host})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_redirect_get_head_301(redirect_proxy):
    p = redirect_proxy
    resp, _ = _plain(p.redirect_port, "GET", "/a/b?x=1&y=2")
    assert resp.status == 301
    assert resp.getheader("location") == f"https://www.example.com:{p.port}/a/b?x=1&y=2"
    resp, body = _plain(p.redirect_port, "HEAD", "/h", host="www.example.com:80")
    assert resp.status == 301 and body == b""
    assert resp.getheader("location") == f"https://www.example.com:{p.port}/h"


def test_redirect_post_308(redirect_proxy):
    p = redirect_proxy
    for method in ("POST", "PUT", "DELETE"):
        resp, _ = _plain(p.redirect_port, method, "/form?q=1", body=b"data")
        assert resp.status == 308, method
        assert resp.getheader("location") == f"https://www.example.com:{p.port}/form?q=1"


def test_redirect_to_port_443_has_no_port():
    from proxy.http.redirect import redirect_location
    assert redirect_location(b"www.example.com:80", b"/p?q", 443) == b"https://www.example.com/p?q"


def test_redirect_refuses_an_invalid_host(redirect_proxy):
    resp, body = _plain(redirect_proxy.redirect_port, "GET", "/x", host="a<svg/onload=alert(1)>")
    assert resp.status == 400
    assert resp.getheader("location") is None and b"<svg" not in body


def test_redirect_of_absolute_form_uses_its_authority(redirect_proxy):
    p = redirect_proxy
    with socket.create_connection(("127.0.0.1", p.redirect_port), timeout=10) as s:
        s.sendall(b"GET http://other.example/p?q=1 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
        out, _ = read_until_close(s)
    assert out.startswith(b"HTTP/1.1 301"), out
    assert f"\r\nlocation: https://other.example:{p.port}/p?q=1\r\n".encode() in out, out


def test_redirect_acme_challenge_is_404(redirect_proxy):
    resp, body = _plain(redirect_proxy.redirect_port, "GET", "/.well-known/acme-challenge/x")
    assert resp.status == 404
    assert resp.getheader("location") is None


def test_redirect_with_curl_follows_to_https(redirect_proxy):
    p = redirect_proxy
    r = subprocess.run(["curl", "-sS", "-k", "-L", "--max-time", "10",
                        "--resolve", f"{HOST}:{p.redirect_port}:127.0.0.1",
                        "--resolve", f"{HOST}:{p.port}:127.0.0.1",
                        f"http://{HOST}:{p.redirect_port}/"], capture_output=True, timeout=15)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"ok"


def test_redirect_keepalive_and_garbage(redirect_proxy):
    p = redirect_proxy
    conn = http.client.HTTPConnection("127.0.0.1", p.redirect_port, timeout=10)
    for path in ("/1", "/2"):
        conn.request("GET", path, headers={"Host": "h.example.com"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 301
    conn.close()
    with socket.create_connection(("127.0.0.1", p.redirect_port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        out, closed = read_until_close(s, timeout=10)
        assert closed
    assert p.proc.poll() is None
    assert "Traceback" not in p.log()


# --------------------------------------------------------------------------- unusual upstreams

class RawUpstream:
    """A socket upstream that answers every request head with fixed bytes, then closes
    after ``hold`` seconds without reading the request body."""

    def __init__(self, response: bytes, hold: float = 0.5):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.response, self.hold = response, hold
        self.heads: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                buf = b""
                try:
                    while b"\r\n\r\n" not in buf:
                        data = c.recv(4096)
                        if not data:
                            break
                        buf += data
                    self.heads.append(buf.split(b"\r\n\r\n")[0])
                    c.sendall(self.response)
                    time.sleep(self.hold)
                except OSError:
                    pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.sock.close()


@pytest.fixture
def raw_upstream():
    made = []

    def make(response: bytes, hold: float = 0.5) -> RawUpstream:
        made.append(RawUpstream(response, hold))
        return made[-1]
    yield make
    for u in made:
        u.stop()


def test_upstream_early_answer_during_upload_is_forwarded(start_proxy, raw_upstream, tmp_path):
    up = raw_upstream(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
    p = start_proxy({"routes": [route(up.url)]})
    f = tmp_path / "body"
    f.write_bytes(os.urandom(20 * 1024 * 1024))
    for expect in ("Expect: 100-continue", "Expect:"):    # "Expect:" makes curl send no Expect
        r = p.curl(HOST, "/upload", "-i", "-H", expect, "--data-binary", f"@{f}", timeout=30)
        final = r.stdout.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]
        assert final.startswith(b"HTTP/1.1 413"), (expect, r.stdout[:300], r.stderr)
        assert final.endswith(b"too big!")
    assert len(up.heads) == 2


def test_close_delimited_upstream_response(start_proxy, raw_upstream):
    up = raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close", hold=0)
    p = start_proxy({"routes": [route(up.url)]})
    conn = https(p.port)
    for _ in range(2):     # the client connection stays usable (the proxy re-frames the body)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"body until close"
    conn.close()


def test_upstream_garbage_is_502(start_proxy, raw_upstream):
    up = raw_upstream(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", hold=0)
    p = start_proxy({"routes": [route(up.url)]})
    r = p.curl(HOST, "/", "-i")
    assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout
    assert "Traceback" not in p.log()


def test_client_that_stops_reading_is_dropped(start_proxy, upstream):
    """A client that never reads its response must not hold the proxy (and the upstream) forever."""
    p = start_proxy({"timeout_idle": "1s", "routes": [route(upstream.url)]})
    with tls_socket(p.port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /big?mb=100 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        time.sleep(3)              # not reading: the proxy's writes stall
        got = 0
        s.settimeout(10)
        try:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            pass
    assert got < 100 * 1024 * 1024
    assert p.curl(HOST, "/echo").returncode == 0
    p.wait_log("client stopped reading")   # the client's doing, not the upstream's
    assert not [l for l in p.log().splitlines() if "WARNING" in l], p.log()[-3000:]


def test_client_leaving_mid_response_is_not_blamed_on_the_upstream(start_proxy, upstream):
    """A client that closes while a large response trickles in from the upstream: logged as
    the client's doing at INFO, with no warning about the upstream."""
    p = start_proxy({"routes": [route(upstream.url)]})
    with tls_socket(p.port) as s:
        s.sendall(f"GET /big?mb=16&ms=20 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        got = b""
        while len(got) < 300_000:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
    p.wait_log("client closed the connection")
    line = next(l for l in p.log().splitlines() if "client closed the connection" in l)
    assert " INFO " in line and "https://app.test" in line, line
    assert not [l for l in p.log().splitlines() if "WARNING" in l], p.log()[-3000:]


@pytest.mark.parametrize("size", [70_000, 100_000, 300_000])
def test_oversized_head_is_431(proxy, upstream, size):
    req = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {'a' * size}\r\n\r\n".encode()
    out, closed = raw_exchange(proxy.port, req)
    assert closed
    assert out.startswith(b"HTTP/1.1 431"), out[:200]
    assert upstream.requests == []


def test_http10_client(proxy, upstream):
    out, closed = raw_exchange(proxy.port, f"GET /echo HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
    assert closed
    assert out.startswith(b"HTTP/1.0 200") or out.startswith(b"HTTP/1.1 200"), out[:200]
    assert b'"method": "GET"' in out


def test_missing_host_is_400(proxy, upstream):
    out, closed = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\n\r\n")
    assert closed and out.startswith(b"HTTP/1.1 400"), out[:200]
    assert upstream.requests == []


def test_access_log_one_line_per_request(proxy):
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    conn = https(proxy.port)
    for _ in range(3):
        get_json(conn, "GET", f"/echo?{marker}")
    conn.close()
    proxy.wait_log(marker, count=3)
    lines = [l for l in proxy.log().splitlines() if marker in l]
    assert len(lines) == 3
    assert all(" 200 " in l and "route=https://app.test" in l for l in lines), lines


def test_access_log_json(start_proxy, upstream):
    p = start_proxy({"access_log_format": "json", "routes": [route(upstream.url)]})
    assert p.curl(HOST, "/echo?json-log").returncode == 0
    p.wait_log("json-log")
    line = next(l for l in p.log().splitlines() if "json-log" in l)
    record = json.loads(line)
    inner = json.loads(record["message"]) if isinstance(record.get("message"), str) else record
    assert inner["status"] == 200 and inner["target"] == "/echo?json-log"


def test_concurrent_clients_get_their_own_responses(proxy, upstream):
    """Pooled upstream connections never mix up bodies or responses between clients."""
    from concurrent.futures import ThreadPoolExecutor

    def client(i: int) -> list[bool]:
        conn = https(proxy.port)
        ok = []
        for j in range(5):
            body = os.urandom(1000 + i * 97 + j)
            seen = get_json(conn, "POST", f"/echo?c={i}&r={j}", body=body)
            ok.append(seen["path"] == f"/echo?c={i}&r={j}"
                      and seen["body_sha256"] == hashlib.sha256(body).hexdigest())
        conn.close()
        return ok

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(client, range(20)))
    assert all(all(r) for r in results)
    assert len(upstream.requests) == 100


def test_pooled_connection_closed_by_upstream_is_not_used(start_proxy, raw_upstream):
    # The upstream keeps each connection 0.3 s after its answer, then closes it.
    up = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", hold=0.3)
    p = start_proxy({"routes": [route(up.url)]})
    for _ in range(3):
        r = p.curl(HOST, "/", "-i")
        assert r.stdout.startswith(b"HTTP/1.1 200") and r.stdout.endswith(b"ok"), r.stdout
        time.sleep(0.8)
    assert len(up.heads) == 3


def test_upstream_stalling_mid_body_cuts_the_client(start_proxy, raw_upstream):
    up = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", hold=8)
    p = start_proxy({"default_upstream_timeout": "1s", "routes": [route(up.url)]})
    with tls_socket(p.port) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        started = time.monotonic()
        out, closed = read_until_close(s, timeout=7)
    assert closed, out                       # cut, not left hanging with a short body
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"0123456789")
    assert time.monotonic() - started < 6
    assert "WARNING proxy.http: upstream" in p.log() and "broke off" in p.log()


def test_bad_chunk_after_good_ones_is_400(proxy, upstream):
    """A body that turns bad midway is the client's fault: 400 (not 502), connection closed."""
    req = (f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
           f"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n").encode()
    out, closed = raw_exchange(proxy.port, req)
    assert closed
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    assert out.count(b"HTTP/1.1") == 1


def test_client_stalling_mid_body_is_408_not_504(start_proxy, upstream):
    p = start_proxy({"timeout_idle": "1s", "routes": [route(upstream.url)]})
    with tls_socket(p.port) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n0123456789".encode())
        started = time.monotonic()
        out, closed = read_until_close(s, timeout=10)
    assert closed
    assert out.startswith(b"HTTP/1.1 408"), out[:300]
    assert time.monotonic() - started < 9
    assert "upstream" not in "\n".join(l for l in p.log().splitlines() if "WARNING" in l)


def test_no_descriptor_leak_across_mixed_traffic(start_proxy, upstream):
    p = start_proxy({"timeout_idle": "2s", "routes": [route(upstream.url)]})
    pid = p.proc.pid
    fds = lambda: len(os.listdir(f"/proc/{pid}/fd"))
    assert p.curl(HOST, "/echo").returncode == 0
    baseline = fds()
    for i in range(6):
        assert p.curl(HOST, "/echo", "--data-binary", "x" * 5000).returncode == 0
        assert p.curl("nowhere.test", "/").returncode == 0                    # 404
        raw_exchange(p.port, SMUGGLING["cl_and_te"] % HOST.encode())          # 400 + close
        raw_exchange(p.port, f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        with tls_socket(p.port) as s:                                         # client leaves mid-request
            s.sendall(f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\nabc".encode())
    deadline = time.monotonic() + 8
    while fds() > baseline + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= baseline + 1, (baseline, fds(), os.listdir(f"/proc/{pid}/fd"))
    assert "Traceback" not in p.log()
