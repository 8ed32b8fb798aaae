"""The ``metrics_address`` listener: ``GET /metrics`` in Prometheus' text format, 404 otherwise."""
from __future__ import annotations

import h11

from .. import metrics
from .local import LocalConnection
from .proxy import Side


class MetricsConnection(LocalConnection):
    what = "metrics listener"

    async def answer(self, side: Side, req: h11.Request) -> None:
        if req.target.split(b"?", 1)[0] == b"/metrics" and req.method in (b"GET", b"HEAD"):
            body = metrics.render().encode()
            self.send(side, req, 200, [(b"content-type", b"text/plain; version=0.0.4")], body)
        else:
            self.send(side, req, 404, [(b"content-type", b"text/plain")], b"not found\n")
