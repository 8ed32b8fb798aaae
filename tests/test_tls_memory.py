"""What an idle TLS connection keeps, and what was not given up to make it smaller.

benchmarks/memory_sites.py breaks an idle connection's memory down by allocation site
(benchmarks/tls-io-notes.md, "Memory per idle TLS connection"). Two settings there trade
memory for behaviour and were kept: session tickets (without them OpenSSL keeps a stateful
session per handshake instead: more memory, and resumption changes) and the post-quantum
hybrid key exchange X25519MLKEM768 that OpenSSL 3.5+ prefers (the client's ML-KEM key share,
about 7 KB, stays with the connection until it closes). These tests pin both, so that neither
is switched off for a smaller figure without a decision.
"""
from __future__ import annotations

import socket
import struct

import pytest
from OpenSSL import SSL

from tests.infra.proxyproc import ProxyProcess, s_client, tls_client_context

from proxy.tls.certcache import CertificateCache
from proxy.tls.engine import TLSEngine


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    routes = [{"from": "https://localhost", "response": {"status": 200, "body": "ok"}}]
    p = ProxyProcess(tmp_path_factory.mktemp("mem"), {"routes": routes}).start()
    yield p
    p.stop()


def _pyopenssl_handshake(port: int, groups: bytes = b"") -> tuple[SSL.Connection, socket.socket]:
    """A client on cryptography's OpenSSL (4.0 here): by default it offers key shares for
    X25519MLKEM768 and X25519, as current browsers do."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if groups:
        from OpenSSL.SSL import _lib
        assert _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
    sock = socket.create_connection(("127.0.0.1", port))   # blocking (OpenSSL reads it itself) ...
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))   # ... but bounded
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    conn.do_handshake()
    return conn, sock


def test_post_quantum_hybrid_is_negotiated_with_clients_that_offer_it(proxy):
    version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).split()[1].decode()
    if tuple(int(x) for x in version.split(".")[:2]) < (3, 5):
        pytest.skip(f"OpenSSL {version} has no X25519MLKEM768")
    conn, sock = _pyopenssl_handshake(proxy.port)
    try:
        assert conn.get_protocol_version_name() == "TLSv1.3"
        assert conn.get_group_name().lower() == "x25519mlkem768"
    finally:
        sock.close()


def test_classical_clients_still_get_x25519(proxy):
    conn, sock = _pyopenssl_handshake(proxy.port, b"X25519:prime256v1")
    try:
        assert conn.get_group_name().lower() == "x25519"
    finally:
        sock.close()
    out = s_client(proxy.port, "localhost")           # the system's OpenSSL 3.0 client
    assert "Server Temp Key: X25519" in out, out


def test_tls13_tickets_are_issued_and_resume(proxy):
    ctx = tls_client_context()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while s.recv(4096):
                pass
            assert s.version() == "TLSv1.3"
            session = s.session
    assert session is not None and session.has_ticket
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            assert s.session_reused


def test_contexts_release_buffers_and_keep_tickets():
    engine = TLSEngine(CertificateCache())
    ctx = engine._base_context()
    assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS   # idle connections hold no record buffers
    assert not ctx.set_options(0) & SSL.OP_NO_TICKET     # stateless tickets, no server-side cache


# --- the engine's callbacks, on pyOpenSSL's binding directly ---------------------------------

def test_a_pyopenssl_without_the_callbacks_internals_is_refused(monkeypatch):
    import proxy.tls.engine as engine_mod
    monkeypatch.setattr(engine_mod, "REQUIRED", engine_mod.REQUIRED + ("SSL_no_such_function",))
    with pytest.raises(RuntimeError, match="lacks SSL_no_such_function, which the TLS engine"):
        _engine()


def _engine(certs=()) -> TLSEngine:
    from proxy.tls.engine import self_signed_certificate
    cache = CertificateCache()
    cache.set_fallback(self_signed_certificate("fallback.invalid"))
    cache.replace_manual(list(certs))
    return TLSEngine(cache)


def _certificate(ca, names):
    from proxy.tls.certcache import MANUAL, Certificate
    leaf = ca.issue(names)
    return Certificate(chain_pem=leaf.cert_path.read_bytes(), key_pem=leaf.key_path.read_bytes(),
                       source=MANUAL, origin="test")


class _Server:
    """The engine's server SSL object over memory BIOs (the proxy's own are on the socket)."""

    def __init__(self, engine: TLSEngine):
        from OpenSSL.SSL import _lib
        from OpenSSL.SSL import _ffi
        self.lib, self.ssl = _lib, _ffi.gc(engine.new_connection(), _lib.SSL_free)
        self.rbio, self.wbio = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
        _lib.SSL_set_bio(self.ssl, self.rbio, self.wbio)   # (freed with the SSL object)
        _lib.SSL_set_accept_state(self.ssl)

    def do_handshake(self) -> None:
        r = self.lib.SSL_do_handshake(self.ssl)
        if r != 1:
            err = self.lib.SSL_get_error(self.ssl, r)
            self.lib.ERR_clear_error()
            if err == self.lib.SSL_ERROR_WANT_READ:
                raise SSL.WantReadError()
            raise SSL.Error(f"server handshake failed ({err})")

    def bio_write(self, data: bytes) -> None:
        if data:
            assert self.lib.BIO_write(self.rbio, data, len(data)) == len(data)

    def bio_read(self, n: int) -> bytes:
        from OpenSSL.SSL import _ffi
        buf = _ffi.new("char[]", n)
        got = self.lib.BIO_read(self.wbio, buf, n)
        if got <= 0:
            raise SSL.WantReadError()
        return _ffi.buffer(buf, got)[:]

    def get_alpn_proto_negotiated(self) -> bytes:
        from proxy.tls.socketstream import selected_alpn
        return selected_alpn(self.ssl) or b""


def _handshake(engine: TLSEngine, offered=(), sni=b"localhost", ocsp=False):
    """An in-process handshake over memory BIOs: (the server, the client Connection, the
    staple the client received or None)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if offered:
        ctx.set_alpn_protos(list(offered))
    got = {}
    if ocsp:
        def ocsp_cb(conn, data, _):
            got["staple"] = data
            return True
        ctx.set_ocsp_client_callback(ocsp_cb)
    client = SSL.Connection(ctx, None)
    if sni:
        client.set_tlsext_host_name(sni)
    if ocsp:
        client.request_ocsp()
    client.set_connect_state()
    server = _Server(engine)
    done = set()
    for _ in range(20):
        for c in (client, server):
            if c not in done:
                try:
                    c.do_handshake()
                    done.add(c)
                except SSL.WantReadError:
                    pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
        if len(done) == 2:
            return server, client, got.get("staple")
    raise AssertionError("no handshake")


def _alpn(engine: TLSEngine, offered) -> tuple[bytes, "_Server"]:
    server, _, _ = _handshake(engine, offered)
    return server.get_alpn_proto_negotiated(), server


def test_servername_selects_the_certificate(ca):
    a, b = _certificate(ca, ["a.example.com"]), _certificate(ca, ["b.example.com"])
    engine = _engine([a, b])
    for sni, want in ((b"b.example.com", b), (b"a.example.com", a), (None, a), (b"nope.example", a)):
        server, client, _ = _handshake(engine, sni=sni)
        assert client.get_peer_certificate().to_cryptography() == want.leaf


@pytest.mark.parametrize("staple", [b"\x30\x03\x0a\x01\x00", None])
def test_status_callback_sends_the_staple(ca, staple):
    cert = _certificate(ca, ["localhost"])
    cert.ocsp_staple = staple
    engine = _engine([cert])
    _, _, got = _handshake(engine, ocsp=True)
    assert got == (staple or b"")


# --- ALPN: the engine's own callback (no per-connection buffers) -------------------------

@pytest.mark.parametrize("offered,chosen", [
    ([b"http/1.1"], b"http/1.1"),
    ([b"h2", b"http/1.1"], b"http/1.1"),
    ([b"http/1.1", b"h2"], b"http/1.1"),
    ([b"spdy/3", b"h2", b"http/1.1", b"http/1.0"], b"http/1.1"),   # parsed, not a usual list
    ([b"h2"], b""),                                                  # no overlap: no ALPN
    ([b"h2", b"h3", b"foo\x08http/1.1"], b""),   # "http/1.1" inside another name is not an offer
])
def test_alpn_selection(offered, chosen):
    got, _ = _alpn(_engine(), offered)
    assert got == chosen


def test_alpn_acme_tls1_without_challenge_is_not_acknowledged():
    got, _ = _alpn(_engine(), [b"acme-tls/1"])
    assert got == b""


def test_alpn_callback_failure_fails_the_handshake(caplog):
    engine = _engine()

    def broken(name):
        raise RuntimeError("storage exploded")
    engine.challenge_lookup = broken
    with pytest.raises(SSL.Error):
        _alpn(engine, [b"acme-tls/1"])
    assert "ALPN selection failed" in caplog.text


def test_acme_tls1_with_challenge_serves_the_challenge_certificate_without_staple(ca):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    cert = _certificate(ca, ["localhost"])
    cert.ocsp_staple = b"\x30\x03\x0a\x01\x00"
    challenge = ca.issue(["localhost"])
    material = (challenge.cert, load_pem_private_key(challenge.key_path.read_bytes(), None))
    engine = _engine([cert])
    engine.challenge_lookup = lambda name: material if name == "localhost" else None
    server, client, staple = _handshake(engine, [b"acme-tls/1"], ocsp=True)
    assert server.get_alpn_proto_negotiated() == b"acme-tls/1"
    assert client.get_peer_certificate().to_cryptography() == challenge.cert
    assert not staple
