"""The ACME issuer against a real Pebble, plus its pure helpers.

The challenge servers here do what the proxy does: an HTTP server on Pebble's httpPort answers
from ``ChallengeStore.http01`` and a pyOpenSSL TLS server on Pebble's tlsPort swaps in the
challenge certificate in its ALPN callback when offered ``acme-tls/1``.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from OpenSSL import SSL

from proxy.autocert.challenges import ACME_TLS_ALPN_PROTOCOL, Challenge, ChallengeStore, tls_alpn_certificate
from proxy.autocert.issuer import (
    AcmeError,
    AcmeIssuer,
    IssuerSettings,
    ari_cert_id,
    build_csr,
    describe_problem,
    generate_account_key,
    issuer_id,
    key_authorization,
    must_staple_refused,
    parse_retry_after,
)
from proxy.autocert.issuer import _Net, _Problem, _Response
from tests.infra.pebble import Pebble, free_port, pebble, pebble_factory  # noqa: F401
from tests.infra.pki import TestCA


# --------------------------------------------------------------------------------------------
# challenge servers (what the proxy's :80 listener and TLS engine do)
# --------------------------------------------------------------------------------------------
class Http01Server:
    def __init__(self, store: ChallengeStore, port: int):
        self.requests: list[tuple[str, str]] = []  # (host header, path)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.headers.get("Host", ""), self.path))
                prefix = "/.well-known/acme-challenge/"
                ka = store.http01(self.path[len(prefix):]) if self.path.startswith(prefix) else None
                body = (ka or "not found").encode()
                self.send_response(200 if ka else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class TlsAlpnServer:
    """Answers acme-tls/1 with the challenge certificate, like the proxy's ALPN callback."""

    def __init__(self, store: ChallengeStore, port: int):
        self.handshakes: list[tuple[str, bytes]] = []  # (SNI, selected ALPN)
        default_cert, default_key = tls_alpn_certificate("default.invalid", "none")
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(x509.load_pem_x509_certificate(default_cert))
        ctx.use_privatekey(serialization.load_pem_private_key(default_key, None))

        def select(conn: SSL.Connection, protos: list[bytes]):
            name = (conn.get_servername() or b"").decode()
            if ACME_TLS_ALPN_PROTOCOL in protos:
                got = store.tls_alpn_objects(name)
                if got is not None:
                    conn.use_certificate(got[0])
                    conn.use_privatekey(got[1])
                    self.handshakes.append((name, ACME_TLS_ALPN_PROTOCOL))
                    return ACME_TLS_ALPN_PROTOCOL
            return SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(select)
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                raw, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket):
        # non-blocking fd + select: pyOpenSSL on a socket with a timeout raises WantReadError
        raw.setblocking(False)
        conn = SSL.Connection(self.ctx, raw)
        conn.set_accept_state()
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    select.select([raw], [], [], max(0.0, deadline - time.monotonic()))
                except SSL.WantWriteError:
                    select.select([], [raw], [], max(0.0, deadline - time.monotonic()))
            try:
                conn.shutdown()
            except SSL.Error:
                pass
        except (SSL.Error, OSError):
            pass
        finally:
            raw.close()

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def store() -> ChallengeStore:
    return ChallengeStore()


@pytest.fixture
def servers(pebble, store):
    h = Http01Server(store, pebble.http_port)
    t = TlsAlpnServer(store, pebble.tls_port)
    yield h, t
    h.close()
    t.close()


def settings_for(ca: Pebble, **kw) -> IssuerSettings:
    return IssuerSettings(directory_url=ca.directory_url, trusted_ca_pem=ca.trusted_ca_pem,
                          email="ops@example.com", **kw)


class Recorder:
    """present/cleanup callbacks that feed the store and remember the order of calls."""

    def __init__(self, store: ChallengeStore):
        self.store = store
        self.events: list[tuple[str, Challenge]] = []

    def present(self, ch: Challenge):
        self.events.append(("present", ch))
        self.store.present(ch)

    def cleanup(self, ch: Challenge):
        self.events.append(("cleanup", ch))
        self.store.remove(ch)


def new_key() -> bytes:
    return generate_account_key()  # any P-256 PKCS#8 key


def verify_chain(chain_pem: bytes, root_pem: bytes, name: str) -> list[x509.Certificate]:
    certs = x509.load_pem_x509_certificates(chain_pem)
    roots = x509.load_pem_x509_certificates(root_pem)
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(name))
    return verifier.verify(certs[0], certs[1:])


# --------------------------------------------------------------------------------------------
# issuance against Pebble
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
def test_issues_with_one_challenge_type(pebble, servers, store, challenge):
    http, tls = servers
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble, challenge_types=(challenge,))) as issuer:
        key = new_key()
        issued = issuer.obtain(["a.example", "B.example."], key, rec.present, rec.cleanup)

    assert issued.domains == ("a.example", "b.example")
    chain = verify_chain(issued.chain_pem, pebble.issuing_root_pem(), "b.example")
    leaf = chain[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["a.example", "b.example"]
    # the certificate is for our key
    priv = serialization.load_pem_private_key(key, None)
    assert leaf.public_key().public_numbers() == priv.public_key().public_numbers()
    assert issued.not_after == leaf.not_valid_after_utc
    assert issued.issuer_key == issuer_id(pebble.directory_url)

    # each name presented once with the asked type, before cleanup; all cleaned up
    presented = [ch for ev, ch in rec.events if ev == "present"]
    assert sorted(ch.domain for ch in presented) == ["a.example", "b.example"]
    assert {ch.type for ch in presented} == {challenge}
    assert [ev for ev, _ in rec.events] == ["present", "present", "cleanup", "cleanup"]
    assert len(store) == 0

    # the CA really validated through our server, on each name
    if challenge == "http-01":
        assert {h.split(":")[0] for h, _ in http.requests} == {"a.example", "b.example"}
        assert not tls.handshakes
    else:
        assert {n for n, _ in tls.handshakes} == {"a.example", "b.example"}
        assert not http.requests

    # the fixture's counters (other tests rely on them)
    assert pebble.order_count() == 1
    assert pebble.account_count() == 1
    assert Counter(pebble.validated_names()) == {"a.example": 1, "b.example": 1}
    assert pebble.issued_serials() == [leaf.serial_number]


def test_prefers_first_offered_type_from_settings(pebble, servers, store):
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble)) as issuer:  # default: tls-alpn-01, then http-01
        issuer.obtain(["pref.example"], new_key(), rec.present, rec.cleanup)
    assert [ch.type for ev, ch in rec.events if ev == "present"] == ["tls-alpn-01"]


def test_key_authorization_matches_account(pebble, servers, store):
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble, challenge_types=("http-01",))) as issuer:
        key_pem, _ = issuer.account()
        issuer.obtain(["ka.example"], new_key(), rec.present, rec.cleanup)
    ch = rec.events[0][1]
    from proxy.autocert.issuer import _jwk_and_alg
    assert ch.key_authorization == key_authorization(ch.token, _jwk_and_alg(key_pem)[0])


def test_failed_validation_is_an_acme_error_and_cleans_up(pebble, store):
    # no challenge server at all: Pebble's connection is refused
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble, challenge_types=("http-01",))) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["nobody.example"], new_key(), rec.present, rec.cleanup)
    err = ei.value
    assert err.ca == pebble.directory_url
    assert err.domains == ("nobody.example",)
    assert err.problem and err.problem["type"].startswith("urn:ietf:params:acme:error:")
    assert "could not validate nobody.example with http-01" in str(err)
    assert [ev for ev, _ in rec.events] == ["present", "cleanup"]
    assert len(store) == 0


def test_must_staple_csr_and_certificate(pebble, servers, store, monkeypatch, caplog):
    import proxy.autocert.issuer as issuer_mod

    sent: list[bytes] = []
    real_build = issuer_mod.build_csr

    def spy(*a, **kw):
        der = real_build(*a, **kw)
        sent.append(der)
        return der

    monkeypatch.setattr(issuer_mod, "build_csr", spy)
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble, must_staple=True)) as issuer:
        issued = issuer.obtain(["ms.example"], new_key(), rec.present, rec.cleanup)
    csr = x509.load_der_x509_csr(sent[-1])
    assert list(csr.extensions.get_extension_for_class(x509.TLSFeature).value) == \
        [x509.TLSFeatureType.status_request]
    verify_chain(issued.chain_pem, pebble.issuing_root_pem(), "ms.example")
    try:
        feature = issued.leaf.extensions.get_extension_for_class(x509.TLSFeature).value
    except x509.ExtensionNotFound:
        # Pebble 2.4 (Debian) issues must-staple orders but drops the extension: we say so.
        assert "without the OCSP must-staple" in caplog.text
        assert issued.must_staple is False
    else:
        assert list(feature) == [x509.TLSFeatureType.status_request]
        assert issued.must_staple is True

    with AcmeIssuer(settings_for(pebble)) as issuer:
        plain = issuer.obtain(["plain.example"], new_key(), rec.present, rec.cleanup)
    with pytest.raises(x509.ExtensionNotFound):
        x509.load_der_x509_csr(sent[-1]).extensions.get_extension_for_class(x509.TLSFeature)
    assert plain.must_staple is False


def test_account_is_reused_from_storage(pebble, servers, store):
    rec = Recorder(store)
    with AcmeIssuer(settings_for(pebble)) as first:
        key_pem, reg_json = first.account()
        first.obtain(["reuse1.example"], new_key(), rec.present, rec.cleanup)
    reg = json.loads(reg_json)
    assert reg["location"].startswith("https://127.0.0.1:")
    assert reg["status"] == "valid"
    assert pebble.account_count() == 1

    with AcmeIssuer(settings_for(pebble), key_pem, reg_json) as second:
        key2, reg2 = second.account()
        second.obtain(["reuse2.example"], new_key(), rec.present, rec.cleanup)
    assert key2 == key_pem
    assert json.loads(reg2)["location"] == reg["location"]
    assert pebble.account_count() == 1  # no new account
    assert pebble.order_count() == 2

    # the CA forgot the account (Pebble restarted): registered afresh with the same key
    pebble.stop()
    pebble.start()
    with AcmeIssuer(settings_for(pebble), key_pem, reg_json) as third:
        key3, reg3 = third.account()
        third.obtain(["reuse3.example"], new_key(), rec.present, rec.cleanup)
    assert key3 == key_pem
    assert pebble.account_count() == 2


def test_one_issuer_serves_concurrent_orders(pebble, servers, store):
    """The manager runs several obtain() calls in threads on one issuer."""
    results: dict[str, object] = {}
    with AcmeIssuer(settings_for(pebble)) as issuer:
        def work(name: str) -> None:
            try:
                results[name] = issuer.obtain([name], new_key(), store.present, store.remove)
            except BaseException as e:  # reported by the assert below
                results[name] = e

        names = [f"c{i}.example" for i in range(4)]
        threads = [threading.Thread(target=work, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    for n in names:
        assert getattr(results.get(n), "domains", None) == (n,), results.get(n)
    assert pebble.account_count() == 1
    assert Counter(pebble.validated_names()) == {n: 1 for n in names}


def test_ca_down_is_an_acme_error(pebble):
    pebble.stop()
    with AcmeIssuer(settings_for(pebble)) as issuer:
        with pytest.raises(AcmeError, match="cannot reach the CA") as ei:
            issuer.account()
    assert ei.value.ca == pebble.directory_url


def test_wrong_trusted_ca_is_a_clear_tls_error(pebble, tmp_path):
    other = TestCA(tmp_path / "other", name="Some other CA")
    s = IssuerSettings(directory_url=pebble.directory_url, trusted_ca_pem=other.cert_pem)
    with AcmeIssuer(s) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["x.example"], new_key(), lambda c: None, lambda c: None)
    msg = str(ei.value)
    assert "certificate verification failed" in msg
    assert "autocert_trusted_ca" in msg
    assert pebble.directory_url in msg


def test_trusted_ca_is_the_only_root_and_no_file_is_left(pebble, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    issuer = AcmeIssuer(settings_for(pebble))
    issuer.directory()
    trusted = [c.public_bytes(serialization.Encoding.DER)
               for c in x509.load_pem_x509_certificates(pebble.trusted_ca_pem)]
    assert issuer._transport.context().get_ca_certs(binary_form=True) == trusted
    issuer.close()
    assert not list(tmp_path.iterdir())


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def test_external_account_binding(pebble_factory, store):
    mac = _b64url(os.urandom(32))
    ca = pebble_factory(eab={"kid-1": mac})
    h, t = Http01Server(store, ca.http_port), TlsAlpnServer(store, ca.tls_port)
    try:
        rec = Recorder(store)
        # missing
        with AcmeIssuer(settings_for(ca)) as issuer:
            with pytest.raises(AcmeError) as ei:
                issuer.obtain(["eab.example"], new_key(), rec.present, rec.cleanup)
        assert "requires External Account Binding" in str(ei.value)
        assert "autocert_eab_key_id" in str(ei.value)
        assert ei.value.problem["type"].endswith(":externalAccountRequired")
        # wrong MAC key
        with AcmeIssuer(settings_for(ca, eab_key_id="kid-1", eab_mac_key=_b64url(os.urandom(32)))) as issuer:
            with pytest.raises(AcmeError) as ei:
                issuer.account()
        assert "rejected the External Account Binding (key id 'kid-1')" in str(ei.value)
        # unknown key id
        with AcmeIssuer(settings_for(ca, eab_key_id="kid-9", eab_mac_key=mac)) as issuer:
            with pytest.raises(AcmeError, match="External Account Binding"):
                issuer.account()
        # not base64url at all
        with AcmeIssuer(settings_for(ca, eab_key_id="kid-1", eab_mac_key="!!!")) as issuer:
            with pytest.raises(AcmeError, match="autocert_eab_mac_key is not base64url"):
                issuer.account()
        assert ca.account_count() == 0
        # right key
        with AcmeIssuer(settings_for(ca, eab_key_id="kid-1", eab_mac_key=mac)) as issuer:
            issued = issuer.obtain(["eab.example"], new_key(), rec.present, rec.cleanup)
        verify_chain(issued.chain_pem, ca.issuing_root_pem(), "eab.example")
        assert ca.account_count() == 1
    finally:
        h.close()
        t.close()


def test_survives_half_of_nonces_rejected(pebble_factory, store):
    ca = pebble_factory(nonce_reject=50)
    h, t = Http01Server(store, ca.http_port), TlsAlpnServer(store, ca.tls_port)
    try:
        rec = Recorder(store)
        with AcmeIssuer(settings_for(ca)) as issuer:
            for i in range(3):
                issued = issuer.obtain([f"nonce{i}.example"], new_key(), rec.present, rec.cleanup)
                verify_chain(issued.chain_pem, ca.issuing_root_pem(), f"nonce{i}.example")
            # the retry really was exercised (2^-40 odds of no rejection at all)
            assert issuer.stats["nonce_rejections"] > 0
        assert ca.order_count() == 3
    finally:
        h.close()
        t.close()


def test_no_renewal_info_without_ari(pebble):
    with AcmeIssuer(settings_for(pebble)) as issuer:
        assert issuer.renewal_info(TestCA(Path(pebble.workdir) / "x").issue(["a.example"]).cert_pem) is None


def test_renewal_info_from_a_directory_with_ari(tmp_path):
    """A minimal plain-HTTP CA directory with renewalInfo (Pebble 2.4 has none)."""
    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue(["ari.example"])
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            if self.path == "/dir":
                body = {"newAccount": base + "/acct", "newOrder": base + "/order",
                        "newNonce": base + "/nonce", "renewalInfo": base + "/ari/"}
                extra = {}
            else:
                body = {"suggestedWindow": {"start": "2030-01-02T03:04:05Z",
                                            "end": "2030-01-03T00:00:00Z"}}
                extra = {"Retry-After": "21600"}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/dir"
        with AcmeIssuer(IssuerSettings(directory_url=url)) as issuer:
            start, end, retry = issuer.renewal_info(leaf.cert_pem)
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(timeout=5)
    assert start == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert end == dt.datetime(2030, 1, 3, tzinfo=dt.timezone.utc)
    assert retry == 21600
    assert seen[-1] == "/ari/" + ari_cert_id(leaf.cert_pem)


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------
def test_issuer_id_is_certmagics_safe_form():
    assert issuer_id("https://acme-v02.api.letsencrypt.org/directory") == "acme-v02.api.letsencrypt.org-directory"
    assert issuer_id("https://127.0.0.1:14000/dir") == "127.0.0.1-14000-dir"
    assert issuer_id("https://acme.zerossl.com/v2/DV90") == "acme.zerossl.com-v2-dv90"
    assert issuer_id("https://ca.example/") == "ca.example"


def test_parse_retry_after():
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Tue, 01 Jan 2030 00:01:00 GMT", now) == 60
    assert parse_retry_after("Mon, 31 Dec 2029 00:00:00 GMT", now) == 0  # in the past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after("9" * 400, now) == 365 * 86400   # capped, no OverflowError
    assert parse_retry_after("\u00b2", now) is None              # a digit, but not an ASCII one


def _cert_with(aki: bytes, serial: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_ari_cert_id_matches_rfc9773_example():
    # RFC 9773 section 4.1: keyIdentifier 69:88:5B:..:D4, serial 00:87:65:43:21
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert ari_cert_id(_cert_with(aki, 0x87654321)) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    # a serial whose high bit is clear needs no leading zero
    assert ari_cert_id(_cert_with(aki, 0x7F)).endswith(".fw")


def test_ari_cert_id_needs_aki():
    with pytest.raises(ValueError, match="Authority Key Identifier"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(5).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
        ari_cert_id(cert.public_bytes(serialization.Encoding.PEM))


def test_build_csr():
    key = new_key()
    csr = x509.load_der_x509_csr(build_csr(key, ["A.example", "b.example", "a.example", "127.0.0.1"]))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a.example"
    with pytest.raises(x509.ExtensionNotFound):
        csr.extensions.get_extension_for_class(x509.TLSFeature)
    long_name = "a" * 60 + ".example"  # > 64 characters: no CN, SAN only
    csr = x509.load_der_x509_csr(build_csr(key, [long_name]))
    assert not csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)


LE_MUST_STAPLE = {
    "type": "urn:ietf:params:acme:error:malformed",
    "detail": "Error finalizing order :: OCSP must-staple extension is no longer available",
    "status": 400,
}


def test_must_staple_refusal_message():
    s = IssuerSettings(directory_url="https://ca.example/dir", must_staple=True)
    with AcmeIssuer(s) as issuer:
        err = issuer._error(_Problem(dict(LE_MUST_STAPLE)), "finalizing the order", ["a.example"])
    assert "the CA refuses must-staple certificates" in str(err)
    assert "turn off autocert_must_staple" in str(err)
    assert err.problem["type"] == LE_MUST_STAPLE["type"]
    assert must_staple_refused({"type": "x:badCSR", "detail": "TLS Feature extension not allowed"})
    assert not must_staple_refused({"type": "x:badCSR", "detail": "key too small"})
    # without must_staple the same words are just the CA's refusal
    with AcmeIssuer(IssuerSettings(directory_url="https://ca.example/dir")) as issuer:
        err = issuer._error(_Problem(dict(LE_MUST_STAPLE)), "finalizing the order")
    assert "autocert_must_staple" not in str(err)


def test_error_keeps_problem_subproblems_and_retry_after():
    body = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates",
            "subproblems": [{"type": "urn:ietf:params:acme:error:rejectedIdentifier",
                             "detail": "nope", "identifier": {"type": "dns", "value": "b.example"}}]}
    net = _Net(None)
    net.last_response = _Response(429, {"Retry-After": "3600"}, b"", "https://ca.example/new-order")
    with AcmeIssuer(IssuerSettings(directory_url="https://ca.example/dir")) as issuer:
        err = issuer._error(_Problem(body), "creating the order", ["a.example"], net)
    assert err.retry_after == 3600
    assert err.problem["type"].endswith(":rateLimited")
    assert err.problem["subproblems"][0]["identifier"] == {"type": "dns", "value": "b.example"}
    assert "rate limited by the CA" in str(err) and "retry after 3600 s" in str(err)
    assert "b.example: rejectedIdentifier: nope" in str(err)


def test_acme_error_str_carries_everything():
    problem = {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": "some names refused",
               "subproblems": [{"type": "urn:ietf:params:acme:error:caa", "detail": "CAA forbids",
                                "identifier": {"type": "dns", "value": "b.example"}}]}
    err = AcmeError("the CA refused the request", ca="https://ca.example/dir",
                    domains=("a.example", "b.example"), problem=problem, retry_after=3600)
    s = str(err)
    assert "https://ca.example/dir" in s and "a.example, b.example" in s
    assert "rejectedIdentifier: some names refused" in s
    assert "b.example: caa: CAA forbids" in s
    assert "retry after 3600 s" in s
    assert describe_problem({"type": "about:blank"}) == "about:blank"


def test_settings_validation():
    with pytest.raises(ValueError, match="dns-01"):
        IssuerSettings(directory_url="https://x/dir", challenge_types=("dns-01",))
    with pytest.raises(ValueError, match="together"):
        IssuerSettings(directory_url="https://x/dir", eab_key_id="kid")
    with pytest.raises(AcmeError, match="not a PEM certificate"):
        AcmeIssuer(IssuerSettings(directory_url="https://x/dir", trusted_ca_pem=b"garbage"))
