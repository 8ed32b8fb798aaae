"""OCSP stapling end to end: the proxy started from its CLI, a real ``openssl ocsp``
responder for a test CA, ``openssl s_client -status`` as the client, Pebble for ACME.

Nothing here reaches into the proxy's process: what is checked is what a client sees on
the wire, what the proxy writes to its log, and what ``autocert-proxy certs`` prints.

Refresh timing: the proxy refreshes a staple at half of the response's validity window.
Tests that need a refresh run the responder with ``-nmin 1`` (responses valid for one
minute), so the next refresh comes ~30 s (+-3 s jitter) after the first fetch; waits for
it are bounded at 75 s.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.infra.ocsp_responder import BadResponder, OpenSSLResponder, free_port
from tests.infra.pebble import pebble_factory  # noqa: F401  (fixture)
from tests.infra.pki import Issued, TestCA
from tests.infra.proxyproc import REPO, s_client, served_certificate

# The stapler looks at the cache every 0.3 s instead of 5 s: staples appear soon after start.
FAST_POLL = {"AUTOCERT_PROXY_OCSP_POLL": "0.3"}
REFRESH_TIMEOUT = 75.0     # s: first fetch + half of a one-minute validity + jitter + margin
GOOD = "Cert Status: good"
SUCCESSFUL = "OCSP Response Status: successful"
NO_STAPLE = "OCSP response: no response sent"


# ----------------------------------------------------------------------------- helpers

@pytest.fixture
def responders(tmp_path):
    """make(ca, nmin=None) -> started OpenSSLResponder; all stopped at teardown."""
    started: list[OpenSSLResponder] = []

    def make(ca: TestCA, nmin=None) -> OpenSSLResponder:
        r = OpenSSLResponder(ca, tmp_path / f"responder-{len(started)}", nmin=nmin)
        started.append(r)
        r.start()
        return r

    yield make
    for r in started:
        r.stop()


def chain_file(issued: Issued, ca: TestCA) -> Path:
    """Leaf + issuer in one PEM file: the stapler needs the issuer to build requests."""
    path = issued.cert_path.with_name(issued.cert_path.stem + "-chain.pem")
    path.write_bytes(issued.cert_pem + ca.cert_pem)
    return path


def manual_config(ca: TestCA, certs: list[Issued], **extra) -> dict:
    names = [c.cert.subject.rfc4514_string().split("=", 1)[1] for c in certs]
    cfg = {
        "routes": [{"from": f"https://{n}", "response": {"status": 200, "body": f"hello {n}"}}
                   for n in names],
        "certificates": [{"cert": str(chain_file(c, ca)), "key": str(c.key_path)} for c in certs],
        "log_level": "debug",
    }
    cfg.update(extra)
    return cfg


def status(port: int, name: str, *extra: str) -> str:
    return s_client(port, name, "-status", *extra, timeout=15)


def wait_status(port: int, name: str, text: str, *extra: str, timeout: float = 15.0,
                log=lambda: "") -> str:
    """Poll ``s_client -status`` until its output contains ``text`` (bounded)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = status(port, name, *extra)
        if text in out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in s_client -status for {name} within {timeout}s:\n"
                         f"{out[-3000:]}\n--- proxy log ---\n{log()[-4000:]}")


def staple_serial_hex(out: str) -> str:
    """The serial the stapled response is about (s_client prints it as hex)."""
    m = re.search(r"Serial Number:\s*([0-9A-Fa-f]+)", out)
    assert m, out
    return m.group(1).upper().lstrip("0")


def this_update(out: str) -> str:
    m = re.search(r"This Update:\s*(.+)", out)
    assert m, out
    return m.group(1).strip()


def served_serial(port: int, name: str) -> int:
    return served_certificate(port, name).serial_number


def clean_env() -> dict:
    """The test's environment without settings that would override the config file."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCERT", "ROUTES", "ADDRESS"))}


def certs_command(config_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "certs", "--config", str(config_path)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=60)


def certs_table(out: subprocess.CompletedProcess) -> dict[str, dict[str, str]]:
    """``certs`` output parsed by the header's column positions: name -> {COLUMN: value}."""
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0]
    cols = re.findall(r"\S+", header)
    starts = [header.index(c) for c in cols]
    table = {}
    for ln in lines[1:]:
        if not ln.strip():
            continue
        cells = {}
        for i, c in enumerate(cols):
            end = starts[i + 1] if i + 1 < len(cols) else len(ln)
            cells[c] = ln[starts[i]:end].strip()
        table[cells["NAME"]] = cells
    return table


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_manual_certificate_is_stapled_on_tls12_and_tls13(ca, responders, start_proxy, version):
    responder = responders(ca)
    leaf = ca.issue(["s.test"], ocsp_url=responder.url)
    responder.add(leaf)
    plain = ca.issue(["plain.test"])                       # no OCSP URL: never stapled
    p = start_proxy(manual_config(ca, [leaf, plain]), env=FAST_POLL)

    out = wait_status(p.port, "s.test", GOOD, version, "-CAfile", str(ca.cert_path), log=p.log)
    assert SUCCESSFUL in out
    assert staple_serial_hex(out) == leaf.serial_hex.lstrip("0")
    expect_proto = "TLSv1.2" if version == "-tls1_2" else "TLSv1.3"
    assert f"New, {expect_proto}, Cipher is" in out, out
    assert "Verify return code: 0 (ok)" in out        # the served chain verifies against the CA

    out = status(p.port, "plain.test", version)
    assert NO_STAPLE in out and "Cert Status" not in out, out
    assert "has no OCSP responder URL" in p.log()


def test_revoked_while_running_is_no_longer_stapled(ca, responders, start_proxy):
    responder = responders(ca, nmin=1)
    leaf = ca.issue(["r.test"], ocsp_url=responder.url)
    other = ca.issue(["g.test"], ocsp_url=responder.url)  # stays good: revocation is per cert
    responder.add(leaf)
    responder.add(other)
    p = start_proxy(manual_config(ca, [leaf, other]), env=FAST_POLL)
    wait_status(p.port, "r.test", GOOD, log=p.log)
    wait_status(p.port, "g.test", GOOD, log=p.log)

    responder.revoke(leaf)                                  # returns once the responder says so
    revoked_line = f"OCSP: certificate for r.test (serial {leaf.cert.serial_number:x}) is REVOKED"
    p.wait_log(revoked_line, timeout=REFRESH_TIMEOUT)
    p.wait_log("manual certificate r.test", timeout=5)
    log = p.log()
    app_line = next(ln for ln in log.splitlines() if "manual certificate r.test" in ln)
    assert "REVOKED" in app_line and "replace it" in app_line, app_line
    assert "ERROR" in next(ln for ln in log.splitlines() if revoked_line in ln)

    out = status(p.port, "r.test")
    assert GOOD not in out and NO_STAPLE in out, out
    assert served_serial(p.port, "r.test") == leaf.cert.serial_number   # manual: still served
    out = status(p.port, "g.test")
    assert GOOD in out, out

    rows = certs_table(certs_command(p.config_path, p.env))
    assert rows["r.test"]["OCSP"] == "revoked", rows
    assert "REVOKED" in rows["r.test"]["LAST_ERROR"], rows
    assert rows["g.test"]["OCSP"] == "good", rows


def test_responder_stopped_last_good_staple_kept(ca, responders, start_proxy):
    responder = responders(ca, nmin=1)
    leaf = ca.issue(["k.test"], ocsp_url=responder.url)
    responder.add(leaf)
    p = start_proxy(manual_config(ca, [leaf]), env=FAST_POLL)
    first = wait_status(p.port, "k.test", GOOD, log=p.log)

    responder.stop()
    # the refresh at half-validity fails; the proxy says it keeps the previous staple
    p.wait_log("(keeping the previous staple)", timeout=REFRESH_TIMEOUT)
    failure = next(ln for ln in p.log().splitlines() if "(keeping the previous staple)" in ln)
    assert "k.test" in failure and responder.url in failure, failure

    out = status(p.port, "k.test")
    assert SUCCESSFUL in out and GOOD in out, out
    assert this_update(out) == this_update(first), (first, out)   # the same, last good one


def test_must_staple_without_reachable_responder_is_not_served(ca, responders, start_proxy):
    responder = responders(ca)
    ok = ca.issue(["ms-ok.test"], ocsp_url=responder.url, must_staple=True)
    responder.add(ok)
    dead_url = f"http://127.0.0.1:{free_port()}"             # nothing listens there
    dead = ca.issue(["ms-dead.test"], ocsp_url=dead_url, must_staple=True)
    p = start_proxy(manual_config(ca, [ok, dead]), env=FAST_POLL)

    # primed before serving: the very first handshake already carries the staple
    out = status(p.port, "ms-ok.test")
    assert served_serial(p.port, "ms-ok.test") == ok.cert.serial_number
    assert SUCCESSFUL in out and GOOD in out, out

    # the one without a responder is never shown; the default certificate is served instead
    served = served_certificate(p.port, "ms-dead.test")
    assert served.serial_number != dead.cert.serial_number
    # ... the same one a name the proxy has no certificate for gets
    assert served.serial_number == served_serial(p.port, "no-such-name.test")
    out = status(p.port, "ms-dead.test")
    assert "CN = ms-dead.test" not in out and "CN = ms-ok.test" in out, out
    err = [ln for ln in p.log().splitlines() if "not served" in ln and "ms-dead.test" in ln]
    assert err, p.log()
    assert "must-staple" in err[0] and dead_url in err[0] and "ERROR" in err[0], err[0]
    assert not any("ms-ok.test" in ln and "not served" in ln for ln in p.log().splitlines())


def test_certs_command_shows_ocsp_status(ca, responders, tmp_path):
    """``autocert-proxy certs`` asks each responder live: good / revoked / - / error."""
    responder = responders(ca)
    good = ca.issue(["good.test"], ocsp_url=responder.url)
    revoked = ca.issue(["revoked.test"], ocsp_url=responder.url)
    unknown = ca.issue(["unknown.test"], ocsp_url=responder.url)   # not in the CA database
    plain = ca.issue(["plain.test"])
    down = ca.issue(["down.test"], ocsp_url=f"http://127.0.0.1:{free_port()}")
    responder.add(good)
    responder.add(revoked)
    responder.revoke(revoked)
    config = tmp_path / "certs.yaml"
    config.write_text(yaml.safe_dump(manual_config(ca, [good, revoked, unknown, plain, down])))
    rows = certs_table(certs_command(config, clean_env()))
    assert rows["good.test"]["OCSP"] == "good"
    assert rows["revoked.test"]["OCSP"] == "revoked"
    assert "REVOKED since" in rows["revoked.test"]["LAST_ERROR"]
    assert responder.url in rows["revoked.test"]["LAST_ERROR"]
    assert rows["unknown.test"]["OCSP"] == "unknown"
    assert rows["plain.test"]["OCSP"] == "-" and rows["plain.test"]["LAST_ERROR"] == "-"
    assert rows["down.test"]["OCSP"] == "error"
    assert "unreachable" in rows["down.test"]["LAST_ERROR"]


def test_certs_command_rejects_bad_responder_answer(ca, tmp_path):
    """A responder answering garbage is reported as an error, not as good."""
    sink = BadResponder(body=b"not an OCSP response")
    try:
        leaf = ca.issue(["garbage.test"], ocsp_url=sink.url)
        config = tmp_path / "certs.yaml"
        config.write_text(yaml.safe_dump(manual_config(ca, [leaf])))
        rows = certs_table(certs_command(config, clean_env()))
        assert sink.requests >= 1
        assert rows["garbage.test"]["OCSP"] == "error", rows
        assert "not a DER OCSP response" in rows["garbage.test"]["LAST_ERROR"], rows
    finally:
        sink.close()


def test_pebble_certificate_without_ocsp_url_causes_no_request(pebble_factory, start_proxy,
                                                               tmp_path):
    # Pebble's ``ocsp_responder_url`` variant (certificates pointing at a real `openssl ocsp`
    # for Pebble's issuing CA) is not tested: Pebble's intermediate key is not available
    # outside Pebble, so no responder can sign for its certificates. Stapling of obtained
    # certificates is covered by the stapler tests in test_ocsp.py.
    port = free_port()
    pebble = pebble_factory(tls_port=port)                   # ocsp_responder_url = "" (default)
    cfg = {
        "_port": port,
        "autocert": True,
        "autocert_ca": pebble.directory_url,
        "autocert_trusted_ca_file": str(pebble.trusted_ca_file),
        "autocert_dir": str(tmp_path / "autocert"),
        "routes": [{"from": "https://nostaple.test", "response": {"status": 200, "body": "ok"}}],
        "log_level": "debug",
    }
    p = start_proxy(cfg, env={**FAST_POLL, "AUTOCERT_PROXY_CHECK_INTERVAL": "0.2",
                              "AUTOCERT_PROXY_RETRY_BASE": "300"})
    deadline = time.monotonic() + 30
    cert = None
    while time.monotonic() < deadline:
        try:
            cert = served_certificate(p.port, "nostaple.test")
        except OSError:
            cert = None
        if cert is not None and "Pebble" in cert.issuer.rfc4514_string():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no Pebble certificate within 30 s:\n{p.log()[-4000:]}")
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)

    # the stapler did look at it (positive evidence), and decided not to ask anyone
    p.wait_log("OCSP: nostaple.test has no OCSP responder URL; not stapling", timeout=10)
    time.sleep(1.0)                                          # a few more stapler polls
    out = status(p.port, "nostaple.test")
    assert NO_STAPLE in out and "Cert Status" not in out, out
    ocsp_lines = [ln for ln in p.log().splitlines()
                  if "OCSP" in ln and "has no OCSP responder URL" not in ln]
    assert ocsp_lines == [], ocsp_lines


def test_reload_during_responder_outage_keeps_must_staple_certificate(ca, responders,
                                                                       start_proxy):
    """SIGHUP while the responder is down: an unchanged must-staple certificate that holds a
    valid staple stays served with it (the reload must not ask the responder again)."""
    responder = responders(ca)
    leaf = ca.issue(["msr.test"], ocsp_url=responder.url, must_staple=True)
    responder.add(leaf)
    p = start_proxy(manual_config(ca, [leaf]), env=FAST_POLL)
    before = status(p.port, "msr.test")
    assert GOOD in before and "CN = msr.test" in before, before

    responder.stop()
    p.reload()
    p.wait_log("configuration reloaded", timeout=15)
    out = status(p.port, "msr.test")
    assert "CN = msr.test" in out and GOOD in out, out + p.log()[-3000:]
    assert this_update(out) == this_update(before)
    assert "not served" not in p.log()
