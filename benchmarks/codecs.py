"""Micro-benchmark: the codec work of one proxied request, h11 vs fastcodec (httptools).

    .venv/bin/python benchmarks/codecs.py

Per request, as proxy/http/proxy.py does it: the client side parses a request head and writes
a response (head, body, end); the upstream side writes a request and parses a response (head +
100-byte body); both connections are kept alive (start_next_cycle). Hop-by-hop filtering
(codec.end_to_end) is included; sockets and TLS are not. Best of 5 runs, engines interleaved.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import h11  # noqa: E402

from parsers import REQUEST, RESPONSE  # noqa: E402
from proxy.http import codec, fastcodec  # noqa: E402


def cycle(eng, n: int) -> None:
    client = eng.Connection(h11.SERVER, max_incomplete_event_size=65536)
    upstream = eng.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    for _ in range(n):
        client.receive_data(REQUEST)
        req = client.next_event()
        assert type(client.next_event()) is h11.EndOfMessage
        headers = [(b"host", b"up")] + [(k, v) for k, v in codec.end_to_end(req.headers) if k != b"host"]
        upstream.send(eng.Request(method=req.method, target=req.target, headers=headers))
        upstream.send(h11.EndOfMessage())
        upstream.receive_data(RESPONSE)
        resp = upstream.next_event()
        data = upstream.next_event()
        assert type(upstream.next_event()) is h11.EndOfMessage
        client.send(eng.Response(status_code=resp.status_code, headers=codec.end_to_end(resp.headers),
                                 reason=resp.reason))
        client.send(h11.Data(data=data.data))
        client.send(h11.EndOfMessage())
        client.start_next_cycle()
        upstream.start_next_cycle()


def main() -> None:
    for name, eng in (("h11", h11), ("fastcodec", fastcodec.engine("httptools"))) * 2:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            cycle(eng, 3000)
            best = min(best, (time.perf_counter() - t0) / 3000 * 1e6)
        print(f"{name:10s} {best:7.1f} us per proxied request (codec work only)")


if __name__ == "__main__":
    main()
