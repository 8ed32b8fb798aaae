"""Stopping the proxy while an order waits for the CA: the order gives up, cleans up its
challenge while the event loop still runs, and the process exits cleanly.

The CA is a real Pebble whose TLS-ALPN-01 validation port is a socket that accepts and never
answers, so its validation hangs and the proxy's order sits polling when SIGTERM arrives.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

from tests.infra.pebble import free_port, pebble_factory  # noqa: F401  (fixture)
from tests.infra.proxyproc import wait_port


class BlackHole:
    """Accepts TCP connections and never sends a byte (a validation that hangs)."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


def test_sigterm_during_an_order_cleans_up_without_executor_warnings(pebble_factory, start_proxy, tmp_path):
    hole_port = free_port()
    hole = BlackHole(hole_port)
    try:
        ca = pebble_factory(tls_port=hole_port)
        port = free_port()
        proxy = start_proxy({
            "_port": port, "address": f"127.0.0.1:{port}", "autocert": True,
            "autocert_ca": ca.directory_url, "autocert_trusted_ca_file": str(ca.trusted_ca_file),
            "autocert_dir": str(tmp_path / "ac"), "log_level": "debug",
            "routes": [{"from": "https://hang.test", "response": {"status": 200, "body": "ok"}}],
        }, env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2"})
        wait_port(port)
        deadline = time.monotonic() + 20
        while not hole.accepted and time.monotonic() < deadline:   # Pebble is validating
            time.sleep(0.05)
        assert hole.accepted, proxy.log()[-3000:]
        proxy.signal(signal.SIGTERM)
        rc = proxy.proc.wait(timeout=30)
        log = proxy.log()
        assert rc == 0, log[-3000:]
        assert "Executor shutdown has been called" not in log
        assert "Event loop is closed" not in log
        assert "order for hang.test abandoned at shutdown" in log
        assert "obtaining a certificate for hang.test failed" not in log   # no backoff recorded
        # the challenge record left storage with the order
        assert not list((tmp_path / "ac").rglob("challenge_tokens/*.json"))
    finally:
        hole.close()
