"""The TLS engine: pyOpenSSL contexts and the three handshake callbacks.

- servername: picks the certificate from the cache (manual first, then obtained; for a
  client without SNI or with an unknown name, the certificate for the IP address it
  connected to when one names it, else the default) and switches the context.
- ALPN: ``http/1.1``; when a client offers ``acme-tls/1`` (RFC 8737), the challenge
  certificate for the name replaces the certificate on that one connection.
- status: the OCSP staple held on the certificate, if any.
The handshake never waits on storage or the network: every callback reads memory only.
"""
from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import logging
import socket
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL.SSL import _ffi, _lib   # pyOpenSSL's cffi binding (the callbacks, below)

from .certcache import SELF_SIGNED, Certificate, CertificateCache
from .clienthello import alpn_names
from .socketstream import new_ssl, refuse_missing_internals, servername

log = logging.getLogger("proxy.tls")

ACME_TLS_1 = b"acme-tls/1"
HTTP_1_1 = b"http/1.1"

# Connections are OpenSSL SSL objects made and driven through pyOpenSSL's cffi binding
# (socketstream.new_ssl), without a pyOpenSSL Connection: that wrapper costs ~120 Python
# bytecodes, a weak-dictionary entry and two memory BIOs per connection, and ~400 B per
# idle one. The three callbacks are registered on the binding directly too, not through
# pyOpenSSL's wrappers, which per handshake look the Connection up in a weak dictionary,
# go through two more Python calls (get_servername, set_context), split the ALPN offer into
# a list, and keep two new cffi buffers with the ALPN answer on every connection until it
# closes (OpenSSL copies the answer at once). Here: usual ALPN offers are recognised whole
# and OpenSSL is pointed at constant buffers. Measured (benchmarks/tls-io-notes.md): -6.6k
# instructions per handshake (servername), -38k for a client that also sends ALPN and
# status_request as browsers do, -225 B per idle connection with ALPN. A pyOpenSSL without
# what these use is refused at start, with what it lacks.
REQUIRED = ("SSL_CTX_set_alpn_select_cb", "SSL_CTX_set_tlsext_servername_callback", "SSL_get_servername",
            "SSL_CTX_set_tlsext_status_cb", "SSL_CTX_set_tlsext_status_arg",
            "SSL_set_tlsext_status_ocsp_resp", "OPENSSL_malloc", "TLSEXT_NAMETYPE_host_name",
            "SSL_TLSEXT_ERR_OK", "SSL_TLSEXT_ERR_NOACK", "SSL_TLSEXT_ERR_ALERT_FATAL",
            "SSL_set_SSL_CTX", "SSL_use_certificate", "SSL_use_PrivateKey", "SSL_set_tlsext_status_type",
            "SSL_CTX_set1_curves_list")
_SERVERNAME_CB = "int (*)(SSL *, int *, void *)"
_ALPN_CB = "int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, unsigned int, void *)"
_STATUS_CB = "int (*)(SSL *, void *)"
# (getattr: placeholders so that the import succeeds on any pyOpenSSL; TLSEngine() refuses
# one without these, so no engine ever runs on them)
_OK = getattr(_lib, "SSL_TLSEXT_ERR_OK", 0)
_NOACK = getattr(_lib, "SSL_TLSEXT_ERR_NOACK", 3)
_FATAL = getattr(_lib, "SSL_TLSEXT_ERR_ALERT_FATAL", 2)
_NULL = _ffi.NULL
_STATUSTYPE_NOTHING = -1   # TLSEXT_STATUSTYPE_nothing (not in the binding)
_PROTO = {p: _ffi.new("unsigned char[]", p) for p in (HTTP_1_1, ACME_TLS_1)}   # kept for the process
# Wire-format ALPN offers (length-prefixed names) answered with http/1.1 without parsing
# them: browsers, curl, Go and most other clients send one of these.
_USUAL_OFFERS = frozenset((b"\x08http/1.1", b"\x02h2\x08http/1.1", b"\x08http/1.1\x02h2"))


# Mozilla "intermediate" (v5.7) TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
# The DHE suites are left out: they need DH parameters, and every client that supports
# them also supports ECDHE.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Mozilla "intermediate" key exchange groups, in OpenSSL 3.5+'s tuple syntax with the
# post-quantum X25519MLKEM768 first (as OpenSSL's defaults rank it); the plain list where the
# library lacks either. OpenSSL's defaults also offer X448, secp521r1 and ffdhe groups.
GROUPS = (b"X25519MLKEM768/X25519:prime256v1/secp384r1", b"X25519:prime256v1:secp384r1")

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


def _set_groups(ctx: SSL.Context) -> None:
    """Offer ``GROUPS`` on ``ctx``: the first form this OpenSSL accepts."""
    for groups in GROUPS:
        if _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1:   # (set1_groups_list)
            return
        _lib.ERR_clear_error()
    raise RuntimeError(f"{SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()} accepts none of the "
                       f"key exchange group lists {', '.join(g.decode() for g in GROUPS)}")


def local_ip(fd: int) -> Optional[str]:
    """The local IP address of the connected socket ``fd`` (an IPv4-mapped IPv6 address as
    IPv4, no scope), None when it has none."""
    sock = socket.socket(fileno=fd)   # (only to ask; the stream keeps the descriptor)
    try:
        host = sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.detach()
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class TLSEngine:
    def __init__(self, cache: CertificateCache, challenge_lookup: Optional[ChallengeLookup] = None):
        refuse_missing_internals([f for f in REQUIRED if not hasattr(_lib, f)], "the TLS engine's callbacks use")
        self.cache = cache
        self.challenge_lookup: ChallengeLookup = challenge_lookup or (lambda name: None)
        # kept alive by every context that uses them, too (pyOpenSSL's slots)
        self._servername_cb = _ffi.callback(_SERVERNAME_CB, self._on_servername, error=_FATAL)
        self._alpn_cb = _ffi.callback(_ALPN_CB, self._on_alpn, error=_FATAL)
        self._status_cb = _ffi.callback(_STATUS_CB, self._on_status, error=_FATAL)
        # The context a connection starts with: it only runs the servername callback.
        self._initial = self._base_context()
        _lib.SSL_CTX_set_tlsext_servername_callback(self._initial._context, self._servername_cb)
        self._initial._tlsext_servername_callback = self._servername_cb
        self._challenge_contexts: dict[bytes, SSL.Context] = {}
        # local IP address -> the first context for connections to it (its servername
        # callback knows the address); only for addresses some certificate names
        self._by_local_ip: dict[str, SSL.Context] = {}
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
        _set_groups(ctx)
        _lib.SSL_CTX_set_alpn_select_cb(ctx._context, self._alpn_cb, _NULL)
        ctx._alpn_select_callback = self._alpn_cb
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
            ctx._ocsp_callback = self._status_cb
            ctx._ocsp_data = handle = _ffi.new_handle(cert)
            _lib.SSL_CTX_set_tlsext_status_cb(ctx._context, self._status_cb)
            _lib.SSL_CTX_set_tlsext_status_arg(ctx._context, handle)
            cert.tls_context = ctx
        return ctx

    def new_connection(self, fd: int = -1):
        """A new server SSL object (cffi ``SSL *``; the stream that takes it frees it) for the
        accepted socket ``fd``."""
        # OpenSSL (1.1.1 on) runs the servername callback for every ClientHello, with or
        # without SNI: the certificate is chosen there, the initial context has none.
        if self.cache.ip_names and fd >= 0:   # (no syscall unless a certificate names an IP)
            ctx = self._initial_for(local_ip(fd), self.cache.ip_names)
            if ctx is not None:
                return new_ssl(ctx)
        return new_ssl(self._initial)

    def _initial_for(self, ip: Optional[str], ip_names: frozenset) -> Optional[SSL.Context]:
        """The first context for connections to the local address ``ip`` when a certificate
        names it: its servername callback falls back to that certificate."""
        if ip is None or ip not in ip_names:
            return None
        ctx = self._by_local_ip.get(ip)
        if ctx is None:
            # kept for the process (a connection may still run on it): one per address ever named
            ctx = self._base_context()
            cb = _ffi.callback(_SERVERNAME_CB, functools.partial(self._on_servername, local_ip=ip),
                               error=_FATAL)
            _lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, cb)
            ctx._tlsext_servername_callback = cb   # kept alive with the context
            self._by_local_ip[ip] = ctx
        return ctx

    # --- callbacks (handshake path: memory reads only) ---
    def _on_servername(self, ssl, alert, arg, local_ip: Optional[str] = None) -> int:
        """OpenSSL's servername callback: the certificate's context for the name sent."""
        try:
            ctx = self._choose_context(servername(ssl), local_ip)
            if ctx is not None and _lib.SSL_set_SSL_CTX(ssl, ctx._context) == _NULL:
                log.error("switching to the certificate's context failed")
                return _FATAL
            return _OK
        except Exception:   # as pyOpenSSL's wrapper: the handshake fails
            log.exception("choosing the certificate failed")
            return _FATAL

    def _choose_context(self, raw: Optional[bytes], local_ip: Optional[str] = None) -> Optional[SSL.Context]:
        """The context for the server name ``raw`` (None: no SNI), else for the local address
        ``local_ip`` the client connected to; None if there is no certificate to serve at all."""
        for _ in range(8):   # a certificate whose key fails is marked unservable: choose again
            cert = None
            if raw:
                try:
                    cert = self.cache.lookup(raw.decode("ascii"))
                except UnicodeDecodeError:
                    cert = None
            if cert is None and local_ip is not None:
                cert = self.cache.lookup(local_ip)
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

    def _on_alpn(self, ssl, out, outlen, in_, inlen, arg) -> int:
        """OpenSSL's ALPN select callback: http/1.1, or acme-tls/1 with a challenge's
        certificate for that one connection."""
        try:
            wire = _ffi.buffer(in_, inlen)[:]
            if wire in _USUAL_OFFERS:
                chosen = HTTP_1_1
            else:
                offered = alpn_names(wire)   # (OpenSSL checked the list's form already)
                if ACME_TLS_1 in offered:
                    chosen = self._acme_tls_1(ssl)
                else:
                    chosen = HTTP_1_1 if HTTP_1_1 in offered else None
            if chosen is None:
                return _NOACK
            out[0] = _PROTO[chosen]   # OpenSSL copies it before the callback's caller returns
            outlen[0] = len(chosen)
            return _OK
        except Exception:   # the handshake fails, as with pyOpenSSL's wrapper; said why here
            log.exception("ALPN selection failed")
            return _FATAL

    def _acme_tls_1(self, ssl) -> Optional[bytes]:
        """A client offered acme-tls/1 (RFC 8737): the challenge certificate for its name on
        this connection (and no OCSP staple), or None (not acknowledged) without a pending
        challenge."""
        raw = servername(ssl)
        material = self.challenge_lookup(raw.decode("ascii", "replace").lower()) if raw else None
        if material is None:
            log.warning("acme-tls/1 handshake for %r with no pending challenge", raw)
            return None
        cert, key = material
        if (_lib.SSL_use_certificate(ssl, crypto.X509.from_cryptography(cert)._x509) != 1
                or _lib.SSL_use_PrivateKey(ssl, crypto.PKey.from_cryptography_key(key)._pkey) != 1):
            raise RuntimeError("the challenge certificate or key was refused by OpenSSL")
        # The status callback runs after this one (TLS 1.3): no staple for the challenge.
        _lib.SSL_set_tlsext_status_type(ssl, _STATUSTYPE_NOTHING)
        return ACME_TLS_1

    def _on_status(self, ssl, arg) -> int:
        """OpenSSL's status (OCSP) callback, for clients that ask: the certificate's staple."""
        try:
            staple = _ffi.from_handle(arg).ocsp_staple
            if not staple:
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

