"""``autocert_preferred_chain``: the chain served is the one the named issuer signed, among the
CA's alternate chains (``Link: rel="alternate"``). Pebble 2.4 offers them with
``PEBBLE_ALTERNATE_ROOTS``: each chain leads to its own root (new names on every start)."""
from __future__ import annotations

import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.autocert.chains import alternate_links, choose_chain
from proxy.config import ConfigError, load_config
from tests.infra.pebble import pebble_factory  # noqa: F401  (fixture)
from tests.infra.pki import TestCA
from tests.infra.proxyproc import wait_port

FAST = {"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"}


def cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def served_chain(port: int, name: str) -> list[x509.Certificate]:
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                          "-showcerts"], input=b"", capture_output=True, timeout=15).stdout
    return x509.load_pem_x509_certificates(out)


def test_preferred_chain_picks_the_alternate_root(pebble_factory, start_proxy, tmp_path):
    ca = pebble_factory(extra_env={"PEBBLE_ALTERNATE_ROOTS": "2"})
    roots = [x509.load_pem_x509_certificate(ca.issuing_root_pem(i)) for i in range(3)]
    want = cn(roots[2].subject)
    cfg = {"_port": ca.tls_port, "address": f"127.0.0.1:{ca.tls_port}", "autocert": True,
           "autocert_ca": ca.directory_url, "autocert_trusted_ca_file": str(ca.trusted_ca_file),
           "autocert_dir": str(tmp_path / "ac"), "autocert_preferred_chain": want,
           "routes": [{"from": "https://chain.test", "response": {"status": 200, "body": "ok"}}]}
    proxy = start_proxy(cfg, env=FAST)
    wait_port(ca.tls_port)
    proxy.wait_log("obtained a certificate for chain.test", timeout=30)
    chain = served_chain(ca.tls_port, "chain.test")
    assert cn(chain[-1].issuer) == want, [cn(c.subject) for c in chain]
    # what a client sees: it verifies against that root, not against the default one
    for i, ok in ((2, True), (0, False)):
        root_file = tmp_path / f"root{i}.pem"
        root_file.write_bytes(roots[i].public_bytes(serialization.Encoding.PEM))
        out = proxy.curl("chain.test", "/", cacert=root_file)
        assert (out.returncode == 0) == ok, (i, out.stderr)
    assert "autocert_preferred_chain" not in proxy.log()


def test_no_matching_chain_serves_the_default_and_says_what_was_offered(pebble_factory, start_proxy, tmp_path):
    ca = pebble_factory(extra_env={"PEBBLE_ALTERNATE_ROOTS": "1"})
    root0 = cn(x509.load_pem_x509_certificate(ca.issuing_root_pem(0)).subject)
    root1 = cn(x509.load_pem_x509_certificate(ca.issuing_root_pem(1)).subject)
    cfg = {"_port": ca.tls_port, "address": f"127.0.0.1:{ca.tls_port}", "autocert": True,
           "autocert_ca": ca.directory_url, "autocert_trusted_ca_file": str(ca.trusted_ca_file),
           "autocert_dir": str(tmp_path / "ac"), "autocert_preferred_chain": "ISRG Root X1",
           "routes": [{"from": "https://chain.test", "response": {"status": 200, "body": "ok"}}]}
    proxy = start_proxy(cfg, env=FAST)
    wait_port(ca.tls_port)
    proxy.wait_log("obtained a certificate for chain.test", timeout=30)
    assert cn(served_chain(ca.tls_port, "chain.test")[-1].issuer) == root0
    log = proxy.log()
    assert "no chain for chain.test has an issuer named 'ISRG Root X1' (autocert_preferred_chain)" in log
    assert root0 in log and root1 in log


# ------------------------------------------------------------------------------ pure parts
def test_alternate_links_from_link_headers():
    values = ['<https://ca.example/dir>;rel="index"',
              '<https://ca.example/cert/1/alt/1>;rel="alternate", </cert/1/alt/2>; rel=alternate',
              '<https://ca.example/x>;title="a, b";rel="alternate up"']
    assert alternate_links(values, "https://ca.example/cert/1") == [
        "https://ca.example/cert/1/alt/1", "https://ca.example/cert/1/alt/2", "https://ca.example/x"]
    assert alternate_links([], "https://ca.example/") == []
    assert alternate_links(["garbage", "<>"], "https://ca.example/") == []


def _chain(leaf_ca: TestCA, leaf, *cas: TestCA) -> bytes:
    return leaf.cert_pem + b"".join(c.cert_pem for c in cas)


def test_choose_chain_by_topmost_issuer_then_any_issuer(tmp_path):
    root_a, root_b = TestCA(tmp_path / "a", name="Root A"), TestCA(tmp_path / "b", name="Root B")
    leaf = root_a.issue(["x.test"])
    default = leaf.cert_pem
    other_leaf = root_b.issue(["x.test"]).cert_pem
    assert choose_chain([default], "Root A") == 0
    assert choose_chain([default, default], "root a") == 0          # case-insensitive, first wins
    assert choose_chain([default], "Root B") is None
    assert choose_chain([default, other_leaf], "Root B") is None    # another leaf is never picked
    assert choose_chain([default, b"junk"], "Root A") == 0
    assert choose_chain([b"junk"], "Root A") is None


def test_preferred_chain_config():
    env = {"HOME": "/h"}
    assert load_config(None, env).autocert_preferred_chain == ""
    assert load_config(None, {**env, "AUTOCERT_PREFERRED_CHAIN": " ISRG Root X1 "}).autocert_preferred_chain == "ISRG Root X1"
    with pytest.raises(ConfigError) as ei:
        load_config(None, {**env, "AUTOCERT_PREFERRED_CHAIN": "a\tb"})
    assert ei.value.problems[0].startswith("autocert_preferred_chain (from environment AUTOCERT_PREFERRED_CHAIN):")
