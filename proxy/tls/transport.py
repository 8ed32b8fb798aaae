"""Byte streams: the plaintext side they share (``ByteStream``), and plain TCP on asyncio
transports (``Stream``: upstreams, the :80 and metrics listeners).

The proxy's TLS connections are ``socketstream.TLSServerStream`` (OpenSSL on the socket), a
``ByteStream`` too.

Every stream offers the same small interface (``read``, ``write``, ``drain``, ``close``), so
the HTTP code above never knows which one it has. Flow control both ways: reading pauses the
transport when the buffer is full; ``drain`` waits while the transport's write buffer is
above its high-water mark.
"""
from __future__ import annotations

import asyncio
from typing import Optional

READ_LIMIT = 256 * 1024


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


# A read's deadline that is this close counts as reached (uvloop's timers have millisecond
# resolution: a timer can fire just before its time).
_SLACK = 0.001


class StreamClosed(ConnectionError):
    """The peer went away or the stream was closed."""


class ByteStream:
    """The plaintext side every stream shares: what was received and not yet read (read with a
    timeout, unread), end of stream, readiness, the drain wait and the wake-ups when the
    connection is lost. Subclasses feed it (``_feed``, ``_feed_eof``, ``_gone``) and say how
    reading pauses and resumes under the read limit (``_pause_reading``, ``_resume_reading``)."""

    # Slots, not a __dict__: one of these lives as long as each (idle) client connection.
    __slots__ = ("_loop", "_buf", "_size", "_eof", "_lost", "_waiter", "_deadline", "_timer", "_reading_paused",
                 "_write_paused", "_drain_waiters", "_ready", "opened_at", "_closed", "peer")

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        # ``loop``: the running loop, when the caller has it (asyncio.get_event_loop() costs a
        # getpid system call per connection)
        self._loop = loop or asyncio.get_event_loop()
        # Received, not yet read: chunks as they came. A list, not a deque: it rarely holds more
        # than one or two chunks, and an empty deque costs 600 bytes per idle connection. Made
        # with the first bytes (a TLS connection waits for them without one).
        self._buf: Optional[list[bytes]] = None
        self._size = 0
        self._eof = False
        self._lost = False             # the connection is gone
        self._waiter: Optional[asyncio.Future] = None
        self._deadline: Optional[float] = None   # the waiting read's, on the loop's clock
        self._timer: Optional[asyncio.TimerHandle] = None   # armed at or before it
        self._reading_paused = False   # more than READ_LIMIT waits to be read
        self._write_paused = False     # drain waits
        self._drain_waiters: Optional[list[asyncio.Future]] = None   # made when needed
        self._ready: Optional[asyncio.Future] = None   # made when asked for (see ``ready``)
        self.opened_at: Optional[float] = None   # when connected (TLS: handshake done), loop time
        self._closed: Optional[asyncio.Future] = None   # made when asked for (rarely)
        self.peer: str = "-"

    @property
    def ready(self) -> asyncio.Future:
        """Resolves when connected (TLS: the handshake is done); fails with StreamClosed when
        the connection is lost first. Made when asked for: most connections never ask."""
        if self._ready is None:
            self._ready = ready = self._loop.create_future()
            if self.opened_at is not None:
                ready.set_result(None)
            elif self._lost:
                ready.set_exception(StreamClosed("connection closed during handshake"))
                ready.exception()  # mark retrieved
        return self._ready

    def _opened(self) -> None:
        """Connected (TLS: handshake done)."""
        self.opened_at = self._loop.time()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    @property
    def closed(self) -> asyncio.Future:
        """Resolves when the connection is gone."""
        if self._closed is None:
            self._closed = self._loop.create_future()
            if self._lost:
                self._closed.set_result(None)
        return self._closed

    # --- fed by the subclass ---
    def _feed(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        if buf is None:
            self._buf = [data]
        else:
            buf.append(data)
        self._size += len(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._size > READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self._pause_reading()

    def _feed_eof(self) -> None:
        self._eof = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _pause_reading(self) -> None:
        """Stop taking bytes from the peer (``_reading_paused`` is set)."""
        raise NotImplementedError

    def _resume_reading(self) -> None:
        """Take bytes from the peer again, if the stream can (then clear ``_reading_paused``)."""
        raise NotImplementedError

    def _gone(self, exc) -> None:
        """The connection is lost: end of stream, and every waiter learns it."""
        self._lost = True
        self._feed_eof()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(StreamClosed(str(exc or "connection closed during handshake")))
            ready.exception()  # mark retrieved
        waiters, self._drain_waiters = self._drain_waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_exception(StreamClosed("connection lost"))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_result(None)

    # --- read by the HTTP layer ---
    async def read(self, n: int = 65536, timeout: Optional[float] = None) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream. Raises TimeoutError after ``timeout``."""
        w = self.readable(timeout)
        if w is not None:
            await w   # (the finished future stays as _waiter: everything that looks at it checks done())
        return self.read_now(n)

    def readable(self, timeout: Optional[float] = None) -> Optional[asyncio.Future]:
        """None when ``read_now`` has something (bytes, or b"" at end of stream); else a
        future to await first, which raises TimeoutError after ``timeout``. (``read`` in two
        halves: a caller that waits in its own frame keeps no coroutine of ours alive while
        the connection idles.)

        The deadline is kept on the stream and one timer serves all its reads: a read that
        ends in time leaves the timer armed, and the next read re-arms it only when its
        deadline comes earlier (a timer that fires before the deadline of the read then
        waiting arms itself again for it). Keep-alive reads with the same timeout thus arm
        a timer about once per timeout, not once per read."""
        if self._buf or self._eof:
            return None
        self._waiter = w = self._loop.create_future()
        if timeout is None:
            self._deadline = None
        else:
            self._deadline = deadline = self._loop.time() + timeout
            t = self._timer
            if t is None or t.when() > deadline:
                if t is not None:
                    t.cancel()
                self._timer = self._loop.call_at(deadline, self._on_timer)
        return w

    def read_now(self, n: int = 65536) -> bytes:
        """Up to ``n`` received bytes, one received chunk at a time, handed over as it is (no
        copy) unless it is longer than ``n``; b"" when nothing is there."""
        buf = self._buf
        if not buf:
            return b""
        data = buf[0]
        if len(data) <= n:
            del buf[0]
        else:
            buf[0] = data[n:]
            data = data[:n]
        self._size -= len(data)
        if self._reading_paused and self._size < READ_LIMIT // 2:
            self._resume_reading()
        return data

    def _on_timer(self) -> None:
        self._timer = None
        w, deadline = self._waiter, self._deadline
        if w is None or w.done() or deadline is None:
            return   # no read waiting, or one without a timeout: the timer lapses
        if self._loop.time() >= deadline - _SLACK:
            w.set_exception(TimeoutError())
        else:   # armed for an earlier read
            self._timer = self._loop.call_at(deadline, self._on_timer)

    async def wait_ready(self, timeout: float) -> None:
        """Until connected (TLS: handshake done); TimeoutError after ``timeout`` (no task needed)."""
        if self.opened_at is not None:
            return
        ready = self.ready
        if ready.done():
            return ready.result()
        # ``ready`` itself times out (its only waiter is the connection's task): no second
        # future, no callback hop
        handle = self._loop.call_later(timeout, _time_out, ready)
        try:
            await ready
        finally:
            handle.cancel()

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (left over after a protocol switch)."""
        if data:
            if self._buf is None:
                self._buf = []
            self._buf.insert(0, bytes(data))
            self._size += len(data)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def must_drain(self) -> bool:
        """Whether ``drain`` has anything to do (wait or raise): callers skip the coroutine when not."""
        return self._write_paused or self._lost

    async def drain(self, timeout: Optional[float] = None) -> None:
        """Waits while the write buffer is full. Raises TimeoutError when the peer has not
        read for ``timeout`` seconds (a reader that stalls must not hold the other side)."""
        if self._lost:
            raise StreamClosed("connection lost")
        if not self._write_paused:
            return
        w = self._loop.create_future()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(w)
        if timeout is None:
            await w
            return
        try:
            async with asyncio.timeout(timeout):   # (not wait_for: CPython gh-86296)
                await w
        finally:
            if self._drain_waiters and w in self._drain_waiters:
                self._drain_waiters.remove(w)


class Stream(ByteStream, asyncio.Protocol):
    """A plain TCP byte stream on an asyncio transport."""

    __slots__ = ("transport",)

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        super().__init__(loop)
        self.transport: Optional[asyncio.Transport] = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        if self.opened_at is None:
            self._opened()

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self):
        self._feed_eof()
        return False

    def connection_lost(self, exc) -> None:
        self._gone(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._resume_writing()

    def _pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- writing, the end ---
    @property
    def is_closing(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.is_closing:
            raise StreamClosed("write on a closed connection")
        self.transport.write(data)

    def shutdown_write(self) -> None:
        """Signal the end of what we send (the peer reads EOF); reading goes on."""
        if self.transport is not None and not self.is_closing and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
