"""The ``metrics_address`` listener: ``GET /metrics`` in Prometheus' text format, the health
probes ``/healthz`` and ``/readyz`` (Pomerium's names), 404 otherwise."""
from __future__ import annotations

from typing import Callable, Optional

import h11

from .. import metrics
from .local import LocalConnection
from .proxy import Side

# The phases of a proxy's life, as App.phase says them
STARTING, SERVING, DRAINING = "starting", "serving", "draining"


def probe(path: bytes, phase: str) -> Optional[tuple[int, bytes]]:
    """The answer to a health probe in ``phase``, None when ``path`` is not a probe.
    ``/healthz``: the listeners are open (503 once draining has begun). ``/readyz``: start-up is
    over as well (the certificates already in storage are served) and it is not draining."""
    if path == b"/healthz":
        ok = phase != DRAINING
    elif path == b"/readyz":
        ok = phase == SERVING
    else:
        return None
    return (200, b"ok\n") if ok else (503, phase.encode() + b"\n")


class MetricsConnection(LocalConnection):
    what = "metrics listener"

    def __init__(self, stream, phase: Callable[[], str] = lambda: SERVING):
        super().__init__(stream)
        self.phase = phase

    async def answer(self, side: Side, req: h11.Request) -> None:
        path = req.target.split(b"?", 1)[0]
        readable = req.method in (b"GET", b"HEAD")
        answer = probe(path, self.phase()) if readable else None
        if readable and path == b"/metrics":
            body = metrics.render().encode()
            self.send(side, req, 200, [(b"content-type", b"text/plain; version=0.0.4")], body)
        elif answer is not None:
            self.send(side, req, answer[0], [(b"content-type", b"text/plain"),
                                             (b"cache-control", b"no-store")], answer[1])
        else:
            self.send(side, req, 404, [(b"content-type", b"text/plain")], b"not found\n")
