"""TLS server connections where OpenSSL reads and writes the socket itself.

The listener accepts on its own (``loop.add_reader`` on the listening socket, a bounded batch
per wake-up); each accepted, non-blocking socket is handed to OpenSSL with ``SSL_set_fd``
and watched in the listener's own epoll set (``Poller``: one descriptor for the loop to
watch, a list slot per connection). No memory BIOs and no asyncio
transport sit between the socket and OpenSSL: a record is read from the kernel straight
into OpenSSL and decrypted into one reused buffer, and a write is encrypted and sent record
by record. ``TLSServerStream`` offers the HTTP layer the same interface as
``transport.Stream`` (read with a timeout, write, drain, shutdown_write, close, abort).

Flow control both ways: reading stops (not watched for input) while more than ``READ_LIMIT``
bytes wait to be read by the HTTP layer, and resumes below half; what the socket does not
take is kept (``SSL_MODE_ENABLE_PARTIAL_WRITE``, retried when the socket is writable) and
``drain`` waits while more than ``WRITE_HIGH`` bytes are kept, until they are below
``WRITE_LOW``.

OpenSSL is called through pyOpenSSL's cffi binding: a connection is an ``SSL *`` made by
``new_ssl`` from a pyOpenSSL Context (no pyOpenSSL Connection); ``check_pyopenssl`` refuses
to start, with a clear error, on a pyOpenSSL whose binding lacks what is used here.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
from _socket import socket as _c_socket
from typing import Callable, Optional

import OpenSSL
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

from .. import metrics
from .transport import _SLACK, ByteStream, StreamClosed

log = logging.getLogger("proxy.tls")

WRITE_HIGH = 64 * 1024   # drain waits while more than this is kept unsent (asyncio's default)
WRITE_LOW = 16 * 1024
ACCEPT_BATCH = 32        # connections accepted per wake-up of the listening socket
PEEK_SIZE = 16 * 1024 + 5   # the ClientHello's first record, shown to the engine's prepare hook
_SCRATCH_SIZE = 256 * 1024   # plaintext decrypted per wake-up at most (then epoll calls again)
_FULL_RECORD = 16 * 1024     # the most plaintext a TLS record carries
_scratch = _ffi.new_allocator(should_clear_after_alloc=False)("char[]", _SCRATCH_SIZE)
_buffer = _ffi.buffer
_from_buffer = _ffi.from_buffer
_SSL_read = _lib.SSL_read
_SSL_write = _lib.SSL_write
_SSL_pending = _lib.SSL_pending
_SSL_get_error = _lib.SSL_get_error
_SSL_do_handshake = _lib.SSL_do_handshake
_SSL_shutdown = _lib.SSL_shutdown
_SSL_new = _lib.SSL_new
_SSL_free = _lib.SSL_free
_SSL_set_options = _lib.SSL_set_options
_SSL_set_shutdown = _lib.SSL_set_shutdown
_KEEP_SESSION = _lib.SSL_SENT_SHUTDOWN | _lib.SSL_RECEIVED_SHUTDOWN
_IGNORE_UNEXPECTED_EOF = getattr(_lib, "SSL_OP_IGNORE_UNEXPECTED_EOF", 0)   # (OpenSSL 3.0 on)
_NULL = _ffi.NULL
_ERR_clear_error = _lib.ERR_clear_error
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL = _lib.SSL_ERROR_SYSCALL
_MODES = (_lib.SSL_MODE_ENABLE_PARTIAL_WRITE | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
          | _lib.SSL_MODE_AUTO_RETRY)
_UNEXPECTED_EOF = getattr(_lib, "SSL_R_UNEXPECTED_EOF_WHILE_READING", -1)
_READ, _WRITE = 1, 2   # what the loop watches the socket for
_SOCK_STREAM = int(socket.SOCK_STREAM)
_IPPROTO_TCP, _TCP_CORK = socket.IPPROTO_TCP, getattr(socket, "TCP_CORK", 3)   # (Linux)
_PEERS: dict = {}   # client address -> the one str kept for it (bounded: cleared when full)
_NO_SHUTDOWN, _SHUTDOWN_WANTED, _SHUTDOWN_SENT = 0, 1, 2
# (the functions read into module globals above are checked by the import itself)
_NEEDED = ("SSL_set_fd", "SSL_set_mode", "SSL_set_accept_state", "SSL_get_servername", "SSL_get_version",
           "SSL_get0_alpn_selected", "ERR_peek_error", "ERR_GET_REASON", "ERR_reason_error_string")


def refuse_missing_internals(missing: list[str], used_for: str) -> None:
    """The one start-up error for a pyOpenSSL without the internals the TLS layer calls
    directly: raises RuntimeError naming what is missing and what uses it (nothing when
    ``missing`` is empty)."""
    if missing:
        raise RuntimeError(f"pyOpenSSL {OpenSSL.__version__} lacks {', '.join(missing)}, which "
                           f"{used_for}; install a pyOpenSSL release that has them (this proxy is "
                           "tested with 26.4)")


def check_pyopenssl() -> None:
    """Raises RuntimeError when this pyOpenSSL lacks what the TLS listener calls directly
    (its Context's ``_context``, and OpenSSL functions in its binding)."""
    refuse_missing_internals(
        ([] if hasattr(SSL.Context(SSL.TLS_SERVER_METHOD), "_context") else ["Context._context"])
        + [f for f in _NEEDED if not hasattr(_lib, f)],
        "the TLS listener uses to let OpenSSL read and write the socket")


def new_ssl(context: SSL.Context):
    """A new ``SSL *`` for ``context`` (a pyOpenSSL Context). Its owner frees it with
    ``SSL_free`` (a stream does when its connection ends; cffi's ``gc`` would cost 80 B per
    idle connection)."""
    ssl = _SSL_new(context._context)
    if ssl == _NULL:
        raise MemoryError("SSL_new failed")
    return ssl


def servername(ssl) -> Optional[bytes]:
    """The name the client sent with SNI on ``ssl``, as sent; None without one."""
    p = _lib.SSL_get_servername(ssl, _lib.TLSEXT_NAMETYPE_host_name)
    return _ffi.string(p) if p != _NULL else None


def selected_alpn(ssl) -> Optional[bytes]:
    """The protocol ALPN settled on ``ssl``, None without one."""
    data, n = _ffi.new("unsigned char **"), _ffi.new("unsigned int *")
    _lib.SSL_get0_alpn_selected(ssl, data, n)
    return _buffer(data[0], n[0])[:] if n[0] else None


class TLSServerStream(ByteStream):
    """One accepted client connection: OpenSSL on the socket, a byte stream to the HTTP layer.

    Made by the listener's factory (``new_connection(fd)`` makes the ``SSL *`` for the accepted
    socket, e.g. ``new_ssl`` of the engine's first context; ``prepare`` sees the first bytes
    before OpenSSL does), then
    ``attach``-ed to the accepted socket. ``ready`` resolves when the handshake is done.

    With ``waiting``, the connection waits on its own until it has something for the HTTP
    layer: ``waiting.start(stream)`` is called once, when the first bytes after the handshake
    are there (as nginx allocates a request's state only then). Until that, nothing else
    exists for the connection (no task, no HTTP codec, no timer of its own: it is in
    ``waiting``), and the stream ends it by itself: when the handshake, or then the first
    byte, takes longer than ``waiting.timeout`` (aborted; closed with close_notify), or when
    the client closes first. Without it, whoever made the stream serves it from the start."""

    __slots__ = ("_new_connection", "_prepare", "_ssl", "_fd", "_handshaked",
                 "_watching", "_read_needs_write", "_write_needs_read", "_out", "_out_size",
                 "_closing", "_shutdown", "_waiting", "_poller", "_wprev", "_wnext")

    def __init__(self, new_connection: Callable[[int], object],
                 prepare: Optional[Callable[[bytes], Optional[asyncio.Future]]] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None,
                 waiting: Optional["Waiting"] = None) -> None:
        super().__init__(loop)
        self._new_connection = new_connection
        self._prepare = prepare
        self._waiting = waiting   # (None once the HTTP layer has the connection)
        self._poller: Optional[Poller] = None   # (attach)
        self._wprev = self._wnext = None   # neighbours in ``waiting``'s list
        self._ssl = None   # the SSL * (cffi), from attach until the connection ends (then freed)
        self._fd = -1
        self._handshaked = False
        self._watching = 0
        self._read_needs_write = False   # SSL_read said WANT_WRITE (a KeyUpdate to answer)
        self._write_needs_read = False   # SSL_write said WANT_READ
        self._out: Optional[list] = None   # plaintext the socket did not take yet
        self._out_size = 0
        self._closing = False
        self._shutdown = _NO_SHUTDOWN

    # --- what the handshake settled, read when asked (most connections never ask) ---
    @property
    def server_name(self) -> Optional[str]:
        """The SNI name the client sent (lower case), None without one or before the handshake."""
        if not self._handshaked or self._ssl is None:
            return None
        name = servername(self._ssl)
        return name.decode("ascii", "replace").lower() if name else None

    @property
    def alpn(self) -> Optional[bytes]:
        return selected_alpn(self._ssl) if self._handshaked and self._ssl is not None else None

    @property
    def tls_version(self) -> str:
        if not self._handshaked or self._ssl is None:
            return ""
        return _ffi.string(_lib.SSL_get_version(self._ssl)).decode("ascii")

    # --- the socket ---
    def attach(self, fd: int, addr, poller: "Poller") -> None:
        """Take the accepted (non-blocking) socket ``fd`` (closed when the connection ends) and
        start: the peek for ``prepare``, or the handshake, at once (the ClientHello is usually
        there with the connection) and then whenever it becomes readable (``poller`` watches)."""
        self._fd = fd
        self._poller = poller
        poller.add(fd, self)
        if addr:   # one string per client address, not per connection
            peer = addr[0]
            self.peer = _PEERS.setdefault(peer, peer)
            if len(_PEERS) > 4096:
                _PEERS.clear()
        self._ssl = ssl = self._new_connection(fd)
        _lib.SSL_set_accept_state(ssl)
        if _lib.SSL_set_fd(ssl, self._fd) != 1:
            self._lose("SSL_set_fd failed")
            return
        _lib.SSL_set_mode(ssl, _MODES)
        if self._waiting is not None:   # the handshake's deadline
            self._waiting.add(self)
        self._watch(_READ)
        self._on_readable()

    def _watch(self, want: int) -> None:
        """Watch the socket for exactly ``want`` (_READ, _WRITE, both or neither)."""
        have = self._watching
        if want == have or self._lost:
            return
        self._poller.watch(self._fd, have, want)
        self._watching = want

    def _update_watch(self) -> None:
        """After the handshake: watch for what the connection's state needs."""
        reading = not (self._reading_paused or self._eof or self._read_needs_write or self._closing)
        self._watch((_READ if reading or self._write_needs_read else 0)
                    | (_WRITE if self._out is not None or self._read_needs_write
                       or self._shutdown == _SHUTDOWN_WANTED else 0))

    def _on_readable(self) -> None:
        try:
            if self._handshaked:
                if self._write_needs_read:
                    self._write_needs_read = False
                    self._flush_out()
                if not (self._reading_paused or self._eof):   # (lost: at its end too)
                    self._read()
            elif self._prepare is not None:
                self._peek()
            else:
                self._handshake()
        except Exception:
            log.exception("TLS connection from %s failed", self.peer)
            self.abort()

    def _on_writable(self) -> None:
        try:
            if not self._handshaked:
                self._handshake()
                return
            if self._read_needs_write:
                self._read_needs_write = False
                self._read()
            self._flush_out()
            self._update_watch()
        except Exception:
            log.exception("TLS connection from %s failed", self.peer)
            self.abort()

    # --- handshake ---
    def _peek(self) -> None:
        """Show the engine the first bytes (the ClientHello) without taking them from the
        socket; it may return a future to wait for before OpenSSL reads them."""
        try:
            data = _recv(self._fd, PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(e)
            return
        if not data:
            self._lose("closed before the handshake")
            return
        prepare, self._prepare = self._prepare, None   # (from here on, readable: handshake)
        fut = prepare(data)
        if fut is None:
            self._handshake()
            return
        self._watch(0)
        fut.add_done_callback(self._after_prepare)

    def _after_prepare(self, fut) -> None:
        if not self._lost:
            self._on_readable()

    def _handshake(self) -> None:
        ssl = self._ssl
        r = _SSL_do_handshake(ssl)
        if r == 1:
            self._handshaked = True
            # an EOF without close_notify: the end of input, not a fatal alert that uncaches the session
            _SSL_set_options(ssl, _IGNORE_UNEXPECTED_EOF)
            self._opened()
            if self._waiting is not None:   # now the first byte's deadline
                self._waiting.add(self, self.opened_at)
            self._watch(_READ)
            self._read()   # the first request (or close_notify) often comes with the Finished
            return
        err = _SSL_get_error(ssl, r)
        if err == _WANT_READ:
            self._watch(_READ)
        elif err == _WANT_WRITE:
            self._watch(_WRITE)
        else:
            self._handshake_failed(err, r)

    def _handshake_failed(self, err: int, r: int) -> None:
        """Counted, unless the peer merely went away (EOF or reset, as before OpenSSL read a
        byte); the alert OpenSSL wrote is already on the socket."""
        gone = err == _SYSCALL or (_lib.ERR_GET_REASON(_lib.ERR_peek_error()) == _UNEXPECTED_EOF)
        reason = _error_text()   # (the engine's callbacks log their own exceptions)
        _ERR_clear_error()
        if not gone:
            log.debug("TLS handshake failed from %s: %s", self.peer, reason)
            metrics.inc("autocert_proxy_tls_handshake_errors_total")
            self._discard_input()   # unread bytes would make close() send a reset before the alert
        self._lose(f"handshake failed: {reason}")

    def _discard_input(self) -> None:
        try:
            for _ in range(4):
                if not _recv(self._fd, 65536):
                    return
        except OSError:
            pass

    # --- reading ---
    def _read(self) -> None:
        """Decrypt what the socket has, up to one scratch buffer (epoll calls again while more
        is there), and hand it up as one chunk."""
        ssl = self._ssl
        buf, room, got = _scratch, _SCRATCH_SIZE, 0
        while True:
            r = _SSL_read(ssl, buf + got, room - got)
            if r > 0:
                got += r
                if got < room:
                    if r < _FULL_RECORD:
                        # A short record usually ends what the peer sent: no read just to
                        # learn that the socket is empty (OpenSSL reads no further than the
                        # record without read-ahead; epoll, level-triggered, calls again
                        # when more is there). Full records (a body) are read on.
                        break
                    continue
                room = _SSL_pending(ssl)
                if room <= 0:
                    break
                # full in the middle of a record: hand it up, then take the rest of that
                # record only (OpenSSL holds it; the socket may not be readable again)
                self._feed(_buffer(buf, got)[:])
                got = 0
                continue
            err = _SSL_get_error(ssl, r)
            if err == _WANT_READ:
                break
            if got:
                self._feed(_buffer(buf, got)[:])
                got = 0
            self._read_stopped(err)
            return
        if got:
            self._feed(_buffer(buf, got)[:])
        if self._waiting is not None and self._buf:
            self._begin()

    def _begin(self) -> None:
        """The first bytes are here: the HTTP layer takes the connection over."""
        waiting, self._waiting = self._waiting, None
        waiting.discard(self)
        waiting.start(self)

    def _expired(self, timeout: float) -> None:
        """``waiting``'s deadline passed: no handshake, or no byte after it, in time."""
        self._waiting = None
        if self._handshaked:   # closed without an answer, as nginx does
            log.debug("TLS connection from %s: no request within %ss", self.peer, timeout)
            self.close()
        else:
            log.debug("TLS connection from %s: handshake not done within %ss", self.peer, timeout)
            self.abort()

    def _read_stopped(self, err: int) -> None:
        if err == _WANT_WRITE:   # OpenSSL must send something first (a KeyUpdate answer)
            self._read_needs_write = True
            self._update_watch()
            return
        if self._waiting is not None:
            if self._buf:   # a request, then the end: the HTTP layer answers it
                self._begin()
            elif err == _ZERO_RETURN:   # closed before asking anything: close_notify back, close
                self._feed_eof()
                self.close()
                return
        self._feed_eof()
        if err == _ZERO_RETURN:   # close_notify or EOF: the end of what the peer sends (no more reading)
            self._update_watch()
            return
        # the peer reset, or a record failed: the connection ends (OpenSSL sent any alert due)
        if err != _SYSCALL:
            log.debug("TLS connection from %s: %s", self.peer, _error_text())
        _ERR_clear_error()
        self._lose(None)

    def _pause_reading(self) -> None:
        self._update_watch()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        self._update_watch()

    # --- writing ---
    @property
    def is_closing(self) -> bool:
        return self._lost or self._closing

    def write(self, data: bytes) -> None:
        if self._lost or self._closing or self._shutdown:
            raise StreamClosed("write on a closed connection")
        if self._out is not None:
            self._keep(data, 0)
        else:
            self._send(data)

    def _send(self, data, off: int = 0) -> bool:
        """SSL_write until all is sent (True) or the socket is full (the rest is kept).

        More than one record's worth is written corked: OpenSSL writes each record (16 KiB)
        with its own write(), and uncorked each would leave as its own TCP segment; corked,
        the kernel sends full segments, and uncorking at the end sends the rest at once
        (nginx's tcp_nopush, for TLS). 1 MiB responses: 874 -> 796 us CPU (system 518 -> 442)."""
        n = len(data)
        if n - off <= _FULL_RECORD:
            return self._send_records(data, off, n)
        _cork(self._fd, 1)
        try:
            return self._send_records(data, off, n)
        finally:
            if self._fd >= 0:   # (not when the write lost the connection)
                _cork(self._fd, 0)

    def _send_records(self, data, off: int, n: int) -> bool:
        ssl = self._ssl
        p = _from_buffer(data)
        while off < n:
            r = _SSL_write(ssl, p + off, n - off)
            if r > 0:
                off += r
                continue
            err = _SSL_get_error(ssl, r)
            if err == _WANT_WRITE or err == _WANT_READ:
                # retried later from the same offset (what OpenSSL requires of a retry)
                self._keep(data, off)
                if err == _WANT_READ:
                    self._write_needs_read = True
                self._update_watch()
                return False
            log.debug("TLS write to %s failed: %s", self.peer, _error_text())
            _ERR_clear_error()
            self._lose(None)
            return False
        return True

    def _keep(self, data, off: int) -> None:
        """Keep ``data[off:]`` to send later: a view of immutable bytes, else a copy (the
        caller may reuse its buffer)."""
        if type(data) is bytes or (type(data) is memoryview and data.readonly):
            rest = memoryview(data)[off:] if off else data
        else:
            rest = bytes(data[off:])
        if self._out is None:
            self._out = [rest]
        else:
            self._out.append(rest)
        self._out_size += len(rest)
        if self._out_size > WRITE_HIGH:
            self._write_paused = True

    def _flush_out(self) -> None:
        """The socket is writable: send what was kept, then close_notify / close if asked."""
        if self._lost:
            return
        out = self._out
        if out is not None:
            self._out, self._out_size = None, 0
            for i, data in enumerate(out):
                if not self._send(data):
                    if self._out is not None:   # not lost: keep the rest behind the first
                        for rest in out[i + 1:]:
                            self._keep(rest, 0)
                        if self._write_paused and self._out_size <= WRITE_LOW:
                            self._resume_writing()
                    return
            if self._write_paused:
                self._resume_writing()
        if self._shutdown == _SHUTDOWN_WANTED:
            self._send_close_notify()
        if self._closing and self._shutdown != _SHUTDOWN_WANTED and not self._lost:
            self._lose(None)

    # --- the end ---
    def _send_close_notify(self) -> None:
        r = _SSL_shutdown(self._ssl)
        if r < 0 and _SSL_get_error(self._ssl, r) == _WANT_WRITE:
            self._shutdown = _SHUTDOWN_WANTED   # retried when writable
        else:
            _ERR_clear_error()
            self._shutdown = _SHUTDOWN_SENT
            if self._closing:   # the socket is closed next (_flush_out): nothing to watch for
                return
        self._update_watch()

    def shutdown_write(self) -> None:
        """Send close_notify (the peer reads EOF) and keep the connection open for reading."""
        if self._handshaked and not self.is_closing and not self._shutdown:
            self._shutdown = _SHUTDOWN_WANTED
            if self._out is None:
                self._send_close_notify()

    def close(self) -> None:
        """Send what is kept, then close_notify, then close the socket."""
        if self._lost or self._closing:
            return
        self._closing = True
        if self._handshaked and not self._shutdown:
            self._shutdown = _SHUTDOWN_WANTED
        if self._out is None:
            self._flush_out()
        else:
            self._update_watch()

    def abort(self) -> None:
        """Close the socket at once (nothing more is sent)."""
        self._lose(None)

    def _lose(self, exc) -> None:
        """The connection is gone: stop watching, close the socket, wake every waiter."""
        if self._lost:
            return
        fd = self._fd
        if fd >= 0:
            if self._poller is not None:   # (closing the socket takes it out of the set)
                self._poller.forget(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        self._watching = 0
        self._fd = -1
        ssl, self._ssl = self._ssl, None
        if ssl is not None:
            if self._handshaked:   # SSL_free uncaches a session not shut down (RFC 5246 7.2.1: needless)
                _SSL_set_shutdown(ssl, _KEEP_SESSION)
            _SSL_free(ssl)
        self._out = None
        if self._waiting is not None:
            self._waiting.discard(self)
            self._waiting = None
        self._gone(exc)


def _on_fd(fd: int, method: Callable, *args):
    """A socket method called on a descriptor the caller keeps (a C socket object for the
    call, then let go; it checks the descriptor with getsockname)."""
    sock = _c_socket(socket.AF_INET, _SOCK_STREAM, 0, fd)   # (any family does for these)
    try:
        return method(sock, *args)
    finally:
        sock.detach()


def _recv(fd: int, n: int, flags: int = 0) -> bytes:
    return _on_fd(fd, _c_socket.recv, n, flags)


def _cork(fd: int, on: int) -> None:
    """TCP_CORK on or off (best effort: a failure only costs the segments' size)."""
    try:
        _on_fd(fd, _c_socket.setsockopt, _IPPROTO_TCP, _TCP_CORK, on)
    except OSError:
        pass


def _error_text() -> str:
    code = _lib.ERR_peek_error()
    if not code:
        return "connection closed"
    text = _lib.ERR_reason_error_string(code)
    return _ffi.string(text).decode("ascii", "replace") if text != _ffi.NULL else f"error {code:#x}"


class Waiting:
    """The TLS connections that have not asked anything yet, each with its deadline (the
    handshake, then the first byte, within ``timeout`` seconds each), behind one timer;
    ``start(stream)`` hands a connection whose first bytes came to the HTTP layer.

    The streams are linked in the order their waits started (``_wprev``/``_wnext``; the
    start time in the stream's ``_deadline``, unused until the HTTP layer reads), which is
    their deadlines' order too (one timeout for all): the timer is armed for the first one
    and a sweep looks only at the expired ones and the first one that is not. (After a
    reload that shortens ``timeout``, the timer armed before it still fires at the old
    deadline.) Per
    connection: two links and the start time (after the handshake the same float as
    ``opened_at``), no timer handle and no dict entry."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 start: Callable[[TLSServerStream], None]) -> None:
        self._loop = loop
        self.timeout = timeout
        self.start = start
        self._head: Optional[TLSServerStream] = None
        self._tail: Optional[TLSServerStream] = None
        self._count = 0
        self._timer: Optional[asyncio.TimerHandle] = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        streams, s = [], self._head
        while s is not None:
            streams.append(s)
            s = s._wnext
        return iter(streams)

    def add(self, stream: TLSServerStream, now: Optional[float] = None) -> None:
        """(Re)start ``stream``'s wait: ``timeout`` from ``now`` (the loop's time), behind
        every other."""
        self.discard(stream)
        stream._deadline = start = self._loop.time() if now is None else now
        tail = self._tail
        stream._wprev = tail
        if tail is None:
            self._head = stream
        else:
            tail._wnext = stream
        self._tail = stream
        self._count += 1
        if self._timer is None:
            self._timer = self._loop.call_at(start + self.timeout, self._sweep)

    def discard(self, stream: TLSServerStream) -> None:
        prev, nxt = stream._wprev, stream._wnext
        if prev is None and self._head is not stream:
            return   # not here
        if prev is None:
            self._head = nxt
        else:
            prev._wnext = nxt
        if nxt is None:
            self._tail = prev
        else:
            nxt._wprev = prev
        stream._wprev = stream._wnext = None
        self._count -= 1

    def _sweep(self) -> None:
        self._timer = None
        started_by = self._loop.time() + _SLACK - self.timeout   # waits started by then are over
        expired = []
        s = self._head
        while s is not None and s._deadline <= started_by:
            expired.append(s)
            s = s._wnext
        for stream in expired:
            self.discard(stream)
        if self._head is not None:
            self._timer = self._loop.call_at(self._head._deadline + self.timeout, self._sweep)
        for stream in expired:
            try:
                stream._expired(self.timeout)
            except Exception:
                log.exception("ending the TLS connection from %s failed", stream.peer)


_EVENTS = (0, select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT)   # by _READ | _WRITE
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP   # (an error or hang-up: both, as libuv)
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_POLL_BATCH = 128


class Poller:
    """The connections' sockets in an epoll set of our own, level-triggered, which the loop
    watches as one descriptor: what ``loop.add_reader`` / ``add_writer`` do per socket, for
    a list slot per descriptor number (as nginx's connection array; descriptors are small,
    reused numbers) and one epoll_ctl per change of interest (closing a socket
    takes it out of the set, so an ended connection costs no call). uvloop's add_reader keeps
    a poll handle, a callback handle, a bound method and a context copy per socket (~880 B
    per idle connection, measured) and sets up and tears down each with ~6 system calls.
    A socket watched for nothing is taken out of the set (an error or hang-up is always
    reported, level-triggered it would be reported on every wake-up)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._streams: list = []   # fd -> TLSServerStream or None
        self._count = 0
        self._closing = False
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        return self._count

    def add(self, fd: int, stream: TLSServerStream) -> None:
        """``stream``'s socket (watched for nothing yet)."""
        streams = self._streams
        if fd >= len(streams):
            streams.extend([None] * max(fd + 1 - len(streams), len(streams)))
        if streams[fd] is None:
            self._count += 1
        streams[fd] = stream

    def watch(self, fd: int, have: int, want: int) -> None:
        """Watch ``fd`` for ``want`` (_READ | _WRITE) instead of ``have``."""
        if not want:
            self._epoll.unregister(fd)
        elif not have:
            self._epoll.register(fd, _EVENTS[want])
        else:
            self._epoll.modify(fd, _EVENTS[want])

    def forget(self, fd: int) -> None:
        """``fd``'s stream has ended (its socket is about to be closed, which takes it out of
        the set)."""
        streams = self._streams
        if fd < len(streams) and streams[fd] is not None:
            streams[fd] = None
            self._count -= 1
        if self._closing and not self._count:
            self._shut()

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, _POLL_BATCH)
        except InterruptedError:
            return
        streams = self._streams
        for fd, ev in events:
            stream = streams[fd]   # (None: it ended earlier in this batch)
            if stream is None:
                continue
            if ev & _READABLE and stream._watching & _READ:
                stream._on_readable()
            if ev & _WRITABLE and stream._watching & _WRITE:
                stream._on_writable()

    def close(self) -> None:
        """No new sockets come: the set closes once the last one is forgotten."""
        self._closing = True
        if not self._count:
            self._shut()

    def _shut(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


class TLSListener:
    """Listening sockets that accept on their own and attach each connection to a stream
    from ``factory``, watched by the listener's ``Poller``. What the app's stop path needs:
    ``close`` (and ``wait_closed``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, socks: list[socket.socket],
                 factory: Callable[[], TLSServerStream]) -> None:
        self._loop = loop
        self.sockets = socks
        self._factory = factory
        self._serving = True
        self.poller = Poller(loop)
        for s in socks:
            loop.add_reader(s.fileno(), self._accept, s, int(s.family))

    def _accept(self, lsock: socket.socket, family: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                # the C half of socket.accept(): the Python half makes a socket.socket (its
                # __init__ and family/type properties are Python code, enum conversions);
                # the plain C socket object has all a connection uses
                fd, addr = lsock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._accept_failed(lsock, e)
                return
            sock = stream = None
            try:
                sock = _c_socket(family, _SOCK_STREAM, 0, fd)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.detach()   # the stream keeps the descriptor alone
                sock = None
                stream = self._factory()
                stream.attach(fd, addr, self.poller)
            except Exception:
                log.exception("could not set up a connection from %s", addr[0] if addr else "-")
                # the descriptor is closed once, by whoever holds it
                if sock is not None:
                    sock.close()
                elif stream is None or stream._fd < 0 and not stream._lost:
                    os.close(fd)
                elif stream._fd >= 0:
                    stream.abort()   # closes it; its waiters learn it is gone

    def _accept_failed(self, lsock: socket.socket, e: OSError) -> None:
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # out of descriptors or memory: stop accepting for a second (as asyncio does)
            log.error("accepting TLS connections failed (%s); pausing for 1 s", e)
            self._loop.remove_reader(lsock.fileno())
            self._loop.call_later(1.0, self._resume, lsock)
        # anything else (ECONNABORTED: the client gave up in the backlog): next wake-up

    def _resume(self, lsock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(lsock.fileno(), self._accept, lsock, int(lsock.family))

    def close(self) -> None:
        """Stop accepting (open connections go on)."""
        if not self._serving:
            return
        self._serving = False
        for s in self.sockets:
            self._loop.remove_reader(s.fileno())
            s.close()
        self.poller.close()

    async def wait_closed(self) -> None:
        return None


def listening_sockets(infos, *, reuse_address: bool = True, reuse_port: bool = False,
                      backlog: int = 2048) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for the addresses ``infos`` (getaddrinfo's
    answer), as loop.create_server makes them (same options and error text: keep in step)."""
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, kind, proto)
            socks.append(s)
            if reuse_address:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {addr!r}: "
                                       f"{e.strerror.lower()}") from None
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def start_tls_server(factory: Callable[[], TLSServerStream], host: Optional[str], port: int, *,
                           reuse_address: bool = True, reuse_port: bool = False,
                           backlog: int = 2048) -> TLSListener:
    """A TLS listener on ``host``:``port`` whose connections are ``factory()`` streams."""
    # resolved in the loop's executor, as loop.create_server does (a name may need DNS)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    socks = listening_sockets(infos, reuse_address=reuse_address, reuse_port=reuse_port,
                              backlog=backlog)
    return TLSListener(asyncio.get_running_loop(), socks, factory)
