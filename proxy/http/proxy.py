"""The reverse proxy: one client connection, its requests, routed to upstreams and streamed.

Bodies flow both ways chunk by chunk with back-pressure (``drain``), never buffered whole.
A request that could be read two ways (smuggling) is answered 400 and the connection closed
before anything reaches an upstream.
"""
from __future__ import annotations

import asyncio
import logging
from html import escape
from time import monotonic
from http import HTTPStatus
from dataclasses import dataclass
from typing import Callable, Optional

import h11
from h11 import (CLIENT, DONE, ERROR, IDLE, NEED_DATA, SEND_BODY, SEND_RESPONSE, SERVER, ConnectionClosed,
                 Data, EndOfMessage, InformationalResponse, LocalProtocolError, RemoteProtocolError,
                 Request)

from ..config import Options, Route
from ..tls.transport import Stream, StreamClosed
from . import codec, fastcodec
from .codec import end_to_end, request_facts
from .access_log import AccessLog, Entry
from .routes import RouteTable, upgrade_allowed
from .upstream import UpstreamPool, UpstreamRefused

log = logging.getLogger("proxy.http")

MAX_HEAD = 64 * 1024
LINGER_SECONDS = 5.0   # how long a request body is read after an early answer
LINGER_AFTER_ERROR = 2.0           # and after an error answer that closes the connection
LINGER_BYTES = 4 * 1024 * 1024
SERVER_NAME = b"autocert-proxy"
READ_SIZE = 256 * 1024   # reads take a received chunk whole (no split, no copy)
JOIN_MAX = 16 * 1024     # held head bytes and a body chunk up to this size leave as one write
# The HTTP/1.1 engine, h11's API either way: fastcodec (httptools) when installed, h11 itself
# (the strict reference) with AUTOCERT_PROXY_HTTP_PARSER=h11. Events stay h11 classes, so the
# event type checks and exceptions below are the same (events are compared with ``type(ev) is``:
# h11's event classes are ABCs, and isinstance on an ABC costs several times more); HTTP.Request/Response are the cheap constructors.
HTTP = fastcodec.engine()
_REQUEST, _RESPONSE = HTTP.Request, HTTP.Response   # (module attributes looked up once)
# h11 tolerates a bare LF in a head and limits only heads that arrive incomplete: the proxy
# checks the raw head bytes itself then. The fast codec rejects both as it parses.
CHECK_HEAD_BYTES = not getattr(HTTP, "checks_head_bytes", False)
# Immutable, so one instance serves every message (building one costs more than sending it).
END = getattr(HTTP, "END", None) or EndOfMessage()


# Request headers the proxy replaces rather than forwards (besides the hop-by-hop ones).
_NOT_FORWARDED = frozenset((b"host", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"))
# The headers sent upstream for (client headers as request_facts keeps them, upstream authority,
# client address, scheme): a kept-alive client sends the same headers with every request.
_UPSTREAM_HEADERS = codec.BoundedCache(1024)


class ClientTimeout(Exception):
    """The client stalled while sending its request body (not an upstream timeout)."""


def error_page(status: int, detail: str = "") -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A page the proxy writes itself; ``detail`` is escaped (it may carry what a client sent)."""
    reason = _REASONS.get(status, "Error")
    body = (f"<!doctype html><title>{status} {reason}</title>\n"
            f"<h1>{status} {reason}</h1>\n<p>{escape(detail)}</p>\n<hr><small>autocert-proxy</small>\n").encode()
    return [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())], body


_REASONS = {301: "Moved Permanently", 308: "Permanent Redirect", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _pending_bytes(conn: h11.Connection) -> bytes:
    """Bytes h11 holds but has not parsed yet (a pipelined request head), to check them too."""
    return conn.trailing_data[0]


class Side:
    """An h11 connection bound to a stream: ``next_event`` reads as needed, ``send`` writes.

    ``hold`` keeps an event's bytes back so that they leave with the next ``send`` (or
    ``flush``): a head and a small body go out as one TLS record and one write system call
    instead of three."""

    __slots__ = ("stream", "conn", "held")

    def __init__(self, stream: Stream, role):
        self.stream = stream
        self.conn = HTTP.Connection(role, max_incomplete_event_size=MAX_HEAD)
        self.held: list[bytes] = []

    async def next_event(self, timeout: Optional[float], head_buf: Optional[bytearray] = None,
                         flush: Optional["Side"] = None):
        """The next h11 event; ``timeout`` bounds the whole event, not each read (a head
        dribbled one byte at a time must not extend its own deadline). ``flush``: a side whose
        held bytes must leave before this one waits for the network."""
        conn = self.conn
        deadline = None
        while True:
            ev = conn.next_event()
            if ev is not NEED_DATA:
                return ev
            remaining = None
            if timeout is not None:
                now = self.stream._loop.time()
                if deadline is None:
                    deadline = now + timeout
                remaining = deadline - now
                if remaining <= 0:
                    raise TimeoutError()
            if flush is not None and flush.held:
                flush.flush()
            stream = self.stream
            w = stream.readable(remaining)   # (stream.read's two halves: no coroutine of its own)
            if w is not None:
                await w
            data = stream.read_now(READ_SIZE)
            if head_buf is not None and data:
                head_buf += data
                codec.check_head_bytes(bytes(head_buf), MAX_HEAD)
            conn.receive_data(data)

    def hold(self, event) -> None:
        data = self.conn.send(event)
        if data:
            self.held.append(data)

    def send(self, event) -> None:
        data = self.conn.send(event)
        if self.held:
            if data and len(data) > JOIN_MAX:
                self.flush()   # a large body chunk is not copied just to put a head before it
            else:
                if data:
                    self.held.append(data)
                data = b"".join(self.held)
                self.held.clear()
        if data:
            self.stream.write(data)

    def flush(self) -> None:
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            self.stream.write(data)


@dataclass
class ProxyState:
    """What request handling reads; replaced as a whole on reload."""
    options: Options
    routes: RouteTable
    pool: UpstreamPool
    access_log: AccessLog
    draining: bool = False


class ClientConnection:
    """Serves one client connection until it closes, times out, or the server drains."""

    __slots__ = ("stream", "get_state", "scheme", "busy", "side", "_close_gently")

    def __init__(self, stream: Stream, get_state: Callable[[], ProxyState], scheme: str = "https"):
        self.stream = stream
        self.get_state = get_state
        self.scheme = scheme
        self.busy = False          # a request is in flight (drain waits for these)
        self.side = Side(stream, SERVER)
        self._close_gently = False   # an error answer was sent: linger before closing

    async def run(self) -> None:
        stream = self.stream
        try:
            state = self.get_state()
            await stream.wait_ready(state.options.timeout_read_header)
        except (TimeoutError, StreamClosed, ConnectionError):
            stream.abort()
            return
        first = True
        conn = self.side.conn
        loop = stream._loop
        try:
            while True:
                data = b""
                head_deadline = None
                if not _pending_bytes(conn):
                    # The connection waits for its next request here, in this frame alone:
                    # no other coroutine of ours stays in memory while it idles. A new
                    # connection's head timeout runs from here and bounds the whole head; a
                    # kept-alive one waits its idle timeout for the first byte.
                    opts = self.get_state().options
                    if first:   # (from the handshake: a TLS stream may start this task later)
                        head_deadline = stream.opened_at + opts.timeout_read_header
                    w = stream.readable(head_deadline - loop.time() if first else opts.timeout_idle)
                    if w is not None:
                        try:
                            await w
                        except TimeoutError:
                            if first:
                                self._raw_error(408, "the request head did not arrive in time")
                            break   # an idle kept-alive connection closes quietly
                    data = stream.read_now(READ_SIZE)
                    if not data:
                        break   # end of stream
                keep = await self._one_request(data, head_deadline)
                first = False
                if not keep:
                    break
        except (StreamClosed, ConnectionError):
            pass
        except Exception:
            log.exception("unexpected error on connection from %s", stream.peer)
        finally:
            self.busy = False
            if self._close_gently:
                await self._discard_input()
            stream.close()

    def _raw_head(self, data: bytes) -> bytearray:
        """h11 only (see CHECK_HEAD_BYTES): the head's raw bytes so far, checked here, and
        kept to check again as the rest arrives."""
        head = data or _pending_bytes(self.side.conn)
        codec.check_head_bytes(head, MAX_HEAD)
        return bytearray(head)

    async def _one_request(self, data: bytes, head_deadline: Optional[float]) -> bool:
        """Serve one request. Returns whether the connection stays open for another.

        ``data``: its first bytes, read by ``run``; the rest of the head has what is left of
        the head timeout (a new connection: from the handshake). Empty: the head is in what
        the codec holds (a pipelined head, or part of one), with the head timeout."""
        state = self.get_state()
        opts = state.options
        side = self.side
        conn = side.conn
        try:
            head_buf = self._raw_head(data) if CHECK_HEAD_BYTES else None
            if data:   # (usually the whole head: parsed here, no coroutine for it)
                conn.receive_data(data)
                ev = conn.next_event()
                if ev is NEED_DATA:
                    ev = await side.next_event(head_deadline - self.stream._loop.time()
                                               if head_deadline is not None else opts.timeout_read_header,
                                               head_buf)
            else:
                ev = await side.next_event(opts.timeout_read_header, head_buf)
        except TimeoutError:   # (a head had begun: an idle connection times out in run)
            self._raw_error(408, "the request head did not arrive in time")
            return False
        except codec.BadRequest as e:
            self._raw_error(e.status, str(e))
            log.info("rejected request from %s: %s", self.stream.peer, e)
            return False
        except RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in (400, 413, 431, 501) else 400
            if "exceeds" in str(e) or "too long" in str(e).lower():
                status = 431
            self._raw_error(status, str(e))
            log.info("rejected request from %s: %s", self.stream.peer, e)
            return False
        if ev is None or type(ev) is ConnectionClosed:
            return False
        if type(ev) is not Request:
            return False
        self.busy = True
        started = monotonic()
        method, target = ev.method, ev.target
        entry = Entry(self.stream.peer, method, target, ev.http_version)
        try:
            facts = request_facts(ev.headers)
            if target[:1] != b"/" or method == b"CONNECT":   # (rare: absolute-form, or refused)
                authority, target = codec.origin_form(method, target)
                facts = facts.with_host(authority)
                ev = _REQUEST(method=method, target=target, headers=ev.headers, http_version=ev.http_version)
        except codec.BadRequest as e:
            self._raw_error(400, str(e))
            log.info("rejected request from %s: %s", self.stream.peer, e)
            entry.status = 400
            state.access_log.write(entry, started)
            return False
        host = facts.host_name
        entry.host = host
        path = target.split(b"?", 1)[0].decode("latin-1")
        route = state.routes.match(host, path, facts.host) if host else None
        try:
            if route is None:
                await self._drain_body(opts)
                self._respond_local(404, *error_page(404, f"No route for {host or '(no host)'}{path}."), ev, entry)
            elif route.response is not None:
                await self._drain_body(opts)
                body = route.response.body.encode()
                self._respond_local(route.response.status, [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode())], body, ev, entry)
                entry.route = route.from_url
            else:
                entry.route = route.from_url
                upgraded = await self._proxy(ev, facts, route, state, entry)
                if upgraded:
                    state.access_log.write(entry, started)
                    return False
        except RemoteProtocolError as e:
            # A bad body (chunk size, length): the upstream got no complete request.
            log.info("bad request body from %s: %s", self.stream.peer, e)
            if conn.our_state in (SEND_RESPONSE, IDLE):
                self._raw_error(400, str(e))
                entry.status = 400
            state.access_log.write(entry, started)
            return False
        except (TimeoutError, ClientTimeout):
            if conn.our_state in (SEND_RESPONSE,):
                self._raw_error(408, "the request body did not arrive in time")
                entry.status = 408
            state.access_log.write(entry, started)
            return False
        finally:
            self.busy = False
        state.access_log.write(entry, started)
        try:
            if self.stream.must_drain:
                await self.stream.drain(opts.timeout_idle)
        except TimeoutError:
            return False   # the client stopped reading its response
        if not state.draining:
            try:
                conn.start_next_cycle()   # both sides done: keep the connection
                return True
            except LocalProtocolError:
                pass
        if conn.our_state is DONE and conn.their_state is SEND_BODY \
                and not conn.client_is_waiting_for_100_continue:
            await self._linger(opts)
        if conn.our_state is DONE and conn.their_state is DONE and not state.draining:
            conn.start_next_cycle()
            return True
        return False

    # --- local answers ---
    def _raw_error(self, status: int, detail: str) -> None:
        """An error sent outside h11's state machine, then the connection closes."""
        headers, body = error_page(status, detail)
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
        head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        head += b"connection: close\r\nserver: " + SERVER_NAME + b"\r\n\r\n"
        try:
            self.stream.write(head + body)
            self.stream.shutdown_write()
        except StreamClosed:
            return
        self._close_gently = True

    async def _discard_input(self) -> None:
        """Lingering close: after an error answer, read and drop what the client still sends
        (bounded), so that closing does not reset the connection before the client has
        read the answer. Nothing read here is parsed."""
        left = LINGER_BYTES
        try:
            async with asyncio.timeout(LINGER_AFTER_ERROR):
                while left > 0:
                    data = await self.stream.read(65536)
                    if not data:
                        return
                    left -= len(data)
        except (TimeoutError, StreamClosed, ConnectionError):
            pass

    def _respond_local(self, status, headers, body, req, entry) -> None:
        draining = self.get_state().draining
        if draining:
            headers = headers + [(b"connection", b"close")]
        self.side.hold(_RESPONSE(status_code=status, headers=headers + [(b"server", SERVER_NAME)],
                                     reason=reason_phrase(status)))
        if req.method != b"HEAD":
            self.side.hold(Data(data=body))
        self.side.send(END)
        entry.status = status
        entry.bytes_sent = len(body)

    async def _drain_body(self, opts: Options) -> None:
        """Reads (and discards) a request body we answer ourselves, so keep-alive stays in sync."""
        side = self.side
        if side.conn.client_is_waiting_for_100_continue:
            return   # the client has not sent the body; h11 will close if it must
        while True:
            ev = await side.next_event(opts.timeout_idle)
            if type(ev) in (EndOfMessage, ConnectionClosed):
                return

    # --- proxying ---
    def _upstream_request(self, req: Request, facts: codec.RequestFacts, route: Route,
                          up) -> Request:
        host_header = facts.host or b""
        authority = host_header if route.preserve_host_header else up.authority_bytes
        key = None
        upgrade = facts.upgrade is not None and upgrade_allowed(route, facts.upgrade)
        if facts.shared:   # the same client headers as before: the same headers to send
            key = (facts, authority, self.stream.peer, self.scheme, upgrade)
            seen = _UPSTREAM_HEADERS.get(key)
            if seen is not None:
                return _REQUEST(method=req.method, target=req.target, headers=list(seen))
        headers = [(b"host", authority)]
        headers += end_to_end(req.headers, keep_upgrade=upgrade,
                                    drop=_NOT_FORWARDED, tokens=facts.tokens)
        xffs = facts.forwarded_for
        if xffs and b"x-forwarded-for" in facts.tokens:
            xffs = []   # named in Connection: hop-by-hop for this request
        peer = self.stream.peer.encode()
        headers.append((b"x-forwarded-for", b", ".join(xffs) + b", " + peer if xffs else peer))
        headers.append((b"x-forwarded-proto", self.scheme.encode()))
        headers.append((b"x-forwarded-host", host_header))
        if facts.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if key is not None:
            _UPSTREAM_HEADERS.keep(key, tuple(headers))
        return _REQUEST(method=req.method, target=req.target, headers=headers)

    async def _proxy(self, req: Request, facts: codec.RequestFacts, route: Route,
                     state: ProxyState, entry: Entry) -> bool:
        """Forwards one request. Returns True when the connection was upgraded (and is done)."""
        opts = state.options
        client = self.side
        if client.conn.client_is_waiting_for_100_continue:
            client.send(InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        # The first body event is read before the upstream is contacted: a body that is
        # malformed from its first byte never reaches the upstream.
        first_body = client.conn.next_event()
        if first_body is NEED_DATA:
            first_body = await client.next_event(opts.timeout_idle)
        up = state.routes.upstream(route)
        entry.upstream = up.address
        up_req = self._upstream_request(req, facts, route, up)
        has_body = type(first_body) is not EndOfMessage
        attempts = 1 if has_body else 2   # a reused connection may have been closed by the upstream
        for attempt in range(attempts):
            try:
                taken = state.pool.take(up)
                reused = taken is not None
                if reused:
                    stream, upstream = taken
                else:
                    stream = await state.pool.connect(up, opts.default_upstream_timeout)
                    upstream = Side(stream, CLIENT)
            except UpstreamRefused as e:
                log.warning("upstream %s refused for %s: %s", entry.upstream, route.from_url, e)
                return self._gateway_error(502, "The upstream service refused the connection.", req, entry)
            except TimeoutError:
                log.warning("upstream %s timed out connecting for %s", entry.upstream, route.from_url)
                return self._gateway_error(504, "The upstream service did not answer in time.", req, entry)
            try:
                upstream.hold(up_req)   # leaves with the first body bytes or the end of message
                if has_body:
                    if await self._send_body(first_body, upstream, opts):
                        upstream.send(END)
                else:
                    upstream.send(END)
                resp = await upstream.next_event(opts.default_upstream_timeout)
                while type(resp) is InformationalResponse and resp.status_code != 101:
                    resp = await upstream.next_event(opts.default_upstream_timeout)
            except ClientTimeout:
                stream.abort()
                raise
            except TimeoutError:
                stream.abort()
                log.warning("upstream %s timed out for %s", entry.upstream, route.from_url)
                return self._gateway_error(504, "The upstream service did not answer in time.", req, entry)
            except (StreamClosed, ConnectionError, RemoteProtocolError, LocalProtocolError) as e:
                stream.abort()
                if isinstance(e, StreamClosed) and client.conn.their_state is not DONE:
                    raise
                if client.conn.their_state is ERROR:
                    raise   # the client's body was malformed: answered 400 by the caller
                if reused and attempt + 1 < attempts:
                    continue
                log.warning("upstream %s failed for %s: %s", entry.upstream, route.from_url, e)
                return self._gateway_error(502, "The upstream service closed the connection.", req, entry)
            if type(resp) is ConnectionClosed:
                stream.abort()
                if reused and attempt + 1 < attempts:
                    continue
                return self._gateway_error(502, "The upstream service closed the connection.", req, entry)
            break
        entry.status = resp.status_code
        if type(resp) is InformationalResponse:   # 101 Switching Protocols
            await self._switch_protocols(resp, upstream, entry)
            return True
        draining = state.draining
        headers = end_to_end(resp.headers)
        if draining:
            headers.append((b"connection", b"close"))
        client.hold(_RESPONSE(status_code=resp.status_code, headers=headers, reason=resp.reason))
        sent = 0
        try:
            while True:
                ev = upstream.conn.next_event()   # usually there already: no coroutine for it
                if ev is NEED_DATA:
                    ev = await upstream.next_event(opts.default_upstream_timeout, flush=client)
                if type(ev) is Data:
                    client.send(ev)   # h11 events are immutable: the received Data goes out as it is
                    sent += len(ev.data)
                    if self.stream.must_drain:
                        try:
                            await self.stream.drain(opts.timeout_idle)
                        except TimeoutError:
                            raise ClientTimeout() from None
                elif type(ev) is EndOfMessage:
                    client.send(END)
                    break
                else:
                    raise RemoteProtocolError("upstream closed mid-response")
        except (TimeoutError, ClientTimeout, RemoteProtocolError, StreamClosed, ConnectionError) as e:
            # The response has started: the only honest signal left is to cut the connection.
            stream.abort()
            entry.bytes_sent = sent
            # Whose side ended it: a client going away is routine, an upstream breaking off is not.
            if type(e) is ClientTimeout:
                log.info("client stopped reading the response for %s (from %s)", route.from_url, self.stream.peer)
            elif self.stream.is_closing:
                log.info("client closed the connection during the response for %s (from %s)", route.from_url,
                         self.stream.peer)
            else:
                log.warning("upstream %s broke off the response for %s: %s", entry.upstream, route.from_url, e)
            self.stream.abort()
            raise StreamClosed("response cut off") from None
        entry.bytes_sent = sent
        try:
            upstream.conn.start_next_cycle()   # both sides done, or LocalProtocolError
        except LocalProtocolError:
            stream.close()
        else:
            state.pool.release(up, stream, upstream)   # the next request on it reuses its codec
        return False

    async def _send_body(self, first_body, upstream: Side, opts: Options) -> bool:
        """Streams the request body to the upstream. Returns False when the upstream stopped
        taking it: it may have answered early (a 413 or 401 before the upload ends), and
        that answer is still read and forwarded."""
        client = self.side
        ev = first_body
        while True:
            if type(ev) is Data:
                try:
                    upstream.send(ev)
                    if upstream.stream.must_drain:
                        await upstream.stream.drain(opts.default_upstream_timeout)
                except (StreamClosed, ConnectionError):
                    return False
            elif type(ev) is EndOfMessage:
                return True
            else:
                raise StreamClosed("client went away during the request body")
            try:
                ev = client.conn.next_event()
                if ev is NEED_DATA:
                    ev = await client.next_event(opts.timeout_idle)
            except TimeoutError:
                raise ClientTimeout() from None

    async def _linger(self, opts: Options) -> None:
        """After answering before the request body ended, read (and drop) the rest for a
        while: closing with unread data makes the kernel send a reset, which can destroy
        the response before the client reads it. When the body ends, keep-alive goes on."""
        try:
            async with asyncio.timeout(min(opts.timeout_idle, LINGER_SECONDS)):
                while self.side.conn.their_state is SEND_BODY:
                    ev = await self.side.next_event(None)
                    if type(ev) is ConnectionClosed:
                        return
        except (TimeoutError, RemoteProtocolError):
            pass

    def _gateway_error(self, status: int, detail: str, req, entry) -> bool:
        headers, body = error_page(status, detail)
        if self.side.conn.their_state is not DONE:
            # The request body was not read to its end: the connection cannot be reused.
            self._raw_error(status, detail)
            entry.status = status
            raise StreamClosed("closed after gateway error")
        self._respond_local(status, headers, body, req, entry)
        return False

    async def _switch_protocols(self, resp: InformationalResponse, upstream: Side, entry: Entry) -> None:
        client = self.side
        client.send(InformationalResponse(status_code=101, headers=end_to_end(resp.headers, keep_upgrade=True),
                                              reason=resp.reason))
        c_extra = client.conn.trailing_data[0]
        u_extra = upstream.conn.trailing_data[0]
        if u_extra:
            self.stream.write(u_extra)
        if c_extra:
            upstream.stream.write(c_extra)
        await pipe_both(self.stream, upstream.stream, self.get_state().options.timeout_idle * 10)


async def _pipe(src: Stream, dst: Stream, timeout: float) -> None:
    try:
        while True:
            data = await src.read(READ_SIZE, timeout)
            if not data:
                break
            dst.write(data)
            await dst.drain(timeout)
    except (StreamClosed, ConnectionError, TimeoutError):
        pass
    finally:
        dst.close()


async def pipe_both(a: Stream, b: Stream, timeout: float) -> None:
    """Raw bytes both ways until either side closes (upgraded connections, e.g. WebSocket)."""
    await asyncio.gather(_pipe(a, b, timeout), _pipe(b, a, timeout))
