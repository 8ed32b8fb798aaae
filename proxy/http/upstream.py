"""Connections to upstream services, kept alive and reused."""
from __future__ import annotations

import asyncio
from time import monotonic
from typing import Optional

from ..config import Upstream
from ..tls.transport import Stream


class UpstreamRefused(ConnectionError):
    pass


def _reusable(stream: Stream) -> bool:
    """Open, not at its end, and nothing unread (an idle upstream has nothing to say)."""
    return not (stream.is_closing or stream._eof or stream._buf)


class UpstreamPool:
    """Idle keep-alive connections per upstream, newest first; stale ones are dropped."""

    def __init__(self, max_idle_per_upstream: int = 64, idle_seconds: float = 60.0):
        self.max_idle = max_idle_per_upstream
        self.idle_seconds = idle_seconds
        # keyed by the upstream's host:port string (computed once, its hash cached by str)
        self._idle: dict[str, list[tuple[Stream, object, float]]] = {}

    def take(self, up: Upstream) -> Optional[tuple[Stream, object]]:
        """An idle kept-alive connection to ``up`` with the codec state released with it, or
        None (no coroutine for the usual case)."""
        idle = self._idle.get(up.address)
        if not idle:
            return None
        now = monotonic()
        while idle:
            stream, codec, since = idle.pop()
            if not _reusable(stream) or now - since > self.idle_seconds:
                stream.close()
                continue
            return stream, codec
        return None

    async def connect(self, up: Upstream, timeout: float) -> Stream:
        """A new connection to ``up``. Raises UpstreamRefused, TimeoutError."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, stream = await loop.create_connection(lambda: Stream(loop), up.host, up.port)
        except TimeoutError:
            raise
        except OSError as e:
            raise UpstreamRefused(f"{up.address}: {e.strerror or e}") from None
        return stream

    def release(self, up: Upstream, stream: Stream, codec: object) -> None:
        """Keeps ``stream`` for reuse with ``codec``, the caller's HTTP state for it (opaque here)."""
        if not _reusable(stream):
            stream.close()
            return
        idle = self._idle.setdefault(up.address, [])
        if len(idle) >= self.max_idle:
            idle.pop(0)[0].close()
        idle.append((stream, codec, monotonic()))

    def close(self) -> None:
        for idle in self._idle.values():
            for stream, _, _ in idle:
                stream.close()
        self._idle.clear()
