"""The configuration's parsers word for word: every refusal's whole message (what a user reads
in --check), the edges of each accepted range, and that one bad entry in a list does not hide the
ones after it. Pinned where scripts/mutation.sh found a message or an edge free to change."""
from __future__ import annotations

import base64
import datetime as dt

import pytest

from proxy.config import (_Bad, _parse_response, normalize_hostname, normalize_mac_key, parse_address,
                          parse_autocert_dir, parse_certificates, parse_choice, parse_from_url,
                          parse_routes, parse_trusted_ca_base64, parse_upstream, DirectResponse, Upstream)

ADDRESS = 'accepted: "host:port", ":port" or "[ipv6]:port", e.g. ":443", "127.0.0.1:8080", "[::1]:443"'
MAC = "accepted: base64url text (A-Z a-z 0-9 - _), as the CA gave it"
L63 = "a" * 63


def refusal(parse, *args, **kwargs) -> str:
    with pytest.raises(_Bad) as e:
        parse(*args, **kwargs)
    return str(e.value)


# ----------------------------------------------------------------------------- host names

def test_host_names_up_to_253_characters():
    longest = ".".join([L63] * 3) + "." + "a" * 61
    assert len(longest) == 253 and normalize_hostname(longest, allow_wildcard=False) == longest
    assert refusal(normalize_hostname, longest + "a", allow_wildcard=False) == \
        f"host '{longest}a' is not a valid DNS name"
    assert refusal(normalize_hostname, "a" * 64 + ".test", allow_wildcard=False) == \
        f"host '{'a' * 64}.test' is not a valid DNS name"


@pytest.mark.parametrize("host,message", [
    ("", "has no host"),
    ("*.a.test", "host '*.a.test' may not be a wildcard here"),
    ("a.*.test", "host 'a.*.test' may not be a wildcard here"),
    ("ex ample.test", "host 'ex ample.test' is not a valid DNS name"),
    ("a..b", "host 'a..b' is not a valid DNS name"),
    ("-a.test", "host '-a.test' is not a valid DNS name"),
    ("\udcff.test", "host '\\udcff.test' is not a valid international domain name (encoding with 'idna' "
                    "codec failed (UnicodeError: Invalid character '\\udcff'))"),
])
def test_host_names_refused(host, message):
    assert refusal(normalize_hostname, host, allow_wildcard=False) == message


def test_host_names_accepted():
    assert normalize_hostname("A.Test.", allow_wildcard=False) == "a.test"
    assert normalize_hostname("bücher.test", allow_wildcard=False) == "xn--bcher-kva.test"
    assert normalize_hostname("::1", allow_wildcard=False) == "::1"
    assert normalize_hostname("*.A.test.", allow_wildcard=True) == "*.a.test"
    assert normalize_hostname("a.*.test", allow_wildcard=True) == "a.*.test"     # Pomerium's '*' anywhere
    assert refusal(normalize_hostname, "*.Bücher.test", allow_wildcard=True) == \
        "host '*.bücher.test': a wildcard host must be written in ASCII (punycode)"
    assert refusal(normalize_hostname, "*.-a.test", allow_wildcard=True) == "host '*.-a.test' is not a valid DNS name"


# ----------------------------------------------------------------------------- addresses

@pytest.mark.parametrize("value,message", [
    (443, f"443 is not an address (quote it in YAML); {ADDRESS}"),
    ("h", f"'h' has no port; {ADDRESS}"),
    ("::1:443", f"'::1:443': an IPv6 host needs brackets; {ADDRESS}"),
    ("*.a.test:443", f"'*.a.test:443': host '*.a.test' may not be a wildcard here; {ADDRESS}"),
    ("bad host:443", f"'bad host:443': host 'bad host' is not a valid DNS name; {ADDRESS}"),
    ("[::1]443", f"'[::1]443' is not an address; {ADDRESS}"),
    ("[zz]:443", f"'[zz]:443': 'zz' is not an IPv6 address; {ADDRESS}"),
    ("h:0", f"'h:0': port '0' is not a number from 1 to 65535; {ADDRESS}"),
])
def test_addresses_refused(value, message):
    assert refusal(parse_address, value) == message


# ----------------------------------------------------------------------------- route URLs

@pytest.mark.parametrize("value,message", [
    (1, '1 is not a string; expected a URL like "https://app.example.com" or "https://*.example.com/api"'),
    ("ftp://a.test", "'ftp://a.test': scheme 'ftp' is not accepted; accepted: https, http"),
    ("https://u@a.test", "'https://u@a.test' has user information; remove the part before '@'"),
    ("https://a.test?x", "'https://a.test?x' has a query or fragment; from takes no '?' or '#'"),
    ("https://a.test?", "'https://a.test?' has a query or fragment; from takes no '?' or '#'"),
    ("https://a.test? ", "'https://a.test? ' has a query or fragment; from takes no '?' or '#'"),
    ("https://a.test#", "'https://a.test#' has a query or fragment; from takes no '?' or '#'"),
    ("https://", "'https://' has no host; expected e.g. https://app.example.com"),
    ("https://a.test:99999", "'https://a.test:99999' is not a valid URL (Port out of range 0-65535)"),
])
def test_route_from_refused(value, message):
    assert refusal(parse_from_url, value) == message


@pytest.mark.parametrize("value,message", [
    (1, '1 is not a string; expected an upstream URL like "http://127.0.0.1:8080"'),
    ("http://", "'http://' has no host; expected e.g. http://127.0.0.1:8080"),
    ("http://a.test?", "'http://a.test?' has a query or fragment; to takes no '?' or '#'"),
    ("http://a.test# ", "'http://a.test# ' has a query or fragment; to takes no '?' or '#'"),
    ("http://*.a.test", "host '*.a.test' may not be a wildcard here"),
    ("http://a.test/x", "'http://a.test/x' has a path; upstream paths are not supported (requests keep "
                        "their own path), accepted: http://host[:port]"),
    ("ftp://a", "'ftp://a': scheme 'ftp' is not accepted; accepted: http://host[:port]"),
    ("https://a", "'https://a': https upstreams are not supported yet; accepted: http://host[:port]"),
])
def test_upstreams_refused(value, message):
    assert refusal(parse_upstream, value) == message


def test_routes_after_a_bad_one_are_still_read():
    problems: list[str] = []
    routes = parse_routes([
        "not a mapping",
        {"from": "https://a.test", "to": "http://127.0.0.1:1"},
        {"from": "https://a.test", "to": "http://127.0.0.1:2"},            # Pomerium: the first wins
        {"from": "https://b.test", "to": "ftp://127.0.0.1:3"},             # bad upstream
        {"to": "http://127.0.0.1:4"},                                      # no from
        {"from": "https://c.test"},                                        # neither to nor response
        {"from": "https://d.test", "to": "http://127.0.0.1:5", "response": {"status": 200}},
        {"from": "https://e.test", "response": {"status": 204}},
    ], "routes", problems)
    assert [(r.host, r.to, r.response) for r in routes] == [
        ("a.test", (Upstream("http", "127.0.0.1", 1),), None),
        ("a.test", (Upstream("http", "127.0.0.1", 2),), None),
        ("e.test", (), DirectResponse(204, ""))]
    assert problems == [
        "routes[0]: expected a mapping with 'from' and 'to' or 'response', got 'not a mapping'",
        "routes[3].to: 'ftp://127.0.0.1:3': scheme 'ftp' is not accepted; accepted: http://host[:port]",
        'routes[4].from: missing; expected a URL like "https://app.example.com"',
        "routes[5]: give exactly one of 'to' (upstream URL or list of URLs) or 'response' "
        "({status, body}); got neither",
        "routes[6]: give exactly one of 'to' (upstream URL or list of URLs) or 'response' "
        "({status, body}); got both",
    ]


def test_pomerium_route_rules_word_for_word():
    problems: list[str] = []
    to = "http://127.0.0.1:1"
    routes = parse_routes([
        {"from": "https://a.test", "to": to, "prefix": "/a", "path": "/b"},
        {"from": "https://a.test/x", "to": to, "prefix": "/a"},
        {"from": "https://a.test/y", "to": to, "path": "/a"},
        {"from": "https://a.test/z", "to": to, "regex": "/a"},
        {"from": "https://b.test/api", "to": to},
        {"from": "https://b.test/api", "to": to},
        {"from": "https://c.test", "to": to, "prefix": "api"},
        {"from": "https://c.test", "to": to, "path": ""},
        {"from": "https://d.test", "to": to, "regex": ".*x", "regex_priority_order": 2},
        {"from": "https://e.test", "to": to, "allow_websockets": True, "allow_spdy": "true"},
        {"from": "https://f.test", "to": to, "allow_upgrades": 1, "allow_spdy": False},
        {"from": "https://g.test", "to": to, "regex": "(?=x)"},
        {"from": "https://g.test", "to": to, "regex_priority_order": "1", "allow_websockets": "maybe"},
    ], "routes", problems)
    assert [(r.host, r.path_prefix, r.regex, r.regex_priority_order, sorted(r.upgrades)) for r in routes] == [
        ("b.test", "/api", None, 0, []),
        ("d.test", "/", ".*x", 2, []),                       # a regex need not start with '/'
        ("e.test", "/", None, 0, ["spdy/3.1", "websocket"]),
        ("f.test", "/", None, 0, ["*"]),
    ]
    own_form = "is this proxy's own form; with 'prefix', 'path' or 'regex' give the path there only"
    assert problems == [
        "routes[0]: give at most one of 'prefix', 'path', 'regex'; got prefix, path",
        f"routes[1].from: a path in 'from' ('/x') {own_form}",
        f"routes[2].from: a path in 'from' ('/y') {own_form}",
        f"routes[3].from: a path in 'from' ('/z') {own_form}",
        "routes[5].from: 'https://b.test/api' duplicates routes[4] (same host 'b.test' and path '/api')",
        "routes[6].prefix: 'api' must start with '/'",
        'routes[7].path: expected a non-empty string like "/api", got \'\'',
        "routes[11].regex: '(?=x)' uses a lookaround or backreference, which RE2 (Pomerium's regex "
        "syntax) does not accept",
        "routes[12].regex_priority_order: expected a whole number, got '1'",
        "routes[12].allow_websockets: 'maybe' is not a boolean; accepted: true, TRUE, True, 1, t, T, "
        "false, FALSE, False, 0, f, F",
    ]


# ----------------------------------------------------------------------------- direct responses

@pytest.mark.parametrize("value,expected", [
    ({"status": 100}, DirectResponse(100, "")),
    ({"status": 599, "body": "x"}, DirectResponse(599, "x")),
    ({"status": 200, "body": None}, DirectResponse(200, "")),
])
def test_responses_accepted(value, expected):
    problems: list[str] = []
    assert _parse_response(value, "r", problems) == expected
    assert problems == []


@pytest.mark.parametrize("value,message", [
    ({"status": 99}, "r.status: 99 is not accepted; accepted: an integer from 100 to 599"),
    ({"status": 600}, "r.status: 600 is not accepted; accepted: an integer from 100 to 599"),
    ({"status": "200"}, "r.status: '200' is not accepted; accepted: an integer from 100 to 599"),
    ({"status": True}, "r.status: True is not accepted; accepted: an integer from 100 to 599"),
    ({"body": "b"}, "r.status: None is not accepted; accepted: an integer from 100 to 599"),
    ({"status": 200, "body": 5}, "r.body: 5 is not a string; quote it in YAML"),
    ("x", "r: expected a mapping like {status: 200, body: \"ok\"}, got 'x'"),
])
def test_responses_refused(value, message):
    problems: list[str] = []
    assert _parse_response(value, "r", problems) is None
    assert problems == [message]


# ----------------------------------------------------------------------------- certificates

def test_certificates_after_a_bad_entry_are_still_read(tmp_path, ca):
    good = ca.issue(["good.test"])
    now = dt.datetime.now(dt.timezone.utc)
    old = ca.issue(["old.test"], not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    problems: list[str] = []
    warnings: list[str] = []
    pairs = parse_certificates([
        "not a mapping",
        {"cert": str(good.cert_path)},
        {"cert": str(good.cert_path), "key": str(good.key_path)},
        {"cert": str(old.cert_path), "key": str(old.key_path)},
    ], "certificates", str(tmp_path), problems, warnings)
    assert [p.origin for p in pairs] == [str(good.cert_path), str(old.cert_path)]
    assert problems == [
        "certificates[0]: expected a mapping with 'cert' and 'key', got 'not a mapping'",
        "certificates[1].key: missing; expected a file path or inline PEM text",
    ]
    assert len(warnings) == 1 and warnings[0].startswith(f"certificates[3].cert: certificate from {old.cert_path} expired on ")
    not_a_list: list[str] = []
    assert parse_certificates({"cert": "x"}, "certificates", str(tmp_path), not_a_list, []) == []
    assert not_a_list == ["certificates: expected a list like [{cert: cert.pem, key: key.pem}], "
                          "got {'cert': 'x'}"]


def test_certificates_match_keys_cheaply_unless_told_to_load_them(tmp_path, ca):
    from tests.test_keymatch import corrupt_private_part
    a = ca.issue(["a.test"])
    bad = tmp_path / "bad.key"
    bad.write_bytes(corrupt_private_part(a.key_pem))
    entry = [{"cert": str(a.cert_path), "key": str(bad)}]
    problems: list[str] = []
    assert len(parse_certificates(entry, "certificates", str(tmp_path), problems, [])) == 1
    assert problems == []
    assert parse_certificates(entry, "certificates", str(tmp_path), problems, [], full_key_check=True) == []
    assert len(problems) == 1 and "private key that can be parsed" in problems[0]


# ----------------------------------------------------------------------------- autocert values

@pytest.mark.parametrize("value,expected", [("abcd", "abcd"), ("  abcd  ", "abcd"), ("abc==", "abc"),
                                            ("abcX", "abcX"), ("ab", "ab"), ("abcdef", "abcdef"),
                                            ("abcdefghij", "abcdefghij"), ("a-_b", "a-_b")])
def test_mac_keys_accepted(value, expected):
    assert normalize_mac_key(value) == expected


@pytest.mark.parametrize("value,message", [
    (5, "5 is not a string; expected base64url text"),
    ("A", f"value of length 1 does not decode as base64url; {MAC}"),
    ("AAAAA", f"value of length 5 does not decode as base64url; {MAC}"),
    ("ab+c", f"value of length 4 is not base64url (it has characters outside A-Z a-z 0-9 - _ ; '+' and '/' "
             f"belong to standard base64); {MAC}"),
])
def test_mac_keys_refused(value, message):
    assert refusal(normalize_mac_key, value) == message


def test_trusted_ca_base64(ca):
    pem = ca.cert_pem
    assert parse_trusted_ca_base64(base64.b64encode(pem).decode()) == pem
    assert parse_trusted_ca_base64(base64.encodebytes(pem).decode()) == pem      # lines wrapped
    assert refusal(parse_trusted_ca_base64, 5) == "5 is not a string; expected base64 of a PEM bundle"
    assert refusal(parse_trusted_ca_base64, pem.decode()) == (
        "holds PEM text; this key takes the PEM bundle base64-encoded "
        "(or put the file's path in autocert_trusted_ca_file)")
    text = base64.b64encode(pem).decode()
    assert refusal(parse_trusted_ca_base64, text[:8] + "!" + text[8:]) == \
        f"value of length {len(text) + 1} is not base64; accepted: base64 of a PEM bundle"
    assert refusal(parse_trusted_ca_base64, base64.b64encode(b"not pem").decode()).startswith(
        "the decoded value holds no PEM certificate that can be parsed (")


def test_autocert_dir_values(tmp_path, monkeypatch):
    accepted = ("a directory path, s3://BUCKET/PREFIX, s3://BUCKET.s3.REGION.amazonaws.com/PREFIX "
                "or gs://BUCKET/PREFIX")
    monkeypatch.setenv("HOME", "/home/u")
    assert parse_autocert_dir("s3://bkt/p", "/base") == "s3://bkt/p"
    assert parse_autocert_dir("gs://bkt/p", "/base") == "gs://bkt/p"
    assert parse_autocert_dir("/abs/dir", "/base") == "/abs/dir"
    assert parse_autocert_dir(" rel/dir ", "/base") == "/base/rel/dir"
    assert parse_autocert_dir("~/dir", "/base") == "/home/u/dir"
    assert refusal(parse_autocert_dir, 5, "/base") == f"5 is not a string; expected {accepted}"
    assert refusal(parse_autocert_dir, "ftp://x", "/base") == f"'ftp://x': unknown scheme 'ftp'; accepted: {accepted}"
    # as written, not as resolved against /base: a mistyped URL is no directory
    assert refusal(parse_autocert_dir, "s3:/bkt", "/base") == \
        f"'s3:/bkt': a storage URL needs '://' after its scheme; accepted: {accepted}"


def test_choices():
    levels = ("debug", "info", "warning", "error")
    assert parse_choice(" WARN ", levels, {"warn": "warning"}) == "warning"
    assert parse_choice("Info", levels) == "info"
    assert refusal(parse_choice, "warn", levels) == "'warn' is not accepted; accepted: debug, info, warning, error"
    assert refusal(parse_choice, 5, levels) == "5 is not accepted; accepted: debug, info, warning, error"
