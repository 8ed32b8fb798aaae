"""The cheap key/certificate match used at start (proxy.tls.keymatch): True only when sure."""
from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from proxy.tls.keymatch import certificate_spki, key_matches, key_spki

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8, TRADITIONAL = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _cert(key) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k.test")])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, algorithm))


KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("fmt", [PKCS8, TRADITIONAL], ids=["pkcs8", "traditional"])
def test_matching_key_in_common_formats(kind, fmt):
    key = KEYS[kind]()
    cert = _cert(key)
    pem = key.private_bytes(PEM, fmt, serialization.NoEncryption())
    assert key_spki(pem) == cert.public_key().public_bytes(DER, SPKI)
    assert certificate_spki(cert.tbs_certificate_bytes) == cert.public_key().public_bytes(DER, SPKI)
    assert key_matches(pem, cert) is True
    assert key_matches(pem.replace(b"\n", b"\r\n"), cert) is True
    # another key of the same kind: no match (the full load then reports it)
    assert key_matches(pem, _cert(KEYS[kind]())) is None


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_encrypted_truncated_or_foreign_keys_are_left_to_the_full_load(kind):
    key = KEYS[kind]()
    cert = _cert(key)
    enc = key.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"pw"))
    trad_enc = key.private_bytes(PEM, TRADITIONAL, serialization.BestAvailableEncryption(b"pw"))
    pem = key.private_bytes(PEM, PKCS8, serialization.NoEncryption())
    for data in (enc, trad_enc, pem[:-60] + pem[-26:], pem.replace(b"PRIVATE KEY", b"PUBLIC KEY"),
                 b"", b"not pem", cert.public_bytes(PEM),
                 b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n" + pem):
        assert key_matches(data, cert) is None, data[:40]
    ed = ed25519.Ed25519PrivateKey.generate()
    assert key_matches(ed.private_bytes(PEM, PKCS8, serialization.NoEncryption()), _cert(ed)) is None


def corrupt_private_part(key_pem: bytes) -> bytes:
    """A PKCS#8 P-256 key whose public point is intact and whose private scalar is invalid."""
    body = b"".join(key_pem.split(b"-----")[2].split())
    der = bytearray(base64.b64decode(body))
    der[36:68] = b"\xff" * 32
    return (b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(bytes(der))
            + b"-----END PRIVATE KEY-----\n")


def test_corrupt_private_part_passes_the_cheap_check_only():
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(key)
    bad = corrupt_private_part(key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
    assert key_matches(bad, cert) is True     # what this check cannot see ...
    with pytest.raises(ValueError):           # ... the full load (--check, first handshake) does
        serialization.load_pem_private_key(bad, None)


def test_explicit_curve_parameters_are_left_to_the_full_load(tmp_path):
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    key, key8, crt = tmp_path / "k.key", tmp_path / "k8.key", tmp_path / "k.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-param_enc", "explicit",
                    "-noout", "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", str(key), "-out", str(key8)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=x", "-days", "1",
                    "-out", str(crt)], check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert key_matches(key.read_bytes(), cert) is None
    assert key_matches(key8.read_bytes(), cert) is None
