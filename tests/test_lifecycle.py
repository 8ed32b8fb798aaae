"""Lifecycle as an operator sees it: SIGHUP reloads without dropping connections, SIGTERM drains."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from tests.infra.proxyproc import served_certificate
from tests.test_proxy import get_json, https, read_until_close


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


@pytest.fixture
def reloadable(start_proxy, upstream, ca):
    a = ca.issue(["a.test"])
    cfg = {"certificates": [{"cert": str(a.cert_path), "key": str(a.key_path)}],
           "routes": [{"from": "https://a.test", "to": upstream.url}]}
    return start_proxy(cfg), cfg


def test_sighup_adds_route_and_certificate_keeping_connections(reloadable, ca, upstream):
    p, cfg = reloadable
    conn = https(p.port, host="a.test")
    get_json(conn, "GET", "/echo?before")
    sock = conn.sock
    assert p.curl("b.test", "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"404"
    b = ca.issue(["b.test"])
    assert served_certificate(p.port, "b.test").serial_number != b.cert.serial_number

    new = dict(cfg)
    new["certificates"] = cfg["certificates"] + [{"cert": str(b.cert_path), "key": str(b.key_path)}]
    new["routes"] = cfg["routes"] + [{"from": "https://b.test", "response": {"status": 200, "body": "new route"}}]
    p.write_config(new)
    p.reload()
    p.wait_log("configuration reloaded")

    # The connection opened before the reload keeps serving, on the same socket.
    seen = get_json(conn, "GET", "/echo?after")
    assert conn.sock is sock
    assert seen["path"] == "/echo?after"
    assert len({r["path"] for r in upstream.requests}) == 2
    conn.close()

    # The new route and the new certificate are served (and the certificate verifies).
    r = p.curl("b.test", "/", cacert=ca.cert_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"new route"
    assert served_certificate(p.port, "b.test").serial_number == b.cert.serial_number
    assert p.proc.poll() is None


def test_sighup_with_invalid_config_keeps_old_one(reloadable, ca, upstream):
    p, cfg = reloadable
    conn = https(p.port, host="a.test")
    get_json(conn, "GET", "/echo")
    sock = conn.sock

    bad = dict(cfg, log_level="loud", routes=[{"from": "https://c.test", "to": "nope://x"}])
    p.write_config(bad)
    p.reload()
    p.wait_log("reload rejected")
    log = p.log()
    assert "log_level" in log and "loud" in log and "routes[0].to" in log

    get_json(conn, "GET", "/echo")           # old route, old connection
    assert conn.sock is sock
    conn.close()
    r = p.curl("a.test", "/echo", cacert=ca.cert_path)
    assert r.returncode == 0, r.stderr
    assert p.curl("c.test", "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"404"

    # A good config after the bad one is taken.
    p.write_config(dict(cfg, routes=cfg["routes"] + [{"from": "https://c.test",
                                                       "response": {"status": 200, "body": "c"}}]))
    p.reload()
    p.wait_log("configuration reloaded")
    assert p.curl("c.test", "/").stdout == b"c"


def test_sighup_removes_route(reloadable, upstream):
    p, cfg = reloadable
    assert p.curl("a.test", "/echo").returncode == 0
    p.write_config(dict(cfg, routes=[{"from": "https://other.test", "to": upstream.url}]))
    p.reload()
    p.wait_log("configuration reloaded")
    assert p.curl("a.test", "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"404"


def _curl_bg(p, host, path):
    cmd = ["curl", "-sS", "-k", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}",
           "--resolve", f"{host}:{p.port}:127.0.0.1", f"https://{host}:{p.port}{path}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_drains_in_flight_request(start_proxy, upstream, sig):
    p = start_proxy({"routes": [{"from": "https://a.test", "to": upstream.url}]})
    idle = https(p.port, host="a.test")
    get_json(idle, "GET", "/echo")           # an idle keep-alive connection
    slow = _curl_bg(p, "a.test", "/slow?s=3")
    _wait(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), what="slow request at upstream")
    p.signal(sig)
    # New connections are refused while the slow one is still being served.
    _wait(lambda: _refused(p.port), timeout=2.5, what="listener closed")
    assert slow.poll() is None, "the in-flight request ended before its response"
    # The idle keep-alive connection is closed instead of waiting for its timeout.
    out, closed = read_until_close(idle.sock, timeout=2.5)
    assert closed and out == b""
    out, err = slow.communicate(timeout=15)
    body, _, code = out.rpartition(b"\n")
    assert code == b"200", (out, err)
    assert b'"/slow?s=3"' in body
    assert p.proc.wait(15) == 0
    assert "shutting down" in p.log()


def test_drain_timeout_bounds_shutdown(start_proxy, upstream):
    p = start_proxy({"shutdown_timeout": "1s", "routes": [{"from": "https://a.test", "to": upstream.url}]})
    slow = _curl_bg(p, "a.test", "/slow?s=10")
    _wait(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), what="slow request at upstream")
    started = time.monotonic()
    p.signal(signal.SIGTERM)
    rc = p.proc.wait(8)            # well before the 10 s upstream answer
    assert time.monotonic() - started < 8
    assert rc == 0
    slow.communicate(timeout=15)
    assert slow.returncode != 0     # the client saw its connection cut
    assert "drain timeout" in p.log()


def test_sighup_during_drain_is_ignored(start_proxy, upstream):
    p = start_proxy({"routes": [{"from": "https://a.test", "to": upstream.url}]})
    slow = _curl_bg(p, "a.test", "/slow?s=2")
    _wait(lambda: any(r["path"].startswith("/slow") for r in upstream.requests), what="slow request at upstream")
    p.signal(signal.SIGTERM)
    p.wait_log("shutting down")
    p.reload()
    out, _ = slow.communicate(timeout=15)
    assert out.endswith(b"\n200")
    assert p.proc.wait(15) == 0
    assert "configuration reloaded" not in p.log()


def test_sighup_picks_up_certificate_renewed_in_place(reloadable, ca):
    """certbot-style renewal: the same file paths get new contents, then SIGHUP."""
    p, cfg = reloadable
    old_serial = served_certificate(p.port, "a.test").serial_number
    renewed = ca.issue(["a.test"], filename="a.test.renewed")
    path = cfg["certificates"][0]
    open(path["cert"], "wb").write(renewed.cert_path.read_bytes())
    open(path["key"], "wb").write(renewed.key_path.read_bytes())
    p.reload()
    p.wait_log("configuration reloaded")
    new_serial = served_certificate(p.port, "a.test").serial_number
    assert new_serial == renewed.cert.serial_number != old_serial
    assert p.curl("a.test", "/echo", cacert=ca.cert_path).returncode == 0


def test_websocket_survives_sighup(start_proxy):
    from websockets.sync.client import connect
    from tests.infra.proxyproc import tls_client_context
    from tests.infra.upstream import WebSocketEchoServer
    ws_server = WebSocketEchoServer()
    try:
        p = start_proxy({"routes": [{"from": "https://ws.test", "to": ws_server.url, "allow_websockets": True}]})
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        with connect(f"wss://ws.test:{p.port}/", ssl=tls_client_context(), sock=sock,
                     server_hostname="ws.test", open_timeout=10, close_timeout=5) as ws:
            ws.send("before")
            assert ws.recv(timeout=10) == "before"
            p.reload()
            p.wait_log("configuration reloaded")
            ws.send("after")
            assert ws.recv(timeout=10) == "after"
    finally:
        ws_server.stop()


def test_sigterm_closes_connections_that_asked_nothing(start_proxy):
    """Connections without a request (handshaked and quiet, or mid-handshake) do not hold the
    drain: they are closed at once, the TLS one with close_notify (a clean EOF)."""
    import ssl
    from tests.infra.proxyproc import tls_client_context
    p = start_proxy({"shutdown_timeout": "30s",
                     "routes": [{"from": "https://localhost", "response": {"status": 200}}]})
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=10)   # no ClientHello
    quiet = tls_client_context().wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=10),
                                             server_hostname="localhost", suppress_ragged_eofs=False)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        p.signal(signal.SIGTERM)
        assert quiet.recv(100) == b""   # close_notify: no ssl.SSLEOFError
        assert raw.recv(100) == b""
        assert p.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    except ssl.SSLEOFError:
        raise AssertionError("closed without close_notify")
    finally:
        raw.close()
        quiet.close()


def test_start_and_reload_leave_the_collector_running_with_the_configuration_frozen(tmp_path, ca):
    """In process, as cli.main runs it: start-up loads the configuration with the collector
    paused and ends with it running again and what start-up made frozen (kept out of its
    walks); a reload leaves it running too, and frees the previous configuration's cycles."""
    import asyncio
    import gc
    import weakref

    import uvloop
    import yaml

    from proxy.app import App
    from proxy.config import load_config

    leaf = ca.issue(["gc.test"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "address": f"127.0.0.1:{port}", "autocert": False,
        "certificates": [{"cert": str(leaf.cert_path), "key": str(leaf.key_path)}],
        "routes": [{"from": "https://gc.test", "response": {"status": 200, "body": "ok"}}]}))

    class Cycle:
        pass

    async def go():
        gc.disable()   # as cli.main does before loading the configuration
        app = App(load_config(str(path), {}))
        cycle = Cycle()
        cycle.me = cycle
        ref = weakref.ref(cycle)
        try:
            await app.start()
            started = (gc.isenabled(), gc.get_freeze_count())
            del cycle   # garbage now, but frozen with what start-up made: no collection frees it
            gc.collect()
            kept = ref() is not None
            assert await app.reload()
            reloaded = (gc.isenabled(), gc.get_freeze_count(), kept, ref() is None)
            await app.shutdown()
            return started, reloaded
        finally:
            gc.enable()
            gc.unfreeze()

    try:
        (enabled, frozen), (enabled_after, frozen_after, kept, freed) = uvloop.run(go())
    finally:
        gc.enable()
        gc.unfreeze()
    assert enabled and frozen > 0
    assert kept        # (frozen: the collector does not look at it)
    assert enabled_after and frozen_after > 0 and freed   # the reload collected it
