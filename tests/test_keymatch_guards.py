"""proxy.tls.keymatch on well-formed PEM around malformed DER: every structural guard, one
case each, and a small deterministic fuzz (truncations, byte flips, insertions) in which the
matcher answers True or None and its parsers raise nothing but their own ValueError.

The keys are built here element by element (checked against cryptography's own encoding), so
that each case breaks exactly one element. Certificates are real ones from cryptography; a
malformed TBSCertificate is given through a stand-in object, because cryptography refuses to
build one (the matcher reads only ``tbs_certificate_bytes``).
"""
from __future__ import annotations

import base64
import datetime as dt
import random
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from proxy.tls import keymatch
from proxy.tls.keymatch import certificate_spki, key_matches, key_spki

DER = serialization.Encoding.DER
PKCS8, TRADITIONAL = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
NOENC = serialization.NoEncryption()

INTEGER, BIT_STRING, OCTET_STRING, NULL, OID, SEQUENCE, SET = 0x02, 0x03, 0x04, 0x05, 0x06, 0x30, 0x31
EC_OID = bytes.fromhex("06072a8648ce3d0201")
P256 = bytes.fromhex("06082a8648ce3d030107")
P384 = bytes.fromhex("06052b81040022")
RSA_OID = bytes.fromhex("06092a864886f70d010101")


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(ln))) + ln + content


def seq(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(v: int) -> bytes:
    return tlv(INTEGER, v.to_bytes(v.bit_length() // 8 + 1, "big"))


def pem(label: str, der: bytes) -> bytes:
    return (f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der)
            + f"-----END {label}-----\n".encode())


def self_signed(key) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "guards.test")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))


@dataclass
class TBSOnly:
    """Stands in for an x509.Certificate whose TBSCertificate cryptography would not build."""
    tbs_certificate_bytes: bytes


class EC:
    """One EC key's elements, and SEC1 / PKCS#8 encodings built from them."""

    def __init__(self, curve, curve_oid: bytes):
        self.key = ec.generate_private_key(curve)
        self.cert = self_signed(self.key)
        size = (self.key.curve.key_size + 7) // 8
        self.d = self.key.private_numbers().private_value.to_bytes(size, "big")
        self.point = self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                       serialization.PublicFormat.UncompressedPoint)
        self.curve = curve_oid

    def public(self) -> bytes:
        return tlv(0xA1, tlv(BIT_STRING, b"\x00" + self.point))

    def sec1(self, *, version=None, priv=None, rest=None) -> bytes:
        rest = [tlv(0xA0, self.curve), self.public()] if rest is None else rest
        return seq(integer(1) if version is None else version,
                   tlv(OCTET_STRING, self.d) if priv is None else priv, *rest)

    def pkcs8(self, *, version=None, alg=None, inner=None, extra=()) -> bytes:
        inner = self.sec1(rest=[self.public()]) if inner is None else inner
        return seq(integer(0) if version is None else version,
                   seq(EC_OID, self.curve) if alg is None else alg,
                   tlv(OCTET_STRING, inner), *extra)


class RSA:
    def __init__(self):
        self.key = rsa.generate_private_key(65537, 1024)
        self.cert = self_signed(self.key)
        n = self.key.private_numbers()
        self.values = [0, n.public_numbers.n, n.public_numbers.e, n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp]

    def pkcs1(self, *, elements=None) -> bytes:
        return seq(*(elements if elements is not None else [integer(v) for v in self.values]))

    def pkcs8(self, *, alg=None, inner=None) -> bytes:
        return seq(integer(0), seq(RSA_OID, tlv(NULL, b"")) if alg is None else alg,
                   tlv(OCTET_STRING, self.pkcs1() if inner is None else inner))


@pytest.fixture(scope="module")
def p384():
    return EC(ec.SECP384R1(), P384)


@pytest.fixture(scope="module")
def p256():
    return EC(ec.SECP256R1(), P256)


@pytest.fixture(scope="module")
def rsa_key():
    return RSA()


def test_the_builders_encode_as_cryptography_does(p384, p256, rsa_key):
    for k in (p384, p256):
        assert k.sec1() == k.key.private_bytes(DER, TRADITIONAL, NOENC)
        assert k.pkcs8() == k.key.private_bytes(DER, PKCS8, NOENC)
    assert rsa_key.pkcs1() == rsa_key.key.private_bytes(DER, TRADITIONAL, NOENC)
    assert rsa_key.pkcs8() == rsa_key.key.private_bytes(DER, PKCS8, NOENC)


def well_formed(p384, p256, rsa_key):
    """(label, DER, certificate) of keys the matcher must recognise."""
    return [
        ("EC PRIVATE KEY", p384.sec1(), p384.cert),
        ("PRIVATE KEY", p384.pkcs8(), p384.cert),
        ("PRIVATE KEY", p256.pkcs8(), p256.cert),          # the fixed-layout fast path
        ("EC PRIVATE KEY", p256.sec1(), p256.cert),
        ("RSA PRIVATE KEY", rsa_key.pkcs1(), rsa_key.cert),
        ("PRIVATE KEY", rsa_key.pkcs8(), rsa_key.cert),
    ]


def test_well_formed_keys_match(p384, p256, rsa_key):
    for label, der, cert in well_formed(p384, p256, rsa_key):
        spki = cert.public_key().public_bytes(DER, SPKI)
        assert key_spki(pem(label, der)) == spki, label
        assert certificate_spki(cert.tbs_certificate_bytes) == spki
        assert key_matches(pem(label, der), cert) is True, label


def test_forms_the_matcher_accepts_beyond_the_usual_layout(p384, p256):
    """Optional elements in other places, text around the block: still the same public key."""
    key = p384
    cases = [
        # SEC1: [1] before [0], an unknown [2], no curve inside PKCS#8's inner key
        ("EC PRIVATE KEY", key.sec1(rest=[key.public(), tlv(0xA0, key.curve)])),
        ("EC PRIVATE KEY", key.sec1(rest=[tlv(0xA0, key.curve), key.public(), tlv(0xA2, b"\x05\x00")])),
        ("PRIVATE KEY", key.pkcs8(inner=key.sec1())),             # curve repeated inside
        ("PRIVATE KEY", key.pkcs8(extra=[tlv(0xA0, b"")])),       # PKCS#8 attributes [0]
    ]
    for label, der in cases:
        assert key_matches(pem(label, der), key.cert) is True, der.hex()
    # P-256 PKCS#8 off the fixed layout (attributes after the key) takes the general path
    der = p256.pkcs8(extra=[tlv(0xA0, b"")])
    assert len(der) != 138 and key_matches(pem("PRIVATE KEY", der), p256.cert) is True
    # text around the one block, CRLF line ends, a long-form length written non-minimally
    text = b"Bag Attributes\r\n" + pem("EC PRIVATE KEY", key.sec1()).replace(b"\n", b"\r\n") + b"trailer\n"
    assert key_matches(text, key.cert) is True
    body = content(key.sec1())
    for size in (2, 4):
        long_len = bytes((SEQUENCE, 0x80 | size)) + len(body).to_bytes(size, "big") + body
        assert key_matches(pem("EC PRIVATE KEY", long_len), key.cert) is True, size


def content(der: bytes) -> bytes:
    """The content of the DER element ``der`` (definite length)."""
    n = der[1]
    return der[2:] if n < 0x80 else der[2 + (n & 0x7F):]


def test_a_version_1_certificate_has_no_version_element(p384):
    body = content(p384.cert.tbs_certificate_bytes)
    assert body[:5] == tlv(0xA0, integer(2))
    v1 = seq(body[5:])
    assert key_matches(pem("EC PRIVATE KEY", p384.sec1()), TBSOnly(v1)) is True


def malformed_keys(p384, p256, rsa_key):
    """(what is wrong, PEM text, certificate whose public key the intact parts match)."""
    k, r = p384, rsa_key
    sec1, pkcs8 = k.sec1(), k.pkcs8()
    body, n = content(sec1), len(content(sec1))
    good = pem("EC PRIVATE KEY", sec1)
    other = EC(ec.SECP384R1(), P384)
    cases = [
        # PEM
        ("two PEM blocks", good + pem("EC PRIVATE KEY", other.sec1())),
        ("two PEM blocks, other label second", good + pem("PRIVATE KEY", other.pkcs8())),
        ("no END line", good.split(b"-----END")[0]),
        ("END of another label", good.replace(b"END EC PRIVATE KEY", b"END PRIVATE KEY")),
        ("BEGIN line not closed", b"-----BEGIN EC PRIVATE KEY\n" + base64.encodebytes(sec1)),
        ("RFC 1421 headers", good.replace(b"KEY-----\n", b"KEY-----\nProc-Type: 4,ENCRYPTED\n\n", 1)),
        ("a header line without '-'", good.replace(b"KEY-----\n", b"KEY-----\nComment: x\n\n", 1)),
        ("not base64", good.replace(b"\n", b"\n*", 1)),
        ("bad base64 padding", pem("EC PRIVATE KEY", sec1)[:-30] + b"=" + pem("EC PRIVATE KEY", sec1)[-30:]),
        ("public key label", pem("PUBLIC KEY", sec1)),
        ("encrypted PKCS#8 label", pem("ENCRYPTED PRIVATE KEY", pkcs8)),
        ("DSA label", pem("DSA PRIVATE KEY", sec1)),
        ("SEC1 under the PKCS#8 label", pem("PRIVATE KEY", sec1)),
        ("PKCS#8 under the SEC1 label", pem("EC PRIVATE KEY", pkcs8)),
        ("P-256 PKCS#8 under the SEC1 label", pem("EC PRIVATE KEY", p256.pkcs8())),
        ("P-256 PKCS#8 under the PKCS#1 label", pem("RSA PRIVATE KEY", p256.pkcs8())),
        # the outer element
        ("empty DER", pem("EC PRIVATE KEY", b"")),
        ("one byte", pem("EC PRIVATE KEY", b"\x30")),
        ("trailing byte", pem("EC PRIVATE KEY", sec1 + b"\x00")),
        ("P-256 PKCS#8 with a trailing byte", pem("PRIVATE KEY", p256.pkcs8() + b"\x00")),
        ("SET, not SEQUENCE", pem("EC PRIVATE KEY", bytes((SET,)) + sec1[1:])),
        ("indefinite length", pem("EC PRIVATE KEY", b"\x30\x80" + body + b"\x00\x00")),
        ("five length bytes", pem("EC PRIVATE KEY", b"\x30\x85" + n.to_bytes(5, "big") + body)),
        ("length past the end", pem("EC PRIVATE KEY", b"\x30\x82" + (n + 1).to_bytes(2, "big") + body)),
        ("one length byte past the end", pem("EC PRIVATE KEY", b"\x30\x81" + bytes((n + 1,)) + body)),
        ("length bytes past the end", pem("EC PRIVATE KEY", b"\x30\x84\x00")),
        ("high tag number", pem("EC PRIVATE KEY", seq(integer(1), tlv(OCTET_STRING, k.d), tlv(0xA0, k.curve),
                                                       k.public(), b"\xbf\x00"))),
        ("child cut after its tag", pem("EC PRIVATE KEY", seq(integer(1), tlv(OCTET_STRING, k.d),
                                                               tlv(0xA0, k.curve), k.public(), b"\xa2"))),
        ("child longer than its parent", pem("EC PRIVATE KEY", seq(integer(1), tlv(OCTET_STRING, k.d),
                                                                    tlv(0xA0, k.curve), k.public(), b"\xa2\x05\x00"))),
        ("indefinite length inside", pem("EC PRIVATE KEY", seq(integer(1), tlv(OCTET_STRING, k.d),
                                                                tlv(0xA0, k.curve), b"\xa2\x80", k.public()))),
        # SEC1
        ("SEC1 with one element", pem("EC PRIVATE KEY", seq(integer(1)))),
        ("SEC1 version not INTEGER", pem("EC PRIVATE KEY", k.sec1(version=tlv(OCTET_STRING, b"\x01")))),
        ("SEC1 private key not OCTET STRING", pem("EC PRIVATE KEY", k.sec1(priv=tlv(INTEGER, k.d)))),
        ("SEC1 without the public key", pem("EC PRIVATE KEY", k.sec1(rest=[tlv(0xA0, k.curve)]))),
        ("SEC1 public key not BIT STRING", pem("EC PRIVATE KEY", k.sec1(rest=[
            tlv(0xA0, k.curve), tlv(0xA1, tlv(OCTET_STRING, b"\x00" + k.point))]))),
        ("SEC1 empty [1]", pem("EC PRIVATE KEY", k.sec1(rest=[tlv(0xA0, k.curve), tlv(0xA1, b"")]))),
        ("SEC1 empty [0]", pem("EC PRIVATE KEY", k.sec1(rest=[tlv(0xA0, b""), k.public()]))),
        ("SEC1 without the curve", pem("EC PRIVATE KEY", k.sec1(rest=[k.public()]))),
        ("SEC1 explicit curve", pem("EC PRIVATE KEY", k.sec1(rest=[tlv(0xA0, seq(integer(1))), k.public()]))),
        # PKCS#8
        ("PKCS#8 with two elements", pem("PRIVATE KEY", seq(integer(0), seq(EC_OID, k.curve)))),
        ("PKCS#8 version not INTEGER", pem("PRIVATE KEY", k.pkcs8(version=tlv(OCTET_STRING, b"\x00")))),
        ("PKCS#8 algorithm not SEQUENCE", pem("PRIVATE KEY", k.pkcs8(alg=tlv(SET, EC_OID + k.curve)))),
        ("PKCS#8 key not OCTET STRING", pem("PRIVATE KEY", seq(integer(0), seq(EC_OID, k.curve),
                                                               tlv(BIT_STRING, k.sec1(rest=[k.public()]))))),
        ("PKCS#8 empty algorithm", pem("PRIVATE KEY", k.pkcs8(alg=seq()))),
        ("PKCS#8 unknown algorithm", pem("PRIVATE KEY", k.pkcs8(alg=seq(tlv(OID, b"\x2b\x65\x70"))))),
        ("PKCS#8 EC without a curve", pem("PRIVATE KEY", k.pkcs8(alg=seq(EC_OID)))),
        ("PKCS#8 EC with two curves", pem("PRIVATE KEY", k.pkcs8(alg=seq(EC_OID, k.curve, k.curve)))),
        ("PKCS#8 EC explicit curve", pem("PRIVATE KEY", k.pkcs8(alg=seq(EC_OID, seq(integer(1)))))),
        ("PKCS#8 inner key not SEQUENCE", pem("PRIVATE KEY", k.pkcs8(inner=tlv(SET, k.sec1()[2:])))),
        ("PKCS#8 inner key with trailing byte", pem("PRIVATE KEY", k.pkcs8(inner=k.sec1() + b"\x00"))),
        ("PKCS#8 inner key empty", pem("PRIVATE KEY", k.pkcs8(inner=b""))),
        ("PKCS#8 inner SEC1 without public key", pem("PRIVATE KEY", k.pkcs8(inner=k.sec1(rest=[]))))
    ]
    cases = [(what, text, k.cert) for what, text in cases]
    rcases = [
        ("PKCS#1 with two integers", pem("RSA PRIVATE KEY", r.pkcs1(elements=[integer(0), integer(r.values[1])]))),
        ("PKCS#1 modulus not INTEGER", pem("RSA PRIVATE KEY", r.pkcs1(elements=[
            integer(0), tlv(OCTET_STRING, r.values[1].to_bytes(129, "big")), integer(65537)]))),
        ("PKCS#1 exponent not INTEGER", pem("RSA PRIVATE KEY", r.pkcs1(elements=[
            integer(0), integer(r.values[1]), tlv(OCTET_STRING, b"\x01\x00\x01")]))),
        ("PKCS#1 version not INTEGER", pem("RSA PRIVATE KEY", r.pkcs1(elements=[
            tlv(NULL, b""), integer(r.values[1]), integer(65537)]))),
        ("PKCS#8 RSA with short inner key", pem("PRIVATE KEY", r.pkcs8(inner=seq(integer(0), integer(r.values[1]))))),
    ]
    return cases + [(what, text, r.cert) for what, text in rcases]


def test_every_structural_guard(p384, p256, rsa_key):
    wrong = []
    for what, text, cert in malformed_keys(p384, p256, rsa_key):
        try:
            key_spki(text)
            wrong.append(f"{what}: key_spki answered")
        except ValueError:
            pass
        if key_matches(text, cert) is not None:
            wrong.append(f"{what}: matched")
    assert not wrong, "\n".join(wrong)


def test_the_minimal_pkcs1_key_is_enough(rsa_key):
    """Version, modulus and exponent are all the matcher reads; the full load judges the rest."""
    r = rsa_key
    three = [integer(0), integer(r.values[1]), integer(r.values[2])]
    assert key_matches(pem("RSA PRIVATE KEY", r.pkcs1(elements=three)), r.cert) is True
    odd_fourth = pem("RSA PRIVATE KEY", r.pkcs1(elements=three + [tlv(OCTET_STRING, b"d")]))
    assert key_matches(odd_fourth, r.cert) is True


def test_public_keys_of_every_length_are_encoded_as_cryptography_does():
    """The SubjectPublicKeyInfo the matcher writes for an RSA key, for moduli whose encodings
    cross the short/long DER length forms (127/128 and 255/256 content bytes)."""
    e = 65537
    for size in range(110, 270):
        n = (1 << (8 * size - 1)) | 1
        expected = rsa.RSAPublicNumbers(e, n).public_key().public_bytes(DER, SPKI)
        key = pem("RSA PRIVATE KEY", seq(integer(0), integer(n), integer(e)))
        assert key_spki(key) == expected, size
    k = ec.generate_private_key(ec.SECP521R1())             # the long length form for EC
    spki = k.public_key().public_bytes(DER, SPKI)
    for fmt in (PKCS8, TRADITIONAL):
        assert key_spki(k.private_bytes(serialization.Encoding.PEM, fmt, NOENC)) == spki


def test_the_usual_p256_layout_takes_no_der_walk(monkeypatch, p256):
    """The fixed PKCS#8 P-256 layout (OpenSSL's, cryptography's, certbot's, Caddy's) is what keeps
    start-up with thousands of keys fast: it is answered by comparing bytes, not parsing DER."""
    spki = p256.cert.public_key().public_bytes(DER, SPKI)
    key = pem("PRIVATE KEY", p256.pkcs8())

    def no_der(*args):
        raise AssertionError("the DER parser ran")

    monkeypatch.setattr(keymatch, "_tlv", no_der)
    assert key_spki(key) == spki
    with pytest.raises(AssertionError):
        key_spki(pem("EC PRIVATE KEY", p256.sec1()))


@pytest.mark.parametrize("what,tbs", [
    ("empty", b""),
    ("empty SEQUENCE", b"\x30\x00"),        # indexed past its end before the guard
    ("SET", b"\x31\x03\x02\x01\x00"),
    ("too few elements", seq(tlv(0xA0, integer(2)), integer(1), seq(), seq())),
    ("public key info not SEQUENCE", seq(integer(1), seq(), seq(), seq(), seq(), tlv(SET, b""))),
])
def test_malformed_tbs_certificates(p384, what, tbs):
    with pytest.raises(ValueError):
        certificate_spki(tbs)
    assert key_matches(pem("EC PRIVATE KEY", p384.sec1()), TBSOnly(tbs)) is None


def test_the_certificate_key_info_is_compared_whole(p384):
    tbs = p384.cert.tbs_certificate_bytes
    assert key_matches(pem("EC PRIVATE KEY", p384.sec1()), TBSOnly(tbs)) is True
    spki = p384.cert.public_key().public_bytes(DER, SPKI)
    other = EC(ec.SECP384R1(), P384).cert.public_key().public_bytes(DER, SPKI)
    assert tbs.count(spki) == 1 and len(other) == len(spki)
    assert key_matches(pem("EC PRIVATE KEY", p384.sec1()), TBSOnly(tbs.replace(spki, other))) is None


def _mutations(der: bytes, rng: random.Random):
    """Every truncation, then flips, deletions and insertions at random places."""
    for n in range(len(der)):
        yield der[:n]
    for _ in range(100):
        i = rng.randrange(len(der))
        b = bytearray(der)
        b[i] ^= 1 << rng.randrange(8)
        yield bytes(b)
        yield der[:i] + der[i + 1:]
        yield der[:i] + bytes((rng.randrange(256),)) + der[i:]
        b[i] = rng.choice((0x00, 0x30, 0x80, 0x81, 0x84, 0x85, 0xA0, 0xA1, 0xFF))
        yield bytes(b)


def test_fuzzed_der_never_escapes_as_another_exception(p384, p256, rsa_key):
    rng = random.Random(23)
    seen = {True: 0, None: 0}
    for label, der, cert in well_formed(p384, p256, rsa_key):
        for m in _mutations(der, rng):
            text = pem(label, m)
            try:
                key_spki(text)
            except ValueError:
                pass
            result = key_matches(text, cert)     # any exception here fails the test
            assert result in (True, None)
            seen[result] += 1
    for label, der, cert in well_formed(p384, p256, rsa_key)[::2]:   # one per certificate
        for m in _mutations(cert.tbs_certificate_bytes, rng):
            try:
                certificate_spki(m)
            except ValueError:
                pass
            assert key_matches(pem(label, der), TBSOnly(m)) in (True, None)
    assert seen[None] > seen[True] > 0


def test_an_ed25519_certificate_with_an_ec_key():
    ed = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ed.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(ed, None))
    k = EC(ec.SECP384R1(), P384)
    assert key_matches(pem("EC PRIVATE KEY", k.sec1()), cert) is None
