"""One access-log line per request, plain (combined-like) or JSON."""
from __future__ import annotations

import json
import logging
from logging import INFO
from time import monotonic

from ..metrics import count_request
from dataclasses import asdict, dataclass

log = logging.getLogger("proxy.access")


@dataclass
class Entry:
    client: str = "-"
    method: bytes = b"-"      # as received: decoded only when a line is written
    target: bytes = b"-"
    version: bytes = b"1.1"
    host: str = "-"
    status: int = 0
    bytes_sent: int = 0
    route: str = "-"
    upstream: str = "-"
    duration_ms: float = 0.0


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
            fields = asdict(entry)
            fields.update(method=method, target=target, version=version)
            log.info(json.dumps(fields, separators=(",", ":")))
        else:
            log.info('%s %s "%s %s HTTP/%s" %d %d %.1fms route=%s upstream=%s',
                     entry.client, entry.host or "-", method, target, version,
                     entry.status, entry.bytes_sent, entry.duration_ms, entry.route, entry.upstream)
