"""Pure parts of autocert: renewal/retry schedule, storage layout, wanted names, ClientHello facts."""
from __future__ import annotations

import datetime as dt
import random
import ssl
from pathlib import Path

import pytest
import yaml

from proxy.autocert import layout
from proxy.autocert.challenges import HTTP_01, TLS_ALPN_01, preferred_challenge_types
from proxy.autocert.issuer import issuer_id
from proxy.autocert.manager import NameState, wanted_names
from proxy.autocert.schedule import (DEFAULT_RETRY_CAP, next_ari_poll, plan_renewal, renewal_time,
                                     retry_delay, window_point)
from proxy.config import load_config
from proxy.tls.certcache import MANUAL, Certificate, CertificateCache
from proxy.tls.clienthello import parse_client_hello
from tests.infra.pki import TestCA

UTC = dt.timezone.utc
T0 = dt.datetime(2030, 1, 1, tzinfo=UTC)


class FixedRandom(random.Random):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


# ------------------------------------------------------------------------------ challenge order
@pytest.mark.parametrize("tls_port, http_port, expected", [
    (443, None, (TLS_ALPN_01,)),                 # no HTTP listener: TLS-ALPN-01 only
    (8443, None, (TLS_ALPN_01,)),
    (443, 80, (TLS_ALPN_01, HTTP_01)),           # both possible
    (8443, 80, (HTTP_01, TLS_ALPN_01)),          # only :80 reachable: HTTP-01 first
    (443, 8080, (TLS_ALPN_01, HTTP_01)),         # only :443: TLS-ALPN-01 first
    (8443, 8080, (TLS_ALPN_01, HTTP_01)),        # both remapped: both still tried
])
def test_challenge_types_follow_the_listeners_ports(tls_port, http_port, expected):
    assert preferred_challenge_types(tls_port, http_port) == expected


# ------------------------------------------------------------------------------ schedule
def test_renewal_in_last_third_without_ari():
    assert renewal_time(T0, T0 + dt.timedelta(days=90)) == T0 + dt.timedelta(days=60)
    assert renewal_time(T0, T0 + dt.timedelta(days=10)) == T0 + dt.timedelta(days=10) * 2 / 3


def test_renewal_at_half_the_lifetime_under_ten_days():
    assert renewal_time(T0, T0 + dt.timedelta(days=3)) == T0 + dt.timedelta(days=1.5)
    six = plan_renewal(T0, T0 + dt.timedelta(days=6), now=T0)
    assert six.at == T0 + dt.timedelta(days=3)
    assert six.source == "lifetime: half left (lifetime under 10 days)"
    assert plan_renewal(T0, T0 + dt.timedelta(days=45), now=T0).source == "lifetime: a third left"
    # Caddy's acme_server: 12 hours
    assert plan_renewal(T0, T0 + dt.timedelta(hours=12), now=T0).at == T0 + dt.timedelta(hours=6)


@pytest.mark.parametrize("window", [None, "lets-encrypt"])
def test_six_day_certificates_renew_with_days_to_spare_under_the_default_check_interval(window):
    """Checks every 60 s (the default): the first check at or after the renewal time orders.
    Let's Encrypt's window for short-lived certificates: 2 % of the lifetime wide, centred at
    half of it."""
    nb, na = T0 - dt.timedelta(hours=1), T0 + dt.timedelta(days=6) - dt.timedelta(hours=1)
    lifetime = na - nb
    ari = None
    if window:
        mid = nb + lifetime / 2
        ari = (mid - lifetime * 0.01, mid + lifetime * 0.01)
    check = dt.timedelta(seconds=60)
    now = T0
    while now < plan_renewal(nb, na, ari, now=now, point=window_point(12345)).at:
        now += check
    assert na - now > dt.timedelta(days=2, hours=20)


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
def test_renewal_inside_the_ari_window(r):
    start, end = T0 + dt.timedelta(days=10), T0 + dt.timedelta(days=12)
    t = renewal_time(T0, T0 + dt.timedelta(days=90), (start, end), rng=FixedRandom(r))
    assert start <= t < end
    assert t == start + (end - start) * r
    plan = plan_renewal(T0, T0 + dt.timedelta(days=90), (start, end), now=T0, point=r)
    assert plan.at == t and plan.source == "ARI window"


def test_renewal_ari_window_wins_even_when_later_than_last_third():
    start = T0 + dt.timedelta(days=80)
    t = renewal_time(T0, T0 + dt.timedelta(days=90), (start, start + dt.timedelta(hours=1)), rng=FixedRandom(0))
    assert t == start


def test_renewal_degenerate_ari_window_is_its_start():
    start = T0 + dt.timedelta(days=5)
    assert renewal_time(T0, T0 + dt.timedelta(days=90), (start, start)) == start


def test_absurd_ari_windows_fall_back_to_the_lifetime():
    nb, na = T0, T0 + dt.timedelta(days=90)
    third = T0 + dt.timedelta(days=60)
    backwards = plan_renewal(nb, na, (T0 + dt.timedelta(days=5), T0 + dt.timedelta(days=4)), now=T0)
    assert backwards.at == third and "ends before it starts" in backwards.source
    # a window at (or after) expiry would let the certificate lapse
    late = plan_renewal(nb, na, (na - dt.timedelta(days=1), na + dt.timedelta(days=30)), now=T0)
    assert late.at == third and "too close to expiry" in late.source
    # a window reaching past 90 % of the lifetime is cut there
    wide = plan_renewal(nb, na, (T0 + dt.timedelta(days=70), T0 + dt.timedelta(days=400)), now=T0, point=0.999)
    assert T0 + dt.timedelta(days=70) <= wide.at <= T0 + dt.timedelta(days=81)


def test_ari_window_in_the_past_renews_now_once_the_certificate_is_not_brand_new():
    nb, na = T0, T0 + dt.timedelta(days=90)
    now = T0 + dt.timedelta(days=20)
    past = (T0 + dt.timedelta(days=10), T0 + dt.timedelta(days=11))
    plan = plan_renewal(nb, na, past, now=now, point=0.7)
    assert plan.at <= now and "already over: renew now" in plan.source
    # a certificate an hour old is held until a tenth of its lifetime (at most a day) has passed
    young = plan_renewal(nb, na, (T0 - dt.timedelta(days=2), T0 - dt.timedelta(days=1)),
                         now=T0 + dt.timedelta(hours=1))
    assert young.at == T0 + dt.timedelta(days=1) and "held" in young.source
    six = plan_renewal(nb, nb + dt.timedelta(days=6), (nb - dt.timedelta(hours=2), nb - dt.timedelta(hours=1)),
                       now=nb + dt.timedelta(hours=1))
    assert six.at == nb + dt.timedelta(days=6) * 0.1


@pytest.mark.parametrize("lifetime", [dt.timedelta(days=6), dt.timedelta(days=90)])
def test_a_ca_that_always_says_renew_now_cannot_drive_a_reissue_loop(lifetime):
    """cert-manager #8993: a window in the past applied to every new certificate (there, a stale
    one; Let's Encrypt back-dates notBefore by an hour, which defeated its guard) re-issued five
    certificates in ten seconds. Here: a CA whose every answer is a window that ended an hour
    ago; a week of checks every 60 s; each renewal gives a certificate back-dated an hour."""
    backdate = dt.timedelta(hours=1)
    now = T0
    nb = now - backdate
    renewals = 0
    while now < T0 + dt.timedelta(days=7):
        window = (now - dt.timedelta(hours=2), now - dt.timedelta(hours=1))
        if now >= plan_renewal(nb, nb + lifetime, window, now=now).at:
            renewals += 1
            nb = now - backdate
        now += dt.timedelta(seconds=60)
    min_age = min(lifetime * 0.1, dt.timedelta(days=1)) - backdate
    assert 0 < renewals <= dt.timedelta(days=7) / min_age + 1
    assert renewals <= (12 if lifetime.days == 6 else 7)


def test_ari_polled_at_least_twice_a_day_and_retry_after_honoured():
    assert next_ari_poll(T0) == T0 + dt.timedelta(hours=6)
    assert next_ari_poll(T0, retry_after=3600) == T0 + dt.timedelta(hours=1)
    assert next_ari_poll(T0, retry_after=0) == T0 + dt.timedelta(minutes=1)         # never a tight loop
    assert next_ari_poll(T0, retry_after=3 * 86400) == T0 + dt.timedelta(hours=12)  # twice a day
    assert next_ari_poll(T0, failed=True) == T0 + dt.timedelta(hours=1)
    assert next_ari_poll(T0, retry_after=7200, failed=True) == T0 + dt.timedelta(hours=2)


def test_window_point_is_fixed_per_certificate_and_spread():
    assert window_point(1234567) == window_point(1234567)
    points = [window_point(s) for s in range(1000, 1200)]
    assert all(0 <= p < 1 for p in points)
    assert min(points) < 0.1 and max(points) > 0.9


def test_retry_delay_doubles_from_base_with_bounded_jitter():
    for failures in range(1, 8):
        lo = retry_delay(failures, base=60, rng=FixedRandom(0.0))
        hi = retry_delay(failures, base=60, rng=FixedRandom(0.999999))
        mid = retry_delay(failures, base=60, rng=FixedRandom(0.5))
        expect = 60 * 2 ** (failures - 1)
        assert mid == pytest.approx(expect)
        assert lo == pytest.approx(expect * 0.8)
        assert hi == pytest.approx(expect * 1.2, rel=1e-5)


def test_retry_delay_jitter_spreads_instances():
    rng = random.Random(7)
    values = {round(retry_delay(1, base=60, rng=rng), 3) for _ in range(50)}
    assert len(values) > 40
    assert all(48 <= v <= 72 for v in values)


def test_retry_delay_is_capped_at_six_hours():
    assert DEFAULT_RETRY_CAP == 6 * 3600
    for failures in (12, 30, 1000):
        for r in (0.0, 0.5, 0.99):
            assert retry_delay(failures, base=60, rng=FixedRandom(r)) <= DEFAULT_RETRY_CAP
    assert retry_delay(1000, base=60, rng=FixedRandom(0.5)) == DEFAULT_RETRY_CAP


def test_retry_delay_honors_retry_after():
    assert retry_delay(1, base=60, retry_after=3600, rng=FixedRandom(0.5)) == 3600
    # a short Retry-After never shortens our own backoff
    assert retry_delay(3, base=60, retry_after=5, rng=FixedRandom(0.5)) == pytest.approx(240)
    # the CA's word beyond our cap still counts (rate limits can be a week)
    week = 7 * 24 * 3600.0
    assert retry_delay(1, base=60, retry_after=week, rng=FixedRandom(0.5)) == week


def test_retry_delay_small_base_for_tests():
    assert retry_delay(1, base=1, rng=FixedRandom(0.5)) == pytest.approx(1)
    assert retry_delay(4, base=1, rng=FixedRandom(0.5)) == pytest.approx(8)


# ------------------------------------------------------------------------------ layout
def test_issuer_ids_match_certmagic():
    assert issuer_id("https://acme-v02.api.letsencrypt.org/directory") == "acme-v02.api.letsencrypt.org-directory"
    assert issuer_id("https://acme-staging-v02.api.letsencrypt.org/directory") == \
        "acme-staging-v02.api.letsencrypt.org-directory"
    assert issuer_id("https://127.0.0.1:14000/dir") == "127.0.0.1-14000-dir"


def test_certificate_keys_follow_certmagic_layout():
    iss = "acme-v02.api.letsencrypt.org-directory"
    assert layout.cert_key(iss, "example.com") == f"certificates/{iss}/example.com/example.com.crt"
    assert layout.private_key_key(iss, "example.com") == f"certificates/{iss}/example.com/example.com.key"
    assert layout.meta_key(iss, "example.com") == f"certificates/{iss}/example.com/example.com.json"
    # certmagic's safe names: wildcard and case
    assert layout.cert_key(iss, "*.Example.com") == \
        f"certificates/{iss}/wildcard_.example.com/wildcard_.example.com.crt"


def test_account_keys_per_ca_and_email():
    iss = "127.0.0.1-14000-dir"
    assert layout.account_key_key(iss, "") == f"acme/{iss}/users/default/default.key"
    assert layout.account_reg_key(iss, "") == f"acme/{iss}/users/default/default.json"
    assert layout.account_key_key(iss, "Ops@Example.com") == f"acme/{iss}/users/ops@example.com/ops.key"
    assert layout.account_reg_key(iss, " ops@example.com ") == f"acme/{iss}/users/ops@example.com/ops.json"
    # staging and production never share an account
    assert layout.account_key_key("a-directory", "x@y.z") != layout.account_key_key("b-directory", "x@y.z")


def test_keys_cannot_escape_their_folder():
    iss = "127.0.0.1-14000-dir"
    # (route hosts are validated DNS names; these check the layout on its own)
    for evil in ("../../etc/passwd", "a/b", "x\\y", "a/../../b"):
        for key in (layout.cert_key(iss, evil), layout.state_key(iss, evil), layout.renew_request_key(iss, evil)):
            parts = key.split("/")
            assert ".." not in parts and "" not in parts and "." not in parts, key
    assert layout.cert_key(iss, "a/b").count("/") == layout.cert_key(iss, "ab").count("/")


def test_our_own_keys_live_beside_certmagics():
    iss = "127.0.0.1-14000-dir"
    assert layout.state_key(iss, "a.test") == f"autocert-proxy/{iss}/a.test.state.json"
    assert layout.renew_request_key(iss, "a.test") == f"autocert-proxy/{iss}/renew/a.test"
    assert layout.renew_request_key(iss, "a.test").startswith(layout.renew_request_prefix(iss) + "/")
    assert layout.lock_name("a.test") == "issue_cert_a.test"
    assert layout.lock_name("*.a.test") == "issue_cert_wildcard_.a.test"


def test_name_state_round_trip_and_garbage():
    st = NameState(failures=3, next_attempt=123.5, last_error="boom", renew_requested=True)
    assert NameState.from_json(st.to_json()) == st
    assert NameState.from_json(b"not json") == NameState()
    assert NameState.from_json(b'{"failures": 2, "unknown": 1}') == NameState(failures=2)
    assert NameState.from_json(b"[1, 2]") == NameState()


# ------------------------------------------------------------------------------ wanted names
def options_with(tmp_path: Path, routes: list[str], certificates=None):
    cfg = {"autocert": True, "autocert_dir": str(tmp_path / "ac"),
           "routes": [{"from": f, "to": "http://127.0.0.1:9"} for f in routes]}
    if certificates:
        cfg["certificates"] = certificates
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(str(path), {})


def cache_with(*pairs) -> CertificateCache:
    cache = CertificateCache()
    cache.replace_manual([Certificate(chain_pem=p.cert_pem, key_pem=p.key_pem, source=MANUAL, origin="t")
                          for p in pairs])
    return cache


def test_wanted_names_https_only_no_wildcards_no_duplicates(tmp_path):
    opts = options_with(tmp_path, [
        "https://a.test", "http://plain.test", "https://*.wild.test", "https://A.test/api",
        "https://b.test", "https://c.test/x",
    ])
    assert wanted_names(opts, CertificateCache()) == ["a.test", "b.test", "c.test"]


def test_wanted_names_skip_valid_manual_certificates(tmp_path):
    ca = TestCA(tmp_path / "pki")
    exact = ca.issue(["m.test"])
    wild = ca.issue(["*.w.test"])
    opts = options_with(tmp_path, ["https://m.test", "https://x.w.test", "https://a.b.w.test", "https://z.test"])
    assert wanted_names(opts, cache_with(exact, wild)) == ["a.b.w.test", "z.test"]


def test_wanted_names_take_over_from_expired_manual_certificates(tmp_path):
    ca = TestCA(tmp_path / "pki")
    now = dt.datetime.now(UTC)
    pair = ca.issue(["m.test"], not_before=now - dt.timedelta(days=10), not_after=now + dt.timedelta(days=1))
    opts = options_with(tmp_path, ["https://m.test"])
    cache = cache_with(pair)
    assert wanted_names(opts, cache, now) == []
    assert wanted_names(opts, cache, now + dt.timedelta(days=2)) == ["m.test"]


# ------------------------------------------------------------------------------ ClientHello
def client_hello(server_name=None, alpn=None, max_version=None) -> bytes:
    """The bytes a real ``ssl`` client sends first."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_parse_real_client_hello_with_sni_and_alpn():
    data = client_hello("Example.COM", ["acme-tls/1"])
    facts = parse_client_hello(data)
    assert facts is not None
    assert facts.server_name == "example.com"
    assert facts.alpn == (b"acme-tls/1",)


def test_parse_real_client_hello_several_alpn_and_tls12():
    facts = parse_client_hello(client_hello("a.test", ["h2", "http/1.1"], max_version=ssl.TLSVersion.TLSv1_2))
    assert facts is not None and facts.server_name == "a.test"
    assert facts.alpn == (b"h2", b"http/1.1")


def test_parse_client_hello_without_sni_or_alpn():
    facts = parse_client_hello(client_hello(None))
    assert facts is not None
    assert facts.server_name is None and facts.alpn == ()


def test_parse_client_hello_trailing_dot():
    facts = parse_client_hello(client_hello("a.test.", ["http/1.1"]))
    assert facts is not None and facts.server_name == "a.test"


def test_parse_client_hello_truncated_or_garbage_is_none():
    data = client_hello("a.test", ["acme-tls/1"])
    for cut in (0, 1, 4, 5, 9, 20, len(data) // 2, len(data) - 1):
        assert parse_client_hello(data[:cut]) is None, cut
    assert parse_client_hello(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") is None
    assert parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None   # a ServerHello


def test_parse_client_hello_never_raises_on_mutations():
    data = bytearray(client_hello("fuzz.test", ["acme-tls/1", "http/1.1"]))
    rng = random.Random(1)
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        facts = parse_client_hello(bytes(mutated))   # must not raise
        if facts is not None and facts.server_name is not None:
            assert isinstance(facts.server_name, str)


async def test_within_keeps_a_cancellation_that_arrives_with_the_answer():
    """_within (what the manager bounds its storage look-ups with, instead of asyncio.wait_for:
    on Python 3.11 wait_for returns the answer and drops a cancellation that arrives in the
    same loop step, CPython gh-86296) raises that cancellation, and times out like wait_for.
    This checks _within itself, not which helper the manager calls."""
    import asyncio
    from proxy.autocert.manager import _within

    async def answer():
        await asyncio.sleep(0)
        task.cancel()   # the caller gives up just as the answer is in
        return "answer"

    task = asyncio.get_running_loop().create_task(_within(answer(), 5.0))
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(TimeoutError):
        await _within(asyncio.sleep(10), 0.01)


def test_ari_record_round_trip_is_tied_to_its_certificate():
    from proxy.autocert.schedule import ari_record, parse_ari_record
    window = (T0, T0 + dt.timedelta(hours=3))
    assert parse_ari_record(ari_record(0xABC, window), 0xABC) == (True, window)
    assert parse_ari_record(ari_record(0xABC, None), 0xABC) == (True, None)        # CA without ARI
    assert parse_ari_record(ari_record(0xABC, window), 0xABD) == (False, None)     # another certificate
    for junk in (b"", b"[]", b'{"serial": "abc", "start": "x", "end": "y"}', b"\xff"):
        assert parse_ari_record(junk, 0xABC) == (False, None)
