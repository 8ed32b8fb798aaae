"""Choosing among the certificate chains a CA offers (RFC 8555 7.4.2: the default chain, and
others behind ``Link: <url>;rel="alternate"``). Pure.

``autocert_preferred_chain`` names an issuer by its common name, as certbot's and lego's
``--preferred-chain`` and Caddy's ``preferred_chains`` do: a chain whose topmost certificate
was issued by that name wins (certbot's rule: it names the root the chain leads to); failing
that, a chain with any certificate issued by that name (lego's rule); failing that, the CA's
default chain.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

_LINK = re.compile(r'<([^>]*)>((?:\s*;\s*(?:[^;,"]|"(?:[^"\\]|\\.)*")+)*)')
_PARAM = re.compile(r';\s*([A-Za-z0-9!#$&+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)')


def alternate_links(header_values: Iterable[str], base_url: str) -> list[str]:
    """The URLs of ``rel="alternate"`` links in Link header values (RFC 8288), made absolute."""
    out: list[str] = []
    for value in header_values:
        for m in _LINK.finditer(value or ""):
            rels: list[str] = []
            for name, val in _PARAM.findall(m.group(2)):
                if name.lower() == "rel":
                    rels += val.strip('"').lower().split()
            if "alternate" in rels:
                url = urllib.parse.urljoin(base_url, m.group(1).strip())
                if url not in out:
                    out.append(url)
    return out


def _issuer_cn(cert: x509.Certificate) -> str:
    attrs = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def chain_issuers(chain_pem: bytes) -> list[str]:
    """Issuer common names of a chain's certificates, leaf first ([] when it cannot be read)."""
    try:
        return [_issuer_cn(c) for c in x509.load_pem_x509_certificates(chain_pem)]
    except ValueError:
        return []


def choose_chain(chains: Sequence[bytes], preferred_issuer: str) -> Optional[int]:
    """Index of the chain ``preferred_issuer`` picks (``chains[0]`` is the CA's default), or
    None when no chain has such an issuer. Chains whose leaf differs from the default's are
    never picked."""
    want = preferred_issuer.strip().lower()
    try:
        leaf = x509.load_pem_x509_certificates(chains[0])[0]
    except (ValueError, IndexError):
        return None
    usable: list[tuple[int, list[str]]] = []
    for i, pem in enumerate(chains):
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            continue
        if certs and certs[0] == leaf:
            usable.append((i, [_issuer_cn(c).lower() for c in certs]))
    for i, issuers in usable:
        if issuers[-1] == want:
            return i
    for i, issuers in usable:
        if want in issuers:
            return i
    return None
