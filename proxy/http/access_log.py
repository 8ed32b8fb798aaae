"""One access-log line per request, plain (combined-like) or JSON."""
from __future__ import annotations

import json
import logging
from logging import INFO
from time import monotonic

from ..metrics import count_request

log = logging.getLogger("proxy.access")


class Entry:
    """What one access-log line says, filled in while the request is served. A plain class
    with slots (one is made per request; a dataclass's generated __init__ runs interpreted)."""
    __slots__ = ("client", "method", "target", "version", "host", "status", "bytes_sent",
                 "route", "upstream", "duration_ms")

    def __init__(self, client: str = "-", method: bytes = b"-", target: bytes = b"-",
                 version: bytes = b"1.1") -> None:
        self.client = client
        self.method = method      # as received: decoded only when a line is written
        self.target = target
        self.version = version
        self.host = "-"
        self.status = 0
        self.bytes_sent = 0
        self.route = "-"
        self.upstream = "-"
        self.duration_ms = 0.0

    def fields(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class AccessLog:
    def __init__(self, fmt: str = "plain"):
        self.fmt = fmt

    def write(self, entry: Entry, started: float) -> None:
        count_request(entry.status)
        if not log.isEnabledFor(INFO):
            return
        entry.duration_ms = round((monotonic() - started) * 1000, 3)
        method, target = entry.method.decode("latin-1"), entry.target.decode("latin-1")
        version = entry.version.decode("latin-1")
        if self.fmt == "json":
            fields = entry.fields()
            fields.update(method=method, target=target, version=version)
            log.info(json.dumps(fields, separators=(",", ":")))
        else:
            log.info('%s %s "%s %s HTTP/%s" %d %d %.1fms route=%s upstream=%s',
                     entry.client, entry.host or "-", method, target, version,
                     entry.status, entry.bytes_sent, entry.duration_ms, entry.route, entry.upstream)
