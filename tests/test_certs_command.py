"""`autocert-proxy certs`: per name the ACME profile, the lifetime, the CA's ARI window and
where the next renewal time came from, next to what it showed before (issuer, not-after,
OCSP, errors). acme2certifier offers profiles and ARI; Pebble 2.4 offers neither."""
from __future__ import annotations

import re
import subprocess
import sys


from tests.infra.a2c import Acme2Certifier
from tests.infra.pebble import free_port, pebble, pebble_factory  # noqa: F401  (fixtures)
from tests.infra.proxyproc import REPO, served_certificate, wait_port, wait_until
from tests.infra.wellknown import ensure_hosts, start_on_wellknown

FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}
STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z"


def certs_table(proxy) -> dict[str, dict[str, str]]:
    """The command's output, cut at the header's column positions: name -> {COLUMN: value}."""
    out = subprocess.run([sys.executable, "-m", "proxy", "certs", "--config", str(proxy.config_path)],
                         cwd=str(REPO), env=proxy.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cols = re.findall(r"\S+", lines[0])
    starts = [lines[0].index(c) for c in cols]
    table = {}
    for ln in lines[1:]:
        cells = {c: ln[starts[i]:starts[i + 1] if i + 1 < len(cols) else len(ln)].strip()
                 for i, c in enumerate(cols)}
        table[cells["NAME"]] = cells
    return table


def test_certs_shows_profile_lifetime_ari_window_and_its_source(tmp_path_factory, start_proxy, tmp_path):
    name, port = "certs.h19.test", free_port()
    ensure_hosts([name])
    ca = Acme2Certifier(tmp_path_factory.mktemp("a2c-certs"), profiles={"shortlived": "6 days"},
                        validity_days=6).start()
    try:
        proxy = start_on_wellknown(start_proxy, {
            "address": f"127.0.0.1:{port}", "http_redirect_addr": "127.0.0.1:80", "autocert": True,
            "autocert_ca": ca.directory_url, "autocert_email": "admin@example.com",
            "autocert_dir": str(tmp_path / "ac"), "autocert_profile": "shortlived",
            "routes": [{"from": f"https://{name}", "response": {"status": 200, "body": "ok"}}],
        }, [80], ("127.0.0.1", port), env=FAST)
        wait_until(lambda: "the CA suggests renewal between" in proxy.log(), "the renewal window", proxy.log)
        row = certs_table(proxy)[name]
        cert = served_certificate(port, name)
    finally:
        ca.stop()
    assert "acme2certifier" in cert.issuer.rfc4514_string()
    assert row["PROFILE"] == "shortlived"
    assert row["LIFETIME"] == "6d"
    assert re.fullmatch(f"{STAMP} \\.\\. {STAMP}", row["ARI_WINDOW"]), row
    assert row["RENEWAL_BY"].startswith("ARI window"), row
    start, end = row["ARI_WINDOW"].split(" .. ")
    assert start <= row["NEXT_RENEWAL"] <= end or "already over" in row["RENEWAL_BY"], row


def test_certs_without_ari_or_profile_names_the_lifetime_rule(pebble, start_proxy, tmp_path):
    port = pebble.tls_port
    proxy = start_proxy({"_port": port, "address": f"127.0.0.1:{port}", "autocert": True,
                         "autocert_ca": pebble.directory_url,
                         "autocert_trusted_ca_file": str(pebble.trusted_ca_file),
                         "autocert_dir": str(tmp_path / "ac"),
                         "routes": [{"from": "https://plain.test", "response": {"status": 200, "body": "ok"}}]},
                        env=FAST)
    wait_port(port)
    wait_until(lambda: "obtained a certificate for plain.test" in proxy.log(), "the certificate", proxy.log)

    def row():
        r = certs_table(proxy)["plain.test"]
        return r if r["ARI_WINDOW"] != "-" else None
    r = wait_until(row, "the CA's answer about ARI", proxy.log)
    assert r["PROFILE"] == "-"
    assert r["ARI_WINDOW"] == "none (CA has no ARI)"
    assert r["LIFETIME"] == "1826d"   # Pebble 2.4: 5 years
    assert r["RENEWAL_BY"] == "lifetime: a third left"
