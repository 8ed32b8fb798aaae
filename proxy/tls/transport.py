"""Byte streams over asyncio transports: plain TCP (upstreams, the :80 and metrics listeners).

The proxy's TLS connections are ``socketstream.TLSServerStream`` (OpenSSL on the socket),
with the same interface; ``TLSStream`` below (memory BIOs) is no longer used by the proxy.

Every stream offers the same small interface (``read``, ``write``, ``drain``, ``close``), so
the HTTP code above never knows which one it has. Flow control both ways: reading pauses the
transport when the buffer is full; ``drain`` waits while the transport's write buffer is
above its high-water mark.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from OpenSSL import SSL
from OpenSSL.SSL import _ffi as _ssl_ffi, _lib as _ssl_lib   # pyOpenSSL's cffi binding (BIO swap below)

from .. import metrics

log = logging.getLogger("proxy.tls")

READ_LIMIT = 256 * 1024
_BIG = 16 * 1024   # bytes through a memory BIO above which its buffer is renewed when idle
_bio_swap = True    # off if pyOpenSSL's internals are not what _fresh_bios expects
# OpenSSL called directly through pyOpenSSL's own cffi binding (its private ``_lib`` and the
# Connection's ``_ssl``/``_into_ssl``/``_from_ssl``) on the paths every connection and every
# byte takes: no exception for "nothing to read yet", records read straight into the buffer
# that is handed up or written out, no fixed 256 KiB / 64 KiB allocation per call. Anything
# unusual (an error, an unknown result) goes through pyOpenSSL's own error handling. Off, with
# one warning, if a pyOpenSSL release lacks those attributes: the public API path remains.
_direct = True
_direct_checked = False
_NULL = _ssl_ffi.NULL
_alloc = _ssl_ffi.new_allocator(should_clear_after_alloc=False)   # no memset: OpenSSL fills it
_buffer = _ssl_ffi.buffer
_from_buffer = _ssl_ffi.from_buffer
_pending_bytes = _ssl_lib.BIO_get_mem_data   # (bio, NULL): bytes held by a memory BIO
_BIO_read = _ssl_lib.BIO_read
_BIO_write = _ssl_lib.BIO_write
_SSL_read = _ssl_lib.SSL_read
_SSL_write = _ssl_lib.SSL_write
_SSL_pending = _ssl_lib.SSL_pending
_SSL_do_handshake = _ssl_lib.SSL_do_handshake
_SSL_get_error = _ssl_lib.SSL_get_error
_SSL_set_bio = _ssl_lib.SSL_set_bio
_BIO_new_mem_buf = _ssl_lib.BIO_new_mem_buf
_BIO_set_mem_eof_return = _ssl_lib.BIO_set_mem_eof_return
_rest_ptr = _ssl_ffi.new("char **")
_BIO_new = _ssl_lib.BIO_new
_BIO_s_mem = _ssl_lib.BIO_s_mem
_WANT_READ = _ssl_lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _ssl_lib.SSL_ERROR_ZERO_RETURN
# A write is encrypted and flushed in pieces of this size: the memory BIO then never holds
# more than one piece's records, so it does not regrow (copy, wipe, zero) to the size of a
# large chunk after each renewal, and the bytes it copies stay in the CPU cache.
WRITE_PIECE = 64 * 1024
_RECORD = 16 * 1024   # the most plaintext one TLS record holds


def _check_direct(conn) -> bool:
    """Once per process: does this pyOpenSSL have what the direct paths use?"""
    global _direct, _direct_checked
    _direct_checked = True
    if not all(hasattr(conn, a) for a in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error")):
        _direct = False
        log.warning("this pyOpenSSL lacks the internals the direct OpenSSL calls use; TLS "
                    "connections take the public API (slower)")
    return _direct


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class StreamClosed(ConnectionError):
    """The peer went away or the stream was closed."""


class Stream(asyncio.Protocol):
    """A plain TCP byte stream. Subclasses transform bytes in ``_incoming`` / ``write``."""

    # Slots, not a __dict__: one of these lives as long as each (idle) client connection.
    __slots__ = ("transport", "_buf", "_size", "_eof", "_lost", "_exc", "_waiter", "_reading_paused",
                 "_write_paused", "_drain_waiters", "_loop", "ready", "_closed", "peer")

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        # ``loop``: the running loop, when the caller has it (asyncio.get_event_loop() costs a
        # getpid system call per connection)
        self.transport: Optional[asyncio.Transport] = None
        # Received, not yet read: chunks as they came. A list, not a deque: it rarely holds more
        # than one or two chunks, and an empty deque costs 600 bytes per idle connection.
        self._buf: list[bytes] = []
        self._size = 0
        self._eof = False
        self._lost = False
        self._exc: Optional[BaseException] = None
        self._waiter: Optional[asyncio.Future] = None
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._loop = loop or asyncio.get_event_loop()
        self.ready: asyncio.Future = self._loop.create_future()   # connected (and TLS handshake done)
        self._closed: Optional[asyncio.Future] = None   # made when asked for (rarely)
        self.peer: str = "-"

    @property
    def closed(self) -> asyncio.Future:
        """Resolves when the connection is gone."""
        if self._closed is None:
            self._closed = self._loop.create_future()
            if self._lost:
                self._closed.set_result(None)
        return self._closed

    # --- asyncio.Protocol ---
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self._on_connected()

    def _on_connected(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self):
        self._feed_eof()
        return False

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._exc = self._exc or exc
        self._feed_eof()
        if not self.ready.done():
            self.ready.set_exception(StreamClosed(str(exc or "connection closed during handshake")))
            self.ready.exception()  # mark retrieved
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(StreamClosed("connection lost"))
        self._drain_waiters.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # --- plaintext side ---
    def _feed(self, data: bytes) -> None:
        if not data:
            return
        self._buf.append(data)
        self._size += len(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._size > READ_LIMIT and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def _feed_eof(self) -> None:
        self._eof = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self, n: int = 65536, timeout: Optional[float] = None) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream. Raises TimeoutError after ``timeout``."""
        if not self._buf and not self._eof:
            self._going_idle()
            self._waiter = w = self._loop.create_future()
            handle = None
            if timeout is not None:
                handle = self._loop.call_later(timeout, _time_out, w)
            try:
                await w
            finally:
                self._waiter = None
                if handle is not None:
                    handle.cancel()
        buf = self._buf
        if buf:
            # One received chunk at a time, handed over as it is (no copy) unless it is
            # longer than ``n``.
            data = buf[0]
            if len(data) <= n:
                del buf[0]
            else:
                buf[0] = data[n:]
                data = data[:n]
            self._size -= len(data)
            if self._reading_paused and self._size < READ_LIMIT // 2 and self.transport:
                self._reading_paused = False
                self.transport.resume_reading()
            return data
        return b""

    def _going_idle(self) -> None:
        """Called when a read is about to wait for the peer (a TLS stream trims its buffers)."""

    async def wait_ready(self, timeout: float) -> None:
        """Until connected (TLS: handshake done); TimeoutError after ``timeout`` (no task needed)."""
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
            self._buf.insert(0, bytes(data))
            self._size += len(data)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def is_closing(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.is_closing:
            raise StreamClosed("write on a closed connection")
        self.transport.write(data)

    @property
    def must_drain(self) -> bool:
        """Whether ``drain`` has anything to do (wait or raise): callers skip the coroutine when not."""
        return self._write_paused or self._lost

    async def drain(self, timeout: Optional[float] = None) -> None:
        """Waits while the write buffer is full. Raises TimeoutError when the peer has not
        read for ``timeout`` seconds (a reader that stalls must not hold the other side)."""
        if self._lost:
            raise StreamClosed("connection lost")
        if self._write_paused:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            if timeout is None:
                await w
                return
            try:
                async with asyncio.timeout(timeout):   # (not wait_for: CPython gh-86296)
                    await w
            finally:
                if w in self._drain_waiters:
                    self._drain_waiters.remove(w)

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


class TLSStream(Stream):
    """A server-side TLS stream: pyOpenSSL ``Connection`` with memory BIOs on a TCP transport.

    Not used by the proxy any more: its TLS listener is ``socketstream`` (OpenSSL on the
    socket). Kept only while tests/test_ocsp.py and tests/test_tls.py still build it; it goes
    with them, in one change.

    ``new_connection`` builds the SSL.Connection (the engine's default context with its
    callbacks). The handshake runs as bytes arrive; ``ready`` resolves when it is done.
    """

    __slots__ = ("_new_connection", "_prepare", "conn", "_handshaked", "_held",
                 "_sent_shutdown", "_swap_bios", "_rdata")

    def __init__(self, new_connection: Callable[[], SSL.Connection],
                 prepare: Optional[Callable[[bytes], Optional[asyncio.Future]]] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        super().__init__(loop)
        self._new_connection = new_connection
        self._prepare = prepare
        self.conn: Optional[SSL.Connection] = None
        self._handshaked = False
        self._held: Optional[bytearray] = None   # bytes kept back while ``prepare`` runs
        self._sent_shutdown = False
        self._swap_bios = False   # the BIOs may hold large buffers: renew them when idle
        self._rdata: Optional[bytes] = None   # the bytes the read BIO reads in place

    # What the handshake settled, read from the connection when asked (most connections never ask).
    @property
    def server_name(self) -> Optional[str]:
        """The SNI name the client sent (lower case), None without one or before the handshake."""
        if not self._handshaked:
            return None
        name = self.conn.get_servername()
        return name.decode("ascii", "replace").lower() if name else None

    @property
    def alpn(self) -> Optional[bytes]:
        if not self._handshaked:
            return None
        return self.conn.get_alpn_proto_negotiated() or None

    @property
    def tls_version(self) -> str:
        if not self._handshaked:
            return ""
        return self.conn.get_protocol_version_name()

    def _on_connected(self) -> None:
        self.conn = conn = self._new_connection()
        conn.set_accept_state()
        if not _direct_checked:
            _check_direct(conn)

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
            return
        if not self._handshaked and self._prepare is not None:
            # Before the first byte reaches OpenSSL, the engine may need to fetch something
            # asynchronously (a challenge certificate from shared storage).
            prepare, self._prepare = self._prepare, None
            fut = prepare(data)
            if fut is not None:
                self._held = bytearray(data)
                self.transport.pause_reading()
                fut.add_done_callback(self._resume_after_prepare)
                return
        self._incoming(data)

    def _resume_after_prepare(self, fut) -> None:
        held, self._held = bytes(self._held or b""), None
        if self._lost:
            return
        self.transport.resume_reading()
        self._incoming(held)

    def _incoming(self, data: bytes) -> None:
        if _direct:
            self._incoming_direct(data)
        else:
            self._incoming_api(data)

    def _handshake_failed(self, e: BaseException) -> None:
        self._flush()   # the alert, if OpenSSL wrote one
        log.debug("TLS handshake failed from %s: %s", self.peer, e)
        metrics.inc("autocert_proxy_tls_handshake_errors_total")
        self._fail(None)

    def _handshake_done(self) -> None:
        self._handshaked = True
        if not self.ready.done():
            self.ready.set_result(None)
        self._swap_bios = True

    def _incoming_direct(self, data: bytes) -> None:
        conn = self.conn
        n = len(data)
        if n > _BIG:
            self._swap_bios = True
        ssl = conn._ssl
        rbio = conn._into_ssl
        if n > _BIG or self._rdata is not None:
            # A large chunk is read by OpenSSL where it is: a read-only memory BIO over the
            # bytes object (kept alive in _rdata) replaces the read BIO, instead of a copy
            # into a growing buffer that is zeroed first (a small one is copied: swapping
            # BIOs costs more than copying a few KiB). OpenSSL keeps a record that arrives in
            # parts in its own buffer, and the reads below take everything, so the read BIO
            # is empty here.
            rest = _pending_bytes(rbio, _rest_ptr)
            if rest > 0:   # not seen (bytes after close_notify, say): they go first
                data = _buffer(_rest_ptr[0], rest)[:] + data
                n = len(data)
            if n > _BIG:
                if type(data) is not bytes:
                    data = bytes(data)
                rbio = _BIO_new_mem_buf(_from_buffer(data), n)
                if rbio != _NULL:
                    _BIO_set_mem_eof_return(rbio, -1)   # empty means "more to come", not the end
                self._rdata = data
            else:   # back to a regular memory BIO
                rbio = _BIO_new(_BIO_s_mem())
                self._rdata = None
            if rbio == _NULL:
                self._fail("out of memory")
                return
            _SSL_set_bio(ssl, rbio, conn._from_ssl)   # frees the previous read BIO
            conn._into_ssl = rbio
        if self._rdata is None and _BIO_write(rbio, _from_buffer(data), n) != n:
            self._fail("bio write failed")
            return
        if not self._handshaked:
            r = _SSL_do_handshake(ssl)
            if r != 1:
                if _SSL_get_error(ssl, r) == _WANT_READ:
                    self._flush()
                    return
                try:   # pyOpenSSL's own error handling: a callback's exception, the error queue
                    conn._raise_ssl_error(ssl, r)
                    raise SSL.Error("handshake failed")
                except Exception as e:   # SSL.Error, or an exception raised inside a callback
                    self._handshake_failed(e)
                return
            self._handshake_done()
        # Every record this data completes, decrypted into one buffer that goes up as one
        # chunk: a 256 KiB read holds 16 records, and one chunk instead of 16 saves 15 trips
        # through the HTTP layer (and 15 writes to the upstream). The plaintext is at most the
        # ciphertext held, plus what OpenSSL has decrypted already, plus the part of one record
        # it read before (a read usually ends inside a record); anything beyond that (never
        # seen) is taken by a second round.
        got = 0
        chunks = None
        end = None
        while True:
            avail = _pending_bytes(rbio, _NULL) + _SSL_pending(ssl)
            if avail <= 0:
                break
            avail += _RECORD
            buf = _alloc("char[]", avail)
            got = 0
            while got < avail:
                r = _SSL_read(ssl, buf + got, avail - got)
                if r > 0:
                    got += r
                    continue
                err = _SSL_get_error(ssl, r)
                if err == _WANT_READ:
                    break
                if err == _ZERO_RETURN:   # close_notify
                    end = "eof"
                    break
                try:
                    conn._raise_ssl_error(ssl, r)
                    end = "fail"
                except (SSL.ZeroReturnError, SSL.SysCallError):   # the peer went away
                    end = "eof"
                except SSL.WantReadError:
                    pass
                except Exception as e:   # SSL.Error
                    log.debug("TLS error from %s: %s", self.peer, e)
                    end = "fail"
                break
            if got:
                chunk = _buffer(buf, got)[:]
                if chunks is None:
                    chunks = chunk
                elif type(chunks) is list:
                    chunks.append(chunk)
                else:
                    chunks = [chunks, chunk]
            if got < avail or end is not None:
                break
        self._deliver(None if chunks is None else chunks if type(chunks) is bytes else b"".join(chunks), end)

    def _incoming_api(self, data: bytes) -> None:
        """The same through pyOpenSSL's public API (when its internals are not what
        _incoming_direct expects)."""
        conn = self.conn
        if len(data) > _BIG:
            self._swap_bios = True
        try:
            conn.bio_write(data)
        except SSL.Error:
            self._fail("bio write failed")
            return
        if not self._handshaked:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except Exception as e:   # SSL.Error, or an exception raised inside a callback
                self._handshake_failed(e)
                return
            self._handshake_done()
        got = []
        end = None
        while True:
            try:
                chunk = conn.recv(65536)
            except SSL.WantReadError:
                break
            except (SSL.ZeroReturnError, SSL.SysCallError):   # close_notify, or the peer went away
                end = "eof"
                break
            except SSL.Error as e:
                log.debug("TLS error from %s: %s", self.peer, e)
                end = "fail"
                break
            if not chunk:
                break
            got.append(chunk)
        self._deliver((got[0] if len(got) == 1 else b"".join(got)) if got else None, end)

    def _deliver(self, data: Optional[bytes], end: Optional[str]) -> None:
        """Hands up what one arrival decrypted, then the end it reached ("eof", "fail" or
        None), and sends what OpenSSL has to say (handshake or alert bytes)."""
        if data:
            self._feed(data)
        if end == "eof":
            self._feed_eof()
        elif end == "fail":
            self._fail(None)
            return
        self._flush()

    def _flush(self) -> None:
        """Sends what OpenSSL wrote to the memory BIO."""
        conn = self.conn
        if _direct:
            # Exactly what the BIO holds, read once into a buffer that is handed to the
            # transport as it is (no copy into a bytes object, no join).
            wbio = conn._from_ssl
            n = _pending_bytes(wbio, _NULL)
            if n <= 0:
                return
            buf = _alloc("char[]", n)
            n = _BIO_read(wbio, buf, n)
            if n <= 0:
                return
            out = memoryview(_buffer(buf, n))   # keeps ``buf`` alive while the transport holds it
        else:
            parts = []
            while True:
                try:
                    data = conn.bio_read(262144)
                except SSL.WantReadError:
                    break
                parts.append(data)
                if len(data) < 262144:
                    break
            if not parts:
                return
            out = b"".join(parts) if len(parts) > 1 else parts[0]
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(out)

    def _going_idle(self) -> None:
        if self._swap_bios:
            self._fresh_bios()

    def _fresh_bios(self) -> None:
        """Give the connection new, empty memory BIOs (both must be drained).

        A memory BIO keeps the largest buffer it ever held: after the handshake that is the
        whole server flight (certificate chain) and the client's hello, after a bulk transfer
        one write piece's records. An idle connection would carry that for as long as it stays
        open. Done when a read is about to wait, not after each write: a fresh BIO regrowing
        under a bulk transfer would copy every piece again. OpenSSL frees the old pair in
        SSL_set_bio."""
        global _bio_swap
        if not _bio_swap:
            return
        conn = self.conn
        try:   # pyOpenSSL's private attributes: if a release renames them, stop swapping
            rbio, wbio, ssl = conn._into_ssl, conn._from_ssl, conn._ssl
        except AttributeError:
            _bio_swap = False
            log.warning("this pyOpenSSL has no memory-BIO attributes to renew; idle TLS "
                        "connections keep their largest buffers")
            return
        if rbio is None or _ssl_lib.BIO_get_mem_data(rbio, _ssl_ffi.NULL) \
                or _ssl_lib.BIO_get_mem_data(wbio, _ssl_ffi.NULL):
            return
        new_r = _ssl_lib.BIO_new(_ssl_lib.BIO_s_mem())
        new_w = _ssl_lib.BIO_new(_ssl_lib.BIO_s_mem())
        if new_r == _ssl_ffi.NULL or new_w == _ssl_ffi.NULL:   # out of memory: keep what works
            for bio in (new_r, new_w):
                if bio != _ssl_ffi.NULL:
                    _ssl_lib.BIO_free(bio)
            return
        _ssl_lib.SSL_set_bio(ssl, new_r, new_w)
        conn._into_ssl, conn._from_ssl = new_r, new_w
        self._rdata = None
        self._swap_bios = False

    def _fail(self, reason: Optional[str]) -> None:
        if reason:
            log.debug("TLS connection from %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self):
        self._feed_eof()
        return False

    def write(self, data: bytes) -> None:
        if self.is_closing:
            raise StreamClosed("write on a closed connection")
        n = len(data)
        if n > _BIG:
            self._swap_bios = True
        conn = self.conn
        if not _direct:
            for off in range(0, n, WRITE_PIECE) if n > WRITE_PIECE else (None,):
                try:
                    conn.sendall(data if off is None else data[off:off + WRITE_PIECE])
                except SSL.Error as e:
                    raise StreamClosed(f"TLS write failed: {e}") from None
                self._flush()
            return
        ssl = conn._ssl
        p = _from_buffer(data)
        off = 0
        while off < n:
            k = n - off if n - off <= WRITE_PIECE else WRITE_PIECE
            # a memory BIO takes everything: SSL_write writes all k bytes or fails
            r = _SSL_write(ssl, p + off, k)
            if r <= 0:
                try:
                    conn._raise_ssl_error(ssl, r)
                    raise SSL.Error("write failed")
                except SSL.Error as e:
                    raise StreamClosed(f"TLS write failed: {e}") from None
            off += r
            self._flush()

    def shutdown_write(self) -> None:
        """Send close_notify (the peer reads EOF) and keep the connection open for reading."""
        if self.conn is not None and self._handshaked and not self.is_closing and not self._sent_shutdown:
            self._sent_shutdown = True
            try:
                self.conn.shutdown()
            except SSL.Error:
                pass
            self._flush()

    def close(self) -> None:
        if self.conn is not None and self._handshaked and not self.is_closing and not self._sent_shutdown:
            try:
                self.conn.shutdown()
            except SSL.Error:
                pass
            self._flush()
        super().close()
