"""Challenge material: pure tests, no network (the TLS handshake runs over memory BIOs)."""
from __future__ import annotations

import datetime as dt
import hashlib
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from proxy.autocert.challenges import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN_PROTOCOL,
    Challenge,
    ChallengeStore,
    acme_identifier_value,
    safe_key,
    storage_key,
    tls_alpn_certificate,
)

KA = "tok123.thumbprintABC"


def test_tls_alpn_certificate_follows_rfc8737():
    cert_pem, key_pem = tls_alpn_certificate("a.example", KA)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)

    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    # DER OCTET STRING (0x04, length 32) of SHA-256(key authorization)
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(KA.encode()).digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed, signature valid
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(hours=1) < life <= dt.timedelta(days=8)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.timezone.utc) <= cert.not_valid_after_utc


def test_acme_identifier_value_differs_per_key_authorization():
    assert acme_identifier_value("a.b") != acme_identifier_value("a.c")
    assert len(acme_identifier_value("x")) == 34


def test_challenge_validates_type_and_roundtrips_json():
    ch = Challenge("http-01", "a.example", "tok", KA)
    assert Challenge.from_json(ch.to_json()) == ch
    with pytest.raises(ValueError, match="dns-01"):
        Challenge("dns-01", "a.example", "tok", KA)


def test_store_http01_present_and_remove():
    store = ChallengeStore()
    ch = Challenge("http-01", "a.example", "tok1", "tok1.thumb")
    assert store.http01("tok1") is None
    store.present(ch)
    assert store.http01("tok1") == "tok1.thumb"
    assert store.http01("other") is None
    assert store.tls_alpn("a.example") is None  # an HTTP-01 challenge is no TLS-ALPN answer
    store.remove(ch)
    assert store.http01("tok1") is None
    assert len(store) == 0


def test_store_tls_alpn_builds_certificate_once_and_matches_names_loosely():
    store = ChallengeStore()
    ch = Challenge("tls-alpn-01", "A.Example", "tok", KA)
    store.present(ch)
    first = store.tls_alpn("a.example")
    assert first is not None
    assert store.tls_alpn("A.EXAMPLE.")[0] is first[0]  # built once, at present time
    objs = store.tls_alpn_objects("a.example")
    assert objs is not None and objs[0] == x509.load_pem_x509_certificate(first[0])
    cert = x509.load_pem_x509_certificate(first[0])
    assert cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value[2:] == \
        hashlib.sha256(KA.encode()).digest()
    store.remove(ch)
    assert store.tls_alpn("a.example") is None


def test_store_remove_keeps_a_newer_challenge_for_the_same_name():
    store = ChallengeStore()
    old = Challenge("tls-alpn-01", "a.example", "old", "old.t")
    new = Challenge("tls-alpn-01", "a.example", "new", "new.t")
    store.present(old)
    store.present(new)
    store.remove(old)  # a late cleanup of the first order must not break the second
    got = store.tls_alpn("a.example")
    assert got is not None
    ext = x509.load_pem_x509_certificate(got[0]).extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.value.value[2:] == hashlib.sha256(b"new.t").digest()


def test_store_is_safe_under_concurrent_use():
    store = ChallengeStore()
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(200):
                ch = Challenge("http-01", f"n{i}.example", f"t{i}-{j}", f"t{i}-{j}.k")
                store.present(ch)
                assert store.http01(ch.token) == ch.key_authorization
                store.remove(ch)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(store) == 0


def test_storage_key_follows_certmagic_layout():
    ch = Challenge("http-01", "A.Example.", "tok", KA)
    assert storage_key(ch) == "challenge_tokens/a.example.json"
    assert storage_key(ch, "127.0.0.1-14000-dir") == "acme/127.0.0.1-14000-dir/challenge_tokens/a.example.json"
    wild = Challenge("tls-alpn-01", "*.example.com", "tok", KA)
    assert storage_key(wild) == "challenge_tokens/wildcard_.example.com.json"
    assert safe_key("../../etc/passwd") == "etcpasswd"
    assert safe_key("Host:8443") == "host-8443"


def _pump(src: SSL.Connection, dst: SSL.Connection) -> bool:
    try:
        data = src.bio_read(65536)
    except SSL.WantReadError:
        return False
    dst.bio_write(data)
    return bool(data)


def _pair(server_ctx: SSL.Context, client_ctx: SSL.Context, sni: bytes):
    """Handshake a client and a server over memory BIOs (bounded)."""
    s = SSL.Connection(server_ctx, None)
    s.set_accept_state()
    c = SSL.Connection(client_ctx, None)
    c.set_connect_state()
    c.set_tlsext_host_name(sni)
    for _ in range(20):
        done = 0
        for conn in (c, s):
            try:
                conn.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
        moved = _pump(c, s) | _pump(s, c)
        if done == 2 and not moved:
            return c, s
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("tls_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_challenge_certificate_served_in_alpn_callback(tls_version):
    """What the proxy's TLS engine does: acme-tls/1 gets the challenge cert, others the real one."""
    store = ChallengeStore()
    store.present(Challenge("tls-alpn-01", "a.example", "tok", KA))
    real_cert_pem, real_key_pem = tls_alpn_certificate("a.example", "not-a-challenge")

    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.set_min_proto_version(tls_version)
    server_ctx.set_max_proto_version(tls_version)
    server_ctx.use_certificate(x509.load_pem_x509_certificate(real_cert_pem))
    server_ctx.use_privatekey(serialization.load_pem_private_key(real_key_pem, None))

    def select(conn: SSL.Connection, protos: list[bytes]):
        if ACME_TLS_ALPN_PROTOCOL in protos:
            got = store.tls_alpn_objects(conn.get_servername().decode())
            if got is None:
                return SSL.NO_OVERLAPPING_PROTOCOLS
            conn.use_certificate(got[0])
            conn.use_privatekey(got[1])
            return ACME_TLS_ALPN_PROTOCOL
        return b"http/1.1" if b"http/1.1" in protos else SSL.NO_OVERLAPPING_PROTOCOLS

    server_ctx.set_alpn_select_callback(select)

    def handshake(protos: list[bytes]) -> x509.Certificate:
        client_ctx = SSL.Context(SSL.TLS_METHOD)
        client_ctx.set_alpn_protos(protos)
        c, _ = _pair(server_ctx, client_ctx, b"a.example")
        return c.get_peer_certificate().to_cryptography()

    acme = handshake([ACME_TLS_ALPN_PROTOCOL])
    ext = acme.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.value.value[2:] == hashlib.sha256(KA.encode()).digest()
    normal = handshake([b"http/1.1"])
    assert normal.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).value.value[2:] == \
        hashlib.sha256(b"not-a-challenge").digest()
