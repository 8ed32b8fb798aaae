"""Micro-benchmark: h11 vs httptools for what the proxy parses per proxied request.

    .venv/bin/python benchmarks/parsers.py

Per request the proxy parses one request head from the client (server role) and one
response (head + small body) from the upstream (client role). Each parser is used the way a
keep-alive connection would use it: one parser object per connection, reused across
messages. Prints microseconds per message (best of 5 repeats).
"""
from __future__ import annotations

import time

import h11
import httptools

REQUEST = (b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
           b"Host: app.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Encoding: gzip, deflate, br\r\n"
           b"Accept-Language: en-US,en;q=0.9\r\n"
           b"Cookie: session=abcdef0123456789; theme=dark\r\n"
           b"Connection: keep-alive\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\n"
            b"Server: nginx/1.22.1\r\n"
            b"Date: Thu, 27 Nov 2026 02:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 100\r\n"
            b"Last-Modified: Thu, 27 Nov 2026 01:00:00 GMT\r\n"
            b"Connection: keep-alive\r\n"
            b"ETag: \"6566-64\"\r\n"
            b"Accept-Ranges: bytes\r\n\r\n" + b"x" * 100)


def bench(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def h11_request(n: int) -> None:
    conn = h11.Connection(h11.SERVER)
    for _ in range(n):
        conn.receive_data(REQUEST)
        req = conn.next_event()
        assert type(req) is h11.Request
        assert type(conn.next_event()) is h11.EndOfMessage
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()


def h11_request_parse_only(n: int) -> None:
    """h11 request parse without producing a response (lower bound for h11's parse part)."""
    for _ in range(n):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        assert type(conn.next_event()) is h11.Request


def h11_response(n: int) -> None:
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"up")])
    for _ in range(n):
        conn.send(req)
        conn.send(h11.EndOfMessage())
        conn.receive_data(RESPONSE)
        assert type(conn.next_event()) is h11.Response
        assert type(conn.next_event()) is h11.Data
        assert type(conn.next_event()) is h11.EndOfMessage
        conn.start_next_cycle()


class _Sink:
    __slots__ = ("headers", "url", "body", "done")

    def __init__(self):
        self.headers, self.url, self.body, self.done = [], b"", [], False

    def on_message_begin(self):
        self.headers = []
        self.body = []
        self.done = False

    def on_url(self, url):
        self.url = url

    def on_header(self, name, value):
        self.headers.append((name.lower(), value))

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        self.done = True


def httptools_request(n: int) -> None:
    sink = _Sink()
    p = httptools.HttpRequestParser(sink)
    for _ in range(n):
        p.feed_data(REQUEST)
        assert sink.done
        p.get_method()
        p.should_keep_alive()


def httptools_response(n: int) -> None:
    sink = _Sink()
    p = httptools.HttpResponseParser(sink)
    for _ in range(n):
        p.feed_data(RESPONSE)
        assert sink.done
        p.get_status_code()


def split_only(n: int) -> None:
    for _ in range(n):
        head, _, _ = REQUEST.partition(b"\r\n\r\n")
        head.split(b"\r\n")


def main() -> None:
    rows = [
        ("h11, request head (server role, full keep-alive cycle incl. tiny response)", h11_request, 20000),
        ("h11, request head, parse only (new Connection each time)", h11_request_parse_only, 20000),
        ("h11, upstream response 100 B body (client role, full cycle incl. request)", h11_response, 20000),
        ("httptools, request head (with header callbacks)", httptools_request, 200000),
        ("httptools, upstream response 100 B body", httptools_response, 200000),
        ("bytes split of the request head (floor)", split_only, 200000),
    ]
    res = {}
    print(f"h11 {h11.__version__}, httptools {httptools.__version__}")
    for label, fn, n in rows:
        res[fn.__name__] = bench(fn, n)
        print(f"{res[fn.__name__]:8.2f} us  {label}")
    h = res["h11_request"] + res["h11_response"]
    t = res["httptools_request"] + res["httptools_response"]
    print(f"per proxied request (request + response): h11 {h:.1f} us, httptools {t:.1f} us, "
          f"saving {h - t:.1f} us ({h / t:.0f}x)")


if __name__ == "__main__":
    main()
