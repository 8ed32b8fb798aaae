"""HTTP/1.1 rules the proxy applies on top of h11: framing checks and header rewriting. Pure.

h11 parses and frames messages; these functions add what a proxy must enforce beyond it,
because a message that two parsers could read differently is a smuggling vector:
- a head with a bare LF where CRLF is required (h11 tolerates it),
- both Content-Length and Transfer-Encoding (h11 lets Transfer-Encoding win),
- hop-by-hop headers, which are meaningful for one connection only,
- a host that is not host[:port], and request targets other than origin-form and absolute-form.
"""
from __future__ import annotations

import re
from ipaddress import IPv6Address
from itertools import chain
from typing import Iterable, Optional

HEAD_END = b"\r\n\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")

# RFC 9110 7.6.1, plus the non-standard ones every proxy strips.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})

Headers = list[tuple[bytes, bytes]]


class BadRequest(Exception):
    """The request is malformed or ambiguous: answer ``status`` and close the connection."""
    status = 400


class HeadTooLarge(BadRequest):
    status = 431


def check_head_bytes(buf: bytes, max_size: Optional[int] = None) -> None:
    """Reject a request head (as received so far) that uses a bare LF as line ending, or
    that is longer than ``max_size`` bytes (h11 only limits heads that arrive incomplete)."""
    end = buf.find(HEAD_END)
    head = buf if end < 0 else buf[: end + 4]
    if max_size is not None and len(head) > max_size:
        raise HeadTooLarge(f"request head larger than {max_size} bytes")
    if _BARE_LF.search(head):
        raise BadRequest("bare LF in request head")


class RequestFacts:
    """What the proxy reads from a request's headers to route and forward it. Read-only for
    its users: ``request_facts`` hands the same object again for the same headers."""
    __slots__ = ("host", "host_name", "tokens", "upgrade", "forwarded_for", "chunked", "shared")

    def __init__(self, host, tokens, upgrade, forwarded_for, chunked):
        self.host: Optional[bytes] = host                 # the first Host value
        self.host_name: str = host_name(host) if host else ""   # it as routing sees it
        self.tokens: set[bytes] = tokens                  # Connection tokens, lower case
        self.upgrade: Optional[bytes] = upgrade           # the Upgrade value, if Connection names it
        self.forwarded_for: list[bytes] = forwarded_for   # X-Forwarded-For values, in order
        self.chunked: bool = chunked                      # the body is chunked
        # kept by request_facts: this object stands for these headers (while it is kept), so
        # it can key what callers derive from them
        self.shared = False

    def with_host(self, host: bytes) -> "RequestFacts":
        """These facts for a request whose host is ``host`` (its target's authority), not shared."""
        return RequestFacts(host, self.tokens, self.upgrade, self.forwarded_for, self.chunked)


_FACT_NAMES = frozenset((b"host", b"connection", b"upgrade", b"x-forwarded-for",
                         b"transfer-encoding", b"content-length"))


def request_facts(headers: Iterable[tuple[bytes, bytes]]) -> RequestFacts:
    """One pass over a request's (lower-case name, value) pairs. Raises BadRequest when the
    body length could be read two ways: Content-Length with Transfer-Encoding, or Content-Length
    values that disagree. A client sends the same headers with every request: the answer for
    headers seen before is the object made for them then (``shared``)."""
    key = tuple(headers)
    try:
        seen = _FACTS.get(key)
    except TypeError:   # unhashable pairs
        return _request_facts(key)
    if seen is not None:
        return seen
    facts = _request_facts(key)
    if _keepable(key):
        facts.shared = True
        _FACTS.keep(key, facts)
    return facts


def _request_facts(headers) -> RequestFacts:
    host = upgrade = None
    connection = []
    xff = []
    lengths = set()
    te = False
    for name, value in headers:
        if name in _FACT_NAMES:
            if name == b"host":
                if host is None:
                    host = value
            elif name == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif name == b"connection":
                connection.append(value)
            elif name == b"x-forwarded-for":
                xff.append(value)
            elif name == b"transfer-encoding":
                te = True
            elif upgrade is None:
                upgrade = value
    if lengths and (te or len(lengths) > 1):
        raise BadRequest("both Content-Length and Transfer-Encoding" if te else "conflicting Content-Length values")
    tokens = _tokens(connection) if connection else set()
    # One rule, the simplest safe one: a framing header named in Connection is refused, never removed.
    if b"content-length" in tokens or b"transfer-encoding" in tokens:
        raise BadRequest("Connection names Content-Length or Transfer-Encoding")
    if b"upgrade" not in tokens:
        upgrade = None
    return RequestFacts(host, tokens, upgrade, xff, te)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    values = [v for n, v in headers if n == b"connection"]
    return _tokens(values) if values else set()


def _tokens(values: list[bytes]) -> set[bytes]:
    tokens = {t.strip(b" \t") for t in b",".join(values).lower().split(b",")}
    tokens.discard(b"")
    return tokens


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n == name:
            return v
    return None


class BoundedCache(dict):
    """A dict that empties itself when it is full: what the codecs keep of heads they have
    seen (a flood of heads never seen costs the cache its contents, never memory). Look-ups
    are plain dict look-ups."""
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


# end_to_end's answers for the headers it saw last: an upstream sends the same response
# headers for the same resource, a client the same request headers (the fast codec hands the
# same pairs again for a block it has seen). Bounded in entries and bytes per entry.
_FORWARDED_MAX = 1024
_FORWARDED_BYTES = 2048
_FORWARDED_PAIRS = 64
_FORWARDED = BoundedCache(_FORWARDED_MAX)
# request_facts' answers, bounded the same way
_FACTS = BoundedCache(_FORWARDED_MAX)


def _keepable(pairs: tuple) -> bool:
    """Whether headers are small enough to key a kept answer: in pairs (each costs a tuple
    and two bytes objects beyond its bytes; h11 makes fresh ones for every message) and in
    bytes."""
    return len(pairs) <= _FORWARDED_PAIRS and sum(map(len, chain.from_iterable(pairs))) <= _FORWARDED_BYTES


def end_to_end(headers: Iterable[tuple[bytes, bytes]], *, keep_upgrade: bool = False,
               drop: frozenset = frozenset(), tokens: Optional[set[bytes]] = None) -> Headers:
    """Headers with hop-by-hop ones removed (and those named in Connection, and ``drop``).
    ``tokens``: the Connection tokens, when the caller has them already."""
    key = None
    if not tokens:   # the answer depends on the arguments alone
        headers = tuple(headers)
        key = (headers, keep_upgrade, drop, tokens is None)
        try:
            seen = _FORWARDED.get(key)
        except TypeError:   # unhashable pairs
            key = None
        else:
            if seen is not None:
                return list(seen)
    out = _end_to_end(headers, keep_upgrade, drop, tokens)
    if key is not None and _keepable(headers):
        _FORWARDED.keep(key, tuple(out))
    return out


def _end_to_end(headers, keep_upgrade, drop, tokens) -> Headers:
    headers = headers if type(headers) is list or type(headers) is tuple else list(headers)
    gone = HOP_BY_HOP | drop if drop else HOP_BY_HOP
    if tokens is None:
        tokens = connection_tokens(headers)
    if tokens:
        gone = gone | tokens
    out = [h for h in headers if h[0] not in gone]
    if keep_upgrade:
        up = header_value(headers, b"upgrade")
        if up is not None:
            out += [(b"connection", b"upgrade"), (b"upgrade", up)]
    return out


# RFC 3986 host [":" port]: an IP-literal (IPv6, checked further in host_name, or IPvFuture) or
# a reg-name (which an IPv4 address also is).
_HOST_PORT = re.compile(rb"(\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[-A-Za-z0-9._~!$&'()*+,;=:]+)\]"
                        rb"|(?:[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")
# absolute-form (RFC 9112 3.2.2): scheme "://" authority, then the origin-form part
_ABSOLUTE_FORM = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?]*)(.*)", re.DOTALL)


def host_name(authority: bytes) -> str:
    """A Host value or a target's authority -> the lower-case name routing sees (no port, no
    trailing dot). Raises BadRequest when it is not host[:port] (RFC 3986), e.g. one with markup."""
    m = _HOST_PORT.fullmatch(authority)
    if m is not None:
        host = m.group(1).decode("ascii")
        if not host.startswith("[") or host[1] in "vV":
            return host.lower().rstrip(".")
        try:
            IPv6Address(host[1:-1])
            return host.lower()
        except ValueError:
            pass
    raise BadRequest("the host is not a valid host[:port]")


def origin_form(method: bytes, target: bytes) -> tuple[Optional[bytes], bytes]:
    """A request's target -> (the authority that names its host, None for origin-form: Host
    does; the origin-form target, which is what goes upstream, as nginx sends it). RFC 9112
    3.2.2: the authority of an absolute-form target wins over Host. Raises BadRequest for
    asterisk-form ("OPTIONS *"), CONNECT, other schemes and an authority with userinfo or
    without a valid host[:port]: a reverse proxy has nothing else to send upstream."""
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")
    if target[:1] == b"/":
        return None, target
    m = _ABSOLUTE_FORM.fullmatch(target)
    if m is None:
        raise BadRequest("the request target is neither origin-form nor http(s) absolute-form")
    authority, rest = m.groups()
    if not host_name(authority):
        raise BadRequest("the request target has no host")
    return authority, rest if rest[:1] == b"/" else b"/" + rest
