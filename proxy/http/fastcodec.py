"""A fast HTTP/1.1 connection with the subset of h11's API the proxy uses, parsing heads with
httptools (llhttp, the parser of Node.js). h11 stays the strict reference: same events,
states, framing and exceptions, and tests/test_fastcodec.py runs both on the same inputs.

Why it is shaped this way:
- **Only heads go through llhttp**, one fresh parser per head (under a microsecond). The head
  is cut at the first CRLFCRLF here, so llhttp never sees a byte past the message it parses,
  and bodies (Content-Length, chunked, close-delimited) are framed here in Python exactly as
  h11 frames them. That keeps h11's buffer semantics: after a message the rest stays in
  ``_receive_buffer`` (a pipelined head, the bytes after an Upgrade: ``trailing_data``)
  until ``start_next_cycle``, which httptools alone cannot do (it has no pause and no offsets).
  A head whose header block was accepted before (the same client and upstream send the same
  blocks again and again) and whose start line has the usual shape is not parsed again: one
  regex splits the start line, and the block's parse comes from a cache (_REQUEST_LINE says
  why llhttp would accept it as it did; tests/test_fastcodec.py checks it against llhttp).
- **The usual exchange takes a short path**: a request and a response kept alive, framed by
  length or chunked, take h11's transitions written out where they happen (_read_head,
  _send_request, _send_response, next_event, send); anything else takes the general code.
- **Events are h11's own classes**, made with ``object.__new__`` (no header regexes), so
  every ``isinstance(ev, h11.Request)`` and ``except h11.RemoteProtocolError`` in the proxy
  works unchanged for both parsers. Received ``headers`` is a plain list of (lower-case name,
  value) pairs, h11's iteration form. ``Request``/``Response``/``InformationalResponse``
  here are cheap constructors with h11's keyword signature; the proxy picks them or h11's
  through ``engine()``. ``send`` also takes real h11 events.
- **The state machine is h11's** (``h11/_state.py``), written out for two roles: the same
  sentinels (``h11.IDLE``, ``h11.DONE``, ``h11.MUST_CLOSE``...) and the same transitions,
  keep-alive and switch-protocol rules.

Stricter than h11 (each rejection is RemoteProtocolError, so a 400/502, never a different
reading of the bytes): methods llhttp does not know, a request line with extra spaces,
duplicate Content-Length headers even when equal, "Content-Length: 5, 5", control characters
(DEL) in values, obs-fold, bare LF also in responses, heads over ``max_incomplete_event_size``
even when they arrive complete, chunk sizes over 16 hex digits or with whitespace after them.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import h11

try:
    import httptools
    from httptools import HttpParserError, HttpParserUpgrade
except ImportError:   # engine() then picks h11
    httptools = None

from h11 import (CLIENT, CLOSED, DONE, ERROR, IDLE, MIGHT_SWITCH_PROTOCOL, MUST_CLOSE, NEED_DATA,
                 PAUSED, SEND_BODY, SEND_RESPONSE, SERVER, SWITCHED_PROTOCOL,
                 LocalProtocolError, RemoteProtocolError)

from .codec import BoundedCache

__all__ = ["Connection", "Request", "Response", "InformationalResponse", "Data", "EndOfMessage",
           "ConnectionClosed", "engine", "PARSER_ENV"]

PARSER_ENV = "AUTOCERT_PROXY_HTTP_PARSER"

_Request = h11.Request
_Response = h11.Response
_Info = h11.InformationalResponse
_Data = h11.Data
_EOM = h11.EndOfMessage
_Closed = h11.ConnectionClosed
_new = object.__new__
# The events' slots, set through their descriptors: object.__setattr__ on these frozen
# dataclasses costs about three times as much (h11's own __init__ goes through it too).
_set_method = _Request.method.__set__
_set_target = _Request.target.__set__
_set_request_headers = _Request.headers.__set__
_set_request_version = _Request.http_version.__set__
_set_status = _Response.status_code.__set__       # (_ResponseBase's: InformationalResponse's too)
_set_response_headers = _Response.headers.__set__
_set_reason = _Response.reason.__set__
_set_response_version = _Response.http_version.__set__
_set_data = _Data.data.__set__
_set_chunk_start = _Data.chunk_start.__set__
_set_chunk_end = _Data.chunk_end.__set__
_set_trailers = _EOM.headers.__set__

# Framing kinds for a body (h11's _body_framing results).
_CL, _CHUNKED, _HTTP10 = 0, 1, 2

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CONTENT = rb"[^\x00\s\x7f](?:[ \t]*[^\x00\s\x7f])*"
_HEADER_LINE = re.compile(rb"(?P<name>" + _TOKEN + rb"):[ \t]*(?P<value>(?:" + _FIELD_CONTENT + rb")?)[ \t]*")
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_REASON = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
# chunk-size [ BWS ";" ext ] CRLF; no sign, no 0x, no spaces after the size, no CR/LF/NUL in the extension.
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n\x00]*)?\r\n")


# --- cheap event constructors (h11's keyword signatures, no regex validation here; send checks) ---

def Request(*, method: bytes, target: bytes, headers, http_version: bytes = b"1.1") -> h11.Request:
    ev = _new(_Request)
    _set_method(ev, method)
    _set_target(ev, target)
    _set_request_headers(ev, headers)
    _set_request_version(ev, http_version)
    return ev


def Response(*, status_code: int, headers, reason: bytes = b"", http_version: bytes = b"1.1") -> h11.Response:
    if not 200 <= status_code <= 999:
        raise LocalProtocolError("Response status_code should be in range [200, 1000)")
    ev = _new(_Response)
    _set_status(ev, status_code)
    _set_response_headers(ev, headers)
    _set_reason(ev, reason)
    _set_response_version(ev, http_version)
    return ev


def InformationalResponse(*, status_code: int, headers, reason: bytes = b"",
                          http_version: bytes = b"1.1") -> h11.InformationalResponse:
    if not 100 <= status_code < 200:
        raise LocalProtocolError("InformationalResponse status_code should be in range [100, 200)")
    ev = _new(_Info)
    _set_status(ev, status_code)
    _set_response_headers(ev, headers)
    _set_reason(ev, reason)
    _set_response_version(ev, http_version)
    return ev


Data = h11.Data
EndOfMessage = h11.EndOfMessage
ConnectionClosed = h11.ConnectionClosed


def _data(data: bytes, chunk_start: bool = False, chunk_end: bool = False) -> h11.Data:
    ev = _new(_Data)
    _set_data(ev, data)
    _set_chunk_start(ev, chunk_start)
    _set_chunk_end(ev, chunk_end)
    return ev


def _eom(trailers) -> h11.EndOfMessage:
    if not trailers:
        return _END
    ev = _new(_EOM)
    _set_trailers(ev, trailers)
    return ev


_END = _new(_EOM)     # events are immutable: one end-of-message without trailers serves all
_set_trailers(_END, ())


_CLOSED_EVENT = _Closed()


def _items(headers):
    """(raw name, lower-case name, value) for a plain list or an h11 Headers object."""
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return full
    return [(n, n.lower(), v) for n, v in headers]


def _comma_tokens(items, name: bytes) -> list:
    out = []
    for _, n, v in items:
        if n == name:
            for t in v.lower().split(b","):
                t = t.strip()
                if t:
                    out.append(t)
    return out


def _has_token(value: bytes, token: bytes) -> bool:
    """``token`` among the comma-separated, case-insensitive tokens of a header value."""
    return token in value.lower() and token in [t.strip() for t in value.lower().split(b",")]


def _check_te(seen: bool, value: bytes) -> None:
    """h11's rule for a Transfer-Encoding header, sent or received: one only, and chunked."""
    if seen:
        raise LocalProtocolError("multiple Transfer-Encoding headers", error_status_hint=501)
    if value.lower() != b"chunked":
        raise LocalProtocolError("Only Transfer-Encoding: chunked is supported", error_status_hint=501)


def _scan(items):
    """What the state machine needs from a head, in one pass over (raw, lower, value) items:
    (Connection: close, an Upgrade value, Expect: 100-continue, Transfer-Encoding, Content-Length)."""
    close = upgrade = expect = te = False
    cl = None
    for _, n, v in items:
        if n in _STATE_HEADERS:
            if n == b"connection":
                close = close or _has_token(v, b"close")
            elif n == b"upgrade":
                upgrade = upgrade or bool(v.strip(b" \t,"))
            elif n == b"expect":
                expect = expect or _has_token(v, b"100-continue")
            elif n == b"transfer-encoding":
                te = True
            else:
                cl = v
    return close, upgrade, expect, te, cl


_STATE_HEADERS = frozenset((b"connection", b"upgrade", b"expect", b"transfer-encoding", b"content-length"))


# Received header line -> (lower-case name, value without surrounding whitespace), for lines
# no framing or state rule looks at: a proxy receives the same User-Agent, Accept, Server...
# lines over and over. Bounded in entries and in line length (a client must not be able to
# make it hold large names or values); emptied when full.
_NORMALISED_MAX = 4096
_NORMALISED = BoundedCache(_NORMALISED_MAX)
_CACHEABLE = 256   # longest header line (name and value) either cache keeps

# Whole header blocks, one level above the line caches: the same client sends the same block
# of header lines with every request (only the request line changes), and an upstream sends
# the same block with every response to the same resource (until its Date ticks). A block's
# parse is a pure function of its bytes, so a block seen before and accepted gives its parse
# again: received block (the lines after the start line, with the blank line) ->
# (normalised pairs, what _scan would say, number of Host headers, _plain_framing's answer);
# headers to send (a tuple of the pairs) -> (block bytes, what _scan would say, number of Host
# headers, what sending it as a usual request / response sets, the block with its final
# CRLF; see _cached_head). Received blocks are kept per role, because llhttp's rules for a block differ for
# requests and responses (e.g. "Transfer-Encoding: chunked<TAB>": an error in a request, a
# close-delimited body in a response) and a block seen before under the usual start line is
# not given to llhttp again (_read_head). Bounded in entries and in block length; emptied when
# full. A block not seen before costs one dict look-up more than the line caches alone.
_BLOCKS_MAX = 1024
_BLOCKS_REQUESTS = BoundedCache(_BLOCKS_MAX)
_BLOCKS_RESPONSES = BoundedCache(_BLOCKS_MAX)
_BLOCKS_OUT = BoundedCache(_BLOCKS_MAX)
_BLOCK_BYTES = 2048   # longest block either keeps
# Sent status lines, (status, reason) -> b"HTTP/1.1 status reason\r\n" (the reason checked),
# and sent methods checked: each check is a regex call. Ints and bytes only; bounded.
_STATUS_LINES_OUT = BoundedCache(64)
_METHODS_OUT = BoundedCache(64)

# The start lines _read_head checks and splits itself, for a block seen before: the shapes
# nearly every request and response has, each a line llhttp accepts (and splits the same
# way) before any block it accepted before under the same role. Its rules for a block do not
# depend on these start lines: of the method only CONNECT matters (it skips the check of a
# request's Transfer-Encoding: blocks first seen in a CONNECT request are not kept), of the
# status only 1xx (101 pauses the parser: an error without Upgrade headers), of the version
# nothing. Any other line (another method, absolute-form or "*", a tab or a byte >= 0x80 in
# the target, a version other than 1.0 and 1.1, a status outside 200-999, a control byte in
# the reason) goes to llhttp. tests/test_fastcodec.py checks this against llhttp, byte by byte.
_REQUEST_LINE = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) (/[\x21-\x7e]*) HTTP/(1\.[01])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([2-9][0-9][0-9])(?: |(?=\r))([\t\x20-\x7e\x80-\xff]*)\r\n")
# Received status lines it matched (with their CRLF) -> (version, status, reason): an upstream
# sends the same few. Bounded.
_STATUS_LINES_IN = BoundedCache(64)


def _plain_framing(role, info, hosts):
    """For a received block: the body framing when a head with it takes the usual path
    (requests: one Host, no Connection: close, Upgrade or Expect: 100-continue; responses:
    no Connection: close), else None."""
    close, upgrade, expect, te, cl = info
    if role is CLIENT:
        if close or upgrade or expect or hosts != 1:
            return None
        return (_CHUNKED, 0) if te else (_CL, 0 if cl is None else int(cl))
    if close:
        return None
    return (_CHUNKED, 0) if te else (_CL, int(cl)) if cl is not None else (_HTTP10, 0)


class _HeadSink:
    """httptools callbacks for one head (no per-header callback: llhttp validates the whole
    head, and the lines are split here), and the normalising of its header lines."""
    __slots__ = ("url", "status", "special")

    def __init__(self):
        self.url = b""
        self.status = b""
        self.special = []   # (line, name, value) of the headers state or framing depends on, and Host

    def normalise(self, line: bytes):
        """One header line of a head llhttp accepted (so ``name: value``, CRLF-free)."""
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        lname = name.lower()
        if lname in _SPECIAL_NAMES:
            if lname == b"transfer-encoding":
                value = value.lower()   # as h11 stores it
            pair = (lname, value)
            self.special.append((line, lname, value))
            return pair
        pair = (lname, value)
        if len(line) <= _CACHEABLE:
            _NORMALISED.keep(line, pair)
        return pair

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.status += status



# States that take part in h11's state-triggered transitions (with keep-alive and no pending
# protocol switch, a pair of states outside these never changes in _settle).
_SETTLING = frozenset((MIGHT_SWITCH_PROTOCOL, SWITCHED_PROTOCOL, CLOSED, ERROR))


def _remote(msg: str, hint: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(msg, error_status_hint=hint)


class Connection:
    """h11.Connection's API (the part the proxy uses) with llhttp parsing heads."""

    # Slots, not a __dict__: one of these lives as long as each (idle) client connection.
    __slots__ = ("our_role", "their_role", "_max", "_receive_buffer", "_pending", "_receive_buffer_closed",
                 "_search_from", "their_http_version", "_request_method", "client_is_waiting_for_100_continue",
                 "_cstate", "_sstate", "_keep_alive", "_switch_upgrade", "_switch_connect", "_plain", "_rkind", "_rleft",
                 "_rchunk_phase", "_wkind", "_wleft")

    def __init__(self, our_role, max_incomplete_event_size: int = 16 * 1024):
        if our_role not in (CLIENT, SERVER):
            raise ValueError(f"expected CLIENT or SERVER, not {our_role!r}")
        self.our_role = our_role
        self.their_role = SERVER if our_role is CLIENT else CLIENT
        self._max = max_incomplete_event_size
        self._receive_buffer = bytearray()
        self._pending: Optional[bytes] = None   # received onto an empty buffer, not yet copied
        self._receive_buffer_closed = False
        self._search_from = 0          # where to resume looking for the end of a head
        self.their_http_version: Optional[bytes] = None
        self._request_method: Optional[bytes] = None
        self.client_is_waiting_for_100_continue = False
        # h11's ConnectionState, flattened
        self._cstate = IDLE
        self._sstate = IDLE
        self._keep_alive = True
        self._switch_upgrade = False
        self._switch_connect = False
        self._plain = True             # _keep_alive and neither _switch_*: what the usual paths check
        # body reader for their SEND_BODY: (kind, remaining) / chunked sub-state
        self._rkind = _CL
        self._rleft = 0
        self._rchunk_phase = 0         # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailer
        # body writer for our SEND_BODY
        self._wkind = _CL
        self._wleft = 0

    # --- states ---
    @property
    def our_state(self):
        return self._sstate if self.our_role is SERVER else self._cstate

    @property
    def their_state(self):
        return self._cstate if self.our_role is SERVER else self._sstate

    @property
    def states(self):
        return {CLIENT: self._cstate, SERVER: self._sstate}

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self.their_role is CLIENT and self.client_is_waiting_for_100_continue

    @property
    def trailing_data(self):
        p = self._pending
        if p is not None:   # (_fold)
            self._pending = None
            self._receive_buffer += p
        return bytes(self._receive_buffer), self._receive_buffer_closed

    def _settle(self) -> None:
        """h11's _fire_state_triggered_transitions."""
        c, s = self._cstate, self._sstate
        if self._plain and c not in _SETTLING and s not in _SETTLING:
            return   # none of the rules below can fire (the usual case)
        while True:
            c0, s0 = c, s
            if self._switch_upgrade or self._switch_connect:
                if c is DONE:
                    c = MIGHT_SWITCH_PROTOCOL
            elif c is MIGHT_SWITCH_PROTOCOL:
                c = DONE
            if not self._keep_alive:
                if c is DONE:
                    c = MUST_CLOSE
                if s is DONE:
                    s = MUST_CLOSE
            if c is MIGHT_SWITCH_PROTOCOL and s is SWITCHED_PROTOCOL:
                c = SWITCHED_PROTOCOL
            elif c is CLOSED and (s is DONE or s is IDLE):
                s = MUST_CLOSE
            elif c is ERROR and s is DONE:
                s = MUST_CLOSE
            elif (c is DONE or c is IDLE) and s is CLOSED:
                c = MUST_CLOSE
            elif c is DONE and s is ERROR:
                c = MUST_CLOSE
            if c is c0 and s is s0:
                break
        self._cstate, self._sstate = c, s

    def _take_head(self, buf, end: int) -> None:
        """The head at the start of ``buf`` (``end`` bytes) is parsed: it leaves the receive
        buffer, or what follows it in bytes that arrived on an empty one becomes _pending."""
        self._search_from = 0
        if type(buf) is bytes:
            if end < len(buf):
                self._pending = buf[end:]
        else:
            del buf[:end]

    def _body_done(self, role) -> None:
        """``role``'s SEND_BODY -> DONE (its end of message, sent or received), and the
        state-triggered transitions when they can change anything."""
        if role is CLIENT:
            self._cstate = DONE
            self.client_is_waiting_for_100_continue = False
            if not self._plain or self._sstate in _SETTLING:
                self._settle()
        else:
            self._sstate = DONE
            if not self._plain or self._cstate in _SETTLING:
                self._settle()

    def _process_error(self, role) -> None:
        if role is CLIENT:
            self._cstate = ERROR
        else:
            self._sstate = ERROR
        self._settle()

    def _transition(self, role, etype, switch=None) -> None:
        """h11's _fire_event_triggered_transitions for ``role`` (and the server on a Request)."""
        if role is CLIENT:
            st = self._cstate
            if st is IDLE and etype is _Request:
                self._cstate = SEND_BODY
                if self._sstate is not IDLE:
                    raise LocalProtocolError(f"can't handle event type Request when role=SERVER and state={self._sstate}")
                self._sstate = SEND_RESPONSE
            elif st is SEND_BODY and (etype is _Data or etype is _EOM):
                if etype is _EOM:
                    self._cstate = DONE
            elif etype is _Closed and st in (IDLE, DONE, MUST_CLOSE, CLOSED):
                self._cstate = CLOSED
            else:
                raise LocalProtocolError(f"can't handle event type {etype.__name__} when role=CLIENT and state={st}")
        else:
            st = self._sstate
            if st is SEND_RESPONSE and etype is _Info:
                if switch is not None:
                    self._sstate = SWITCHED_PROTOCOL
            elif (st is SEND_RESPONSE or st is IDLE) and etype is _Response:
                self._sstate = SWITCHED_PROTOCOL if (switch is not None and st is SEND_RESPONSE) else SEND_BODY
            elif st is SEND_BODY and (etype is _Data or etype is _EOM):
                if etype is _EOM:
                    self._sstate = DONE
            elif etype is _Closed and st in (IDLE, DONE, MUST_CLOSE, CLOSED):
                self._sstate = CLOSED
            else:
                raise LocalProtocolError(f"can't handle event type {etype.__name__} when role=SERVER and state={st}")

    def _process_head(self, role, etype, method, status, version, info) -> tuple:
        """State changes for a Request / Response / InformationalResponse from ``role``.
        Returns the body framing (kind, length) when the sender enters SEND_BODY."""
        if version == b"1.1" and self._plain and not info[0]:
            # The usual heads, h11's transitions written out (what the general path below
            # does for them): a request on an idle kept-alive connection that asks for no
            # switch, and a final response that keeps the connection alive.
            if etype is _Request:
                if self._cstate is IDLE and self._sstate is IDLE and not info[1] and method != b"CONNECT":
                    self._cstate = SEND_BODY
                    self._sstate = SEND_RESPONSE
                    self._request_method = method
                    if role is self.their_role:
                        self.their_http_version = version
                    if info[2]:
                        self.client_is_waiting_for_100_continue = True
                    return (_CHUNKED, 0) if info[3] else (_CL, 0 if info[4] is None else int(info[4]))
            elif etype is _Response and self._sstate is SEND_RESPONSE \
                    and (self._cstate is DONE or self._cstate is SEND_BODY):
                self._sstate = SEND_BODY
                if role is self.their_role:
                    self.their_http_version = version
                self.client_is_waiting_for_100_continue = False
                return self._framing(self._request_method, _Response, status, info)
        switch = None
        if etype is _Request:
            if method == b"CONNECT":
                self._switch_connect = True
                self._plain = False
            if info[1]:
                self._switch_upgrade = True
                self._plain = False
        else:
            if etype is _Info and status == 101:
                switch = "upgrade"
                if not self._switch_upgrade:
                    raise LocalProtocolError("Received server _SWITCH_UPGRADE event without a pending proposal")
            elif etype is _Response and self._switch_connect and 200 <= status < 300:
                switch = "connect"
            if switch is None and etype is _Response:
                self._switch_upgrade = self._switch_connect = False
                self._plain = self._keep_alive
        self._transition(role, etype, switch)
        self._settle()
        if etype is _Request:
            self._request_method = method
        if role is self.their_role:
            self.their_http_version = version
        if etype is not _Info:
            if info[0] or version < b"1.1":
                self._keep_alive = self._plain = False
                self._settle()
        if etype is _Request:
            if info[2] and version >= b"1.1":
                self.client_is_waiting_for_100_continue = True
        else:
            self.client_is_waiting_for_100_continue = False
        # framing of the body that follows, if the sender is now in SEND_BODY
        state = self._cstate if role is CLIENT else self._sstate
        if state is not SEND_BODY:
            return None
        return self._framing(self._request_method, etype, status, info)

    @staticmethod
    def _framing(method, etype, status, info) -> tuple:
        """h11's _body_framing."""
        if etype is _Response:
            if status in (204, 304) or method == b"HEAD" or (method == b"CONNECT" and 200 <= status < 300):
                return _CL, 0
        cl = info[4]
        if info[3]:
            return _CHUNKED, 0
        if cl is not None:
            return _CL, int(cl)
        if etype is _Request:
            return _CL, 0
        return _HTTP10, 0

    def start_next_cycle(self) -> None:
        if self._cstate is not DONE or self._sstate is not DONE:
            raise LocalProtocolError(
                f"not in a reusable state. self.states={{CLIENT: {self._cstate}, SERVER: {self._sstate}}}")
        self._cstate = self._sstate = IDLE
        self._request_method = None

    # --- receiving ---
    def receive_data(self, data: bytes) -> None:
        if data:
            if self._receive_buffer_closed:
                raise RuntimeError("received close, then received more data?")
            if self._pending is None and not self._receive_buffer:
                self._pending = data    # may pass through as a body chunk, uncopied (next_event)
            else:
                self._fold()
                self._receive_buffer += data
        else:
            self._receive_buffer_closed = True

    def _fold(self) -> None:
        p = self._pending
        if p is not None:
            self._pending = None
            self._receive_buffer += p

    def next_event(self):
        their = self._cstate if self.our_role is SERVER else self._sstate
        if their is ERROR:
            raise RemoteProtocolError("Can't receive data when peer state is ERROR")
        try:
            p = self._pending
            buf = self._receive_buffer
            if their is SEND_BODY:
                kind = self._rkind
                if p is not None:
                    # Bytes that arrived on an empty buffer: inside a body they are the next
                    # Data event as they are (a 1 MiB response crosses here in 256 KiB pieces:
                    # copying each into the buffer and out again would double the proxy's
                    # memory traffic).
                    self._pending = None
                    if kind is _HTTP10 or (kind is _CL and len(p) <= self._rleft):
                        if kind is _CL:
                            self._rleft -= len(p)
                        ev = _new(_Data)
                        _set_data(ev, p if type(p) is bytes else bytes(p))
                        _set_chunk_start(ev, False)
                        _set_chunk_end(ev, False)
                        if self.our_role is SERVER:   # (_their_data)
                            self.client_is_waiting_for_100_continue = False
                        return ev
                    buf += p
                if kind is _CL and self._rleft == 0:
                    # the end of the body (what _read_body then _their_eom(()) do, for their SEND_BODY)
                    self._body_done(self.their_role)
                    return _END
                ev = self._read_body(buf)
            elif their is IDLE or their is SEND_RESPONSE:
                if p is not None:
                    # A head is parsed where it is, and what follows it (the start of a
                    # body) stays pending, copied once.
                    self._pending = None
                    if type(p) is bytes and not buf:
                        ev = self._read_head(p)
                        if ev is not None:
                            return ev
                        buf += p   # not a whole head yet: keep the bytes
                    else:
                        buf += p
                        ev = self._read_head(buf)
                elif buf:
                    ev = self._read_head(buf)
                else:
                    ev = None
            else:   # DONE, MUST_CLOSE, CLOSED, MIGHT_SWITCH_PROTOCOL, SWITCHED_PROTOCOL
                if p is not None:
                    self._pending = None
                    buf += p
                if (their is DONE and buf) or their is MIGHT_SWITCH_PROTOCOL or their is SWITCHED_PROTOCOL:
                    return PAUSED
                if buf:
                    raise LocalProtocolError("Got data when expecting EOF")
                ev = None
            if ev is None:
                if not buf and self._receive_buffer_closed:
                    if their is SEND_BODY:
                        ev = self._body_eof()
                    else:
                        ev = _CLOSED_EVENT
                        self._transition(self.their_role, _Closed)
                        self._settle()
                    return ev
                if len(buf) > self._max:
                    raise RemoteProtocolError("Receive buffer too long", error_status_hint=431)
                if self._receive_buffer_closed:
                    raise RemoteProtocolError("peer unexpectedly closed connection")
                return NEED_DATA
            return ev
        except BaseException as exc:
            self._process_error(self.their_role)
            if isinstance(exc, LocalProtocolError) and not isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(str(exc), error_status_hint=exc.error_status_hint) from None
            raise

    def _read_head(self, buf):
        """The head at the start of ``buf``: the receive buffer, or bytes that arrived on an
        empty one (then what follows the head becomes ``_pending``)."""
        if not buf:
            return None
        end = buf.find(b"\r\n\r\n", self._search_from) + 4
        line = None
        if 4 < end <= self._max:
            # A start line of the usual shape (see _REQUEST_LINE) before a header block seen
            # before under the same role: the head is llhttp's to accept as it was, not parsed
            # again.
            if self.their_role is CLIENT:
                line = _REQUEST_LINE.match(buf)
                if line is not None:
                    seen = _BLOCKS_REQUESTS.get(bytes(buf[line.end():end]))
                    if seen is None:
                        line = None
                    else:
                        method, target, version = line.groups()
                        plain = seen[3]
                        # Both IDLE: kept alive, no protocol switch pending (_settle keeps
                        # neither DONE otherwise, and only DONE, DONE starts a new cycle).
                        if plain is not None and version == b"1.1" and self._cstate is IDLE \
                                and self._sstate is IDLE:
                            # the usual request: what the code below and _process_head do for it
                            self._take_head(buf, end)
                            ev = _new(_Request)
                            _set_method(ev, method)
                            _set_target(ev, target)
                            _set_request_headers(ev, list(seen[0]))
                            _set_request_version(ev, version)
                            self._cstate = SEND_BODY
                            self._sstate = SEND_RESPONSE
                            self._request_method = method
                            self.their_http_version = version
                            self._rkind, self._rleft = plain
                            self._rchunk_phase = 0
                            return ev
            else:
                first = buf.find(b"\r\n") + 2
                key = bytes(buf[:first])
                line = _STATUS_LINES_IN.get(key)
                if line is None:
                    line = _STATUS_LINE.fullmatch(key)
                    if line is not None:
                        version, status, reason = line.groups()
                        line = version, int(status), reason
                        if first <= 128:
                            _STATUS_LINES_IN.keep(key, line)
                if line is not None:
                    seen = _BLOCKS_RESPONSES.get(bytes(buf[first:end]))
                    if seen is None:
                        line = None
                    else:
                        version, status, reason = line
                        plain = seen[3]
                        if plain is not None and version == b"1.1" \
                                and self._sstate is SEND_RESPONSE \
                                and (self._cstate is DONE or self._cstate is SEND_BODY) \
                                and self._plain:
                            # the usual response: what the code below and _process_head do for it
                            self._take_head(buf, end)
                            ev = _new(_Response)
                            _set_status(ev, status)
                            _set_response_headers(ev, list(seen[0]))
                            _set_reason(ev, reason)
                            _set_response_version(ev, version)
                            self._sstate = SEND_BODY
                            self.their_http_version = version
                            self.client_is_waiting_for_100_continue = False
                            # (no CONNECT: it left _switch_connect set)
                            if status == 204 or status == 304 or self._request_method == b"HEAD":
                                self._rkind, self._rleft = _CL, 0
                            else:
                                self._rkind, self._rleft = plain
                            self._rchunk_phase = 0
                            return ev
        if line is not None:
            self._search_from = 0
            headers = list(seen[0])
            info, hosts = seen[1], seen[2]
        else:
            if buf[0] == 10 or buf[:2] == b"\r\n":
                raise LocalProtocolError("no request line received" if self.their_role is CLIENT
                                         else "no response line received")
            if end < 4:
                self._search_from = max(0, len(buf) - 3)
                if buf[0] < 0x21:
                    raise LocalProtocolError("illegal request line")
                if buf.count(b"\n") != buf.count(b"\r\n"):
                    raise LocalProtocolError("bare LF in message head")
                if len(buf) > self._max:
                    raise RemoteProtocolError(f"message head exceeds {self._max} bytes", error_status_hint=431)
                return None
            self._search_from = 0
            if end > self._max:
                raise RemoteProtocolError(f"message head exceeds {self._max} bytes", error_status_hint=431)
            head = bytes(buf[:end])
            first = head.find(b"\r\n")
            block = head[first + 2:]
            blocks = _BLOCKS_REQUESTS if self.their_role is CLIENT else _BLOCKS_RESPONSES
            seen = blocks.get(block)
            if seen is None:
                lines = head.split(b"\r\n")   # the start line, the header lines, b"", b""
                if head.count(b"\n") != len(lines) - 1:   # an LF that ends no CRLF
                    raise LocalProtocolError("bare LF in message head")
            elif head.find(b"\n") != first + 1:   # the block has none: one in the start line
                raise LocalProtocolError("bare LF in message head")
            sink = _HeadSink()
            if self.their_role is CLIENT:
                parser = httptools.HttpRequestParser(sink)
            else:
                parser = httptools.HttpResponseParser(sink)
            try:
                parser.feed_data(head)
            except HttpParserUpgrade:
                pass
            except HttpParserError as e:
                hint = 501 if "Transfer-Encoding` header" in str(e) or "invalid `Transfer-Encoding`" in str(e) else 400
                raise LocalProtocolError(f"illegal message head: {e}", error_status_hint=hint) from None
            version = parser.get_http_version().encode()
            if seen is not None:
                headers = list(seen[0])
                info, hosts = seen[1], seen[2]
            else:
                headers, info, hosts = self._read_block(lines, sink)
                # (not a block first seen in a CONNECT request: llhttp skips its Transfer-Encoding
                # check there, and the same block after another method is llhttp's to refuse)
                if len(block) <= _BLOCK_BYTES and (blocks is _BLOCKS_RESPONSES or parser.get_method() != b"CONNECT"):
                    blocks.keep(block, (tuple(headers), info, hosts, _plain_framing(self.their_role, info, hosts)))
            if self.their_role is CLIENT:
                method = parser.get_method()
                target = sink.url
            else:
                status = parser.get_status_code()
                reason = sink.status
        self._take_head(buf, end)
        if self.their_role is CLIENT:
            # llhttp tolerates extra spaces in the request line; h11 does not.
            # The line is exactly "METHOD SP target SP HTTP/x.y" when its length leaves no room
            # (as _REQUEST_LINE's are).
            if line is None and (first != len(method) + len(target) + len(version) + 7
                                 or not head.startswith(method)):
                raise LocalProtocolError("illegal request line")
            if version == b"1.1" and hosts == 0:
                raise LocalProtocolError("Missing mandatory Host: header")
            if hosts > 1:
                raise LocalProtocolError("Found multiple Host: headers")
            ev = _new(_Request)
            _set_method(ev, method)
            _set_target(ev, target)
            _set_request_headers(ev, headers)
            _set_request_version(ev, version)
            etype, status = _Request, 0
        else:
            method = None
            etype = _Info if status < 200 else _Response
            ev = _new(etype)
            _set_status(ev, status)
            _set_response_headers(ev, headers)
            _set_reason(ev, reason)
            _set_response_version(ev, version)
        framing = self._process_head(self.their_role, etype, method, status, version, info)
        if framing is not None:
            self._rkind, self._rleft = framing
            self._rchunk_phase = 0
        return ev

    @staticmethod
    def _read_block(lines, sink):
        """The header lines of a head llhttp accepted (``lines``: its start line, header lines,
        b"", b"") -> (pairs, what _scan would say, number of Host headers); raises what
        h11 raises for their framing."""
        # Headers: lower-case names, values without surrounding whitespace. Ordinary lines
        # come normalised from a cache; the ones h11's Content-Length / Transfer-Encoding /
        # Host / Connection rules look at go through sink.normalise, which collects them for
        # the checks below.
        get = _NORMALISED.get
        del lines[0], lines[-2:]
        headers = [get(line) or sink.normalise(line) for line in lines]
        hosts = 0
        te = False
        for _, lname, value in sink.special:   # h11's checks of what it receives
            if lname == b"host":
                hosts += 1
            elif lname == b"transfer-encoding":
                _check_te(te, value)
                te = True
            elif lname == b"content-length" and len(value) > 20:
                raise LocalProtocolError("bad Content-Length")
        return headers, _scan(sink.special), hosts

    def _read_body(self, buf: bytearray):
        kind = self._rkind
        if kind is _CL:
            left = self._rleft
            if left == 0:
                return self._their_eom(())
            if not buf:
                return None
            if len(buf) <= left:
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:left])
                del buf[:left]
            self._rleft = left - len(data)
            return self._their_data(_data(data))
        if kind is _HTTP10:
            if not buf:
                return None
            data = bytes(buf)
            buf.clear()
            return self._their_data(_data(data))
        return self._read_chunked(buf)

    def _read_chunked(self, buf: bytearray):
        while True:
            phase = self._rchunk_phase
            if phase == 0:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if b"\n" in buf:
                        raise LocalProtocolError("illegal chunk header: bare LF")
                    return None
                m = _CHUNK_HEADER.match(buf, 0, nl + 2)
                if m is None or m.end() != nl + 2:
                    raise LocalProtocolError(f"illegal chunk header: {bytes(buf[:nl + 2])!r}")
                size = int(m.group(1), 16)
                del buf[:nl + 2]
                if size == 0:
                    self._rchunk_phase = 3
                    continue
                self._rleft = size
                self._rchunk_phase = 1
                start = True
            elif phase == 1:
                start = False
            elif phase == 2:
                if len(buf) < 2:
                    if buf and buf[0] != 13:
                        raise LocalProtocolError(f"malformed chunk footer: {bytes(buf)!r}")
                    return None
                if buf[0] != 13 or buf[1] != 10:
                    raise LocalProtocolError(f"malformed chunk footer: {bytes(buf[:2])!r}")
                del buf[:2]
                self._rchunk_phase = 0
                continue
            else:
                return self._read_trailer(buf)
            if not buf:
                return None
            left = self._rleft
            if len(buf) <= left:
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:left])
                del buf[:left]
            left -= len(data)
            self._rleft = left
            if left == 0:
                self._rchunk_phase = 2
            return self._their_data(_data(data, start, left == 0))

    def _read_trailer(self, buf: bytearray):
        if buf[:2] == b"\r\n":
            del buf[:2]
            return self._their_eom(())
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if buf.count(b"\n") != buf.count(b"\r\n"):
                raise LocalProtocolError("bare LF in trailer")
            return None
        block = bytes(buf[:end])
        if b"\n" in block.replace(b"\r\n", b""):
            raise LocalProtocolError("bare LF in trailer")
        trailers = []
        for line in block.split(b"\r\n"):
            m = _HEADER_LINE.fullmatch(line)
            if m is None:
                raise LocalProtocolError(f"illegal header line: {line!r}")
            trailers.append((m.group("name").lower(), m.group("value")))
        del buf[:end + 4]
        return self._their_eom(trailers)

    def _body_eof(self):
        if self._rkind is _HTTP10:
            return self._their_eom(())
        if self._rkind is _CL:
            raise RemoteProtocolError(
                "peer closed connection without sending complete message body "
                f"(received some bytes, expected {self._rleft} more)")
        raise RemoteProtocolError("peer closed connection without sending complete message body "
                                  "(incomplete chunked read)")

    def _their_data(self, ev):
        if self.their_role is CLIENT:
            self.client_is_waiting_for_100_continue = False
        return ev

    def _their_eom(self, trailers):
        ev = _eom(trailers) if trailers else _END
        if self.our_role is SERVER:   # they are the client
            if self._cstate is SEND_BODY:
                self._cstate = DONE
                self.client_is_waiting_for_100_continue = False
                if self._plain and self._sstate not in _SETTLING:
                    return ev   # (_settle would change nothing)
            else:
                self._transition(CLIENT, _EOM)
                self.client_is_waiting_for_100_continue = False
        elif self._sstate is SEND_BODY:
            self._sstate = DONE
            if self._plain and self._cstate not in _SETTLING:
                return ev
        else:
            self._transition(SERVER, _EOM)
        self._settle()
        return ev

    # --- sending ---
    def send(self, event):
        role = self.our_role
        ours = self._sstate if role is SERVER else self._cstate
        if ours is ERROR:
            raise LocalProtocolError("Can't send data when our state is ERROR")
        try:
            etype = type(event)
            if etype is _Data:
                if ours is not SEND_BODY:
                    self._transition(role, _Data)   # raises
                if role is CLIENT:
                    self.client_is_waiting_for_100_continue = False
                data = event.data
                if self._wkind is _CL:   # (_write_data's first case)
                    left = self._wleft - len(data)
                    if left < 0:
                        raise LocalProtocolError("Too much data for declared Content-Length")
                    self._wleft = left
                    return data
                return self._write_data(data)
            if etype is _EOM:
                if ours is not SEND_BODY:
                    self._transition(role, _EOM)   # raises
                self._body_done(role)
                trailers = event.headers
                if self._wkind is _CL:   # (_write_eom's first case)
                    if self._wleft != 0:
                        raise LocalProtocolError("Too little data for declared Content-Length")
                    if trailers:
                        raise LocalProtocolError("Content-Length and trailers don't mix")
                    return b""
                return self._write_eom(trailers)
            if etype is _Response or etype is _Info:
                return self._send_response(event, etype)
            if etype is _Request:
                return self._send_request(event)
            if etype is _Closed:
                self._transition(role, _Closed)
                self._settle()
                return None
            raise LocalProtocolError(f"can't send {event!r}")
        except BaseException:
            self._process_error(self.our_role)
            raise

    def _send_request(self, ev) -> bytes:
        if ev.http_version != b"1.1":
            raise LocalProtocolError("I only send HTTP/1.1")
        method, target = ev.method, ev.target
        if type(method) is not bytes or method not in _METHODS_OUT:
            if _METHOD.fullmatch(method) is None:
                raise LocalProtocolError("Illegal method characters")
            if type(method) is bytes and len(method) <= 32:
                _METHODS_OUT.keep(method, True)
        if _TARGET.fullmatch(target) is None:
            raise LocalProtocolError("Illegal target characters")
        fast = _cached_head(ev.headers)
        if fast is not None:
            framing = fast[3]
            # (both IDLE: kept alive, no protocol switch pending; see _read_head)
            if framing is not None and method != b"CONNECT" and self._cstate is IDLE and self._sstate is IDLE:
                # the usual request: _process_head's transitions written out
                self._cstate = SEND_BODY
                self._sstate = SEND_RESPONSE
                self._request_method = method
                self._wkind, self._wleft = framing
                return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, fast[0])
        if fast is not None and fast[2] == 1:
            block, info = fast[0], fast[1]
            self._wkind, self._wleft = self._process_head(self.our_role, _Request, method, 0, b"1.1", info)
            return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, block)
        items = _items(ev.headers)
        hosts = sum(1 for _, n, _v in items if n == b"host")
        if hosts == 0:
            raise LocalProtocolError("Missing mandatory Host: header")
        if hosts > 1:
            raise LocalProtocolError("Found multiple Host: headers")
        items = _check_framing_headers(items)
        head = b"%s %s HTTP/1.1\r\n%s" % (method, target, _header_block(items))
        framing = self._process_head(self.our_role, _Request, method, 0, b"1.1", _scan(items))
        self._wkind, self._wleft = framing
        return head

    def _send_response(self, ev, etype) -> bytes:
        if ev.http_version != b"1.1":
            raise LocalProtocolError("I only send HTTP/1.1")
        status = ev.status_code
        reason = ev.reason
        line = _STATUS_LINES_OUT.get((status, reason)) if type(status) is int and type(reason) is bytes else None
        if line is None:
            if _REASON.fullmatch(reason) is None:
                raise LocalProtocolError("Illegal reason phrase")
        fast = _cached_head(ev.headers)
        if fast is not None:
            length = fast[4]
            if length is not None and etype is _Response and self._plain and self._sstate is SEND_RESPONSE \
                    and (self._cstate is DONE or self._cstate is SEND_BODY):
                # the usual response (framed by its length: nothing for _clean_up_response_headers
                # to change): _process_head's transitions written out (no CONNECT: it
                # leaves _plain false)
                self._sstate = SEND_BODY
                self.client_is_waiting_for_100_continue = False
                self._wkind = _CL
                self._wleft = 0 if status == 204 or status == 304 or self._request_method == b"HEAD" else length
                if line is None:
                    line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
                    if type(status) is int and type(reason) is bytes and len(reason) <= 64:
                        _STATUS_LINES_OUT.keep((status, reason), line)
                return line + fast[5]
        if fast is not None and fast[2] == 0:
            block, info = fast[0], fast[1]
            if etype is _Info or (self._keep_alive and self._sent_response_kind(status, info) == _CL):
                # nothing for _clean_up_response_headers to change
                framing = self._process_head(self.our_role, etype, None, status, b"1.1", info)
                if framing is not None:
                    self._wkind, self._wleft = framing
                return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, block)
        items = _check_framing_headers(_items(ev.headers))
        if etype is _Response:
            items = self._clean_up_response_headers(status, items)
        head = b"HTTP/1.1 %d %s\r\n%s" % (status, reason, _header_block(items))
        framing = self._process_head(self.our_role, etype, None, status, b"1.1", _scan(items))
        if framing is not None:
            self._wkind, self._wleft = framing
        return head

    def _sent_response_kind(self, status: int, info) -> int:
        """The body framing of a response we send (to HEAD, framed as GET's would be)."""
        method = self._request_method
        return self._framing(b"GET" if method == b"HEAD" else method, _Response, status, info)[0]

    def _clean_up_response_headers(self, status: int, items):
        """h11's _clean_up_response_headers_for_sending (the cached path in _send_response
        takes only heads this leaves unchanged: kept alive and framed by length)."""
        method = self._request_method
        kind = self._sent_response_kind(status, _scan(items))
        need_close = False
        if kind != _CL:
            items = [it for it in items if it[1] != b"content-length"]
            if self.their_http_version is None or self.their_http_version < b"1.1":
                items = [it for it in items if it[1] != b"transfer-encoding"]
                if method != b"HEAD":
                    need_close = True
            else:
                items = [it for it in items if it[1] != b"transfer-encoding"]
                items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        if not self._keep_alive or need_close:
            tokens = set(_comma_tokens(items, b"connection"))
            tokens.discard(b"keep-alive")
            tokens.add(b"close")
            items = [it for it in items if it[1] != b"connection"]
            items += [(b"Connection", b"connection", t) for t in sorted(tokens)]
        return items

    def _write_data(self, data: bytes) -> bytes:
        kind = self._wkind
        if kind is _CL:
            left = self._wleft - len(data)
            if left < 0:
                raise LocalProtocolError("Too much data for declared Content-Length")
            self._wleft = left
            return data
        if kind is _CHUNKED:
            if not data:
                return b""
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _write_eom(self, trailers) -> bytes:
        kind = self._wkind
        if kind is _CL:
            if self._wleft != 0:
                raise LocalProtocolError("Too little data for declared Content-Length")
            if trailers:
                raise LocalProtocolError("Content-Length and trailers don't mix")
            return b""
        if kind is _CHUNKED:
            return b"0\r\n" + _header_block(_items(trailers) if trailers else ())
        if trailers:
            raise LocalProtocolError("can't send trailers to HTTP/1.0 client")
        return b""


# Header lines already written once, validated: (name, value) -> b"name: value\r\n". A proxy
# writes the same few dozen headers over and over (User-Agent, Accept, Server, Content-Type,
# the X-Forwarded-* it adds), and checking and formatting each again cost more than the rest
# of writing a head. Lines of the headers that framing and state depend on are also indexed
# in _CACHED_SPECIAL -> (name, lower-case name, value). Bounded: emptied past _CACHE_MAX.
_CACHED_LINES: dict = {}
_CACHED_SPECIAL: dict = {}
_CACHE_MAX = 4096
_SPECIAL_NAMES = _STATE_HEADERS | {b"host"}


def _cache_line(h):
    """The line for one (name, value) pair, validated as h11 validates it; None when the pair
    is not two bytes objects or not valid (the caller then takes the general path, which
    raises h11's errors in h11's order)."""
    try:
        n, v = h
    except (TypeError, ValueError):
        return None
    if type(n) is not bytes or type(v) is not bytes or _TOKENS.fullmatch(n) is None \
            or len(n) + len(v) > _CACHEABLE:
        return None   # (a long line, e.g. a large cookie, is written by the general path)
    if v.translate(None, _VALUE_BYTES) or (v and (v[0] in b" \t" or v[-1] in b" \t")):
        return None
    line = b"%s: %s\r\n" % (n, v)
    ln = n.lower()
    if ln in _SPECIAL_NAMES:
        _CACHED_SPECIAL[line] = (n, ln, v)
    _CACHED_LINES[(n, v)] = line
    return line


def _cached_head(headers):
    """For a plain list of (name, value) pairs whose framing needs no normalising and whose
    Host, if any, comes first: (header block bytes, what _scan would say of the head, number
    of Host headers, a usual request's body framing or None, a usual response's
    Content-Length or None, the block with its final CRLF), kept in _BLOCKS_OUT; else None,
    and the general path handles the head."""
    if type(headers) is not list:
        return None
    try:
        key = tuple(headers)
        seen = _BLOCKS_OUT.get(key)
    except TypeError:   # an unhashable pair
        return None
    if seen is not None:
        return seen
    if len(_CACHED_LINES) > _CACHE_MAX:
        _CACHED_LINES.clear()
        _CACHED_SPECIAL.clear()
    get = _CACHED_LINES.get
    try:
        lines = [get(h) or _cache_line(h) for h in headers]
    except TypeError:   # an unhashable pair
        return None
    if None in lines:
        return None
    hosts = cls = 0
    close = upgrade = expect = te = False
    cl = None
    for _, n, v in [_CACHED_SPECIAL[line] for line in lines if line in _CACHED_SPECIAL]:
        if n == b"host":
            hosts += 1
        elif n == b"content-length":
            if not v.isdigit() or len(v) > 20:
                return None
            cls += 1
            cl = v
        elif n == b"transfer-encoding":
            if te or v != b"chunked":
                return None
            te = True
        elif n == b"connection":
            close = close or _has_token(v, b"close")
        elif n == b"upgrade":
            upgrade = upgrade or bool(v.strip(b" \t,"))
        else:   # expect
            expect = expect or _has_token(v, b"100-continue")
    if cls + te > 1 or hosts > 1:
        return None
    if hosts and _CACHED_SPECIAL.get(lines[0], (0, 0))[1] != b"host":
        return None   # h11 writes Host first
    block = b"".join(lines)
    # and for the usual heads, what sending them sets (see _send_request, _send_response): a
    # request's body framing, a response's Content-Length
    usual_request = None if hosts != 1 or close or upgrade or expect \
        else (_CHUNKED, 0) if te else (_CL, 0 if cl is None else int(cl))
    usual_response = None if hosts or close or te or cl is None else int(cl)
    seen = block, (close, upgrade, expect, te, cl), hosts, usual_request, usual_response, block + b"\r\n"
    if len(block) <= _BLOCK_BYTES:
        _BLOCKS_OUT.keep(key, seen)
    return seen


def _check_framing_headers(items):
    """h11's normalize_and_validate for Content-Length / Transfer-Encoding on what we send
    (events built with the cheap constructors skip it)."""
    out = None
    seen_cl = None
    te = False
    for i, (raw, n, v) in enumerate(items):
        if n == b"content-length":
            lengths = {x.strip() for x in v.split(b",")}
            if len(lengths) != 1:
                raise LocalProtocolError("conflicting Content-Length headers")
            value = lengths.pop()
            if not value.isdigit() or len(value) > 20:
                raise LocalProtocolError("bad Content-Length")
            if seen_cl is None:
                seen_cl = value
                if value != v:
                    out = out if out is not None else list(items[:i])
                    out.append((raw, n, value))
                    continue
            elif seen_cl != value:
                raise LocalProtocolError("conflicting Content-Length headers")
            else:
                out = out if out is not None else list(items[:i])
                continue
        elif n == b"transfer-encoding":
            _check_te(te, v)
            te = True
            if v != b"chunked":
                out = out if out is not None else list(items[:i])
                out.append((raw, n, b"chunked"))
                continue
        if out is not None:
            out.append((raw, n, v))
    return items if out is None else out


_TOKENS = re.compile(_TOKEN)
# Bytes allowed in a field value (h11's field-vchar / SP / HTAB, minus DEL): ``translate``
# deleting these leaves nothing for a valid value, checked for all values at once.
_VALUE_BYTES = bytes([9] + list(range(0x20, 0x7f)) + list(range(0x80, 0x100)))


def _header_block(items) -> bytes:
    """Host first, then the rest in order (as h11 writes them); validated like h11 does
    (names are tokens; values have no CR, LF, NUL or other controls, no outer whitespace)."""
    parts = []
    rest = []
    for raw, n, v in items:
        if n == b"host":
            parts.append(b"%s: %s\r\n" % (raw, v))
        else:
            rest.append(b"%s: %s\r\n" % (raw, v))
        if v and (v[0] in b" \t" or v[-1] in b" \t"):
            raise LocalProtocolError(f"Illegal header value {v!r}")
    parts += rest
    parts.append(b"\r\n")
    if items:
        if _TOKENS.fullmatch(b"".join([it[0] for it in items])) is None or any(not it[0] for it in items):
            raise LocalProtocolError("Illegal header name")
        if b"".join([it[2] for it in items]).translate(None, _VALUE_BYTES):
            raise LocalProtocolError("Illegal header value")
    return b"".join(parts)


# --- selection ---

class _FastEngine:
    """The names the proxy takes from its HTTP engine, fastcodec flavour (h11's module is the other)."""
    Connection = Connection
    Request = staticmethod(Request)
    Response = staticmethod(Response)
    InformationalResponse = staticmethod(InformationalResponse)
    Data = h11.Data
    EndOfMessage = h11.EndOfMessage
    name = "httptools"
    END = _END   # the end of a message without trailers, one shared instance
    checks_head_bytes = True   # bare LF and oversized heads are rejected while parsing


def engine(choice: Optional[str] = None):
    """The HTTP/1.1 engine: this module (httptools) by default, ``h11`` itself when
    ``AUTOCERT_PROXY_HTTP_PARSER=h11``. ``=httptools`` forces this one."""
    choice = (choice if choice is not None else os.environ.get(PARSER_ENV, "")).strip().lower()
    if choice not in ("", "h11", "httptools"):
        raise ValueError(f"{PARSER_ENV}={choice!r}: expected 'h11' or 'httptools'")
    if choice == "h11" or (choice == "" and httptools is None):
        return h11
    if httptools is None:
        raise ImportError(f"{PARSER_ENV}=httptools but httptools is not installed")
    return _FastEngine
