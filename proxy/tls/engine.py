"""The TLS engine: pyOpenSSL contexts and the three handshake callbacks.

- servername: picks the certificate from the cache (manual first, then obtained; the
  default for clients without SNI or with an unknown name) and switches the context.
- ALPN: ``http/1.1``; when a client offers ``acme-tls/1`` (RFC 8737), the challenge
  certificate for the name replaces the certificate on that one connection.
- status: the OCSP staple held on the certificate, if any.
The handshake never waits on storage or the network: every callback reads memory only.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from .certcache import SELF_SIGNED, Certificate, CertificateCache

log = logging.getLogger("proxy.tls")

ACME_TLS_1 = b"acme-tls/1"
HTTP_1_1 = b"http/1.1"

# Mozilla "intermediate" (v5.7) TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
# The DHE suites are left out: they need DH parameters, and every client that supports
# them also supports ECDHE.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Returns (certificate, private key) as cryptography objects for a name with a pending
# TLS-ALPN-01 challenge, else None.
ChallengeLookup = Callable[[str], Optional[tuple[object, object]]]


def self_signed_certificate(name: str = "autocert-proxy.invalid") -> Certificate:
    """The default certificate when no manual one is configured, so the proxy always starts."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        chain_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        source=SELF_SIGNED, origin="generated at start",
    )


class TLSEngine:
    def __init__(self, cache: CertificateCache, challenge_lookup: Optional[ChallengeLookup] = None):
        self.cache = cache
        self.challenge_lookup: ChallengeLookup = challenge_lookup or (lambda name: None)
        # The context a connection starts with: it only runs the servername callback.
        self._initial = self._base_context()
        self._initial.set_tlsext_servername_callback(self._on_servername)
        self._challenge_contexts: dict[bytes, SSL.Context] = {}
        # Runs on a connection's first bytes before OpenSSL sees them (the autocert manager's
        # storage look-up for challenges and names obtained elsewhere); None: nothing to do.
        self.prepare: Optional[Callable[[bytes], object]] = None

    # --- contexts ---
    def _base_context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(INTERMEDIATE_CIPHERS.encode())
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_alpn_select_callback(self._on_alpn)
        return ctx

    def context_for(self, cert: Certificate) -> SSL.Context:
        """The context serving ``cert``: built on first use and kept on the certificate.

        Raises when the key cannot be used (the config matched only its public part)."""
        ctx = cert.tls_context
        if ctx is None:
            ctx = self._base_context()
            ctx.use_certificate(cert.leaf)
            for extra in cert.chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(serialization.load_pem_private_key(cert.key_pem, password=None))
            ctx.set_ocsp_server_callback(self._on_status, data=cert)
            cert.tls_context = ctx
        return ctx

    def new_connection(self) -> SSL.Connection:
        # OpenSSL (1.1.1 on) runs the servername callback for every ClientHello, with or
        # without SNI: the certificate is chosen there, the initial context has none.
        return SSL.Connection(self._initial, None)

    # --- callbacks (handshake path: memory reads only) ---
    def _on_servername(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        for _ in range(8):   # a certificate whose key fails is marked unservable: choose again
            cert = None
            if raw:
                try:
                    cert = self.cache.lookup(raw.decode("ascii"))
                except UnicodeDecodeError:
                    cert = None
            if cert is None:
                cert = self.cache.default()
                if cert is None:
                    return
            ctx = cert.tls_context
            if ctx is None:
                try:
                    ctx = self.context_for(cert)
                except Exception as e:
                    self._key_failed(cert, e)
                    continue
            conn.set_context(ctx)
            return

    @staticmethod
    def _key_failed(cert: Certificate, e: Exception) -> None:
        cert.key_error = f"{type(e).__name__}: {e}"
        log.error("%s certificate for %s (%s) is not served: its private key cannot be used (%s); "
                  "replace the key", cert.source, ", ".join(cert.names), cert.origin or "-", cert.key_error)

    def _on_alpn(self, conn: SSL.Connection, offered: list[bytes]):
        if ACME_TLS_1 in offered:
            raw = conn.get_servername()
            material = self.challenge_lookup(raw.decode("ascii", "replace").lower()) if raw else None
            if material is None:
                log.warning("acme-tls/1 handshake for %r with no pending challenge", raw)
                return SSL.NO_OVERLAPPING_PROTOCOLS
            cert, key = material
            conn.use_certificate(cert)
            conn.use_privatekey(key)
            conn.set_app_data("acme-tls/1")
            return ACME_TLS_1
        if HTTP_1_1 in offered:
            return HTTP_1_1
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _on_status(self, conn: SSL.Connection, cert: Certificate) -> bytes:
        if conn.get_app_data() == "acme-tls/1":
            return b""
        return cert.ocsp_staple or b""
