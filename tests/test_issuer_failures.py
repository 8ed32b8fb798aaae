"""The ACME issuer when the CA misbehaves (issue 23): a real Pebble stopped or restarted in the
middle of things, rejecting every nonce, validating a name that never answers; real nginx in
front of it closing idle kept-alive connections. A labelled double (``MisbehavingCA``) only for
what Pebble cannot be made to do: fail an order at finalization, never finish one, or send an
unusable certificate.
"""
from __future__ import annotations

import datetime as dt
import socket
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.autocert.issuer import AcmeError, AcmeIssuer, IssuerSettings, unusable_chain
from tests.infra.ca_front import Exchange, MisbehavingCA, NginxFront
from tests.infra.pebble import pebble, pebble_factory  # noqa: F401  (fixtures)
from tests.infra.pki import TestCA
from tests.test_issuer import Recorder, new_key, servers, settings_for, store, verify_chain  # noqa: F401

ACCOUNT_GONE = "urn:ietf:params:acme:error:accountDoesNotExist"


def via(front, **kw) -> IssuerSettings:
    """Settings for the CA behind ``front`` (NginxFront or MisbehavingCA)."""
    return IssuerSettings(directory_url=front.directory_url, trusted_ca_pem=front.pebble.trusted_ca_pem, **kw)


# --------------------------------------------------------------------------------------------
# the CA going away, and coming back
# --------------------------------------------------------------------------------------------
def test_ca_stopped_mid_order_is_an_error_and_the_challenge_is_cleaned_up(pebble, servers, store):
    """Pebble stops the moment the challenge is presented, before the CA is asked to validate."""
    rec = Recorder(store)

    def present_then_stop(ch):
        rec.present(ch)
        pebble.stop()

    with AcmeIssuer(settings_for(pebble, challenge_types=("tls-alpn-01",))) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["mid.example"], new_key(), present_then_stop, rec.cleanup)
    assert "validating the names: cannot reach the CA" in str(ei.value)
    assert ei.value.domains == ("mid.example",)
    assert [ev for ev, _ in rec.events] == ["present", "cleanup"]
    assert len(store) == 0


def test_ca_restarted_while_the_connection_was_idle_is_reached_on_a_new_one(pebble, servers, store):
    """The CA's process ended while our kept-alive connection waited in the pool: no TLS
    close_notify, the reused connection fails with SSLEOFError. It must be reopened, so that
    what reaches us is the CA's own answer (here: a restarted Pebble has forgotten the
    account), not a TLS error."""
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble, challenge_types=("tls-alpn-01",))) as issuer:
        issuer.obtain(["before.example"], new_key(), rec.present, rec.cleanup)
        pebble.stop()
        pebble.start()
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["after.example"], new_key(), rec.present, rec.cleanup)
    assert ei.value.problem_type == ACCOUNT_GONE, str(ei.value)
    assert "TLS" not in str(ei.value)


def test_connection_closed_by_the_ca_while_idle_is_reopened(pebble, servers, store, tmp_path):
    """Real nginx in front of Pebble closes kept-alive connections idle for 300 ms."""
    front = NginxFront(pebble, tmp_path / "nginx", keepalive_timeout="300ms").start()
    try:
        rec = Recorder(store)
        with AcmeIssuer(via(front, challenge_types=("tls-alpn-01",))) as issuer:
            first = issuer.obtain(["idle1.example"], new_key(), rec.present, rec.cleanup)
            used = set(front.connections())
            time.sleep(0.8)   # nginx closes our idle connection
            second = issuer.obtain(["idle2.example"], new_key(), rec.present, rec.cleanup)
        root = pebble.issuing_root_pem()
        verify_chain(first.chain_pem, root, "idle1.example")
        verify_chain(second.chain_pem, root, "idle2.example")
        assert set(front.connections()) - used, "the second order used no new connection"
    finally:
        front.stop()


# --------------------------------------------------------------------------------------------
# nonces, validation, orders
# --------------------------------------------------------------------------------------------
def test_a_ca_rejecting_every_nonce_is_given_up_on_after_the_bound(pebble_factory):
    ca = pebble_factory(nonce_reject=100)
    with AcmeIssuer(settings_for(ca, nonce_retries=3)) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.account()
    assert "the CA kept rejecting our nonces (3 attempts)" in str(ei.value)
    assert ei.value.problem_type.endswith(":badNonce")
    assert ca.log().count("POST /sign-me-up ->") == 3   # three tries, each with a fresh nonce


@pytest.mark.timeout(60)
def test_a_validation_that_never_finishes_times_out(pebble, store):
    """Pebble's own validation hangs for real: the name's TLS port accepts and never answers
    (Pebble would give up after ~15 s). Our order deadline (1 s here) comes first."""
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", pebble.tls_port))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    rec = Recorder(store)
    started = time.monotonic()
    try:
        with AcmeIssuer(settings_for(pebble, challenge_types=("tls-alpn-01",), timeout=1.0)) as issuer:
            with pytest.raises(AcmeError) as ei:
                issuer.obtain(["hang.example"], new_key(), rec.present, rec.cleanup)
    finally:
        silent.close()
        for s in held:
            s.close()
    assert "timed out after 1 s waiting for the CA to validate hang.example" in str(ei.value)
    assert time.monotonic() - started < 10
    assert [ev for ev, _ in rec.events] == ["present", "cleanup"]


@pytest.fixture
def misbehaving(pebble):
    front = MisbehavingCA(pebble)
    yield front
    front.close()


def _order_answer(ex: Exchange) -> bool:
    return ex.method == "POST" and ex.status < 300 and (
        ex.path.startswith("/finalize-order/") or ex.path.startswith("/my-order/"))


def test_an_order_the_ca_fails_at_finalization(misbehaving, servers, store):
    """A labelled double: the front turns Pebble's finalize answer into an invalid order with
    a problem document (Let's Encrypt does this when, say, a CAA recheck fails at finalization)."""
    problem = {"type": "urn:ietf:params:acme:error:caa", "detail": "CAA record for caa.example "
               "prevents issuance", "status": 403}

    def fail(ex: Exchange) -> None:
        if _order_answer(ex):
            ex.set_json({**ex.json(), "status": "invalid", "error": problem})
    misbehaving.rewrite = fail
    rec = Recorder(store)
    with AcmeIssuer(via(misbehaving, challenge_types=("tls-alpn-01",))) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["caa.example"], new_key(), rec.present, rec.cleanup)
    assert "the order failed" in str(ei.value)
    assert ei.value.problem == problem
    assert "caa: CAA record for caa.example prevents issuance" in str(ei.value)
    assert misbehaving.count(r"^/certZ/") == 0


@pytest.mark.timeout(60)
def test_an_order_that_never_becomes_valid_times_out(misbehaving, servers, store):
    """A labelled double: the front shows the order as "processing" on every look."""
    def stall(ex: Exchange) -> None:
        if _order_answer(ex):
            order = ex.json()
            order.pop("certificate", None)
            ex.set_json({**order, "status": "processing"})
    misbehaving.rewrite = stall
    rec = Recorder(store)
    started = time.monotonic()
    with AcmeIssuer(via(misbehaving, challenge_types=("tls-alpn-01",), timeout=1.5)) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["stall.example"], new_key(), rec.present, rec.cleanup)
    assert "waiting for the order to become valid (last state: processing)" in str(ei.value)
    assert time.monotonic() - started < 10
    assert misbehaving.count(r"^/certZ/") == 0


# --------------------------------------------------------------------------------------------
# an unusable certificate from the CA
# --------------------------------------------------------------------------------------------
def cert_for(ca: TestCA, public_key, names, *, days_left: float = 30) -> x509.Certificate:
    """A certificate from ``ca`` for any key and names, expiring in ``days_left`` days."""
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=60)).not_valid_after(now + dt.timedelta(days=days_left))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca.key, hashes.SHA256()))


def test_unusable_chain_rules(tmp_path):
    ca = TestCA(tmp_path / "ca")
    other_ca = TestCA(tmp_path / "other", name="Other CA")
    key_pem = new_key()
    pub = serialization.load_pem_private_key(key_pem, None).public_key()
    good = cert_for(ca, pub, ["a.example", "b.example"])
    assert unusable_chain([good, ca.cert], ("a.example", "b.example"), key_pem) == ""
    assert unusable_chain([good], ("a.example",), key_pem) == ""   # no chain at all is allowed
    assert unusable_chain([], ("a.example",), key_pem) == "no certificate"
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert unusable_chain([cert_for(ca, stranger, ["a.example"])], ("a.example",), key_pem) == \
        "it is not for the key we sent"
    assert unusable_chain([good], ("a.example", "c.example"), key_pem) == \
        "it does not name c.example (it names a.example, b.example)"
    expired = cert_for(ca, pub, ["a.example"], days_left=-1)
    assert unusable_chain([expired], ("a.example",), key_pem).startswith("it expired on ")
    assert unusable_chain([good, other_ca.cert], ("a.example",), key_pem) == \
        "the chain's second certificate (CN=Other CA) did not issue it"
    ip = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
          .public_key(pub).serial_number(1)
          .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2999, 1, 1))
          .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("::1"))]),
                         critical=False).sign(ca.key, hashes.SHA256()))
    assert unusable_chain([ip], ("0:0::1",), key_pem) == ""
    assert unusable_chain([ip], ("127.0.0.1",), key_pem).startswith("it does not name 127.0.0.1")
