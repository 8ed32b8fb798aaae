"""The certificate cache: server name -> certificate, manual certificates first.

The only certificate state shared between the traffic side (handshakes read it) and the
management side (autocert and the OCSP stapler write it). Lookups are dict reads: O(1) in
the number of certificates, never waiting on storage or the network.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import threading
import time
from dataclasses import InitVar, dataclass, field
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, NameOID

MANUAL = "manual"
ACME = "acme"
SELF_SIGNED = "self-signed"


class CertificateProblem(ValueError):
    """A certificate or key that cannot be used; the message says why."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def aia_ocsp_url(aia: x509.AuthorityInformationAccess) -> Optional[str]:
    """The first http(s) OCSP responder URL of an AIA extension value, or None."""
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
            desc.access_location, x509.UniformResourceIdentifier
        ):
            url = desc.access_location.value.strip()
            if url.lower().startswith(("http://", "https://")):
                return url
    return None


def _leaf_facts(cert: x509.Certificate) -> tuple[tuple[str, ...], bool, Optional[str]]:
    """(names, must-staple, OCSP URL) from one pass over the extensions; the names are the
    SAN DNS entries and IP addresses (RFC 8738 certificates), else the subject CN. (Asking for each extension by OID raises
    ExtensionNotFound for the absent ones: ~10 us each, thousands at start.)"""
    names: list[str] = []
    must_staple = False
    url = None
    for ext in cert.extensions:
        oid = ext.oid
        if oid == _SAN:
            names = [g.value.lower().rstrip(".") if isinstance(g, _DNSName) else str(g.value)
                     for g in ext.value if isinstance(g, (_DNSName, _IPAddress))]
        elif oid == _TLS_FEATURE:
            must_staple = x509.TLSFeatureType.status_request in ext.value
        elif oid == _AIA:
            url = aia_ocsp_url(ext.value)
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names)), must_staple, url


_SAN = ExtensionOID.SUBJECT_ALTERNATIVE_NAME
_TLS_FEATURE = ExtensionOID.TLS_FEATURE
_AIA = ExtensionOID.AUTHORITY_INFORMATION_ACCESS
_DNSName = x509.DNSName
_IPAddress = x509.IPAddress


def split_pem_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateProblem(f"not a PEM certificate: {e}") from None


@dataclass(eq=False)
class Certificate:
    """One certificate chain and its key, as served. ``ocsp_staple`` is set by the stapler.

    Everything a handshake reads (names, expiry, must-staple) is computed once here, as plain
    attributes; the key is parsed only when the TLS engine first builds the context."""

    chain_pem: bytes
    key_pem: bytes
    source: str                  # MANUAL | ACME | SELF_SIGNED
    origin: str = ""             # where it came from (file path, storage key)
    issuer_id: str = ""          # for ACME certificates: the CA's storage id
    leaf: x509.Certificate = field(init=False)
    chain: list[x509.Certificate] = field(init=False)
    names: tuple[str, ...] = field(init=False)
    not_after: _dt.datetime = field(init=False)
    must_staple: bool = field(init=False)
    ocsp_url: Optional[str] = field(init=False)   # the OCSP responder, None when there is none
    ocsp_staple: Optional[bytes] = None   # DER OCSPResponse, "good" and valid, or None
    revoked: bool = False
    tls_context: object = None             # built lazily by the TLS engine
    key_checked: bool = False              # the caller already matched key and certificate
    parsed: InitVar[Optional[Sequence[x509.Certificate]]] = None   # the chain, when the caller parsed it
    # Set when the key turned out unusable while building the TLS context (a corrupt private
    # part behind a public part that matched): the certificate is then never served.
    key_error: Optional[str] = None

    def __post_init__(self, parsed: Optional[Sequence[x509.Certificate]]) -> None:
        self.chain = list(parsed) if parsed else split_pem_chain(self.chain_pem)
        self.leaf = leaf = self.chain[0]
        self.names, self.must_staple, self.ocsp_url = _leaf_facts(leaf)
        self.not_after = leaf.not_valid_after_utc
        self._not_after_ts = self.not_after.timestamp()   # the handshake compares floats
        if self.key_checked:
            return   # config validation matched the key; it is parsed only for the TLS context
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

    def expired(self, now: Optional[_dt.datetime] = None) -> bool:
        return (now or _now()) >= self.not_after

    @property
    def servable(self) -> bool:
        """False for a must-staple certificate without a staple (no client may see it so),
        and for one whose key proved unusable."""
        return (self.ocsp_staple is not None or not self.must_staple) and self.key_error is None

    def covers(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        return name in self.names or wildcard_of(name) in self.names

    def __repr__(self) -> str:
        return f"<Certificate {self.source} {','.join(self.names)} until {self.not_after:%Y-%m-%d}>"


def _is_ip(name: str) -> bool:
    if not (name[-1:].isdigit() or ":" in name):   # (cheap: a DNS name never ends in a digit)
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


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
        # names that are IP addresses: a client without SNI gets the certificate for the
        # address it connected to (empty: the handshake path never asks for that address)
        self.ip_names: frozenset[str] = frozenset()
        self.version = 0   # changes whenever the set of certificates changes (readers: cache.all)

    # --- reads (handshake path) ---
    def lookup(self, server_name: str) -> Optional[Certificate]:
        """Exact name first, then the one-label wildcard; a valid certificate (not expired,
        not revoked, servable) wins, else any servable one. Plain attribute reads and one
        float clock read: this runs inside every handshake."""
        name = server_name.lower().rstrip(".")
        idx = self._index
        now = time.time()
        exact = idx.get(name, ())
        for c in exact:
            if c._not_after_ts > now and not c.revoked and c.servable:
                return c
        wild = idx.get(wildcard_of(name), ())
        for c in wild:
            if c._not_after_ts > now and not c.revoked and c.servable:
                return c
        for c in exact + wild:   # nothing better: an expired or revoked one beats a wrong name
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
        self.ip_names = frozenset(n for n in self._index if _is_ip(n))
        self._default = self._manual[0] if self._manual else self._fallback
        self.version += 1
