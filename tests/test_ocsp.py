"""OCSP stapling against a real responder (`openssl ocsp`) started per test.

Misbehaving responders (garbage, wrong certificate, stranger's signature) use
``BadResponder``, a test double: no real responder misbehaves on demand.
Time inside the stapler is a movable clock (real now + offset), so "12 hours later" is a
clock step, while the network and the responder are real.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp as xocsp
from cryptography.x509.oid import NameOID

from proxy.storage.base import KeyInfo, NotFound, Storage
from proxy.tls import ocsp
from proxy.tls.certcache import MANUAL, Certificate, CertificateCache
from tests.infra.ocsp_responder import (BadResponder, OpenSSLResponder, free_port,
                                        make_response, ocsp_query)
from tests.infra.pki import TestCA

try:   # the real file backend when it is in the tree
    from proxy.storage.file import FileStorage
except ImportError:   # pragma: no cover
    FileStorage = None


class DictStorage(Storage):
    """In-memory Storage, used only if proxy/storage/file.py is not importable."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    async def store(self, key, value, *, private=False):
        self.data[key] = bytes(value)

    async def load(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise NotFound(key) from None

    async def delete(self, key):
        if self.data.pop(key, None) is None:
            raise NotFound(key)

    async def exists(self, key):
        return key in self.data

    async def list(self, prefix, recursive=False):
        return [k for k in self.data if k.startswith(prefix.rstrip("/") + "/")]

    async def stat(self, key):
        return KeyInfo(key, len(await self.load(key)), 0.0)

    async def lock(self, name):
        pass

    async def unlock(self, name):
        pass


def make_storage(tmp_path):
    if FileStorage is not None:
        return FileStorage(str(tmp_path / "storage"))
    return DictStorage()


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self):
        self.offset = dt.timedelta(0)

    def __call__(self):
        return dt.datetime.now(dt.timezone.utc) + self.offset

    def advance(self, **kw):
        self.offset += dt.timedelta(**kw)


class CountingFetcher:
    """Wraps the real ``ocsp.fetch`` and records the URLs asked (a spy, not a mock)."""

    def __init__(self):
        self.urls: list[str] = []

    async def __call__(self, url, req, timeout):
        self.urls.append(url)
        return await ocsp.fetch(url, req, timeout)


async def wait_for(pred, timeout=10.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def served(issued, ca) -> Certificate:
    return Certificate(chain_pem=issued.cert_pem + ca.cert_pem, key_pem=issued.key_pem,
                       source=MANUAL, origin=str(issued.cert_path))


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "ca")


@pytest.fixture
def responder(ca, tmp_path):
    r = OpenSSLResponder(ca, tmp_path / "responder")
    r.start()
    yield r
    r.stop()


@pytest.fixture
def bad():
    servers = []

    def make(**kw):
        s = BadResponder(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
async def run_stapler():
    """Start ``Stapler.run()`` as a task; cancelled and closed at teardown."""
    started = []

    def start(stapler):
        started.append((stapler, asyncio.get_running_loop().create_task(stapler.run())))
        return stapler

    yield start
    for stapler, task in started:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stapler.close()


def stapler_for(cache, **kw):
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("timeout", 3.0)
    kw.setdefault("backoff_base", 1.0)
    kw.setdefault("rng", random.Random(1))
    return ocsp.Stapler(cache, **kw)


# ------------------------------------------------------------------ pure parts

def test_ocsp_url_and_request(ca):
    leaf = ca.issue(["a.test"], ocsp_url="http://ocsp.example.test:8080/x")
    assert ocsp.ocsp_url(leaf.cert) == "http://ocsp.example.test:8080/x"
    assert ocsp.ocsp_url(ca.issue(["b.test"]).cert) is None
    req = xocsp.load_der_ocsp_request(ocsp.build_request(leaf.cert, ca.cert))
    assert req.serial_number == leaf.cert.serial_number
    assert isinstance(req.hash_algorithm, hashes.SHA1)


def test_refresh_at_is_half_life_with_jitter():
    tu = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    res = ocsp.OCSPResult("good", tu, tu + dt.timedelta(days=4))
    rng = random.Random(7)
    times = [ocsp.refresh_at(res, tu, rng) for _ in range(200)]
    assert all(tu + dt.timedelta(hours=43) <= t <= tu + dt.timedelta(hours=53) for t in times)
    assert len(set(times)) > 1   # jittered
    # already past half-life (e.g. a persisted staple): due now, never in the past
    late = tu + dt.timedelta(days=3)
    assert ocsp.refresh_at(res, late, rng) == late


def test_backoff_grows_and_is_capped():
    rng = random.Random(3)
    d = [ocsp.backoff_delay(n, 30, 3600, rng) for n in range(1, 12)]
    assert 24 <= d[0] <= 36 and 48 <= d[1] <= 72
    assert all(x <= 3600 * 1.2 for x in d) and d[-1] >= 3600 * 0.8


def test_storage_key_is_certmagic_like(ca):
    c = served(ca.issue(["*.Example.test", "example.test"], filename="wild"), ca)
    key = ocsp.storage_key(c)
    assert key.startswith("ocsp/wildcard_.example.test-") and len(key.rsplit("-", 1)[1]) == 16


# ------------------------------------------------------------------ verify_response

def test_verify_good_response_from_real_responder(ca, responder):
    leaf = ca.issue(["a.test"], ocsp_url=responder.url)
    responder.add(leaf)
    res = ocsp.verify_response(ocsp_query(responder.url, leaf.cert, ca.cert), leaf.cert, ca.cert)
    assert res.status == "good"
    assert res.next_update > res.this_update and not res.next_update_assumed


def test_verify_unknown_from_real_responder(ca, responder):
    leaf = ca.issue(["never-added.test"], ocsp_url=responder.url)
    res = ocsp.verify_response(ocsp_query(responder.url, leaf.cert, ca.cert), leaf.cert, ca.cert)
    assert res.status == "unknown"


def _rsa_ca():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa.test")]))
            .issuer_name(name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return cert, key, leaf


def test_verify_rsa_issuer_signed_and_tampered():
    ca_cert, ca_key, leaf = _rsa_ca()
    der = make_response(leaf, ca_cert, ca_cert, ca_key, include_signer=False)
    assert ocsp.verify_response(der, leaf, ca_cert).status == "good"
    # flip one bit of the signature (the last byte of the DER is inside it)
    with pytest.raises(ocsp.OCSPInvalid, match="not signed by the issuer"):
        ocsp.verify_response(der[:-1] + bytes([der[-1] ^ 1]), leaf, ca_cert)


def test_verify_time_rules(ca):
    leaf = ca.issue(["t.test"])
    now = dt.datetime.now(dt.timezone.utc)
    sign = dict(signer_cert=ca.cert, signer_key=ca.key, include_signer=False)
    with pytest.raises(ocsp.OCSPInvalid, match="in the future"):
        ocsp.verify_response(make_response(leaf.cert, ca.cert, this_update=now + dt.timedelta(hours=1),
                                           **sign), leaf.cert, ca.cert, now)
    # small skew is tolerated
    ok = make_response(leaf.cert, ca.cert, this_update=now + dt.timedelta(minutes=2), **sign)
    assert ocsp.verify_response(ok, leaf.cert, ca.cert, now).status == "good"
    with pytest.raises(ocsp.OCSPInvalid, match="nextUpdate .* has passed"):
        ocsp.verify_response(make_response(leaf.cert, ca.cert, this_update=now - dt.timedelta(days=2),
                                           next_update=now - dt.timedelta(days=1), **sign),
                             leaf.cert, ca.cert, now)
    # no nextUpdate: valid for DEFAULT_VALIDITY after thisUpdate, then not
    fresh = make_response(leaf.cert, ca.cert, this_update=now - dt.timedelta(minutes=10),
                          no_next_update=True, **sign)
    res = ocsp.verify_response(fresh, leaf.cert, ca.cert, now)
    assert res.next_update_assumed and res.next_update == res.this_update + ocsp.DEFAULT_VALIDITY
    with pytest.raises(ocsp.OCSPInvalid, match="assumed"):
        ocsp.verify_response(fresh, leaf.cert, ca.cert, now + dt.timedelta(hours=1))


def _bad_responses(ca, leaf, responder, tmp_path):
    """name -> (DER, expected reason regex). All of them are about ``leaf`` unless noted."""
    stranger = TestCA(tmp_path / "stranger", name="Stranger CA")
    stranger_signer = stranger.issue(["Stranger OCSP"], ocsp_signing=True)
    other = ca.issue(["other.test"], ocsp_url=responder.url)
    responder.add(other)
    no_eku = ca.issue(["not-a-responder"])   # issued by the CA, but serverAuth only
    return {
        "garbage": (b"\x30\x03garbage", "not a DER OCSP response"),
        "empty": (b"", "not a DER OCSP response"),
        "try-later": (xocsp.OCSPResponseBuilder.build_unsuccessful(
            xocsp.OCSPResponseStatus.TRY_LATER).public_bytes(serialization.Encoding.DER),
            "TRY_LATER"),
        # a genuine response from the real responder, about another certificate
        "other-cert": (ocsp_query(responder.url, other.cert, ca.cert), "no response for this certificate"),
        "stranger-ca-signed": (make_response(leaf.cert, ca.cert, stranger.cert, stranger.key),
                               "not signed by the issuer"),
        "stranger-delegated": (make_response(leaf.cert, ca.cert, stranger_signer.cert, stranger_signer.key),
                               "not issued by the issuer"),
        "delegate-without-ocsp-eku": (make_response(leaf.cert, ca.cert, no_eku.cert, no_eku.key),
                                      "lacks the id-kp-OCSPSigning"),
    }


BAD_KINDS = ["garbage", "empty", "try-later", "other-cert", "stranger-ca-signed",
             "stranger-delegated", "delegate-without-ocsp-eku"]


def test_verify_rejects_bad_responses(ca, responder, tmp_path):
    leaf = ca.issue(["a.test"], ocsp_url=responder.url)
    responder.add(leaf)
    bad = _bad_responses(ca, leaf, responder, tmp_path)
    assert sorted(bad) == sorted(BAD_KINDS)
    for kind, (der, reason) in bad.items():
        with pytest.raises(ocsp.OCSPInvalid, match=reason):
            ocsp.verify_response(der, leaf.cert, ca.cert)
    # the issuer's key with a real delegated responder's certificate still verifies
    assert ocsp.verify_response(ocsp_query(responder.url, leaf.cert, ca.cert),
                                leaf.cert, ca.cert).status == "good"


# ------------------------------------------------------------------ fetch

async def test_fetch_falls_back_to_get_on_405(ca, responder, bad):
    leaf = ca.issue(["a.test"], ocsp_url=responder.url)
    responder.add(leaf)
    good = ocsp_query(responder.url, leaf.cert, ca.cert)
    srv = bad(body=good, reject_post=True)
    der = await ocsp.fetch(srv.url, ocsp.build_request(leaf.cert, ca.cert), 3.0)
    assert der == good and srv.methods == ["POST", "GET"]


async def test_fetch_bounds_size_and_reports_http_errors(bad):
    big = bad(body=b"x" * (ocsp.MAX_RESPONSE_BYTES + 1))
    with pytest.raises(ocsp.OCSPFetchError, match="more than"):
        await ocsp.fetch(big.url, b"req", 3.0)
    err = bad(status=500)
    with pytest.raises(ocsp.OCSPFetchError, match="HTTP 500"):
        await ocsp.fetch(err.url, b"req", 3.0)
    with pytest.raises(ocsp.OCSPFetchError, match="unreachable"):
        await ocsp.fetch(f"http://127.0.0.1:{free_port()}", b"req", 3.0)


# ------------------------------------------------------------------ the stapler

async def test_stapler_staples_good_response(ca, responder, run_stapler):
    leaf = ca.issue(["a.test", "www.a.test"], ocsp_url=responder.url)
    responder.add(leaf)
    cert = served(leaf, ca)
    cache = CertificateCache()
    cache.replace_manual([cert])
    stapler = run_stapler(stapler_for(cache))
    await wait_for(lambda: cert.ocsp_staple is not None, what="a staple")
    assert ocsp.verify_response(cert.ocsp_staple, leaf.cert, ca.cert).status == "good"
    st = stapler.status(cert)
    assert st["staple"] == "good" and st["ocsp_url"] == responder.url and st["last_error"] is None
    nu = dt.datetime.fromisoformat(st["next_update"])
    nr = dt.datetime.fromisoformat(st["next_refresh"])
    assert nr < nu   # refreshes before the staple expires


async def test_revoked_while_running(ca, responder, run_stapler, caplog):
    leaf = ca.issue(["r.test"], ocsp_url=responder.url)
    responder.add(leaf)
    cert = served(leaf, ca)
    cache = CertificateCache()
    cache.replace_manual([cert])
    clock = Clock()
    revoked = []
    fetcher = CountingFetcher()
    run_stapler(stapler_for(cache, clock=clock, on_revoked=revoked.append, fetcher=fetcher))
    await wait_for(lambda: cert.ocsp_staple is not None, what="a staple")
    assert not cert.revoked and revoked == []

    responder.revoke(leaf)      # waits until openssl reports it
    clock.advance(hours=13)     # past the half-life of a 1-day response
    with caplog.at_level(logging.ERROR, logger="proxy.tls.ocsp"):
        await wait_for(lambda: cert.revoked, what="revocation seen")
        await wait_for(lambda: revoked == [cert], what="on_revoked")
    assert cert.ocsp_staple is None
    msg = [r for r in caplog.records if r.levelno == logging.ERROR and "REVOKED" in r.getMessage()]
    assert msg and "r.test" in msg[0].getMessage() and f"{leaf.cert.serial_number:x}" in msg[0].getMessage()
    # revocation is final: no further requests, and the cache no longer prefers it
    asked = len(fetcher.urls)
    clock.advance(days=2)
    await asyncio.sleep(0.3)
    assert len(fetcher.urls) == asked and cert.ocsp_staple is None


async def test_responder_down_keeps_last_good_staple(ca, responder, run_stapler):
    leaf = ca.issue(["d.test"], ocsp_url=responder.url)
    responder.add(leaf)
    cert = served(leaf, ca)
    cache = CertificateCache()
    cache.replace_manual([cert])
    clock = Clock()
    stapler = run_stapler(stapler_for(cache, clock=clock))
    await wait_for(lambda: cert.ocsp_staple is not None, what="a staple")
    good = cert.ocsp_staple

    responder.stop()
    clock.advance(hours=13)
    await wait_for(lambda: stapler.status(cert)["failures"] >= 2, what="failed retries")
    assert cert.ocsp_staple == good
    st = stapler.status(cert)
    assert responder.url in st["last_error"] and st["staple"] == "good"

    responder.start()           # back: the next retry staples a fresh response
    clock.advance(minutes=30)   # beyond any backoff step so far
    await wait_for(lambda: cert.ocsp_staple not in (None, good), what="re-stapled")
    assert stapler.status(cert)["failures"] == 0
    fresh = ocsp.verify_response(cert.ocsp_staple, leaf.cert, ca.cert, clock())

    responder.stop()            # down again, this time until the staple expires
    clock.advance(hours=12)     # past the fresh staple's nextUpdate (1 day after real now)
    assert clock() >= fresh.next_update
    await wait_for(lambda: cert.ocsp_staple is None, what="expired staple dropped")
    assert stapler.status(cert)["staple"] == "none"


@pytest.mark.parametrize("kind", BAD_KINDS)
async def test_bad_responses_rejected_old_staple_kept(ca, responder, bad, run_stapler, tmp_path,
                                                      kind, caplog):
    srv = bad()
    leaf = ca.issue(["a.test"], ocsp_url=srv.url)
    responder.add(leaf)
    good = ocsp_query(responder.url, leaf.cert, ca.cert)   # a real good response...
    srv.body = good                                          # ...served by the double first
    der, reason = _bad_responses(ca, leaf, responder, tmp_path)[kind]
    cert = served(leaf, ca)
    cache = CertificateCache()
    cache.replace_manual([cert])
    clock = Clock()
    stapler = run_stapler(stapler_for(cache, clock=clock))
    await wait_for(lambda: cert.ocsp_staple is not None, what="a staple")

    srv.body = der
    clock.advance(hours=13)
    with caplog.at_level(logging.WARNING, logger="proxy.tls.ocsp"):
        await wait_for(lambda: stapler.status(cert)["failures"] >= 1, what="rejection")
    assert cert.ocsp_staple == good and not cert.revoked

    assert re.search(reason, stapler.status(cert)["last_error"])
    assert any(re.search(reason, r.getMessage()) for r in caplog.records)


async def test_must_staple_unreachable_prime_raises(ca):
    url = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    leaf = ca.issue(["ms.test", "www.ms.test"], ocsp_url=url, must_staple=True)
    cert = served(leaf, ca)
    assert cert.must_staple
    stapler = stapler_for(CertificateCache())
    try:
        with pytest.raises(ocsp.StapleRequired) as e:
            await stapler.prime(cert)
    finally:
        await stapler.close()
    msg = str(e.value)
    assert "ms.test" in msg and "www.ms.test" in msg and url in msg and "must-staple" in msg
    assert cert.ocsp_staple is None


async def test_must_staple_prime_with_responder(ca, responder):
    leaf = ca.issue(["ms.test"], ocsp_url=responder.url, must_staple=True)
    responder.add(leaf)
    cert = served(leaf, ca)
    stapler = stapler_for(CertificateCache())
    try:
        await stapler.prime(cert)
        assert cert.ocsp_staple is not None
        # revoked must-staple: no staple, so prime refuses it
        leaf2 = ca.issue(["ms2.test"], ocsp_url=responder.url, must_staple=True)
        responder.add(leaf2)
        responder.revoke(leaf2)
        cert2 = served(leaf2, ca)
        with pytest.raises(ocsp.StapleRequired, match="REVOKED"):
            await stapler.prime(cert2)
        assert cert2.revoked
        # must-staple without any OCSP URL cannot be served either
        with pytest.raises(ocsp.StapleRequired, match="no OCSP responder URL"):
            await stapler.prime(served(ca.issue(["ms3.test"], must_staple=True), ca))
    finally:
        await stapler.close()


async def test_no_ocsp_url_or_no_issuer_makes_no_request(ca, responder, bad, run_stapler):
    srv = bad()
    with_url = ca.issue(["u.test"], ocsp_url=srv.url)
    responder.add(with_url)
    srv.body = ocsp_query(responder.url, with_url.cert, ca.cert)
    no_url = served(ca.issue(["plain.test"]), ca)
    orphan_leaf = ca.issue(["orphan.test"], ocsp_url=srv.url)
    orphan = Certificate(chain_pem=orphan_leaf.cert_pem, key_pem=orphan_leaf.key_pem, source=MANUAL)
    stapled = served(with_url, ca)
    cache = CertificateCache()
    cache.replace_manual([no_url, orphan, stapled])
    fetcher = CountingFetcher()
    stapler = run_stapler(stapler_for(cache, fetcher=fetcher))
    await wait_for(lambda: stapled.ocsp_staple is not None, what="the URL-carrying cert stapled")
    await asyncio.sleep(0.3)    # several more polls
    # exactly one request: the one certificate that can be stapled (the spy proves counting works)
    assert fetcher.urls == [srv.url] and srv.requests == 1
    assert no_url.ocsp_staple is None and orphan.ocsp_staple is None
    assert stapler.status(no_url)["staple"] == "no OCSP URL"
    assert stapler.status(orphan)["staple"] == "no issuer in chain"
    await stapler.prime(no_url)     # not must-staple: nothing to do, no error
    assert srv.requests == 1


async def test_slow_responder_does_not_delay_others(ca, responder, bad, run_stapler):
    slow = bad(delay=2.0)
    a = ca.issue(["slow.test"], ocsp_url=slow.url)
    responder.add(a)
    slow.body = ocsp_query(responder.url, a.cert, ca.cert)
    b = ca.issue(["fast.test"], ocsp_url=responder.url)
    responder.add(b)
    ca_slow, ca_fast = served(a, ca), served(b, ca)
    cache = CertificateCache()
    cache.replace_manual([ca_slow, ca_fast])
    run_stapler(stapler_for(cache, timeout=5.0))
    await wait_for(lambda: slow.requests == 1, what="request to the slow responder")
    await wait_for(lambda: ca_fast.ocsp_staple is not None, what="fast cert stapled")
    assert slow.answered == 0   # the fast one was stapled while the slow one still stalled
    await wait_for(lambda: ca_slow.ocsp_staple is not None, what="slow cert stapled")


async def test_persisted_staple_reused_after_restart(ca, responder, tmp_path):
    leaf = ca.issue(["p.test"], ocsp_url=responder.url)
    responder.add(leaf)
    storage = make_storage(tmp_path)
    first = served(leaf, ca)
    s1 = stapler_for(CertificateCache(), storage=storage)
    try:
        await s1.prime(first)
    finally:
        await s1.close()
    assert first.ocsp_staple is not None
    assert await storage.load(ocsp.storage_key(first)) == first.ocsp_staple

    responder.stop()    # "restart": a new process, the responder is down
    again = served(leaf, ca)
    fetcher = CountingFetcher()
    s2 = stapler_for(CertificateCache(), storage=storage, fetcher=fetcher)
    try:
        await s2.prime(again)
    finally:
        await s2.close()
    assert again.ocsp_staple == first.ocsp_staple and fetcher.urls == []


async def test_corrupt_persisted_staple_is_ignored(ca, responder, tmp_path):
    leaf = ca.issue(["c.test"], ocsp_url=responder.url)
    responder.add(leaf)
    storage = make_storage(tmp_path)
    cert = served(leaf, ca)
    await storage.store(ocsp.storage_key(cert), b"not an OCSP response")
    fetcher = CountingFetcher()
    s = stapler_for(CertificateCache(), storage=storage, fetcher=fetcher)
    try:
        await s.prime(cert)
    finally:
        await s.close()
    assert fetcher.urls == [responder.url] and cert.ocsp_staple is not None
    assert await storage.load(ocsp.storage_key(cert)) == cert.ocsp_staple


# ------------------------------------------------------------------ end to end: the handshake

async def test_openssl_s_client_sees_the_staple(ca, responder, run_stapler):
    """The stapler fills cert.ocsp_staple; the TLS engine staples it; s_client -status sees it."""
    engine_mod = pytest.importorskip("proxy.tls.engine")
    socketstream = pytest.importorskip("proxy.tls.socketstream")
    leaf = ca.issue(["s.test"], ocsp_url=responder.url, must_staple=True)
    responder.add(leaf)
    plain = ca.issue(["plain.test"])            # no OCSP URL: nothing stapled
    cert, plain_cert = served(leaf, ca), served(plain, ca)
    cache = CertificateCache()
    stapler = stapler_for(cache)
    await stapler.prime(cert)                   # must-staple: primed before it is served
    cache.replace_manual([cert, plain_cert])
    run_stapler(stapler)
    engine = engine_mod.TLSEngine(cache)
    server = await socketstream.start_tls_server(
        lambda: socketstream.TLSServerStream(engine.new_connection), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def s_client(name):
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
            "-status", "-CAfile", str(ca.cert_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 15)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return out.decode(errors="replace")

    try:
        out = await s_client("s.test")
        assert "OCSP Response Status: successful" in out, out
        assert "Cert Status: good" in out, out
        assert f"{leaf.cert.serial_number:X}" in out.replace(":", "").upper()
        out = await s_client("plain.test")
        assert "OCSP response: no response sent" in out, out
    finally:
        server.close()
        await server.wait_closed()


def test_mutated_responses_never_crash(ca, responder):
    """Peer bytes: every single-byte corruption of a real response is either still a valid
    response or OCSPInvalid - never another exception."""
    leaf = ca.issue(["m.test"], ocsp_url=responder.url)
    responder.add(leaf)
    good = ocsp_query(responder.url, leaf.cert, ca.cert)
    rng = random.Random(11)
    outcomes = {"valid": 0, "invalid": 0}
    for i in range(len(good)):
        for flip in (0x01, 0x80, rng.randrange(1, 256)):
            der = good[:i] + bytes([good[i] ^ flip]) + good[i + 1:]
            try:
                ocsp.verify_response(der, leaf.cert, ca.cert)
                outcomes["valid"] += 1
            except ocsp.OCSPInvalid:
                outcomes["invalid"] += 1
    for cut in range(0, len(good), 7):
        with pytest.raises(ocsp.OCSPInvalid):
            ocsp.verify_response(good[:cut], leaf.cert, ca.cert)
    assert outcomes["invalid"] > outcomes["valid"]


async def test_primed_certificate_is_not_fetched_again_when_cached(ca, responder, run_stapler):
    leaf = ca.issue(["pc.test"], ocsp_url=responder.url)
    responder.add(leaf)
    cert = served(leaf, ca)
    cache = CertificateCache()
    fetcher = CountingFetcher()
    stapler = run_stapler(stapler_for(cache, fetcher=fetcher))
    await stapler.prime(cert)
    await asyncio.sleep(0.2)            # polls while the cert is not in the cache yet
    cache.replace_manual([cert])
    await asyncio.sleep(0.3)            # polls with it in the cache: not due for hours
    assert fetcher.urls == [responder.url] and cert.ocsp_staple is not None
    cache.replace_manual([])            # removed: forgotten, and not asked about
    await asyncio.sleep(0.2)
    assert cert not in stapler._states and fetcher.urls == [responder.url]


async def test_a_certificate_obtained_while_running_is_stapled(ca, responder, run_stapler):
    """Between changes of the cache a tick looks only at the certificates it can staple (with
    thousands of certificates and no OCSP URL, at none): one obtained later (put_managed, as
    the autocert manager does) must still be seen and stapled, and a renewal's replacement too."""
    leaf = ca.issue(["got.test"], ocsp_url=responder.url)
    renewed_leaf = ca.issue(["www.got.test", "got.test"], ocsp_url=responder.url)   # (another subject: the index keeps subjects unique)
    responder.add(leaf)
    responder.add(renewed_leaf)   # (both known to the responder before it is asked)
    plain = [served(ca.issue([f"p{i}.test"]), ca) for i in range(20)]
    cache = CertificateCache()
    cache.replace_manual(plain)
    stapler = run_stapler(stapler_for(cache))
    await asyncio.sleep(0.2)            # several ticks with nothing to staple
    assert stapler._stapleable == []
    got = served(leaf, ca)
    got.source = "managed"
    cache.put_managed(got)
    await wait_for(lambda: got.ocsp_staple is not None, what="the obtained certificate stapled")
    renewed = served(renewed_leaf, ca)
    renewed.source = "managed"
    cache.put_managed(renewed)          # the renewal replaces it: stapled, the old one forgotten
    await wait_for(lambda: renewed.ocsp_staple is not None, what="the renewed certificate stapled")
    await wait_for(lambda: got not in stapler._states, what="the replaced certificate forgotten")


async def test_a_primed_certificate_never_cached_is_forgotten_after_its_grace(ca, responder, run_stapler,
                                                                                monkeypatch):
    """A certificate primed for the cache (a must-staple one before it is published) keeps its
    state while it may still arrive; one that never does is forgotten when its grace ends,
    though the cache did not change meanwhile."""
    monkeypatch.setattr(ocsp, "PRIMED_GRACE", 0.5)
    leaf = ca.issue(["never.test"], ocsp_url=responder.url)
    responder.add(leaf)
    cert = served(leaf, ca)
    cache = CertificateCache()
    cache.replace_manual([served(ca.issue(["other.test"]), ca)])
    stapler = run_stapler(stapler_for(cache))
    await asyncio.sleep(0.1)            # the first full look is done
    await stapler.prime(cert)
    await asyncio.sleep(0.2)            # ticks within the grace: kept
    assert cert in stapler._states
    await wait_for(lambda: cert not in stapler._states, what="the primed certificate forgotten")
