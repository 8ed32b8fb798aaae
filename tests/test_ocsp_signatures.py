"""OCSP responses signed with RSA-PSS and Ed25519, and the revoked / unknown statuses
(issue 23), from a real responder: ``openssl ocsp`` with a delegated responder certificate
whose key is RSA (``-rsigopt rsa_padding_mode:pss``, SHA-256 and SHA-384) or Ed25519.

cryptography does not parse the RSASSA-PSS parameters of an OCSP response
(``signature_hash_algorithm`` raises), so every PSS-signed response was rejected as "not
signed by the issuer or an authorised responder": a revocation signed so was never seen.
"""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp as xocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.tls import ocsp
from proxy.tls.certcache import CertificateCache
from tests.infra.ocsp_responder import OpenSSLResponder, ocsp_query
from tests.infra.pki import Issued, TestCA
from tests.test_ocsp import Clock, CountingFetcher, run_stapler, served, stapler_for, wait_for  # noqa: F401

SIGNERS = {
    # kind: (key factory, openssl ocsp options, the response's signature algorithm)
    "rsa-pss-sha256": (lambda: rsa.generate_private_key(65537, 2048),
                       ["-rsigopt", "rsa_padding_mode:pss"], "rsassaPss"),
    "rsa-pss-sha384": (lambda: rsa.generate_private_key(65537, 2048),
                       ["-rsigopt", "rsa_padding_mode:pss", "-rsigopt", "rsa_pss_saltlen:digest",
                        "-rmd", "sha384"], "rsassaPss"),
    "ed25519": (ed25519.Ed25519PrivateKey.generate, [], "ed25519"),
    "ecdsa": (lambda: ec.generate_private_key(ec.SECP256R1()), [], "ecdsa-with-SHA256"),
}


def delegated_signer(ca: TestCA, key, name: str) -> Issued:
    """A responder certificate for ``key`` (any type), issued by the (EC) test CA."""
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = ca.dir / f"{name}.pem", ca.dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(cert, key, cert_path, key_path)


class Setup:
    """A test CA, a responder signing with one kind of key, and three leaves it answers for."""

    def __init__(self, directory, kind: str):
        make_key, signing_args, self.algorithm = SIGNERS[kind]
        self.ca = TestCA(directory / "ca")
        self.responder = OpenSSLResponder(
            self.ca, directory / "responder",
            signer=delegated_signer(self.ca, make_key(), f"responder-{kind}"), signing_args=signing_args)
        self.good = self.ca.issue(["good.test"], ocsp_url=self.responder.url)
        self.revoked = self.ca.issue(["revoked.test"], ocsp_url=self.responder.url)
        self.unknown = self.ca.issue(["unknown.test"], ocsp_url=self.responder.url)   # never added
        self.revoked_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(hours=2)
        self.responder.add(self.good, wait=0)
        self.responder.add(self.revoked, wait=0)
        self.responder.revoke(self.revoked, when=self.revoked_at, wait=0)
        self.responder.start()

    def ask(self, leaf: Issued) -> bytes:
        return ocsp_query(self.responder.url, leaf.cert, self.ca.cert)


@pytest.fixture(scope="module", params=list(SIGNERS))
def setup(request, tmp_path_factory):
    s = Setup(tmp_path_factory.mktemp(request.param), request.param)
    yield s
    s.responder.stop()


def test_each_status_verifies_whatever_signs_it(setup):
    for leaf, status in ((setup.good, "good"), (setup.revoked, "revoked"), (setup.unknown, "unknown")):
        der = setup.ask(leaf)
        assert xocsp.load_der_ocsp_response(der).signature_algorithm_oid._name == setup.algorithm
        result = ocsp.verify_response(der, leaf.cert, setup.ca.cert)
        assert result.status == status
        assert result.revocation_time == (setup.revoked_at if status == "revoked" else None)


def test_a_tampered_response_is_rejected_whatever_signs_it(setup):
    der = bytearray(setup.ask(setup.good))
    tbs = xocsp.load_der_ocsp_response(bytes(der)).tbs_response_bytes
    at = bytes(der).find(tbs) + len(tbs) - 1     # the last byte of the signed data
    der[at] ^= 1
    with pytest.raises(ocsp.OCSPInvalid):
        ocsp.verify_response(bytes(der), setup.good.cert, setup.ca.cert)


async def test_the_stapler_staples_good_drops_revoked_and_keeps_through_unknown(setup, run_stapler):
    """good: stapled. revoked: seen (on_revoked, no staple, never asked again). unknown after a
    good answer: the good staple is kept until it expires, retried with a backoff."""
    certs = {n: served(leaf, setup.ca) for n, leaf in
             (("good", setup.good), ("revoked", setup.revoked), ("unknown", setup.unknown))}
    cache = CertificateCache()
    cache.replace_manual(list(certs.values()))
    clock = Clock()
    fetcher = CountingFetcher()
    revoked = []
    stapler = run_stapler(stapler_for(cache, clock=clock, fetcher=fetcher, on_revoked=revoked.append))
    await wait_for(lambda: certs["good"].ocsp_staple is not None and revoked == [certs["revoked"]]
                   and stapler.status(certs["unknown"])["failures"] >= 1, what="first answers")
    assert certs["revoked"].revoked and certs["revoked"].ocsp_staple is None
    assert certs["unknown"].ocsp_staple is None
    assert stapler.status(certs["unknown"])["staple"] == "unknown to responder"
    assert "does not know this certificate" in stapler.status(certs["unknown"])["last_error"]

    # the good one becomes unknown to the responder: its staple stays while valid
    good = certs["good"].ocsp_staple
    setup.responder.forget(setup.good)
    try:
        clock.advance(hours=13)   # past the half-life of a one-day response: asked again
        await wait_for(lambda: stapler.status(certs["good"])["failures"] >= 1, what="unknown seen")
        assert certs["good"].ocsp_staple == good
        st = stapler.status(certs["good"])
        assert st["staple"] == "good" and "does not know this certificate" in st["last_error"]
        next_try = dt.datetime.fromisoformat(st["next_refresh"])
        assert clock() < next_try <= clock() + dt.timedelta(seconds=2)   # backoff_base 1 s
        clock.advance(hours=12)   # past the staple's nextUpdate: no longer stapled
        await wait_for(lambda: certs["good"].ocsp_staple is None, what="expired staple dropped")
    finally:
        setup.responder.add(setup.good, wait=0)
    assert not certs["good"].revoked and revoked == [certs["revoked"]]


# ------------------------------------------------------------------ the RSASSA-PSS parameters
def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


PSS = bytes.fromhex("2a864886f70d01010a")
MGF1 = bytes.fromhex("2a864886f70d010108")
SHA384 = bytes.fromhex("608648016503040202")
TBS = _tlv(0x30, _tlv(0x02, b"\x05") + b"\xa0" * 130)    # long form length, as real ones


def _algid(oid: bytes, *params: bytes) -> bytes:
    return _tlv(0x30, _tlv(0x06, oid) + b"".join(params))


def _pss(hash_oid=SHA384, mgf_oid=MGF1, salt=b"\x30") -> bytes:
    params = _tlv(0x30, _tlv(0xA0, _algid(hash_oid)) + _tlv(0xA1, _algid(mgf_oid, _algid(hash_oid)))
                  + _tlv(0xA2, _tlv(0x02, salt)))
    return TBS + _algid(PSS, params) + _tlv(0x03, b"\x00sig")


def test_pss_parameters_named_and_defaulted():
    h, mgf, salt = ocsp.pss_parameters(_pss(), TBS)
    assert (h.name, mgf.name, salt) == ("sha384", "sha384", 48)
    h, mgf, salt = ocsp.pss_parameters(TBS + _algid(PSS) + _tlv(0x03, b"\x00"), TBS)   # RFC 4055 defaults
    assert (h.name, mgf.name, salt) == ("sha1", "sha1", 20)


@pytest.mark.parametrize("der, why", [
    (_pss(hash_oid=bytes.fromhex("2a0304")), "unknown hash algorithm"),
    (_pss(mgf_oid=bytes.fromhex("2a0304")), "not MGF1"),
    (_pss(salt=b"\xff"), "negative salt"),
    (b"\x30\x03\x02\x01\x06" + _pss()[len(TBS):], "no tbsResponseData"),
    (TBS + _tlv(0x04, b"x"), "no signatureAlgorithm"),
    (TBS + b"\x30\x80" + _algid(PSS)[2:], "bad DER length"),                 # indefinite length
    (TBS + b"\x30\x85\x00\x00\x00\x00\x0b" + _algid(PSS)[2:], "bad DER length"),   # 5 length bytes
], ids=["hash", "mgf", "salt", "tbs", "algid", "indefinite", "long-length"])
def test_pss_parameters_refuse_what_they_cannot_use(der, why):
    with pytest.raises(ValueError, match=why):
        ocsp.pss_parameters(der, TBS)


def test_pss_parameters_cut_anywhere_is_a_value_error_never_an_index_error():
    der = _pss()
    for cut in range(len(TBS), len(der) - 6):   # the trailing BIT STRING is not read
        with pytest.raises(ValueError):
            ocsp.pss_parameters(der[:cut], TBS)
