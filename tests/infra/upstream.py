"""A real upstream HTTP/1.1 server for proxy tests (stdlib http.server, in a thread).

Endpoints: ``/echo`` (any method; JSON of method, path, headers, body length and sha256),
``/slow?s=N`` (answers after N seconds), ``/big?mb=N`` (N MiB, Content-Length; ``&ms=M``:
M milliseconds between 64 KiB blocks),
``/chunked?n=N`` (N chunks), anything else -> echo. Every request is recorded in
``requests`` so tests can assert what the upstream saw.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):   # quiet
        pass

    def _body(self) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                if not line:   # the proxy cut the body off (a bad chunk from its client): expected
                    raise ConnectionResetError("request body cut off")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 65536))
                    h.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        return n, h.hexdigest()

    def _handle(self):
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "headers": [(k.lower(), v) for k, v in self.headers.items()],
                                     "client": self.client_address})
        if url.path == "/slow":
            time.sleep(float(q.get("s", "1")))
        if url.path == "/big":
            size = int(float(q.get("mb", "1")) * 1024 * 1024)
            self._body()
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            pause = float(q.get("ms", "0")) / 1000
            left = size
            while left:
                part = block[: min(left, len(block))]
                self.wfile.write(part)
                left -= len(part)
                if pause:
                    time.sleep(pause)
            return
        if url.path == "/chunked":
            self._body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "3"))):
                data = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
            return
        n, digest = self._body()
        out = json.dumps({"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body_length": n, "body_sha256": digest}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # Tests cut connections on purpose (early answers, aborted transfers): a peer that went
        # away is expected, anything else is still printed.
        import sys
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class UpstreamServer:
    def __init__(self, port: int = 0):
        self.httpd = _QuietServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.httpd.requests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_ports(self) -> set:
        """Distinct (host, port) pairs the requests came from: one per upstream connection."""
        return {r["client"] for r in self.requests}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class WebSocketEchoServer:
    """A real WebSocket echo server (the ``websockets`` library), in a thread."""

    def __init__(self):
        from websockets.sync.server import serve

        def echo(ws):
            for message in ws:
                ws.send(message)

        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
