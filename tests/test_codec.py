"""Pure unit tests of the HTTP/1.1 rules (proxy/http/codec.py) and the route table (routes.py)."""
from __future__ import annotations

import pytest

from proxy.config import Route, Upstream
from proxy.http import codec
from proxy.http.redirect import redirect_location
from proxy.http.routes import RouteTable


# --------------------------------------------------------------------------- head bytes

@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",          # incomplete, so far fine
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith\nLF",   # LFs in the body are not checked
    b"",
])
def test_head_with_crlf_is_accepted(head):
    codec.check_head_bytes(head)


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\n",    # still incomplete, already bad
    b"GET / HTTP/1.1\n\n",
])
def test_bare_lf_in_head_is_rejected(head):
    with pytest.raises(codec.BadRequest):
        codec.check_head_bytes(head)


# --------------------------------------------------------------------------- framing

def test_framing_single_length_ok():
    codec.request_facts([(b"host", b"a"), (b"content-length", b"5")])
    codec.request_facts([(b"content-length", b"5"), (b"content-length", b"5")])
    codec.request_facts([(b"content-length", b"5, 5")])
    codec.request_facts([(b"transfer-encoding", b"chunked")])


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")],
    [(b"content-length", b"5"), (b"content-length", b"6")],
    [(b"content-length", b"5, 6")],
])
def test_framing_ambiguous_is_rejected(headers):
    with pytest.raises(codec.BadRequest):
        codec.request_facts(headers)


# --------------------------------------------------------------------------- headers

def test_end_to_end_drops_hop_by_hop_and_connection_named():
    headers = [
        (b"host", b"a"), (b"connection", b"keep-alive, X-Secret"), (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"), (b"proxy-connection", b"keep-alive"), (b"x-secret", b"1"),
        (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"), (b"trailer", b"x"),
        (b"proxy-authorization", b"Basic x"), (b"x-kept", b"yes"),
    ]
    out = codec.end_to_end(headers)
    assert out == [(b"host", b"a"), (b"x-kept", b"yes")]


def test_end_to_end_keeps_upgrade_when_asked():
    headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", b"k")]
    assert codec.request_facts(headers).upgrade == b"websocket"
    out = codec.end_to_end(headers, keep_upgrade=True)
    assert (b"upgrade", b"websocket") in out and (b"connection", b"upgrade") in out
    assert (b"sec-websocket-key", b"k") in out
    assert codec.request_facts([(b"upgrade", b"websocket")]).upgrade is None    # no Connection: upgrade
    assert codec.request_facts([(b"connection", b"upgrade")]).upgrade is None   # no Upgrade header


def test_end_to_end_answers_again_the_same():
    """end_to_end keeps its answers for headers it has seen: warm it answers as cold, for
    every combination of arguments, each caller gets its own list, tokens the caller passes
    are honoured, and the memory is bounded."""
    codec._FORWARDED.clear()
    headers = [(b"host", b"a"), (b"connection", b"keep-alive, X-Secret"), (b"x-secret", b"1"),
               (b"upgrade", b"websocket"), (b"x-kept", b"yes")]
    calls = [dict(), dict(keep_upgrade=True), dict(drop=frozenset({b"host"})), dict(tokens=set()),
             dict(tokens={b"x-kept"})]
    cold = [codec.end_to_end(list(headers), **kw) for kw in calls]
    assert cold[0] == [(b"host", b"a"), (b"x-kept", b"yes")]
    assert cold[3] == [(b"host", b"a"), (b"x-secret", b"1"), (b"x-kept", b"yes")]   # the caller's tokens
    assert cold[4] == [(b"host", b"a"), (b"x-secret", b"1")]
    assert codec._FORWARDED   # kept
    warm = [codec.end_to_end(list(headers), **kw) for kw in calls]
    assert warm == cold
    warm[0].append((b"x-added", b"1"))
    assert codec.end_to_end(list(headers)) == cold[0]
    for i in range(codec._FORWARDED_MAX + 10):
        codec.end_to_end([(b"x-n", b"%d" % i)])
    assert len(codec._FORWARDED) <= codec._FORWARDED_MAX
    big = [(b"x-big", b"v" * codec._FORWARDED_BYTES)]
    codec._FORWARDED.clear()
    assert codec.end_to_end(big) == big and not codec._FORWARDED


def test_connection_tokens_case_and_spaces():
    assert codec.connection_tokens([(b"connection", b" Close ,X-A,, ")]) == {b"close", b"x-a"}


@pytest.mark.parametrize("host,expected", [
    (b"Example.COM", "example.com"),
    (b"example.com:8443", "example.com"),
    (b"example.com.", "example.com"),
    (b"example.com:", "example.com"),
    (b"192.0.2.1:80", "192.0.2.1"),
    (b"[::1]:443", "[::1]"),
    (b"[2001:DB8::1]", "[2001:db8::1]"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    (b"a%2Db.example", "a%2db.example"),
    (b"", ""),
])
def test_host_name(host, expected):
    assert codec.host_name(host) == expected


@pytest.mark.parametrize("host", [
    b"a<svg/onload=alert(1)>", b'a"b', b"a b", b"example.com:abc", b"example.com:80:80", b"\xff",
    b"user@example.com", b"example.com/x", b"[::1", b"[not-ipv6]", b"[1.2.3.4]", b"[fe80::1%25eth0]",
    b"a%zz",
])
def test_host_name_rejects_what_is_not_host_port(host):
    with pytest.raises(codec.BadRequest):
        codec.host_name(host)


def test_request_facts_rejects_an_invalid_host():
    with pytest.raises(codec.BadRequest):
        codec.request_facts([(b"host", b"a<svg/onload=alert(1)>")])


@pytest.mark.parametrize("method,target,expected", [
    (b"GET", b"/x?y=1", (None, b"/x?y=1")),
    (b"GET", b"http://internal.test/x?y=1", (b"internal.test", b"/x?y=1")),
    (b"GET", b"HTTPS://Internal.Test:8443", (b"Internal.Test:8443", b"/")),
    (b"GET", b"http://internal.test?x=1", (b"internal.test", b"/?x=1")),
    (b"POST", b"http://[::1]:80/p", (b"[::1]:80", b"/p")),
])
def test_origin_form(method, target, expected):
    assert codec.origin_form(method, target) == expected


@pytest.mark.parametrize("method,target", [
    (b"OPTIONS", b"*"), (b"CONNECT", b"internal.test:443"), (b"CONNECT", b"/"),
    (b"GET", b"internal.test/x"), (b"GET", b"ftp://internal.test/"), (b"GET", b"http:///x"),
    (b"GET", b"http://user@internal.test/"), (b"GET", b"http://a<svg>/"), (b"GET", b"http://:80/"),
])
def test_origin_form_refuses_other_targets(method, target):
    with pytest.raises(codec.BadRequest):
        codec.origin_form(method, target)


@pytest.mark.parametrize("connection", [b"Content-Length", b"keep-alive, content-length", b"Transfer-Encoding"])
def test_connection_naming_a_framing_header_is_refused(connection):
    with pytest.raises(codec.BadRequest):
        codec.request_facts([(b"host", b"a"), (b"connection", connection), (b"content-length", b"5")])


def test_redirect_location():
    assert redirect_location(b"a.example.com", b"/x?y=1", 443) == b"https://a.example.com/x?y=1"
    assert redirect_location(b"a.example.com:80", b"/x", 8443) == b"https://a.example.com:8443/x"
    with pytest.raises(codec.BadRequest):
        redirect_location(b"a<svg>", b"/", 443)


# --------------------------------------------------------------------------- routes

def _route(host, prefix="/", to=("10.0.0.1",)):
    return Route(from_url=f"https://{host}{prefix}", scheme="https", host=host, path_prefix=prefix,
                 to=tuple(Upstream("http", h, 80) for h in to))


def test_route_hosts_match_in_file_order_as_in_pomerium():
    exact, wild = _route("a.example.com"), _route("*.example.com")
    assert RouteTable([exact, wild]).match("a.example.com", "/") is exact
    t = RouteTable([wild, exact])
    assert t.match("a.example.com", "/") is wild         # first match in file order wins
    assert t.match("b.example.com", "/") is wild
    assert t.match("x.b.example.com", "/") is wild       # Pomerium's * is (.*): several labels
    assert t.match("example.com", "/") is None
    assert t.match("other.org", "/") is None


def test_route_longest_prefix_whole_segments():
    root, api, apiv2 = _route("h"), _route("h", "/api"), _route("h", "/api/v2")
    t = RouteTable([root, api, apiv2])
    assert t.match("h", "/api") is api
    assert t.match("h", "/api/x") is api
    assert t.match("h", "/api/v2/x") is apiv2
    assert t.match("h", "/apix") is root
    assert t.match("h", "/") is root


def test_route_prefix_without_root_route():
    api = _route("h", "/api")
    t = RouteTable([api])
    assert t.match("h", "/other") is None
    assert t.match("h", "/api/") is api


def test_round_robin_over_upstreams():
    r = _route("h", to=("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    t = RouteTable([r])
    picks = [t.upstream(r).host for _ in range(6)]
    assert picks == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_head_size_limit():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 100 + b"\r\n\r\n"
    codec.check_head_bytes(head, max_size=len(head))
    codec.check_head_bytes(head + b"body bytes after the head do not count", max_size=len(head))
    with pytest.raises(codec.HeadTooLarge) as e:
        codec.check_head_bytes(head, max_size=len(head) - 1)
    assert e.value.status == 431
    with pytest.raises(codec.HeadTooLarge):
        codec.check_head_bytes(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, max_size=100)   # still incomplete


def test_request_facts_one_pass_agrees_with_the_single_lookups():
    headers = [(b"host", b"a.example"), (b"x-forwarded-for", b"1.1.1.1"), (b"connection", b"Upgrade, X-Forwarded-For"),
               (b"upgrade", b"websocket"), (b"host", b"b.example"), (b"x-forwarded-for", b"2.2.2.2"),
               (b"upgrade", b"h2c"), (b"transfer-encoding", b"chunked")]
    facts = codec.request_facts(headers)
    assert facts.host == codec.header_value(headers, b"host") == b"a.example"
    assert facts.tokens == codec.connection_tokens(headers) == {b"upgrade", b"x-forwarded-for"}
    assert facts.upgrade == codec.header_value(headers, b"upgrade") == b"websocket"
    assert facts.forwarded_for == [b"1.1.1.1", b"2.2.2.2"]
    assert facts.chunked
    plain = codec.request_facts([(b"upgrade", b"websocket"), (b"content-length", b"5, 5")])
    assert plain.upgrade is None   # not named in Connection
    assert (plain.host, plain.tokens, plain.forwarded_for, plain.chunked) == (None, set(), [], False)
    for bad in ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
                [(b"content-length", b"5"), (b"content-length", b"6")]):
        with pytest.raises(codec.BadRequest):
            codec.request_facts(bad)


def test_request_facts_answers_the_same_headers_with_the_same_object():
    headers = [(b"host", b"example.com:443"), (b"connection", b"keep-alive, x-a"), (b"x-a", b"1")]
    first = codec.request_facts(headers)
    again = codec.request_facts(list(headers))
    assert again is first and first.shared
    assert first.host_name == "example.com" and first.tokens == {b"keep-alive", b"x-a"}
    other = codec.request_facts(headers + [(b"x-forwarded-for", b"203.0.113.9")])
    assert other is not first and other.forwarded_for == [b"203.0.113.9"]
    big = [(b"host", b"example.com"), (b"cookie", b"c" * 4096)]
    assert not codec.request_facts(big).shared                        # too large to keep
    assert codec.request_facts(big) is not codec.request_facts(big)
    with pytest.raises(codec.BadRequest):                              # errors are never kept
        codec.request_facts([(b"content-length", b"1"), (b"content-length", b"2")])
    with pytest.raises(codec.BadRequest):
        codec.request_facts([(b"content-length", b"1"), (b"content-length", b"2")])


def test_kept_answers_are_bounded_in_pairs_and_unhashable_pairs_still_count():
    many = [(b"host", b"example.com")] + [(b"a", b"")] * 1000   # few bytes, many pairs
    assert not codec.request_facts(many).shared
    unique = (b"b", b"unique-to-this-test")
    codec.end_to_end(many + [unique])
    assert not any(unique in key[0] for key in codec._FORWARDED)   # not kept
    # a generator whose pairs cannot be hashed: the answer still sees every pair
    facts = codec.request_facts([n, v] for n, v in [(b"host", b"h"), (b"transfer-encoding", b"chunked")])
    assert facts.host == b"h" and facts.chunked and not facts.shared
    out = codec.end_to_end([n, v] for n, v in [(b"x-a", b"1"), (b"connection", b"close")])
    assert [n for n, _ in out] == [b"x-a"]
