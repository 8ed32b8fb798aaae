"""``autocert_profile``: the ACME profile (draft-ietf-acme-profiles) sent in every newOrder,
renewals included, against acme2certifier, which lists profiles in its directory and records
each order's profile in its database. A CA without profiles (Pebble 2.4) and a profile the CA
does not know give one clear error naming the setting.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from proxy.autocert.issuer import AcmeError, AcmeIssuer, IssuerSettings, issuer_id
from proxy.autocert.manager import new_certificate_key
from tests.infra.a2c import Acme2Certifier
from tests.infra.pebble import free_port, pebble, pebble_factory  # noqa: F401  (fixtures)
from tests.infra.proxyproc import REPO, served_certificate, wait_port, wait_until
from tests.infra.wellknown import ensure_hosts, start_on_wellknown

PROFILES = {"classic": "90-day certificates", "shortlived": "6-day certificates"}
FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}
NAMES = ["p-ok.h19.test", "p-bad.h19.test", "p-issuer.h19.test"]


@pytest.fixture(scope="module")
def a2c(tmp_path_factory):
    ensure_hosts(NAMES)
    ca = Acme2Certifier(tmp_path_factory.mktemp("a2c-profiles"), profiles=PROFILES).start()
    yield ca
    ca.stop()


def config(ca_url: str, store, name: str, port: int, profile: str, **extra) -> dict:
    cfg = {"address": f"127.0.0.1:{port}", "http_redirect_addr": "127.0.0.1:80", "autocert": True,
           "autocert_ca": ca_url, "autocert_email": "admin@example.com", "autocert_dir": str(store),
           "autocert_profile": profile,
           "routes": [{"from": f"https://{name}", "response": {"status": 200, "body": "ok"}}]}
    cfg.update(extra)
    return cfg


def cli(proxy, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", str(proxy.config_path)],
                          cwd=str(REPO), env=proxy.env, capture_output=True, text=True, timeout=30)


def issued_by_a2c(port: int, name: str):
    try:
        cert = served_certificate(port, name)
    except OSError:
        return None
    return cert if "acme2certifier" in cert.issuer.rfc4514_string() else None


def test_profile_is_sent_with_every_order_renewals_included(a2c, start_proxy, tmp_path):
    name, port = "p-ok.h19.test", free_port()
    before = len(a2c.order_profiles())
    proxy = start_on_wellknown(start_proxy, config(a2c.directory_url, tmp_path / "ac", name, port, "shortlived"),
                               [80], ("127.0.0.1", port), env=FAST)
    first = wait_until(lambda: issued_by_a2c(port, name), "a certificate from acme2certifier", proxy.log)
    out = cli(proxy, "renew", name)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: (c := issued_by_a2c(port, name)) is not None and c.serial_number != first.serial_number,
             "the renewed certificate", proxy.log)
    assert a2c.order_profiles()[before:] == ["shortlived", "shortlived"]
    meta = tmp_path / "ac" / "certificates" / issuer_id(a2c.directory_url) / name / f"{name}.json"
    assert json.loads(meta.read_text())["issuer_data"]["profile"] == "shortlived"


def test_unknown_profile_is_one_clear_error_naming_the_setting(a2c, start_proxy, tmp_path):
    name, port = "p-bad.h19.test", free_port()
    before = len(a2c.order_profiles())
    proxy = start_on_wellknown(start_proxy, config(a2c.directory_url, tmp_path / "ac", name, port, "tlsserver"),
                               [80], ("127.0.0.1", port), env=FAST)
    proxy.wait_log("obtaining a certificate for p-bad.h19.test failed", timeout=30)
    time.sleep(1.0)   # several maintenance checks: still one failure (backoff), no order
    log = proxy.log()
    assert log.count("failed (attempt") == 1, log[-3000:]
    assert "autocert_profile is 'tlsserver', which this CA does not offer; it offers classic, shortlived" in log
    assert len(a2c.order_profiles()) == before
    rows = cli(proxy, "certs")
    assert rows.returncode == 0 and "autocert_profile is 'tlsserver'" in rows.stdout


def test_invalid_profile_from_the_ca_names_the_setting(a2c):
    """A CA that lists a profile but refuses it in newOrder (``invalidProfile``). acme2certifier
    refuses any profile missing from its list, so the issuer is handed a copy of the real
    directory that lists one more: the refusal itself is acme2certifier's."""
    settings = IssuerSettings(directory_url=a2c.directory_url, email="admin@example.com",
                              profile="tlsserver", challenge_types=("http-01",))
    directory = a2c.directory()
    directory["meta"] = {**directory["meta"], "profiles": {**directory["meta"]["profiles"], "tlsserver": "x"}}
    with AcmeIssuer(settings, directory=directory) as issuer:
        with pytest.raises(AcmeError) as ei:
            issuer.obtain(["p-issuer.h19.test"], new_certificate_key(), lambda c: None, lambda c: None)
    assert ei.value.problem_type == "urn:ietf:params:acme:error:invalidProfile"
    assert "refused the profile 'tlsserver' that autocert_profile asks for" in str(ei.value)


def test_a_ca_without_profiles_is_one_clear_error(pebble, start_proxy, tmp_path):
    port = pebble.tls_port
    proxy = start_proxy({"_port": port, "address": f"127.0.0.1:{port}", "autocert": True,
                         "autocert_ca": pebble.directory_url,
                         "autocert_trusted_ca_file": str(pebble.trusted_ca_file),
                         "autocert_dir": str(tmp_path / "ac"), "autocert_profile": "shortlived",
                         "routes": [{"from": "https://noprof.test", "response": {"status": 200, "body": "ok"}}]},
                        env=FAST)
    wait_port(port)
    proxy.wait_log("obtaining a certificate for noprof.test failed", timeout=30)
    log = proxy.log()
    assert "autocert_profile is 'shortlived', but this CA offers no profiles" in log
    assert pebble.order_count() == 0
