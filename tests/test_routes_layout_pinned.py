"""Route matching, the storage layout and the retry cap, pinned where the other tests left a rule
free to change (found by scripts/mutation.sh)."""
from __future__ import annotations

import random

import pytest

from proxy.autocert import layout
from proxy.autocert.schedule import retry_delay
from proxy.config import Route, Upstream
from proxy.http.routes import RouteTable

ISSUER = "127.0.0.1-14000-dir"


def route(host: str, prefix: str = "/", to: tuple[str, ...] = ("10.0.0.1",)) -> Route:
    return Route(from_url=f"https://{host}{prefix}", scheme="https", host=host, path_prefix=prefix,
                 to=tuple(Upstream("http", h, 80) for h in to))


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


def test_hosts_lists_each_host_once_in_order():
    t = RouteTable([route("b"), route("a"), route("b", "/x"), route("*.c")])
    assert t.hosts() == ["b", "a", "*.c"]
    assert RouteTable([]).hosts() == []


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
