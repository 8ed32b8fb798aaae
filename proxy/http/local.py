"""Plain-HTTP connections whose requests the proxy answers itself (the redirect listener with
its ACME HTTP-01 answers, the metrics listener): read a request, answer it, discard any body,
keep the connection alive when both sides allow it."""
from __future__ import annotations

import logging

import h11

from ..tls.transport import Stream, StreamClosed
from .proxy import Side, reason_phrase

log = logging.getLogger("proxy.http")


class LocalConnection:
    what = "local listener"

    def __init__(self, stream: Stream, timeout: float = 10.0):
        self.stream = stream
        self.timeout = timeout
        self.busy = False

    async def answer(self, side: Side, req: h11.Request) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        side = Side(self.stream, h11.SERVER)
        try:
            while True:
                try:
                    ev = await side.next_event(self.timeout)
                except (TimeoutError, h11.RemoteProtocolError):
                    return
                if not isinstance(ev, h11.Request):
                    return
                self.busy = True
                await self.answer(side, ev)
                self.busy = False
                while side.conn.their_state is h11.SEND_BODY:
                    ev = await side.next_event(self.timeout)
                    if isinstance(ev, h11.ConnectionClosed):
                        return
                if side.conn.our_state is h11.DONE and side.conn.their_state is h11.DONE:
                    side.conn.start_next_cycle()
                else:
                    return
        except (StreamClosed, ConnectionError, TimeoutError, h11.RemoteProtocolError):
            pass
        except Exception:
            log.exception("%s: unexpected error from %s", self.what, self.stream.peer)
        finally:
            self.stream.close()

    @staticmethod
    def send(side: Side, req: h11.Request, status: int, headers: list, body: bytes) -> None:
        if not any(n == b"content-length" for n, _ in headers):
            headers = headers + [(b"content-length", str(len(body)).encode())]
        side.send(h11.Response(status_code=status, headers=headers + [(b"server", b"autocert-proxy")],
                               reason=reason_phrase(status)))
        if req.method != b"HEAD":
            side.send(h11.Data(data=body))
        side.send(h11.EndOfMessage())
