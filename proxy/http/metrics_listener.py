"""The ``metrics_address`` listener: ``GET /metrics`` in Prometheus' text format, 404 otherwise."""
from __future__ import annotations

import h11

from .. import metrics
from ..tls.transport import Stream, StreamClosed
from .proxy import Side, reason_phrase


class MetricsConnection:
    def __init__(self, stream: Stream, timeout: float = 10.0):
        self.stream = stream
        self.timeout = timeout
        self.busy = False

    async def run(self) -> None:
        side = Side(self.stream, h11.SERVER)
        try:
            while True:
                ev = await side.next_event(self.timeout)
                if not isinstance(ev, h11.Request):
                    return
                while side.conn.their_state is h11.SEND_BODY:
                    if isinstance(await side.next_event(self.timeout), h11.ConnectionClosed):
                        return
                path = ev.target.split(b"?", 1)[0]
                if path == b"/metrics" and ev.method in (b"GET", b"HEAD"):
                    status, ctype, body = 200, b"text/plain; version=0.0.4", metrics.render().encode()
                else:
                    status, ctype, body = 404, b"text/plain", b"not found\n"
                side.send(h11.Response(status_code=status, reason=reason_phrase(status), headers=[
                    (b"content-type", ctype), (b"content-length", str(len(body)).encode())]))
                if ev.method != b"HEAD":
                    side.send(h11.Data(data=body))
                side.send(h11.EndOfMessage())
                if side.conn.our_state is h11.DONE and side.conn.their_state is h11.DONE:
                    side.conn.start_next_cycle()
                else:
                    return
        except (StreamClosed, ConnectionError, TimeoutError, h11.RemoteProtocolError):
            pass
        finally:
            self.stream.close()
