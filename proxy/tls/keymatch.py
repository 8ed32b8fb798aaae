"""Does a PEM private key belong to a certificate? Answered from the DER structures alone.

Loading a private key with ``cryptography`` (and computing both public keys to compare them)
costs ~70 us; with thousands of manual certificates that dominates start-up. The public key
is written inside the common private key formats (PKCS#8 and SEC1 EC keys carry the public
point, RSA keys the modulus and exponent), so comparing it with the certificate's
SubjectPublicKeyInfo needs a few slices of DER and no cryptography.

``key_matches`` answers True only when it is sure the key's public part is the certificate's;
anything else (another format, an encrypted key, PEM headers, a key without its public point,
a mismatch, anything malformed) is None: the caller then loads the key the full way, which
also produces the precise error message. What this cheap check cannot see is a private part
that is corrupt while the public part is right: that key fails when its TLS context is first
built (logged, and the certificate is not served), or under ``--check``, which loads every key.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Optional

_OID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")
_OID_RSA = bytes.fromhex("06092a864886f70d010101")
_RSA_ALG_ID = b"\x30\x0d" + _OID_RSA + b"\x05\x00"
_BEGIN = b"-----BEGIN "
# base64 has no "-" (nor ":"): RFC 1421 headers (an encrypted traditional key) never match
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----([^-]*)-----END \1-----")
_SEQUENCE, _OCTET_STRING, _BIT_STRING, _INTEGER, _OID = 0x30, 0x04, 0x03, 0x02, 0x06


class _Malformed(ValueError):
    pass


def _tlv(b: bytes, i: int, limit: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``i`` (ending before ``limit``)."""
    if i + 2 > limit:
        raise _Malformed
    tag, n = b[i], b[i + 1]
    if tag & 0x1F == 0x1F:
        raise _Malformed   # high tag numbers: not in these structures
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4:
            raise _Malformed   # (length bytes past ``limit`` fail the check below)
        n = int.from_bytes(b[i:i + k], "big")
        i += k
    if i + n > limit:
        raise _Malformed
    return tag, i, i + n


def _children(b: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The elements inside a constructed element's content: (tag, tlv start, content start, end)."""
    out = []
    i = start
    while i < end:
        tag, s, e = _tlv(b, i, end)
        out.append((tag, i, s, e))
        i = e
    return out


def _der(tag: int, content: bytes) -> bytes:
    """A DER element: tag, definite length, content."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(ln))) + ln + content


def _seq(content: bytes) -> bytes:
    return _der(_SEQUENCE, content)


def _bit_string(content: bytes) -> bytes:
    return _der(_BIT_STRING, b"\x00" + content)


def certificate_spki(tbs: bytes) -> bytes:
    """The SubjectPublicKeyInfo element (DER) of a TBSCertificate."""
    tag, i, end = _tlv(tbs, 0, len(tbs))
    if tag != _SEQUENCE or i == end:
        raise _Malformed
    if tbs[i] == 0xA0:                 # [0] version
        i = _tlv(tbs, i, end)[2]
    for _ in range(5):                 # serial, signature, issuer, validity, subject
        i = _tlv(tbs, i, end)[2]
    tag, _, e = _tlv(tbs, i, end)
    if tag != _SEQUENCE:
        raise _Malformed
    return tbs[i:e]


def _pem_der(data: bytes) -> tuple[bytes, bytes]:
    """(label, DER) of the only PEM block in ``data``; _Malformed when not exactly one plain block."""
    block = _PEM_BLOCK.search(data) if data.count(_BEGIN) == 1 else None
    if block is None:
        raise _Malformed
    label, body = block.groups()
    try:
        return label, base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _Malformed from None


def _rsa_spki(der: bytes, s: int, e: int) -> bytes:
    kids = _children(der, s, e)   # RSAPrivateKey: version, modulus, publicExponent, ...
    if len(kids) < 3 or any(k[0] != _INTEGER for k in kids[:3]):
        raise _Malformed
    n, pub_e = der[kids[1][1]:kids[1][3]], der[kids[2][1]:kids[2][3]]
    return _seq(_RSA_ALG_ID + _bit_string(_seq(n + pub_e)))


def _ec_parts(der: bytes, s: int, e: int) -> tuple[Optional[bytes], bytes]:
    """ECPrivateKey -> (the [0] parameters element or None, the [1] public key BIT STRING element)."""
    kids = _children(der, s, e)   # version, privateKey, [0] parameters, [1] publicKey
    if len(kids) < 2 or kids[0][0] != _INTEGER or kids[1][0] != _OCTET_STRING:
        raise _Malformed
    params = public = None
    for tag, t0, c0, c1 in kids[2:]:
        if tag == 0xA0:
            inner = _tlv(der, c0, c1)
            params = der[c0:inner[2]]
        elif tag == 0xA1:
            inner = _tlv(der, c0, c1)
            if inner[0] != _BIT_STRING:
                raise _Malformed
            public = der[c0:inner[2]]
    if public is None:
        raise _Malformed   # the public point is optional in SEC1: load the key to know it
    return params, public


# PKCS#8 P-256 keys as OpenSSL, cryptography, certbot and Caddy write them: one fixed layout.
_P256_ALG_ID = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
_P256_PKCS8_HEAD = bytes.fromhex("308187020100") + _P256_ALG_ID + bytes.fromhex("046d306b0201010420")
_P256_PKCS8_PUB = bytes.fromhex("a144034200")        # at 68, after the 32-byte private scalar
_P256_SPKI_HEAD = bytes.fromhex("3059") + _P256_ALG_ID + bytes.fromhex("034200")


def key_spki(key_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) the private key in ``key_pem`` implies, from its own
    fields (PKCS#8 EC/RSA, SEC1 EC, PKCS#1 RSA); _Malformed for anything else."""
    label, der = _pem_der(key_pem)
    if len(der) == 138 and der.startswith(_P256_PKCS8_HEAD) and der[68:73] == _P256_PKCS8_PUB \
            and label == b"PRIVATE KEY":
        return _P256_SPKI_HEAD + der[73:]
    tag, s, e = _tlv(der, 0, len(der))
    if tag != _SEQUENCE or e != len(der):
        raise _Malformed
    if label == b"PRIVATE KEY":
        kids = _children(der, s, e)   # version, AlgorithmIdentifier, privateKey OCTET STRING, ...
        if len(kids) < 3 or kids[0][0] != _INTEGER or kids[1][0] != _SEQUENCE or kids[2][0] != _OCTET_STRING:
            raise _Malformed
        alg = der[kids[1][1]:kids[1][3]]
        alg_kids = _children(der, kids[1][2], kids[1][3])
        if not alg_kids:
            raise _Malformed
        oid = der[alg_kids[0][1]:alg_kids[0][3]]
        ptag, ps, pe = _tlv(der, kids[2][2], kids[2][3])
        if ptag != _SEQUENCE or pe != kids[2][3]:
            raise _Malformed
        if oid == _OID_EC_PUBLIC_KEY:
            if len(alg_kids) != 2 or alg_kids[1][0] != _OID:
                raise _Malformed   # explicit curve parameters: let the full load judge them
            _, public = _ec_parts(der, ps, pe)
            return _seq(alg + public)
        if oid == _OID_RSA:
            return _rsa_spki(der, ps, pe)
        raise _Malformed   # Ed25519, DSA, RSA-PSS, ...: the full load answers
    if label == b"EC PRIVATE KEY":
        params, public = _ec_parts(der, s, e)
        if params is None or params[0] != _OID:
            raise _Malformed   # no curve, or explicit curve parameters: the full load judges
        return _seq(_seq(_OID_EC_PUBLIC_KEY + params) + public)
    if label == b"RSA PRIVATE KEY":
        return _rsa_spki(der, s, e)
    raise _Malformed


def key_matches(key_pem: bytes, cert) -> Optional[bool]:
    """True when the key's public part is the certificate's (``cert``: a cryptography
    x509.Certificate); None when that cannot be told cheaply or it does not match."""
    try:
        return True if key_spki(key_pem) == certificate_spki(cert.tbs_certificate_bytes) else None
    except (_Malformed, IndexError):
        return None
