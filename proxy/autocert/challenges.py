"""Challenge material: HTTP-01 key authorizations and TLS-ALPN-01 certificates. No I/O.

The ACME issuer ``present``s a challenge here before telling the CA to validate and
``remove``s it afterwards; the traffic side reads it:

- the :80 listener answers ``GET /.well-known/acme-challenge/<token>`` with ``http01(token)``;
- the TLS engine, when a client offers ALPN ``acme-tls/1``, serves ``tls_alpn(server_name)``
  (``conn.use_certificate`` / ``conn.use_privatekey`` in the ALPN select callback).

``ChallengeStore`` is thread-safe: the issuer runs in a worker thread, the readers on the loop.
The TLS-ALPN-01 certificate is built once, at ``present`` time, so the handshake path only
does a dictionary lookup.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"
CHALLENGE_TYPES = (HTTP_01, TLS_ALPN_01)

#: RFC 8737 section 3: id-pe-acmeIdentifier
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: The ALPN protocol the CA offers when validating TLS-ALPN-01.
ACME_TLS_ALPN_PROTOCOL = b"acme-tls/1"
#: Where HTTP-01 tokens are fetched from (RFC 8555 section 8.3).
HTTP01_PATH_PREFIX = "/.well-known/acme-challenge/"


def preferred_challenge_types(tls_port: int, http_port: Optional[int]) -> tuple[str, ...]:
    """Challenge types in the order to try them, from the listeners' ports.

    Pomerium's rule: HTTP-01 needs the plain-HTTP listener on 80, TLS-ALPN-01 the TLS listener on
    443 (a CA validates there). The one the ports make possible comes first; the other is still
    tried, for ports remapped in front of the proxy (NAT, a load balancer, a test CA)."""
    if http_port is None:
        return (TLS_ALPN_01,)
    if http_port == 80 and tls_port != 443:
        return (HTTP_01, TLS_ALPN_01)
    return (TLS_ALPN_01, HTTP_01)


@dataclass(frozen=True)
class Challenge:
    """One challenge chosen for one authorization."""

    type: str               # "http-01" or "tls-alpn-01"
    domain: str             # the identifier being validated (lower case, no trailing dot)
    token: str
    key_authorization: str  # token + "." + base64url(SHA-256 JWK thumbprint of the account key)

    def __post_init__(self) -> None:
        if self.type not in CHALLENGE_TYPES:
            raise ValueError(f"unsupported challenge type {self.type!r}; expected one of {CHALLENGE_TYPES}")

    def to_json(self) -> bytes:
        return json.dumps({"type": self.type, "domain": self.domain, "token": self.token,
                           "key_authorization": self.key_authorization}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Challenge":
        d = json.loads(data)
        return cls(type=d["type"], domain=d["domain"], token=d["token"],
                   key_authorization=d["key_authorization"])


def _der_octet_string(value: bytes) -> bytes:
    # DER OCTET STRING of a short value (the 32-byte digest): tag 0x04, short-form length.
    if len(value) > 127:
        raise ValueError("value too long for this encoder")
    return bytes([0x04, len(value)]) + value


def acme_identifier_value(key_authorization: str) -> bytes:
    """The DER content of the acmeIdentifier extension: OCTET STRING(SHA-256(keyAuthorization))."""
    return _der_octet_string(hashlib.sha256(key_authorization.encode("ascii")).digest())


def ip_literal(name: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def sni_name(identifier: str) -> str:
    """The name a CA sends with SNI to validate ``identifier`` with TLS-ALPN-01: the name itself,
    or for an IP address its reverse-mapping name (RFC 8738 section 6: 7.113.0.203.in-addr.arpa)."""
    ip = ip_literal(identifier)
    return ip.reverse_pointer if ip is not None else identifier.lower().rstrip(".")


def ip_from_sni(name: str) -> Optional[str]:
    """The IP address a reverse-mapping SNI name stands for (``sni_name``'s inverse), or None."""
    name = name.lower().rstrip(".")
    if name.endswith(".in-addr.arpa"):
        parts = name[:-len(".in-addr.arpa")].split(".")
        text = ".".join(reversed(parts)) if len(parts) == 4 else ""
    elif name.endswith(".ip6.arpa"):
        nibbles = name[:-len(".ip6.arpa")].split(".")
        hexa = "".join(reversed(nibbles)) if len(nibbles) == 32 else ""
        text = ":".join(hexa[i:i + 4] for i in range(0, 32, 4)) if hexa else ""
    else:
        return None
    ip = ip_literal(text) if text else None
    return str(ip) if ip is not None and ip.reverse_pointer == name else None


def tls_alpn_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """A self-signed RFC 8737 validation certificate for ``domain``: (cert_pem, key_pem).

    P-256 key, SAN dNSName = domain (iPAddress for an IP address, RFC 8738), critical
    acmeIdentifier extension, valid for a few days.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ip) if (ip := ip_literal(domain)) is not None else x509.DNSName(domain)]),
            critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, acme_identifier_value(key_authorization)),
            critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


_UNSAFE = re.compile(r"[^\w@.\-]", re.ASCII)   # Go's \w, as certmagic's safeKeyRE


def safe_key(name: str) -> str:
    """certmagic's ``StorageKeys.Safe``: one path segment made of safe characters only."""
    s = name.strip().lower()
    s = s.replace(" ", "_").replace("+", "_plus_").replace("*", "wildcard_").replace(":", "-")
    s = s.replace("..", "")
    return _UNSAFE.sub("", s)


def storage_key(ch: Challenge, issuer_key: str = "") -> str:
    """Where a presented challenge is kept in shared storage, so any instance can answer the CA.

    certmagic's distributed solver keeps one JSON record per domain under the issuer:
    ``acme/<issuer>/challenge_tokens/<domain>.json``; a reader finds it by the name the CA
    asks for (Host header for HTTP-01, SNI for TLS-ALPN-01) and checks the token. The record is
    ``ch.to_json()``. ``issuer_key`` is ``issuer_id(directory_url)``; without it the key is
    ``challenge_tokens/<domain>.json``.
    """
    leaf = f"challenge_tokens/{safe_key(ch.domain.rstrip('.'))}.json"
    return f"acme/{safe_key(issuer_key)}/{leaf}" if issuer_key else leaf


class ChallengeStore:
    """Challenges presented right now. Thread-safe; readers never block on I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: dict[str, Challenge] = {}                  # token -> challenge
        # domain -> (challenge, cert_pem, key_pem, parsed cert, parsed key)
        self._alpn: dict[str, tuple[Challenge, bytes, bytes, x509.Certificate, Any]] = {}

    @staticmethod
    def _norm(domain: str) -> str:
        return sni_name(domain)   # TLS-ALPN-01 challenges are looked up by the SNI the CA sends

    def present(self, ch: Challenge) -> None:
        if ch.type == HTTP_01:
            with self._lock:
                self._http[ch.token] = ch
        else:
            cert_pem, key_pem = tls_alpn_certificate(ch.domain, ch.key_authorization)
            entry = (ch, cert_pem, key_pem, x509.load_pem_x509_certificate(cert_pem),
                     serialization.load_pem_private_key(key_pem, None))
            with self._lock:
                self._alpn[self._norm(ch.domain)] = entry

    def remove(self, ch: Challenge) -> None:
        """Forget ``ch``; a newer challenge presented for the same domain/token is kept."""
        with self._lock:
            if ch.type == HTTP_01:
                if self._http.get(ch.token) == ch:
                    del self._http[ch.token]
            else:
                d = self._norm(ch.domain)
                cur = self._alpn.get(d)
                if cur is not None and cur[0] == ch:
                    del self._alpn[d]

    def http01(self, token: str) -> Optional[str]:
        """The key authorization to answer ``GET /.well-known/acme-challenge/<token>``."""
        with self._lock:
            ch = self._http.get(token)
        return ch.key_authorization if ch else None

    def tls_alpn(self, domain: str) -> Optional[tuple[bytes, bytes]]:
        """(cert_pem, key_pem) to serve to an ``acme-tls/1`` client asking for ``domain``."""
        with self._lock:
            cur = self._alpn.get(self._norm(domain))
        return (cur[1], cur[2]) if cur else None

    def tls_alpn_objects(self, domain: str) -> Optional[tuple[x509.Certificate, Any]]:
        """Like ``tls_alpn`` but parsed, ready for ``conn.use_certificate`` / ``use_privatekey``."""
        with self._lock:
            cur = self._alpn.get(self._norm(domain))
        return (cur[3], cur[4]) if cur else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._http) + len(self._alpn)
