"""The certificate cache: server name -> certificate, manual certificates first.

The only certificate state shared between the traffic side (handshakes read it) and the
management side (autocert and the OCSP stapler write it). Lookups are dict reads: O(1) in
the number of certificates, never waiting on storage or the network.
"""
from __future__ import annotations

import datetime as _dt
import functools
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

MANUAL = "manual"
ACME = "acme"
SELF_SIGNED = "self-signed"


class CertificateProblem(ValueError):
    """A certificate or key that cannot be used; the message says why."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names a certificate covers: its SAN DNS entries, else its subject CN."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        names = [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names))


def split_pem_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateProblem(f"not a PEM certificate: {e}") from None


@dataclass(eq=False)
class Certificate:
    """One certificate chain and its key, as served. ``ocsp_staple`` is set by the stapler."""

    chain_pem: bytes
    key_pem: bytes
    source: str                  # MANUAL | ACME | SELF_SIGNED
    origin: str = ""             # where it came from (file path, storage key)
    issuer_id: str = ""          # for ACME certificates: the CA's storage id
    leaf: x509.Certificate = field(init=False)
    chain: list[x509.Certificate] = field(init=False)
    names: tuple[str, ...] = field(init=False)
    ocsp_staple: Optional[bytes] = None   # DER OCSPResponse, "good" and valid, or None
    revoked: bool = False
    tls_context: object = None             # built lazily by the TLS engine
    key_checked: bool = False              # the caller already matched key and certificate

    def __post_init__(self) -> None:
        self.chain = split_pem_chain(self.chain_pem)
        self.leaf = self.chain[0]
        self.names = certificate_names(self.leaf)
        if self.key_checked:
            return   # config validation parsed the key; it is parsed again only for the TLS context
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CertificateProblem(f"private key cannot be read: {e}") from None
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CertificateProblem("the private key does not match the certificate")

    @property
    def not_before(self) -> _dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> _dt.datetime:
        return self.leaf.not_valid_after_utc

    def expired(self, now: Optional[_dt.datetime] = None) -> bool:
        return (now or _now()) >= self.not_after

    @functools.cached_property
    def must_staple(self) -> bool:   # read on every handshake (servable): computed once
        try:
            feat = self.leaf.extensions.get_extension_for_oid(ExtensionOID.TLS_FEATURE)
        except x509.ExtensionNotFound:
            return False
        return x509.TLSFeatureType.status_request in feat.value

    @property
    def servable(self) -> bool:
        """False for a must-staple certificate without a staple: no client may see it so."""
        return self.ocsp_staple is not None or not self.must_staple

    def covers(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        return name in self.names or wildcard_of(name) in self.names

    def __repr__(self) -> str:
        return f"<Certificate {self.source} {','.join(self.names)} until {self.not_after:%Y-%m-%d}>"


def wildcard_of(name: str) -> str:
    """The wildcard name covering ``name`` by one label: a.b.c -> *.b.c ("" if none)."""
    head, dot, rest = name.partition(".")
    return f"*.{rest}" if dot and rest else ""


class CertificateCache:
    """name -> Certificate. Manual certificates win over obtained ones; valid over expired."""

    def __init__(self) -> None:
        self._lock = threading.Lock()   # writers may be threads; readers take a snapshot
        self._manual: list[Certificate] = []
        self._managed: dict[str, Certificate] = {}   # key: name set
        self._index: dict[str, tuple[Certificate, ...]] = {}
        self._default: Optional[Certificate] = None
        self._fallback: Optional[Certificate] = None

    # --- reads (handshake path) ---
    def lookup(self, server_name: str) -> Optional[Certificate]:
        name = server_name.lower().rstrip(".")
        idx = self._index
        cands = idx.get(name, ()) + idx.get(wildcard_of(name), ())
        if not cands:
            return None
        now = _now()
        for c in cands:
            if not c.expired(now) and not c.revoked and c.servable:
                return c
        for c in cands:   # nothing better: an expired or revoked one beats a wrong name
            if c.servable:
                return c
        return None

    def default(self) -> Optional[Certificate]:
        """The certificate for clients without SNI or with an unknown name."""
        d = self._default
        if d is not None and not d.servable:
            for c in self._manual:
                if c.servable:
                    return c
            return self._fallback
        return d

    def all(self) -> list[Certificate]:
        return list(self._manual) + list(self._managed.values())

    def managed(self, name: str) -> Optional[Certificate]:
        return self._managed.get(name.lower())

    def manual_covering(self, name: str) -> Optional[Certificate]:
        for c in self._manual:
            if c.covers(name):
                return c
        return None

    # --- writes (management side) ---
    def set_fallback(self, cert: Certificate) -> None:
        """The self-signed certificate used when no manual certificate exists."""
        with self._lock:
            self._fallback = cert
            self._rebuild()

    def replace_manual(self, certs: Iterable[Certificate]) -> list[Certificate]:
        """Install ``certs``; an unchanged certificate keeps its served object (built context,
        staple). Returns the objects now served, in order."""
        with self._lock:
            old = {c.chain_pem: c for c in self._manual}
            self._manual = [old.get(c.chain_pem, c) for c in certs]
            self._rebuild()
            return list(self._manual)

    def put_managed(self, cert: Certificate) -> None:
        """Add or replace the obtained certificate for ``cert.names`` (renewal swaps it)."""
        with self._lock:
            for n in cert.names:
                prev = self._managed.get(n)
                if prev is not None and prev is not cert:
                    for pn in prev.names:
                        if self._managed.get(pn) is prev:
                            del self._managed[pn]
            for n in cert.names:
                self._managed[n] = cert
            self._rebuild()

    def remove_managed(self, name: str) -> None:
        with self._lock:
            self._managed.pop(name.lower(), None)
            self._rebuild()

    def _rebuild(self) -> None:
        index: dict[str, list[Certificate]] = {}
        for c in self._manual:
            for n in c.names:
                index.setdefault(n, []).append(c)
        seen = set()
        for c in self._managed.values():
            if id(c) in seen:
                continue
            seen.add(id(c))
            for n in c.names:
                index.setdefault(n, []).append(c)
        self._index = {k: tuple(v) for k, v in index.items()}   # atomic swap for readers
        self._default = self._manual[0] if self._manual else self._fallback
