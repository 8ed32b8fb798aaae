"""The autocert manager when the CA or the storage fails (issue 23): the proxy started from its
CLI against a real Pebble and real storage made to misbehave (a CA that is down or restarted,
a storage directory made read-only, a stored certificate that is corrupt); a labelled double
only where no real component can misbehave so (a CA sending an unusable certificate).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.autocert import layout
from proxy.autocert.issuer import issuer_id
from proxy.autocert.manager import new_certificate_key
from proxy.autocert.schedule import DEFAULT_RETRY_CAP
from tests.infra.ca_front import Exchange, MisbehavingCA
from tests.infra.pebble import pebble_factory  # noqa: F401  (fixture)
from tests.infra.pki import TestCA
from tests.infra.proxyproc import ProxyProcess, free_port, served_certificate
from tests.infra.readonly import read_only
from tests.test_autocert import (FAST, ac_config, assert_self_signed, certs_rows, cli, from_pebble,
                                 shared_ca, wait_pebble_cert, wait_served, write_root)  # noqa: F401
from tests.test_issuer_failures import cert_for

CAP = DEFAULT_RETRY_CAP


def attempts(proxy: ProxyProcess, name: str) -> list[tuple[int, float]]:
    """(attempt number, announced delay in s) of every failed order the proxy logged for ``name``."""
    pat = re.compile(rf"obtaining a certificate for {re.escape(name)} failed \(attempt (\d+)\); "
                     rf"next attempt in (\d+)s")
    return [(int(m.group(1)), float(m.group(2))) for m in pat.finditer(proxy.log())]


def state_path(store: Path, ca_url: str, name: str) -> Path:
    return store / layout.state_key(issuer_id(ca_url), name)


def read_state(store: Path, ca_url: str, name: str) -> dict:
    return json.loads(state_path(store, ca_url, name).read_text())


# --------------------------------------------------------------------------------------------
# item 1: any number of failures gives a capped, jittered backoff
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored, attempt, low, high", [
    # ~250 days of failures at the 6 h cap: 2 ** 1024 overflowed a float
    ({"failures": 1024, "last_error": "an old error"}, 1025, 0.8 * CAP, CAP),
    # a state file edited by hand (or written by something else): its fields are ignored
    ({"failures": "many", "next_attempt": "soon"}, 1, 0.8 * 60, 1.2 * 60),
], ids=["1024-failures", "edited-state-file"])
def test_a_long_failing_name_still_backs_off(start_proxy, tmp_path, stored, attempt, low, high):
    """The CA is down (nothing listens at its port): every order fails at once. The failure
    after a stored state must still set a next attempt; before the fix the error escaped
    and the name was retried at every check."""
    ca = f"https://127.0.0.1:{free_port()}/dir"
    store = tmp_path / "ac"
    path = state_path(store, ca, "long.test")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    proxy = start_proxy({"autocert": True, "autocert_ca": ca, "autocert_dir": str(store),
                         "routes": [{"from": "https://long.test", "to": "http://127.0.0.1:9"}]},
                        env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.1", "AUTOCERT_PROXY_RETRY_BASE": "60"})
    proxy.wait_log("obtaining a certificate for long.test failed")
    before = time.time()
    time.sleep(1.0)   # ten maintenance checks
    assert [a for a, _ in attempts(proxy, "long.test")] == [attempt], proxy.log()[-3000:]
    assert "checking long.test failed" not in proxy.log()
    (_, announced), = attempts(proxy, "long.test")
    assert low - 1 <= announced <= high + 1
    state = read_state(store, ca, "long.test")
    assert state["failures"] == attempt
    assert before - 2 + low <= state["next_attempt"] <= before + high + 1
    assert "cannot reach the CA" in state["last_error"]


async def test_the_next_attempt_is_set_even_if_the_delay_cannot_be_computed(tmp_path, monkeypatch):
    """A labelled double: ``retry_delay`` replaced by one that raises. No real input makes it
    fail any more (tests/test_schedule.py); this pins the manager's order of operations for the
    day a change to the schedule does: the name still waits (the cap), it is not retried at
    every check."""
    from proxy.autocert import manager as manager_module
    from proxy.autocert.manager import AutocertManager, NameState
    from proxy.config import Address, Options, Route, Upstream
    from proxy.storage.file import FileStorage
    from proxy.tls.certcache import CertificateCache

    def broken(*args, **kwargs):
        raise OverflowError("a schedule that cannot count")

    monkeypatch.setattr(manager_module, "retry_delay", broken)
    route = Route(from_url="https://a.test", scheme="https", host="a.test", path_prefix="/",
                  to=(Upstream("http", "127.0.0.1", 9),))
    ca = "https://127.0.0.1:1/dir"
    options = Options(address=Address("127.0.0.1", 1), routes=(route,), autocert=True,
                      autocert_ca=ca, autocert_dir=str(tmp_path / "ac"))
    storage = FileStorage(str(tmp_path / "ac"))
    m = AutocertManager(options, CertificateCache(), {}, storage=storage)
    state = NameState(failures=3)
    before = time.time()
    await m._failed("a.test", state, "the CA refused", None)
    assert state.failures == 4 and state.last_error == "the CA refused"
    assert before + CAP - 1 <= state.next_attempt <= time.time() + CAP
    assert read_state(tmp_path / "ac", ca, "a.test")["next_attempt"] == state.next_attempt
    await storage.close()


# --------------------------------------------------------------------------------------------
# storage failing while obtaining (a storage directory made read-only for real)
# --------------------------------------------------------------------------------------------
def cert_files(store: Path, ca_url: str, name: str) -> Path:
    return store / "certificates" / issuer_id(ca_url) / name


def test_storage_error_while_obtaining_backs_off(shared_ca, start_proxy, tmp_path):
    """``acme/`` is read-only: the account is registered at the CA but cannot be stored. That
    is a failed attempt like any other: logged, backed off, not retried at every check (each
    retry would register one more account)."""
    store = tmp_path / "ac"
    accounts = shared_ca.account_count()
    with read_only(store / "acme"):
        proxy = start_proxy(ac_config(shared_ca, store, ["ro.test"]), env=FAST)
        proxy.wait_log("obtaining a certificate for ro.test failed")
        time.sleep(1.0)   # five maintenance checks
        assert [a for a, _ in attempts(proxy, "ro.test")] == [1], proxy.log()[-3000:]
        (_, announced), = attempts(proxy, "ro.test")
        assert 0.8 * 300 - 1 <= announced <= 1.2 * 300 + 1
        assert shared_ca.account_count() == accounts + 1
        row = certs_rows(proxy)["ro.test"]
        assert "storage:" in row and "Read-only file system" in row, row
        assert_self_signed(proxy, "ro.test")
    # the disk is writable again: an operator's renew request does not wait for the backoff
    assert cli(proxy, "renew", "ro.test").returncode == 0
    wait_pebble_cert(proxy, "ro.test")


def test_a_state_that_cannot_be_saved_still_backs_off_doubling(start_proxy, tmp_path):
    """``autocert-proxy/`` (where the backoff state lives) is read-only and the CA is down: the
    backoff kept in memory must still grow; the stale stored state must not reset it."""
    ca = f"https://127.0.0.1:{free_port()}/dir"
    store = tmp_path / "ac"
    with read_only(store / "autocert-proxy"):
        proxy = start_proxy({"autocert": True, "autocert_ca": ca, "autocert_dir": str(store),
                             "routes": [{"from": "https://st.test", "to": "http://127.0.0.1:9"}]},
                            env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.1", "AUTOCERT_PROXY_RETRY_BASE": "0.3"})
        deadline = time.monotonic() + 20
        while len(attempts(proxy, "st.test")) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        numbers = [a for a, _ in attempts(proxy, "st.test")]
        assert numbers[:4] == [1, 2, 3, 4], proxy.log()[-3000:]
        assert "saving the retry state for st.test failed" in proxy.log()


def test_certificate_obtained_but_not_stored_is_served_and_stored_later(shared_ca, start_proxy, tmp_path):
    """``certificates/`` is read-only while the order completes: the certificate is served from
    memory; once the disk is writable it is stored (the same certificate), so a restart serves
    it without a new order."""
    store = tmp_path / "ac"
    root = write_root(shared_ca, tmp_path / "root.pem")
    with read_only(store / "certificates"):
        proxy = start_proxy(ac_config(shared_ca, store, ["mem.test"]), env=FAST)
        served = wait_pebble_cert(proxy, "mem.test")
        assert proxy.curl("mem.test", "/", cacert=root).returncode == 0
        assert "certificate for mem.test obtained but not stored" in proxy.log()
        time.sleep(0.5)
        assert not (cert_files(store, shared_ca.directory_url, "mem.test") / "mem.test.crt").exists()
    orders = shared_ca.order_count()
    proxy.wait_log("certificate for mem.test stored in")
    stored = cert_files(store, shared_ca.directory_url, "mem.test")
    assert x509.load_pem_x509_certificate((stored / "mem.test.crt").read_bytes()).serial_number \
        == served.serial_number
    key = serialization.load_pem_private_key((stored / "mem.test.key").read_bytes(), None)
    assert key.public_key() == served.public_key()
    assert proxy.log().count("obtained but not stored") == 1   # logged once, retried quietly
    proxy.stop()
    again = start_proxy(ac_config(shared_ca, store, ["mem.test"]), env=FAST, name="restarted")
    assert wait_pebble_cert(again, "mem.test").serial_number == served.serial_number
    time.sleep(0.5)
    assert shared_ca.order_count() == orders


def _other_key_pem() -> bytes:
    return new_certificate_key()


def _spoil_san(chain_pem: bytes) -> bytes:
    """The chain with its leaf's subjectAltName made unparseable (a SET where its SEQUENCE is):
    the certificate still loads; cryptography fails only when the extensions are read."""
    import base64
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
    at = der.find(bytes.fromhex("0603551d11")) + 5        # id-ce-subjectAltName, then OCTET STRING
    assert der[at] == 0x04 and der[at + 2] == 0x30
    der[at + 2] = 0x31
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n"
    return pem + chain_pem.partition(b"-----END CERTIFICATE-----\n")[2]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-key", "bad-extension"])
def test_an_unusable_stored_certificate_is_replaced_and_kept_aside(shared_ca, start_proxy, tmp_path, damage):
    store = tmp_path / "ac"
    first = start_proxy(ac_config(shared_ca, store, ["bad.test"]), env=FAST, name="first")
    old = wait_pebble_cert(first, "bad.test")
    first.stop()
    d = cert_files(store, shared_ca.directory_url, "bad.test")
    crt, key = d / "bad.test.crt", d / "bad.test.key"
    if damage == "garbage":
        crt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif damage == "truncated":
        crt.write_bytes(crt.read_bytes()[:300])
    elif damage == "bad-extension":
        crt.write_bytes(_spoil_san(crt.read_bytes()))
    else:
        key.write_bytes(_other_key_pem())
    bad_crt, bad_key = crt.read_bytes(), key.read_bytes()

    second = start_proxy(ac_config(shared_ca, store, ["bad.test"]), env=FAST, name="second")
    new = wait_pebble_cert(second, "bad.test")
    assert new.serial_number != old.serial_number
    log = second.log()
    assert "the stored certificate for bad.test is unusable" in log
    assert "kept aside" in log
    # the new pair is stored and usable ...
    assert x509.load_pem_x509_certificate(crt.read_bytes()).serial_number == new.serial_number
    assert serialization.load_pem_private_key(key.read_bytes(), None).public_key() == new.public_key()
    # ... and the bad one was kept aside byte for byte, not deleted
    aside = {p.name.split(".unusable-")[0]: p for p in d.glob("*.unusable-*")}
    assert set(aside) == {"bad.test.crt", "bad.test.key", "bad.test.json"}, sorted(d.iterdir())
    assert aside["bad.test.crt"].read_bytes() == bad_crt
    assert aside["bad.test.key"].read_bytes() == bad_key
    assert aside["bad.test.key"].stat().st_mode & 0o077 == 0


# --------------------------------------------------------------------------------------------
# the CA: invalid authorization, an unusable certificate, a forgotten account
# --------------------------------------------------------------------------------------------
def test_an_invalid_authorization_is_backed_off_with_the_cas_reason(start_proxy, pebble_factory, tmp_path):
    """Pebble validates on a port where nothing listens: the authorization becomes invalid."""
    ca = pebble_factory(tls_port=free_port())
    proxy = start_proxy(ac_config(ca, tmp_path / "ac", ["inv.test"], _port=free_port()), env=FAST)
    proxy.wait_log("obtaining a certificate for inv.test failed", timeout=20)
    time.sleep(1.0)
    assert [a for a, _ in attempts(proxy, "inv.test")] == [1], proxy.log()[-3000:]
    line = next(ln for ln in proxy.log().splitlines() if "obtaining a certificate for inv.test failed" in ln)
    assert "could not validate inv.test with tls-alpn-01 (authorization invalid)" in line
    assert f"127.0.0.1:{ca.tls_port}" in line      # the CA's own words: where it tried
    assert ca.order_count() == 1
    assert_self_signed(proxy, "inv.test")


def _cert_for(issuer: TestCA, public_key, names, days_left: float = 30) -> bytes:
    return cert_for(issuer, public_key, names, days_left=days_left).public_bytes(serialization.Encoding.PEM)


UNUSABLE = {
    # mode: what the CA's download answer becomes, and what the log must say
    "garbage": "not a PEM certificate chain (it begins b'<html>down for maintenance",
    "bad-intermediate": "not a PEM certificate chain (it begins b'-----BEGIN CERTIFICATE-----",
    "other-key": "not for the key we sent",
    "other-name": "does not name cert.test",
    "expired": "it expired on",
    "wrong-intermediate": "did not issue it",
}


@pytest.mark.parametrize("mode", list(UNUSABLE))
def test_an_unusable_certificate_from_the_ca_is_not_served_and_backed_off(shared_ca, start_proxy, tmp_path, mode):
    """A labelled double (MisbehavingCA): Pebble cannot be made to send an unusable certificate,
    so a front rewrites its download answer. Not stored, not served, one order per backoff."""
    front = MisbehavingCA(shared_ca)
    other = TestCA(tmp_path / "other-ca", name="Some other CA")

    def spoil(ex: Exchange) -> None:
        if not (ex.method == "POST" and ex.path.startswith("/certZ/") and ex.status == 200):
            return
        our_key = front.csrs[-1].public_key()
        leaf, _, rest = ex.body.partition(b"-----END CERTIFICATE-----\n")
        leaf += b"-----END CERTIFICATE-----\n"
        if mode == "garbage":
            ex.body = b"<html>down for maintenance</html>"
        elif mode == "bad-intermediate":
            ex.body = leaf + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        elif mode == "other-key":
            ex.body = _cert_for(other, x509.load_pem_x509_certificate(_cert_for(
                other, serialization.load_pem_private_key(_other_key_pem(), None).public_key(),
                ["cert.test"])).public_key(), ["cert.test"]) + other.cert_pem
        elif mode == "other-name":
            ex.body = _cert_for(other, our_key, ["someone-else.test"]) + other.cert_pem
        elif mode == "expired":
            ex.body = _cert_for(other, our_key, ["cert.test"], days_left=-1) + other.cert_pem
        else:
            ex.body = leaf + other.cert_pem
    front.rewrite = spoil
    try:
        cfg = ac_config(shared_ca, tmp_path / "ac", ["cert.test"], autocert_ca=front.directory_url)
        proxy = start_proxy(cfg, env=FAST)
        proxy.wait_log("obtaining a certificate for cert.test failed", timeout=20)
        time.sleep(1.0)   # five maintenance checks
        assert front.count(r"^/certZ/") == 1, proxy.log()[-3000:]
        assert [a for a, _ in attempts(proxy, "cert.test")] == [1]
        line = next(ln for ln in proxy.log().splitlines() if "obtaining a certificate for cert.test failed" in ln)
        assert UNUSABLE[mode] in line, line
        assert_self_signed(proxy, "cert.test")
        assert not (tmp_path / "ac" / "certificates").exists() or \
            not any((tmp_path / "ac" / "certificates").rglob("*.crt"))
    finally:
        front.close()


def test_a_ca_that_forgot_the_account_gets_it_registered_again(pebble_factory, start_proxy, tmp_path):
    """Pebble restarted (it keeps no accounts): the running proxy's account URL no longer works.
    The next order registers the account again, once, and stores the new registration."""
    port = free_port()
    ca = pebble_factory(tls_port=port)
    store = tmp_path / "ac"
    proxy = start_proxy(ac_config(ca, store, ["forgot.test"]), env=FAST)
    first = wait_pebble_cert(proxy, "forgot.test")
    reg_path = store / layout.account_reg_key(issuer_id(ca.directory_url), "")
    old_location = json.loads(reg_path.read_text())["location"]
    ca.stop()
    ca.start()
    accounts = ca.account_count()
    assert cli(proxy, "renew", "forgot.test").returncode == 0
    second = wait_served(proxy.port, "forgot.test", lambda c: from_pebble(c) and c.serial_number != first.serial_number,
                        log=proxy.log)
    assert "no longer knows our ACME account; registering it again" in proxy.log()
    assert ca.account_count() == accounts + 1
    assert json.loads(reg_path.read_text())["location"] != old_location
    assert attempts(proxy, "forgot.test") == []          # no failed attempt on the way
    # a restart finds the stored registration good: no further account
    proxy.stop()
    again = start_proxy(ac_config(ca, store, ["forgot.test"]), env=FAST, name="restarted")
    assert wait_pebble_cert(again, "forgot.test").serial_number == second.serial_number
    assert cli(again, "renew", "forgot.test").returncode == 0
    wait_served(again.port, "forgot.test", lambda c: from_pebble(c) and c.serial_number != second.serial_number,
                log=again.log)
    assert ca.account_count() == accounts + 1


def test_a_renew_request_brings_one_attempt_not_one_per_check(start_proxy, tmp_path):
    """The CA is down. ``autocert-proxy renew`` brings an attempt at once; while that request
    stays in storage (it is removed on success) the failures back off as usual, and a second
    request brings a second attempt. Before, a pending request reset the backoff at every check."""
    ca = f"https://127.0.0.1:{free_port()}/dir"
    proxy = start_proxy({"autocert": True, "autocert_ca": ca, "autocert_dir": str(tmp_path / "ac"),
                         "routes": [{"from": "https://again.test", "to": "http://127.0.0.1:9"}]},
                        env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.1", "AUTOCERT_PROXY_RETRY_BASE": "300"})
    proxy.wait_log("obtaining a certificate for again.test failed (attempt 1)")
    for n in (2, 3):
        assert cli(proxy, "renew", "again.test").returncode == 0
        proxy.wait_log(f"obtaining a certificate for again.test failed (attempt {n})")
        time.sleep(1.0)   # ten maintenance checks, the request still in storage
        assert [a for a, _ in attempts(proxy, "again.test")] == list(range(1, n + 1)), proxy.log()[-3000:]


def test_s3_stopped_mid_order_the_certificate_is_served_then_stored(shared_ca, start_proxy, tmp_path):
    """moto (S3) stops while the order is at finalization and comes back (empty) later: the
    certificate is served from memory, and stored once the store answers again.

    The MisbehavingCA front changes nothing here: it only holds Pebble's finalize answer until
    moto is down (a labelled double used as a gate, so that "mid-order" is deterministic)."""
    import threading

    from tests.test_shared import Bucket

    bucket = Bucket("s3", tmp_path)
    front = MisbehavingCA(shared_ca)
    at_finalize, go_on = threading.Event(), threading.Event()

    def hold(ex: Exchange) -> None:
        if ex.path.startswith("/finalize-order/"):
            at_finalize.set()
            go_on.wait(30)
    front.rewrite = hold
    try:
        cfg = ac_config(shared_ca, tmp_path / "unused", ["s3mid.test"], autocert_ca=front.directory_url,
                        autocert_dir=bucket.url("p"))
        proxy = start_proxy(cfg, env={**FAST, **bucket.env})
        assert at_finalize.wait(20), proxy.log()[-3000:]
        bucket.stop()
        go_on.set()
        served = wait_pebble_cert(proxy, "s3mid.test")
        proxy.wait_log("certificate for s3mid.test obtained but not stored", timeout=30)
        bucket.restart()                        # same port, the bucket created again, empty
        proxy.wait_log("certificate for s3mid.test stored in", timeout=30)
        key = f"p/certificates/{issuer_id(front.directory_url)}/s3mid.test/s3mid.test.crt"
        assert x509.load_pem_x509_certificate(bucket.get(key)).serial_number == served.serial_number
        assert served_certificate(proxy.port, "s3mid.test").serial_number == served.serial_number
        assert front.count(r"^/certZ/") == 1    # one order all along
    finally:
        go_on.set()
        front.close()
        bucket.stop()
