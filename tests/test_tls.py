"""The TLS engine as a client sees it: SNI selection, default certificates, versions, ALPN."""
from __future__ import annotations

import os
import warnings
import socket
import ssl
import struct
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.infra.pki import TestCA
from tests.infra.proxyproc import ProxyProcess, s_client, served_certificate, tls_client_context
from tests.infra.sslyze import scan as sslyze_scan


def _names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


@pytest.fixture(scope="module")
def module_ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def three_certs(module_ca):
    return {
        "a": module_ca.issue(["a.example.com"]),
        "b": module_ca.issue(["b.example.com", "b2.example.com"]),
        "wild": module_ca.issue(["*.wild.example.com"]),
    }


@pytest.fixture(scope="module")
def sni_proxy(tmp_path_factory, three_certs):
    """One proxy with three manual certificates, shared by the module (starting costs ~1 s)."""
    certs = [{"cert": str(c.cert_path), "key": str(c.key_path)} for c in three_certs.values()]
    routes = [{"from": f"https://{h}", "response": {"status": 200, "body": f"hello {h}"}}
              for h in ("a.example.com", "b.example.com", "b2.example.com", "*.wild.example.com")]
    p = ProxyProcess(tmp_path_factory.mktemp("sni"), {"certificates": certs, "routes": routes}).start()
    yield p
    p.stop()


@pytest.mark.parametrize("server_name,which", [
    ("a.example.com", "a"),
    ("b.example.com", "b"),
    ("b2.example.com", "b"),
    ("x.wild.example.com", "wild"),
    ("A.EXAMPLE.COM", "a"),
])
def test_sni_selects_certificate_s_client(sni_proxy, three_certs, module_ca, server_name, which):
    out = s_client(sni_proxy.port, server_name, "-CAfile", str(module_ca.cert_path),
                   "-verify_hostname", server_name.lower())
    expected = three_certs[which].cert
    cn = expected.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert f"CN = {cn}" in out or f"CN={cn}" in out, out
    assert "Verify return code: 0 (ok)" in out, out
    assert served_certificate(sni_proxy.port, server_name).serial_number == expected.serial_number


@pytest.mark.parametrize("host", ["a.example.com", "b2.example.com", "deep.wild.example.com"])
def test_sni_curl_verifies_served_certificate(sni_proxy, module_ca, host):
    r = sni_proxy.curl(host, "/", cacert=module_ca.cert_path)
    assert r.returncode == 0, r.stderr
    expected = host if not host.endswith("wild.example.com") else "*.wild.example.com"
    assert r.stdout.decode() == f"hello {expected}"


def test_wildcard_does_not_cover_two_labels(sni_proxy, three_certs):
    # x.y.wild.example.com is not covered by *.wild.example.com: the default (first manual) is served.
    cert = served_certificate(sni_proxy.port, "x.y.wild.example.com")
    assert cert.serial_number == three_certs["a"].cert.serial_number


def test_no_sni_gets_first_manual_certificate(sni_proxy, three_certs):
    cert = served_certificate(sni_proxy.port, None)
    assert cert.serial_number == three_certs["a"].cert.serial_number
    out = s_client(sni_proxy.port, None)
    assert "CN = a.example.com" in out or "CN=a.example.com" in out, out


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_no_sni_gets_first_manual_certificate_both_versions(sni_proxy, flag):
    # no SNI: the certificate is still chosen in the servername callback (OpenSSL runs it
    # for every ClientHello); the connection starts on a context without any certificate
    out = s_client(sni_proxy.port, None, flag)
    assert "CN = a.example.com" in out or "CN=a.example.com" in out, out


def test_unknown_name_gets_first_manual_certificate(sni_proxy, three_certs):
    cert = served_certificate(sni_proxy.port, "unknown.example.org")
    assert cert.serial_number == three_certs["a"].cert.serial_number


def test_self_signed_default_when_no_certificate(start_proxy, ca):
    p = start_proxy({"routes": [{"from": "https://localhost", "response": {"status": 200, "body": "ok"}}]})
    for name in (None, "localhost"):
        cert = served_certificate(p.port, name)
        assert cert.issuer == cert.subject   # self-signed
    r = p.curl("localhost")
    assert r.returncode == 0 and r.stdout == b"ok", r.stderr
    # Without -k, a client cannot verify it.
    r = p.curl("localhost", "/", cacert=ca.cert_path)
    assert r.returncode != 0 and b"certificate" in r.stderr, r.stderr


def _handshake(port: int, version: ssl.TLSVersion):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")   # let the client offer the old protocol at all
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
            return s.version()


def test_tls12_and_tls13_accepted(sni_proxy):
    assert _handshake(sni_proxy.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(sni_proxy.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_tls10_and_tls11_refused(sni_proxy, flag):
    out = s_client(sni_proxy.port, "a.example.com", flag, "-cipher", "DEFAULT:@SECLEVEL=0")
    # The client offered the old version (so the refusal is the server's): alert 70.
    assert "alert protocol version" in out, out
    assert "BEGIN CERTIFICATE" not in out, out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls10_and_tls11_refused_python(sni_proxy, version):
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        _handshake(sni_proxy.port, version)


def test_alpn_http11(sni_proxy):
    ctx = tls_client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
            assert s.selected_alpn_protocol() == "http/1.1"
    out = s_client(sni_proxy.port, "a.example.com", "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in out, out


def test_alpn_only_h2_gets_no_alpn_but_no_crash(sni_proxy):
    ctx = tls_client_context()
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
                assert s.selected_alpn_protocol() in (None, "http/1.1")
    except ssl.SSLError:
        pass   # refusing with no_application_protocol is also correct
    # The proxy still serves.
    assert sni_proxy.curl("a.example.com").stdout == b"hello a.example.com"


def test_acme_tls1_without_challenge_is_refused(sni_proxy):
    ctx = tls_client_context()
    ctx.set_alpn_protocols(["acme-tls/1"])
    with socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
                assert s.selected_alpn_protocol() != "acme-tls/1"
        except ssl.SSLError:
            pass


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_garbage_instead_of_client_hello(sni_proxy):
    pid = sni_proxy.proc.pid
    # settle: one successful request, so lazy state is built
    assert sni_proxy.curl("a.example.com").returncode == 0
    fds_before = _fd_count(pid)
    payloads = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", os.urandom(3000), b"\x16\x03\x01\x00\x05hello",
                b"\x16\x03\x01\xff\xff" + b"\x00" * 100, b"\x00" * 10]
    for payload in payloads * 4:
        with socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as s:
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
    # The connections are gone on the proxy side, and it still serves.
    deadline = time.monotonic() + 5
    while _fd_count(pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count(pid) <= fds_before
    assert sni_proxy.proc.poll() is None
    assert sni_proxy.curl("a.example.com").stdout == b"hello a.example.com"
    assert "Traceback" not in sni_proxy.log()


def test_silent_client_closed_after_read_header_timeout(start_proxy):
    p = start_proxy({"timeout_read_header": "1s",
                     "routes": [{"from": "https://localhost", "response": {"status": 200, "body": "ok"}}]})
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        started = time.monotonic()
        assert s.recv(4096) == b""       # closed by the proxy, without a byte of TLS
        assert time.monotonic() - started < 8
    # A client that handshakes but sends no request is closed too.
    ctx = tls_client_context()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            try:
                data = s.recv(4096)
            except (ssl.SSLError, ConnectionResetError):
                data = b""
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data


def _issue_via_intermediate(ca: TestCA, directory, name: str):
    """leaf <- intermediate <- test CA; returns (fullchain path, key path, leaf, intermediate)."""
    import datetime as dt
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID
    now = dt.datetime.now(dt.timezone.utc)
    ikey = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate")]))
             .issuer_name(ca.cert.subject).public_key(ikey.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(ca.key, hashes.SHA256()))
    lkey = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(inter.subject).public_key(lkey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ikey, hashes.SHA256()))
    chain = directory / f"{name}.fullchain.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + inter.public_bytes(serialization.Encoding.PEM))
    key = directory / f"{name}.key"
    key.write_bytes(lkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return chain, key, leaf, inter


def test_intermediate_chain_is_served(start_proxy, ca, tmp_path):
    # Two chained certificates, so that the one chosen by SNI (not the default) must send its own chain.
    c1, k1, _, _ = _issue_via_intermediate(ca, tmp_path, "first.test")
    c2, k2, leaf2, inter2 = _issue_via_intermediate(ca, tmp_path, "second.test")
    p = start_proxy({"certificates": [{"cert": str(c1), "key": str(k1)}, {"cert": str(c2), "key": str(k2)}],
                     "routes": [{"from": "https://second.test", "response": {"status": 200, "body": "chained"}}]})
    out = s_client(p.port, "second.test", "-CAfile", str(ca.cert_path))
    assert out.count("BEGIN CERTIFICATE") == 2, out
    assert "Verify return code: 0 (ok)" in out, out
    r = p.curl("second.test", "/", cacert=ca.cert_path)   # only the root is trusted
    assert r.returncode == 0 and r.stdout == b"chained", r.stderr


def test_certificate_whose_key_fails_late_is_not_served_and_says_why(start_proxy, ca, tmp_path):
    # The key's public part matches (start-up only compares that), its private part is broken:
    # the proxy starts, and the first handshake for the name logs the problem once and gets
    # the default certificate instead of a failed handshake.
    from tests.test_keymatch import corrupt_private_part
    good, broken = ca.issue(["good.test"]), ca.issue(["broken.test"])
    bad_key = tmp_path / "broken.key"
    bad_key.write_bytes(corrupt_private_part(broken.key_pem))
    p = start_proxy({"certificates": [{"cert": str(good.cert_path), "key": str(good.key_path)},
                                      {"cert": str(broken.cert_path), "key": str(bad_key)}],
                     "routes": [{"from": "https://good.test", "response": {"status": 200, "body": "ok"}}]})
    for _ in range(3):
        assert served_certificate(p.port, "broken.test").serial_number == good.cert.serial_number
    p.wait_log("manual certificate for broken.test")
    log = p.log()
    assert log.count("is not served: its private key cannot be used") == 1, log
    line = next(ln for ln in log.splitlines() if "broken.test" in ln and "ERROR" in ln)
    assert str(broken.cert_path) in line and "replace the key" in line, line
    assert served_certificate(p.port, "good.test").serial_number == good.cert.serial_number


# --------------------------------------------------------------------------- TLS 1.2 session IDs

def _tls12_session_ids_only() -> ssl.SSLContext:
    """A TLS 1.2 client that can resume only by session ID (no tickets), as sslyze tries it."""
    ctx = tls_client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _resumes(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession, name: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name, session=session) as s:
            return s.session_reused


def _close_without_close_notify(s: ssl.SSLSocket) -> None:
    """End the TCP connection as a client that never unwraps: FIN (no close_notify), then wait
    for the proxy's end, so that the next connection comes after the proxy has seen this one close."""
    socket.socket.shutdown(s, socket.SHUT_WR)   # the TCP half of close(), under TLS
    try:
        while s.recv(4096):
            pass
    except (ssl.SSLError, OSError):
        pass
    s.close()


@pytest.mark.parametrize("request_first", [False, True], ids=["after-handshake", "after-request"])
def test_tls12_session_id_resumes_after_a_close_without_close_notify(sni_proxy, request_first):
    ctx = _tls12_session_ids_only()
    for _ in range(5):
        raw = socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5)
        s = ctx.wrap_socket(raw, server_hostname="a.example.com")
        assert s.version() == "TLSv1.2" and not s.session_reused
        if request_first:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
            got = b""
            while not got.endswith(b"hello a.example.com"):
                got += s.recv(4096)
        session = s.session
        _close_without_close_notify(s)
        assert _resumes(sni_proxy.port, ctx, session, "a.example.com")


def test_tls12_session_id_resumes_after_the_proxy_cuts_the_connection(start_proxy, ca):
    """The proxy ends a connection without close_notify (an upstream broke off mid-response): the
    client's session is still good."""
    from tests.test_proxy import RawUpstream
    up = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", hold=0)
    leaf = ca.issue(["cut.test"])
    try:
        p = start_proxy({"certificates": [{"cert": str(leaf.cert_path), "key": str(leaf.key_path)}],
                         "routes": [{"from": "https://cut.test", "to": up.url}]})
        ctx = _tls12_session_ids_only()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="cut.test") as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: cut.test\r\n\r\n")
                    got = b""
                    try:
                        while chunk := s.recv(4096):
                            got += chunk
                    except ssl.SSLError:
                        pass   # (the cut: EOF without close_notify)
                    assert got.endswith(b"0123456789"), got
                    session = s.session
            assert _resumes(p.port, ctx, session, "cut.test")
        assert "broke off" in p.log()
    finally:
        up.stop()


def test_tls12_session_is_not_resumed_after_a_corrupt_record(sni_proxy):
    """What keeps a session (above) is only for connections that end without a TLS error: a
    record that fails to decrypt ends the connection with an alert and its session."""
    ctx = _tls12_session_ids_only()
    raw = socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="a.example.com")
    session = s.session
    socket.socket.sendall(s, b"\x17\x03\x03\x00\x40" + os.urandom(0x40))   # application data no key opens
    try:
        while s.recv(4096):
            pass
    except (ssl.SSLError, OSError):
        pass   # bad_record_mac
    s.close()
    assert not _resumes(sni_proxy.port, ctx, session, "a.example.com")


# --------------------------------------------------------------------------- key exchange groups

_TEMP_KEY = {"X25519": "X25519", "X448": "X448", "P-256": "ECDH, prime256v1",
             "P-384": "ECDH, secp384r1", "P-521": "ECDH, secp521r1"}


@pytest.mark.parametrize("group,offered", [("X25519", True), ("P-256", True), ("P-384", True),
                                           ("X448", False), ("P-521", False), ("ffdhe2048", False)])
def test_key_exchange_groups_are_mozilla_intermediate(sni_proxy, group, offered):
    # TLS 1.3, the client offering this group alone
    out = s_client(sni_proxy.port, "a.example.com", "-tls1_3", "-groups", group)
    if offered:
        assert f"Server Temp Key: {_TEMP_KEY[group]}," in out, out
    else:
        assert "alert handshake failure" in out and "BEGIN CERTIFICATE" not in out, out
    if group.startswith("ffdhe"):
        return   # (no DHE suite for TLS 1.2)
    # TLS 1.2, the group first, then P-256: without it the client could not take the P-256
    # certificate at all (in TLS 1.2 the groups list also limits the certificate's curve)
    out = s_client(sni_proxy.port, "a.example.com", "-tls1_2", "-groups", ":".join(dict.fromkeys([group, "P-256"])))
    assert f"Server Temp Key: {_TEMP_KEY[group if offered else 'P-256']}," in out, out


def test_post_quantum_key_exchange_is_kept(sni_proxy):
    """X25519MLKEM768, where the OpenSSL in use has it (a pyOpenSSL client on the same OpenSSL)."""
    from OpenSSL import SSL
    from OpenSSL.SSL import _lib
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if _lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519MLKEM768") != 1:
        _lib.ERR_clear_error()
        pytest.skip(f"{SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()} has no X25519MLKEM768")
    with socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as raw:
        raw.settimeout(None)   # OpenSSL reads the descriptor itself: blocking, with a kernel timeout
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"a.example.com")
        conn.set_connect_state()
        conn.do_handshake()
        assert conn.get_group_name() == "X25519MLKEM768"
        assert conn.get_protocol_version_name() == "TLSv1.3"


def test_sslyze_finds_mozilla_intermediate_and_session_id_resumption(sni_proxy, module_ca, tmp_path):
    """sslyze (tests/infra/sslyze.py: its own environment) checks the proxy against Mozilla's
    "intermediate" configuration (groups included) and resumes TLS 1.2 sessions by ID 5 times
    with a client that never sends close_notify."""
    status, text, result = sslyze_scan("a.example.com", sni_proxy.port, module_ca.cert_path, tmp_path,
                                       "--mozilla_config=intermediate", "--resum")
    assert f"a.example.com:{sni_proxy.port}: OK - Compliant." in text, text
    assert status == 0, text
    curves = result["scan_result"]["elliptic_curves"]["result"]
    assert {c["name"] for c in curves["supported_curves"]} == {"X25519", "secp256r1", "secp384r1"}, curves
    resumption = result["scan_result"]["session_resumption"]["result"]
    assert resumption["session_id_successful_resumptions_count"] == 5, resumption
