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
from OpenSSL.SSL import _ffi, _lib   # pyOpenSSL's cffi binding (the callbacks, below)

from .certcache import SELF_SIGNED, Certificate, CertificateCache

log = logging.getLogger("proxy.tls")

ACME_TLS_1 = b"acme-tls/1"
HTTP_1_1 = b"http/1.1"

# The three callbacks are registered on pyOpenSSL's cffi binding directly, not through
# pyOpenSSL's wrappers, which per handshake look the Connection up in a weak dictionary,
# go through two more Python calls (get_servername, set_context), split the ALPN offer into
# a list, and keep two new cffi buffers with the ALPN answer on every connection until it
# closes (OpenSSL copies the answer at once). Here: the Connection is looked up only where
# it is needed (acme-tls/1, a staple to send, recording the switched context), usual ALPN
# offers are recognised whole, and OpenSSL is pointed at constant buffers. Measured
# (benchmarks/tls-io-notes.md): -6.6k instructions per handshake (servername), -38k for a
# client that also sends ALPN and status_request as browsers do, -225 B per idle connection
# with ALPN. pyOpenSSL's public API is used instead if its binding lacks what this needs.
_DIRECT = all(hasattr(_lib, a) for a in (
    "SSL_CTX_set_alpn_select_cb", "SSL_CTX_set_tlsext_servername_callback", "SSL_get_servername",
    "SSL_set_SSL_CTX", "SSL_CTX_set_tlsext_status_cb", "SSL_CTX_set_tlsext_status_arg",
    "SSL_set_tlsext_status_ocsp_resp", "OPENSSL_malloc", "TLSEXT_NAMETYPE_host_name",
    "SSL_TLSEXT_ERR_OK", "SSL_TLSEXT_ERR_NOACK", "SSL_TLSEXT_ERR_ALERT_FATAL")) \
    and hasattr(SSL.Connection, "_reverse_mapping")
_SERVERNAME_CB = "int (*)(SSL *, int *, void *)"
_ALPN_CB = "int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)"
_STATUS_CB = "int (*)(SSL *, void *)"
if _DIRECT:
    _OK, _NOACK, _FATAL = _lib.SSL_TLSEXT_ERR_OK, _lib.SSL_TLSEXT_ERR_NOACK, _lib.SSL_TLSEXT_ERR_ALERT_FATAL
    _HOST_NAME = _lib.TLSEXT_NAMETYPE_host_name
    _get_servername = _lib.SSL_get_servername
    _set_ssl_ctx = _lib.SSL_set_SSL_CTX
    _by_ssl = SSL.Connection._reverse_mapping   # SSL * -> Connection (pyOpenSSL's, weak values)
_NULL = _ffi.NULL
_PROTO = {p: _ffi.new("unsigned char[]", p) for p in (HTTP_1_1, ACME_TLS_1)}   # kept for the process
# Wire-format ALPN offers (length-prefixed names) answered with http/1.1 without parsing
# them: browsers, curl, Go and most other clients send one of these.
_USUAL_OFFERS = frozenset((b"\x08http/1.1", b"\x02h2\x08http/1.1", b"\x08http/1.1\x02h2"))


def _alpn_offers(wire: bytes) -> Optional[list[bytes]]:
    """The protocol names of a wire-format ALPN list; None if it is malformed."""
    out = []
    i, n = 0, len(wire)
    while i < n:
        k = wire[i]
        if k == 0 or i + 1 + k > n:
            return None
        out.append(wire[i + 1:i + 1 + k])
        i += 1 + k
    return out


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
        self._direct = _DIRECT
        if self._direct:   # kept alive by every context that uses them, too (pyOpenSSL's slots)
            self._servername_cb = _ffi.callback(_SERVERNAME_CB, self._on_servername_direct, error=_FATAL)
            self._alpn_cb = _ffi.callback(_ALPN_CB, self._on_alpn_direct, error=_FATAL)
            self._status_cb = _ffi.callback(_STATUS_CB, self._on_status_direct, error=_FATAL)
        # The context a connection starts with: it only runs the servername callback.
        self._initial = self._base_context()
        if self._direct:
            _lib.SSL_CTX_set_tlsext_servername_callback(self._initial._context, self._servername_cb)
            self._initial._tlsext_servername_callback = self._servername_cb
        else:
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
        if self._direct:
            _lib.SSL_CTX_set_alpn_select_cb(ctx._context, self._alpn_cb, _NULL)
            ctx._alpn_select_callback = self._alpn_cb
        else:
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
            if self._direct:
                ctx._ocsp_callback = self._status_cb
                ctx._ocsp_data = handle = _ffi.new_handle(cert)
                _lib.SSL_CTX_set_tlsext_status_cb(ctx._context, self._status_cb)
                _lib.SSL_CTX_set_tlsext_status_arg(ctx._context, handle)
            else:
                ctx.set_ocsp_server_callback(self._on_status, data=cert)
            cert.tls_context = ctx
        return ctx

    def new_connection(self) -> SSL.Connection:
        # OpenSSL (1.1.1 on) runs the servername callback for every ClientHello, with or
        # without SNI: the certificate is chosen there, the initial context has none.
        return SSL.Connection(self._initial, None)

    # --- callbacks (handshake path: memory reads only) ---
    def _on_servername_direct(self, ssl, alert, arg) -> int:
        """OpenSSL's servername callback: _on_servername without pyOpenSSL's wrappers."""
        try:
            p = _get_servername(ssl, _HOST_NAME)
            ctx = self._choose_context(_ffi.string(p) if p != _NULL else None)
            if ctx is not None:
                _set_ssl_ctx(ssl, ctx._context)
                _by_ssl[ssl]._context = ctx   # what Connection.set_context records
                ctx._used = True
            return _OK
        except Exception:   # as pyOpenSSL's wrapper: the handshake fails
            log.exception("choosing the certificate failed")
            return _FATAL

    def _on_servername(self, conn: SSL.Connection) -> None:
        ctx = self._choose_context(conn.get_servername())
        if ctx is not None:
            conn.set_context(ctx)

    def _choose_context(self, raw: Optional[bytes]) -> Optional[SSL.Context]:
        """The context for the server name ``raw`` (None: no SNI); None if there is no
        certificate to serve at all."""
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
                    return None
            ctx = cert.tls_context
            if ctx is None:
                try:
                    ctx = self.context_for(cert)
                except Exception as e:
                    self._key_failed(cert, e)
                    continue
            return ctx
        return None

    @staticmethod
    def _key_failed(cert: Certificate, e: Exception) -> None:
        cert.key_error = f"{type(e).__name__}: {e}"
        log.error("%s certificate for %s (%s) is not served: its private key cannot be used (%s); "
                  "replace the key", cert.source, ", ".join(cert.names), cert.origin or "-", cert.key_error)

    def _on_alpn_direct(self, ssl, out, outlen, in_, inlen, arg) -> int:
        """OpenSSL's ALPN select callback: _on_alpn without pyOpenSSL's wrapper."""
        try:
            wire = _ffi.buffer(in_, inlen)[:]
            if wire in _USUAL_OFFERS:
                chosen = HTTP_1_1
            else:
                offered = _alpn_offers(wire)
                if offered is None:   # (OpenSSL checked the list already)
                    return _FATAL
                if ACME_TLS_1 in offered:
                    chosen = self._on_alpn(_by_ssl[ssl], offered)
                else:
                    chosen = HTTP_1_1 if HTTP_1_1 in offered else None
            if chosen is None or chosen is SSL.NO_OVERLAPPING_PROTOCOLS:
                return _NOACK
            out[0] = _PROTO[chosen]   # OpenSSL copies it before the callback's caller returns
            outlen[0] = len(chosen)
            return _OK
        except Exception:   # the handshake fails, as with pyOpenSSL's wrapper; said why here
            log.exception("ALPN selection failed")
            return _FATAL

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

    def _on_status_direct(self, ssl, arg) -> int:
        """OpenSSL's status (OCSP) callback, for clients that ask: _on_status without
        pyOpenSSL's wrapper; the Connection is looked up only when there is a staple."""
        try:
            staple = _ffi.from_handle(arg).ocsp_staple
            if not staple or _by_ssl[ssl].get_app_data() == "acme-tls/1":
                return _NOACK
            n = len(staple)
            p = _lib.OPENSSL_malloc(n)   # OpenSSL takes it over
            if p == _NULL:
                return _FATAL
            _ffi.buffer(p, n)[:] = staple
            _lib.SSL_set_tlsext_status_ocsp_resp(ssl, p, n)
            return _OK
        except Exception:
            log.exception("OCSP status callback failed")
            return _FATAL

    def _on_status(self, conn: SSL.Connection, cert: Certificate) -> bytes:
        if conn.get_app_data() == "acme-tls/1":
            return b""
        return cert.ocsp_staple or b""
