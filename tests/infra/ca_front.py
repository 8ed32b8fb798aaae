"""Things in front of a Pebble, for the CA's failure paths.

``NginxFront``: real nginx proxying HTTPS to Pebble with a short ``keepalive_timeout``: it closes
idle kept-alive connections as the load balancers in front of real CAs do (Pebble itself never
closes an idle one). Its access log records the connection serial number of every request.

``MisbehavingCA``: a labelled test double for what no real CA can be made to do on demand: an
HTTPS front that forwards every request to Pebble and lets the test rewrite Pebble's answers
(a certificate that is unusable, an order that fails at finalization or never completes).
Pebble builds its URLs from the Host header, so every URL it hands out points at the front.

Both listen on 127.0.0.1 with a certificate from Pebble's listener CA: a client that trusts
``pebble.trusted_ca_file`` trusts them.
"""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cryptography import x509

from .pebble import Pebble, free_port

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class NginxFront:
    """nginx on 127.0.0.1:<port> proxying to Pebble; idle client connections closed after
    ``keepalive_timeout`` (an nginx time, e.g. "300ms")."""

    def __init__(self, pebble: Pebble, workdir: Path, keepalive_timeout: str = "300ms"):
        self.pebble = pebble
        self.dir = Path(workdir)
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").chmod(0o777)      # nginx workers run as "nobody" when started by root
        self.port = free_port()
        self.listener = pebble.ca.issue(["localhost", "127.0.0.1"],
                                        filename=f"nginx-front-{secrets.token_hex(4)}")
        self.access_log = self.dir / "access.log"
        d = self.dir
        self.conf = d / "nginx.conf"
        self.conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format conn '$connection $request_method $uri $status';
    access_log {self.access_log} conn;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_timeout {keepalive_timeout};
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.listener.cert_path};
        ssl_certificate_key {self.listener.key_path};
        location / {{
            proxy_pass https://127.0.0.1:{pebble.acme_port};
            proxy_set_header Host $http_host;
            proxy_ssl_verify off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> "NginxFront":
        self.proc = subprocess.Popen(["nginx", "-c", str(self.conf), "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        ctx = ssl.create_default_context(cafile=str(self.pebble.trusted_ca_file))
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()[-2000:]}")
            try:
                c = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=2)
                c.request("GET", "/dir")
                if c.getresponse().status == 200:
                    c.close()
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nginx in front of Pebble did not answer in 10 s")
            time.sleep(0.05)

    def connections(self) -> list[int]:
        """The nginx connection serial of every request logged, in order."""
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [int(line.split()[0]) for line in text.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@dataclass
class Exchange:
    """One request the front forwarded and Pebble's answer, which ``rewrite`` may change."""
    method: str
    path: str
    payload: Optional[dict]          # the JWS payload of a POST (None for POST-as-GET / GET)
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    extra: dict = field(default_factory=dict)

    def json(self) -> dict:
        return json.loads(self.body)

    def set_json(self, obj: dict) -> None:
        self.body = json.dumps(obj).encode()


class MisbehavingCA:
    """A labelled double in front of a real Pebble: see the module docstring. Set ``rewrite``
    to a function taking an ``Exchange``; ``csrs`` holds every CSR sent to finalize, and
    ``requests`` every (method, path) forwarded."""

    def __init__(self, pebble: Pebble):
        self.pebble = pebble
        self.rewrite: Optional[Callable[[Exchange], None]] = None
        self.csrs: list[x509.CertificateSigningRequest] = []
        self.requests: list[tuple[str, str]] = []
        self.listener = pebble.ca.issue(["localhost", "127.0.0.1"],
                                        filename=f"misbehaving-ca-{secrets.token_hex(4)}")
        upstream = ssl.create_default_context(cafile=str(pebble.trusted_ca_file))
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append((self.command, self.path))
                payload = None
                if body:
                    try:
                        raw = _b64url_decode(json.loads(body)["payload"])
                        payload = json.loads(raw) if raw else None
                    except (ValueError, KeyError, TypeError):
                        payload = None
                if isinstance(payload, dict) and "csr" in payload:
                    outer.csrs.append(x509.load_der_x509_csr(_b64url_decode(payload["csr"])))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn = http.client.HTTPSConnection("127.0.0.1", outer.pebble.acme_port,
                                                   context=upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    r = conn.getresponse()
                    ex = Exchange(self.command, self.path, payload, r.status,
                                  [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP],
                                  r.read())
                finally:
                    conn.close()
                if outer.rewrite is not None:
                    outer.rewrite(ex)
                self.send_response(ex.status)
                for k, v in ex.headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(ex.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(ex.body)

            do_GET = do_POST = do_HEAD = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.listener.cert_path), str(self.listener.key_path))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def count(self, pattern: str) -> int:
        """Requests forwarded whose path matches ``pattern`` (a regex)."""
        return sum(1 for _, p in self.requests if re.search(pattern, p))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
