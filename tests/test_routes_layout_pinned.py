"""Route matching, the storage layout and the retry cap, pinned where the other tests left a rule
free to change (found by scripts/mutation.sh)."""
from __future__ import annotations

import random

import pytest

from proxy.autocert import layout
from proxy.autocert.schedule import retry_delay
from proxy.config import Route, Upstream
from proxy.http.routes import RouteTable, request_port, upgrade_allowed

ISSUER = "127.0.0.1-14000-dir"


def route(host: str, from_path: str = "/", to: tuple[str, ...] = ("10.0.0.1",), **rules) -> Route:
    return Route(from_url=f"https://{host}{from_path}", scheme="https", host=host, path_prefix=from_path,
                 to=tuple(Upstream("http", h, 80) for h in to), **rules)


def test_the_root_route_takes_every_target_even_asterisk():
    root = route("h")
    t = RouteTable([root])
    for path in ("/", "/x/y", "*", "?q", ""):
        assert t.match("h", path) is root, path


def test_a_prefix_with_a_trailing_slash_matches_below_it_only():
    api = route("h", "/api/")
    t = RouteTable([api])
    assert t.match("h", "/api/") is api
    assert t.match("h", "/api/x") is api
    assert t.match("h", "/api/?q") is api
    assert t.match("h", "/api") is None
    assert t.match("h", "/apix") is None


def test_a_prefix_matches_its_own_query():
    api = route("h", "/api")
    t = RouteTable([api])
    assert t.match("h", "/api?x=1") is api
    assert t.match("h", "/api#f") is None
    assert t.match("h", "/apix?x=1") is None


def test_a_name_without_a_dot_has_no_wildcard_parent():
    t = RouteTable([route("*.test"), route("localhost")])
    assert t.match("test", "/") is None
    assert t.match("localhost", "/").host == "localhost"
    assert t.match("a.test", "/").host == "*.test"


def test_upstreams_one_two_and_each_route_its_own_turn():
    one, two = route("a", to=("10.0.0.1",)), route("b", to=("10.0.0.1", "10.0.0.2"))
    t = RouteTable([one, two])
    assert [t.upstream(one).host for _ in range(3)] == ["10.0.0.1"] * 3
    assert [t.upstream(two).host for _ in range(4)] == ["10.0.0.1", "10.0.0.2"] * 2
    three = route("c", to=("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    t = RouteTable([three, two])
    assert [t.upstream(three).host, t.upstream(two).host, t.upstream(three).host] == \
        ["10.0.0.1", "10.0.0.1", "10.0.0.2"]


def test_hosts_lists_each_host_once_exact_names_first():
    t = RouteTable([route("*.c"), route("b"), route("a"), route("b", "/x"), route("*.c", "/y")])
    assert t.hosts() == ["b", "a", "*.c"]
    assert RouteTable([]).hosts() == []


def test_a_route_with_a_port_matches_requests_to_that_port_only():
    ported = route("h", port=8443)
    t = RouteTable([ported], port=8443)
    assert t.match("h", "/", b"h:8443") is ported
    assert t.match("h", "*", b"h:8443") is ported          # ported routes take the path through the rules
    assert t.match("h", "/", b"h:443") is None
    assert t.match("h", "/", None) is ported                # no port in Host: the listener's
    assert t.match("h", "/", b"h") is ported
    assert RouteTable([ported]).match("h", "/") is None     # the listener's default port is 443
    t443 = RouteTable([route("h", port=443)])
    assert t443.match("h", "/") is not None and t443.match("h", "/", b"h:443") is not None
    # without a ported route the Host header's port does not matter
    plain = route("h")
    assert RouteTable([plain], port=8443).match("h", "/", b"h:1") is plain


def test_the_port_of_a_host_header():
    for authority, port in [(b"h:8443", 8443), (b"h", 7), (b"h:", 7), (b"h:x", 7), (b"8443", 7), (None, 7),
                            (b"", 7), (b"[::1]:8443", 8443), (b"[::1]", 7), (b"[::1:8443]", 7),
                            (b"a:b:8443", 8443), (b"h:80", 80)]:
        assert request_port(authority, 7) == port, authority


def test_pomeriums_path_rules():
    pre, exact, rx = route("h", prefix="/a"), route("p", path="/a"), route("r", regex="/a/[0-9]+")
    t = RouteTable([pre, exact, rx])
    assert t.match("h", "/ab") is pre and t.match("h", "/a/b") is pre and t.match("h", "/b") is None
    assert t.match("p", "/a") is exact and t.match("p", "/a/") is None and t.match("p", "/ab") is None
    assert t.match("r", "/a/12") is rx and t.match("r", "/a/12x") is None and t.match("r", "/b/a/1") is None


def test_a_higher_regex_priority_is_tried_first():
    low, high = route("h", regex="/a.*"), route("h", regex="/ab.*", regex_priority_order=5)
    t = RouteTable([low, high])
    assert t.match("h", "/abc") is high
    assert t.match("h", "/ac") is low
    neg = route("h", regex="/a.*", regex_priority_order=-1)
    zero = route("h", regex="/a.*")
    assert RouteTable([neg, zero]).match("h", "/a") is zero          # file order only among equals


def test_an_exact_host_falls_back_to_wildcards_in_file_order():
    exact, wild = route("a.test", path="/x"), route("*.test")
    t = RouteTable([exact, wild])
    assert t.match("a.test", "/x") is exact
    assert t.match("a.test", "/y") is wild
    assert t.match("b.c.test", "/y") is wild                 # '*' stands for one or more characters
    mid = route("api.*.example.com")
    assert RouteTable([mid]).match("api.eu.example.com", "/") is mid
    assert RouteTable([mid]).match("api..example.com", "/") is None      # not zero characters
    assert RouteTable([mid]).match("web.eu.example.com", "/") is None


def test_upgrades_only_where_the_route_allows_them():
    ws = route("h", upgrades=frozenset({"websocket"}))
    assert upgrade_allowed(ws, b" WebSocket ") is True
    assert upgrade_allowed(ws, b"h2c") is False
    assert upgrade_allowed(route("h"), b"websocket") is False
    assert upgrade_allowed(route("h", upgrades=frozenset({"*"})), b"h2c") is True


def test_account_folders_are_certmagics_for_any_email():
    # certmagic's StorageKeys.Safe keeps ASCII word characters only (Go's \w), so a
    # non-ASCII address maps to the folder Caddy and Pomerium use for it
    assert layout.account_key_key(ISSUER, "Jürgen@Example.com") == f"acme/{ISSUER}/users/jrgen@example.com/jrgen.key"
    assert layout.account_reg_key(ISSUER, "Straße@Example.com") == f"acme/{ISSUER}/users/strae@example.com/strae.json"
    assert layout.cert_key(ISSUER, "bücher.example") == f"certificates/{ISSUER}/bcher.example/bcher.example.crt"
    # the local part ends at the first "@" (certmagic's strings.Index)
    assert layout.account_key_key(ISSUER, "a@b@example.com") == f"acme/{ISSUER}/users/a@b@example.com/a.key"
    # an address with nothing before its "@" still gets a file of its own
    assert layout.account_key_key(ISSUER, "@example.com") == f"acme/{ISSUER}/users/@example.com/default.key"
    assert layout.account_reg_key(ISSUER, "  ") == f"acme/{ISSUER}/users/default/default.json"


class Fixed(random.Random):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_the_cap_holds_below_one_second_too():
    # jitter above a sub-second cap is cut at the cap, as it is at six hours
    assert retry_delay(1, base=0.25, cap=0.5, rng=Fixed(0.999)) == pytest.approx(0.25 * 1.1996)
    assert retry_delay(3, base=0.25, cap=0.5, rng=Fixed(0.999)) == 0.5
    assert retry_delay(3, base=0.25, cap=0.5, retry_after=0.75, rng=Fixed(0.0)) == 0.75
