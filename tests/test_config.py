"""load_config: file + environment -> Options, every problem named by key, all at once."""
from __future__ import annotations

import base64
import datetime as dt
import os
import re
import textwrap
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.config import (
    LETS_ENCRYPT_PRODUCTION,
    LETS_ENCRYPT_STAGING,
    KNOWN_KEYS,
    ROUTE_KEYS,
    Address,
    ConfigError,
    DirectResponse,
    Upstream,
    load_config,
    parse_duration,
)
from proxy import pomerium_names
from tests.infra.pki import TestCA

REPO = Path(__file__).resolve().parent.parent
ENV = {"HOME": "/home/tester"}  # a HOME so the default autocert_dir does not depend on the machine
ONE_ROUTE = "routes: [{from: 'https://a.example.com', to: 'http://127.0.0.1:9'}]\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def problems_of(path, environ=ENV) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ)
    assert exc.value.problems, "ConfigError without problems"
    for p in exc.value.problems:
        assert p in str(exc.value)
    return exc.value.problems


def one_problem(path, environ=ENV) -> str:
    found = problems_of(path, environ)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "pki")


# --------------------------------------------------------------------------- defaults, example

def test_no_file_no_env_gives_defaults():
    o = load_config(None, ENV)
    assert o.address == Address("", 443)
    assert o.http_redirect_addr is None
    assert o.routes == () and o.certificates == ()
    assert o.autocert is False
    assert o.autocert_ca == LETS_ENCRYPT_PRODUCTION
    assert o.autocert_dir == "/home/tester/.local/share/autocert-proxy/autocert"
    assert (o.log_level, o.access_log_format, o.workers) == ("info", "plain", 1)
    assert o.source == ""


def test_example_config_loads_offline():
    o = load_config(str(REPO / "config.example.yaml"), {})
    assert o.address == Address("", 8443)
    assert o.http_redirect_addr == Address("", 8080)
    assert o.autocert is False
    [route] = o.routes
    assert (route.scheme, route.host, route.path_prefix) == ("https", "localhost", "/")
    assert route.response == DirectResponse(200, "autocert-proxy is running\n")
    assert route.to == ()
    assert o.source.endswith("config.example.yaml")


def test_example_config_documents_every_key():
    text = (REPO / "config.example.yaml").read_text()
    undocumented = [k for k in KNOWN_KEYS if not re.search(rf"^#?\s*{k}:", text, re.M)]
    assert undocumented == []
    assert "s3://" in text and "gs://" in text


def test_options_are_immutable(tmp_path):
    o = load_config(write(tmp_path, """
        routes:
          - from: https://a.example.com
            to: [http://127.0.0.1:1, http://127.0.0.1:2]
    """), ENV)
    with pytest.raises(FrozenInstanceError):
        o.autocert = True  # type: ignore[misc]
    assert isinstance(o.routes, tuple) and isinstance(o.routes[0].to, tuple)


# --------------------------------------------------------------------------- file and environment

def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = one_problem(write(tmp_path, "autocert_emial: a@example.com\n"))
    assert p.startswith("autocert_emial:") and "'autocert_email'" in p


def test_unknown_key_without_close_match(tmp_path):
    p = one_problem(write(tmp_path, "zzzz: 1\n"))
    assert p.startswith("zzzz: unknown key") and "did you mean" not in p


def test_unrelated_environment_is_ignored():
    o = load_config(None, {**ENV, "PATH": "/bin", "AUTOCERT_FOO": "x", "address_lower": "junk"})
    assert o.address == Address("", 443)


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, """
        address: ":8443"
        autocert: false
        routes:
          - from: https://file.example.com
            to: http://127.0.0.1:9000
    """)
    env = {**ENV, "ADDRESS": "127.0.0.1:9443", "AUTOCERT": "t",
           "ROUTES": "- from: https://env.example.com\n  to: http://127.0.0.1:9001\n"}
    o = load_config(path, env)
    assert o.address == Address("127.0.0.1", 9443)
    assert o.autocert is True
    assert [r.host for r in o.routes] == ["env.example.com"]
    assert o.routes[0].to == (Upstream("http", "127.0.0.1", 9001),)


def test_routes_from_environment_as_json():
    o = load_config(None, {**ENV, "ROUTES": '[{"from": "https://j.example.com", "to": "http://10.0.0.1"}]'})
    assert o.routes[0].to == (Upstream("http", "10.0.0.1", 80),)


def test_empty_environment_variable_counts_as_unset(tmp_path):
    o = load_config(write(tmp_path, 'address: ":8443"\n'), {**ENV, "ADDRESS": ""})
    assert o.address.port == 8443


def test_environment_errors_name_the_variable():
    found = problems_of(None, {**ENV, "AUTOCERT": "yes", "ROUTES": "[{from: ftp://x}]"})
    assert any(p.startswith("autocert (from environment AUTOCERT): 'yes'") for p in found)
    assert any(p.startswith("routes[0].from (from environment ROUTES):") and "ftp" in p for p in found)


def test_invalid_yaml_in_environment():
    p = one_problem(None, {**ENV, "ROUTES": "[{from: "})
    assert p.startswith("routes (from environment ROUTES): not valid YAML")


def test_missing_config_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    p = one_problem(missing)
    assert missing in p and "cannot read" in p


def test_duplicate_key_in_file(tmp_path):
    p = one_problem(write(tmp_path, "autocert: true\nautocert: false\n"))
    assert "duplicate key 'autocert'" in p


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in one_problem(write(tmp_path, "- a\n- b\n"))


def test_empty_file_and_empty_values_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), ENV).address.port == 443
    assert load_config(write(tmp_path, "routes:\naddress:\n"), ENV).routes == ()


def test_several_problems_reported_at_once(tmp_path):
    found = problems_of(write(tmp_path, """
        address: ":99999"
        autocert: maybe
        log_level: loud
        timeout_idle: 0
        workers: -2
        autocert_eab_key_id: kid
        routes:
          - from: ftp://a.example.com
            to: https://b.example.com
    """))
    keys = [p.split(":")[0] for p in found]
    assert keys == ["address", "autocert", "log_level", "timeout_idle", "workers",
                    "routes[0].from", "routes[0].to", "autocert_eab_mac_key"], found


# --------------------------------------------------------------------------- scalars

@pytest.mark.parametrize("text,expected", [
    ("true", True), ("TRUE", True), ("True", True), ("1", True), ("t", True), ("T", True),
    ("false", False), ("FALSE", False), ("False", False), ("0", False), ("f", False), ("F", False),
])
def test_booleans_parse_loosely(text, expected):
    o = load_config(None, {**ENV, "AUTOCERT": text, "AUTOCERT_MUST_STAPLE": text, "AUTOCERT_USE_STAGING": text})
    assert (o.autocert, o.autocert_must_staple, o.autocert_use_staging) == (expected,) * 3


@pytest.mark.parametrize("text", ["yes", "no", "on", "2", "tru", " true"])
def test_bad_boolean_names_key_value_and_forms(text):
    p = one_problem(None, {**ENV, "AUTOCERT_MUST_STAPLE": text})
    assert p.startswith("autocert_must_staple (from environment AUTOCERT_MUST_STAPLE):")
    assert repr(text) in p and "true, TRUE, True, 1, t, T, false" in p


def test_booleans_in_file(tmp_path):
    o = load_config(write(tmp_path, "autocert: true\nautocert_must_staple: 1\nautocert_use_staging: 'T'\n"), ENV)
    assert (o.autocert, o.autocert_must_staple, o.autocert_use_staging) == (True, True, True)
    assert one_problem(write(tmp_path, "autocert: 7\n")).startswith("autocert: 7 is not a boolean")


@pytest.mark.parametrize("text,expected", [
    (":443", Address("", 443)), ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
    ("[::1]:443", Address("::1", 443)), ("Localhost:1", Address("localhost", 1)),
    ("0.0.0.0:65535", Address("0.0.0.0", 65535)),
])
def test_addresses(text, expected):
    o = load_config(None, {**ENV, "ADDRESS": text})
    assert o.address == expected


def test_ipv6_address_prints_with_brackets():
    assert str(Address("::1", 443)) == "[::1]:443" and str(Address("", 80)) == ":80"
    assert Upstream("http", "::1", 8080).authority == "[::1]:8080"
    assert Upstream("http", "a.example", 80).authority == "a.example"


@pytest.mark.parametrize("text", ["443", ":0", ":65536", ":http", "::1:443", "[::1]443", "[zz]:1", "a b:1", ""])
def test_bad_addresses(text, tmp_path):
    p = one_problem(write(tmp_path, f"http_redirect_addr: {text!r}\n"))
    assert p.startswith("http_redirect_addr:") and "accepted:" in p


def test_unquoted_numeric_address_is_explained(tmp_path):
    p = one_problem(write(tmp_path, "address: 443\n"))
    assert p.startswith("address: 443") and "quote it" in p


def test_redirect_address_may_not_overlap_tls_address(tmp_path):
    p = one_problem(write(tmp_path, 'address: ":8443"\nhttp_redirect_addr: "127.0.0.1:8443"\n'))
    assert p.startswith("http_redirect_addr:") and "overlaps" in p
    assert load_config(write(tmp_path, 'address: "127.0.0.1:8443"\nhttp_redirect_addr: "127.0.0.2:8443"\n'),
                       ENV).http_redirect_addr == Address("127.0.0.2", 8443)


@pytest.mark.parametrize("value,seconds", [
    (5, 5.0), (2.5, 2.5), ("30", 30.0), ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5),
    ("2h", 7200.0), ("1.5h", 5400.0), ("1h2m3s4ms", 3723.004), ("100us", 1e-4), ("10µs", 1e-5),
])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


def test_duration_keys_from_file_and_env(tmp_path):
    o = load_config(write(tmp_path, "timeout_idle: 1m\ntimeout_read_header: 500ms\nshutdown_timeout: 3\n"),
                    {**ENV, "DEFAULT_UPSTREAM_TIMEOUT": "1m30s"})
    assert (o.timeout_idle, o.timeout_read_header, o.default_upstream_timeout, o.shutdown_timeout) == \
        (60.0, 0.5, 90.0, 3.0)


@pytest.mark.parametrize("value", ["0", "0s", "-1s", "30 s", "1d", "s", "abc", "true", ".inf"])
def test_bad_durations(value):
    p = one_problem(None, {**ENV, "TIMEOUT_IDLE": value})
    assert p.startswith("timeout_idle (from environment TIMEOUT_IDLE):") and repr(value) in p
    assert '"1m30s"' in p


def test_boolean_is_not_a_duration(tmp_path):
    assert one_problem(write(tmp_path, "shutdown_timeout: true\n")).startswith("shutdown_timeout: True")


def test_workers(tmp_path):
    assert load_config(None, {**ENV, "WORKERS": "4"}).workers == 4
    assert load_config(write(tmp_path, "workers: auto\n"), ENV).workers == (os.cpu_count() or 1)
    for bad in ("0", "-1", "many", "1.5"):
        p = one_problem(None, {**ENV, "WORKERS": bad})
        assert p.startswith("workers (from environment WORKERS):") and '"auto"' in p


def test_log_keys(tmp_path):
    o = load_config(write(tmp_path, "log_level: DEBUG\naccess_log_format: json\n"), ENV)
    assert (o.log_level, o.access_log_format) == ("debug", "json")
    assert load_config(None, {**ENV, "LOG_LEVEL": "warn"}).log_level == "warning"
    p = one_problem(None, {**ENV, "ACCESS_LOG_FORMAT": "xml"})
    assert "'xml'" in p and "plain, json" in p


# --------------------------------------------------------------------------- routes

def routes_of(tmp_path, text):
    return load_config(write(tmp_path, text), ENV).routes


def test_route_fields(tmp_path):
    [a, b, c] = routes_of(tmp_path, """
        routes:
          - from: https://App.Example.COM/api/
            to: http://127.0.0.1:9000
            preserve_host_header: t
          - from: http://*.example.com
            to: [http://Upstream-1.internal, "http://[::1]:81/"]
          - from: https://bücher.example
            response: {status: 404}
    """)
    assert (a.from_url, a.scheme, a.host, a.path_prefix) == \
        ("https://App.Example.COM/api/", "https", "app.example.com", "/api/")
    assert a.to == (Upstream("http", "127.0.0.1", 9000),) and a.preserve_host_header and a.response is None
    assert (b.scheme, b.host, b.path_prefix) == ("http", "*.example.com", "/")
    assert b.to == (Upstream("http", "upstream-1.internal", 80), Upstream("http", "::1", 81))
    assert b.preserve_host_header is False
    assert c.host == "xn--bcher-kva.example"
    assert c.response == DirectResponse(404, "") and c.to == ()


@pytest.mark.parametrize("from_url,fragment", [
    ("ftp://a.example.com", "'ftp'"),
    ("https:///path", "no host"),
    ("https://a.example.com/?q=1", "query"),
    ("https://a.example.com/#x", "query or fragment"),
    ("https://user@a.example.com", "user information"),
    ("https://a.*.bücher.example", "ASCII"),
    ("https://a_b..example.com", "not a valid DNS name"),
])
def test_bad_from(tmp_path, from_url, fragment):
    p = one_problem(write(tmp_path, f"routes:\n  - from: {from_url!r}\n    to: http://127.0.0.1\n"))
    assert p.startswith("routes[0].from:") and fragment in p, p


@pytest.mark.parametrize("to,fragment", [
    ("https://b.example.com", "https upstreams are not supported yet"),
    ("ws://b.example.com", "'ws'"),
    ("http://b.example.com/app", "has a path"),
    ("http://b.example.com:99999", "not a valid URL"),
    ("http://", "no host"),
])
def test_bad_to(tmp_path, to, fragment):
    p = one_problem(write(tmp_path, f"routes:\n  - from: https://a.example.com\n    to: [http://ok, {to!r}]\n"))
    assert p.startswith("routes[0].to[1]:") and fragment in p, p


def test_to_and_response_exactly_one(tmp_path):
    both = one_problem(write(tmp_path, """
        routes:
          - from: https://a.example.com
            to: http://127.0.0.1
            response: {status: 200}
    """))
    neither = one_problem(write(tmp_path, "routes:\n  - from: https://a.example.com\n"))
    assert both.startswith("routes[0]:") and "both" in both
    assert neither.startswith("routes[0]:") and "neither" in neither


def test_route_problems_name_their_key(tmp_path):
    found = problems_of(write(tmp_path, """
        routes:
          - from: https://a.example.com
            to: http://127.0.0.1
            preserve_host: true
          - to: http://127.0.0.1
          - from: https://c.example.com
            response: {status: 700, body: 5, code: 1}
          - from: https://d.example.com
            to: http://127.0.0.1
            preserve_host_header: sometimes
          - from: https://e.example.com
            to: []
          - just a string
    """))
    assert found[0].startswith("routes[0].preserve_host:") and "'preserve_host_header'" in found[0]
    assert found[1].startswith("routes[1].from: missing")
    assert [p.split(":")[0] for p in found[2:]] == [
        "routes[2].response.code", "routes[2].response.status", "routes[2].response.body",
        "routes[3].preserve_host_header", "routes[4].to", "routes[5]"], found
    assert "100 to 599" in found[3]


def test_routes_must_be_a_list(tmp_path):
    assert one_problem(write(tmp_path, "routes: {from: https://a}\n")).startswith("routes: expected a list")


def test_duplicate_routes(tmp_path):
    p = one_problem(write(tmp_path, """
        routes:
          - from: https://a.example.com/x
            to: http://127.0.0.1
          - from: https://a.example.com/y
            to: http://127.0.0.1
          - from: http://A.example.com/x
            response: {status: 200}
    """))
    assert p.startswith("routes[2].from:") and "duplicates routes[0]" in p


def test_https_route_without_certificate_and_no_autocert_is_fine(tmp_path):
    [r] = routes_of(tmp_path, "autocert: false\nroutes:\n  - from: https://nocert.example\n    to: http://h\n")
    assert r.host == "nocert.example"


# --------------------------------------------------------------------------- certificates

def test_certificates_from_files_inline_and_certificate_file(tmp_path, ca):
    a, b, c = ca.issue(["a.example.com"]), ca.issue(["b.example.com"]), ca.issue(["c.example.com"])
    # relative paths resolve against the config file's directory
    doc = {
        "certificates": [
            {"cert": "pki/a.example.com.pem", "key": str(a.key_path)},
            {"cert": b.cert_pem.decode(), "key": b.key_pem.decode()},
        ],
        "certificate_file": str(c.cert_path),
        "certificate_key_file": str(c.key_path),
    }
    path = write(tmp_path, yaml.safe_dump(doc))
    o = load_config(path, ENV)
    assert [p.origin for p in o.certificates] == [str(a.cert_path), "certificates[1] (inline)", str(c.cert_path)]
    assert [p.cert_pem for p in o.certificates] == [a.cert_pem, b.cert_pem, c.cert_pem]
    assert [p.key_pem for p in o.certificates] == [a.key_pem, b.key_pem, c.key_pem]


def test_chain_is_kept_leaf_first_and_text_around_pem_dropped(tmp_path, ca):
    leaf = ca.issue(["a.example.com"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"Bag Attributes: junk\n" + leaf.cert_pem + ca.cert_pem)
    o = load_config(None, {**ENV, "CERTIFICATE_FILE": str(chain), "CERTIFICATE_KEY_FILE": str(leaf.key_path)})
    assert o.certificates[0].cert_pem == leaf.cert_pem + ca.cert_pem


def test_certificates_from_environment(ca):
    a = ca.issue(["a.example.com"])
    env = {**ENV, "CERTIFICATES": f'[{{"cert": "{a.cert_path}", "key": "{a.key_path}"}}]'}
    assert load_config(None, env).certificates[0].origin == str(a.cert_path)


def test_unreadable_certificate_file_names_key_path_and_error(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    missing = tmp_path / "missing.pem"
    p = one_problem(write(tmp_path, f"certificates:\n  - cert: {missing}\n    key: {a.key_path}\n"))
    assert p.startswith("certificates[0].cert:") and str(missing) in p and "No such file" in p


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_certificate(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    a.key_path.chmod(0)
    p = one_problem(write(tmp_path, f"certificate_file: {a.cert_path}\ncertificate_key_file: {a.key_path}\n"))
    assert p.startswith("certificate_key_file:") and "Permission denied" in p


def test_directory_as_certificate_path(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    p = one_problem(write(tmp_path, f"certificate_file: {tmp_path}\ncertificate_key_file: {a.key_path}\n"))
    assert p.startswith("certificate_file:") and str(tmp_path) in p and "cannot read" in p


def test_mismatched_certificate_and_key(tmp_path, ca):
    a, b = ca.issue(["a.example.com"]), ca.issue(["b.example.com"])
    p = one_problem(write(tmp_path, f"certificates:\n  - cert: {a.cert_path}\n    key: {b.key_path}\n"))
    assert p.startswith("certificates[0].key:") and "does not match" in p and str(a.cert_path) in p


def test_mismatch_is_found_for_every_key_format(tmp_path, ca):
    # the cheap public-part match at start must not let a wrong key through in any format
    a, b = ca.issue(["a.example.com"]), ca.issue(["b.example.com"])
    trad = tmp_path / "b-trad.key"
    trad.write_bytes(b.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
    for key in (b.key_path, trad):
        p = one_problem(write(tmp_path, f"certificates:\n  - cert: {a.cert_path}\n    key: {key}\n"))
        assert p.startswith("certificates[0].key:") and "does not match" in p


def test_key_with_corrupt_private_part_is_reported_by_the_full_check(tmp_path, ca):
    # Start-up matches a key to its certificate by the public part written in the key (no key
    # parse); a key whose private part is broken behind a right public part passes that, and
    # is caught by the full check (--check) and when its context is first built.
    from tests.test_keymatch import corrupt_private_part
    a = ca.issue(["a.example.com"])
    bad = tmp_path / "bad.key"
    bad.write_bytes(corrupt_private_part(a.key_pem))
    path = write(tmp_path, f"certificates:\n  - cert: {a.cert_path}\n    key: {bad}\n")
    o = load_config(path, ENV)
    assert [p.origin for p in o.certificates] == [str(a.cert_path)]
    with pytest.raises(ConfigError) as exc:
        load_config(path, ENV, full_key_check=True)
    [p] = exc.value.problems
    assert p.startswith("certificates[0].key:") and str(bad) in p and "private key that can be parsed" in p, p


def test_certificate_pair_keeps_the_bytes_read_and_the_parsed_chain(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    o = load_config(write(tmp_path, f"certificate_file: {a.cert_path}\ncertificate_key_file: {a.key_path}\n"), ENV)
    [pair] = o.certificates
    assert pair.cert_data == a.cert_path.read_bytes() and pair.key_data == a.key_path.read_bytes()
    assert [c.serial_number for c in pair.certs] == [a.cert.serial_number]


def test_key_of_second_certificate_hints_at_order(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    wrong_order = tmp_path / "wrong.pem"
    wrong_order.write_bytes(ca.cert_pem + a.cert_pem)
    p = one_problem(write(tmp_path, f"certificate_file: {wrong_order}\ncertificate_key_file: {a.key_path}\n"))
    assert "leaf must come first" in p


def test_garbage_pem_and_encrypted_key(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(a.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"pw")))
    found = problems_of(write(tmp_path, f"""
        certificates:
          - cert: {garbage}
            key: {a.key_path}
          - cert: {a.cert_path}
            key: {encrypted}
          - cert: {a.cert_path}
            key: {garbage}
    """))
    assert found[0].startswith("certificates[0].cert:") and "no PEM certificate" in found[0]
    assert found[1].startswith("certificates[1].key:") and "password" in found[1]
    assert found[2].startswith("certificates[2].key:") and "no PEM private key" in found[2]
    assert len(found) == 3


def test_certificate_entry_keys(tmp_path, ca):
    a = ca.issue(["a.example.com"])
    found = problems_of(write(tmp_path, f"certificates:\n  - cert: {a.cert_path}\n    keyfile: x\n"))
    assert found[0].startswith("certificates[0].keyfile: unknown key") and "'key'" in found[0]
    assert found[1].startswith("certificates[0].key: missing")


def test_certificate_file_needs_key_file(ca):
    a = ca.issue(["a.example.com"])
    p = one_problem(None, {**ENV, "CERTIFICATE_FILE": str(a.cert_path)})
    assert p.startswith("certificate_key_file: missing")


def test_expired_certificate_is_accepted_with_warning(tmp_path, ca):
    now = dt.datetime.now(dt.timezone.utc)
    old = ca.issue(["old.example.com"], not_before=now - dt.timedelta(days=100),
                   not_after=now - dt.timedelta(days=10))
    o = load_config(write(tmp_path, f"certificate_file: {old.cert_path}\ncertificate_key_file: {old.key_path}\n"
                                    + ONE_ROUTE), ENV)
    assert o.certificates[0].cert_pem == old.cert_pem
    assert len(o.warnings) == 1 and "expired" in o.warnings[0]


def test_not_yet_valid_certificate_is_accepted_with_warning(tmp_path, ca):
    now = dt.datetime.now(dt.timezone.utc)
    new = ca.issue(["new.example.com"], not_before=now + dt.timedelta(days=2),
                   not_after=now + dt.timedelta(days=90))
    o = load_config(write(tmp_path, f"certificates:\n  - cert: {new.cert_path}\n    key: {new.key_path}\n"
                                    + ONE_ROUTE), ENV)
    assert o.certificates[0].cert_pem == new.cert_pem
    assert len(o.warnings) == 1, o.warnings
    w = o.warnings[0]
    assert w.startswith("certificates[0].cert:") and "not valid before" in w and str(new.cert_path) in w
    assert f"{new.cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC" in w


def test_pkcs1_rsa_key_is_accepted_and_normalized(tmp_path, ca):
    # A key in the traditional "BEGIN EC PRIVATE KEY" form still loads; stored as PKCS#8.
    a = ca.issue(["a.example.com"])
    trad = tmp_path / "trad.key"
    trad.write_bytes(a.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
    o = load_config(None, {**ENV, "CERTIFICATE_FILE": str(a.cert_path), "CERTIFICATE_KEY_FILE": str(trad)})
    assert o.certificates[0].key_pem == a.key_pem


# --------------------------------------------------------------------------- autocert

def test_ca_selection_production_staging_explicit(tmp_path):
    assert load_config(None, ENV).autocert_ca == LETS_ENCRYPT_PRODUCTION
    staging = load_config(None, {**ENV, "AUTOCERT_USE_STAGING": "true"})
    assert staging.autocert_ca == LETS_ENCRYPT_STAGING and staging.autocert_use_staging
    explicit = load_config(write(tmp_path, "autocert_ca: https://ca.example/dir\nautocert_use_staging: true\n"), ENV)
    assert explicit.autocert_ca == "https://ca.example/dir"
    local = load_config(None, {**ENV, "AUTOCERT_CA": "http://127.0.0.1:14000/dir"})
    assert local.autocert_ca == "http://127.0.0.1:14000/dir"


@pytest.mark.parametrize("url", ["http://ca.example/dir", "ftp://ca.example", "ca.example/dir", "https://"])
def test_bad_ca_url(url):
    p = one_problem(None, {**ENV, "AUTOCERT_CA": url})
    assert p.startswith("autocert_ca (from environment AUTOCERT_CA):") and repr(url) in p and "https://" in p


def test_email(tmp_path):
    assert load_config(write(tmp_path, "autocert_email: ''\n"), ENV).autocert_email == ""
    assert load_config(None, {**ENV, "AUTOCERT_EMAIL": "ops@example.com"}).autocert_email == "ops@example.com"
    for bad in ("ops", "ops@", "@example.com", "a b@example.com", "ops@localhost"):
        p = one_problem(None, {**ENV, "AUTOCERT_EMAIL": bad})
        assert p.startswith("autocert_email (from environment AUTOCERT_EMAIL):") and repr(bad) in p


MAC = base64.urlsafe_b64encode(bytes(range(250, 256)) + b"\xfb\xff").decode()  # has '-' and '_'


def test_eab_both_given():
    assert "-" in MAC or "_" in MAC
    o = load_config(None, {**ENV, "AUTOCERT_EAB_KEY_ID": "kid-1", "AUTOCERT_EAB_MAC_KEY": MAC})
    assert (o.autocert_eab_key_id, o.autocert_eab_mac_key) == ("kid-1", MAC.rstrip("="))


def test_eab_padding_is_tolerated_and_removed():
    padded = base64.urlsafe_b64encode(b"12345").decode()
    assert padded.endswith("=")
    o = load_config(None, {**ENV, "AUTOCERT_EAB_KEY_ID": "k", "AUTOCERT_EAB_MAC_KEY": padded})
    assert o.autocert_eab_mac_key == padded.rstrip("=")


@pytest.mark.parametrize("given,missing", [("AUTOCERT_EAB_KEY_ID", "autocert_eab_mac_key"),
                                           ("AUTOCERT_EAB_MAC_KEY", "autocert_eab_key_id")])
def test_eab_only_one_given(given, missing):
    value = MAC if given == "AUTOCERT_EAB_MAC_KEY" else "kid-1"
    p = one_problem(None, {**ENV, given: value})
    assert p.startswith(f"{missing}: missing") and given.lower() in p


@pytest.mark.parametrize("mac", ["ab+/cd", "abc$", "a", "abcde=====", "ab cd"])
def test_bad_mac_key(mac):
    p = one_problem(None, {**ENV, "AUTOCERT_EAB_KEY_ID": "kid", "AUTOCERT_EAB_MAC_KEY": mac})
    assert p.startswith("autocert_eab_mac_key (from environment AUTOCERT_EAB_MAC_KEY):") and "base64url" in p
    # the secret itself is not repeated into logs
    assert mac not in p.split(":", 1)[1] or len(mac) <= 1


def test_trusted_ca_base64_and_file(tmp_path, ca):
    b64 = base64.b64encode(ca.cert_pem).decode()
    assert load_config(None, {**ENV, "AUTOCERT_TRUSTED_CA": b64}).autocert_trusted_ca_pem == ca.cert_pem
    o = load_config(write(tmp_path, "autocert_trusted_ca_file: pki/ca.pem\n"), ENV)
    assert o.autocert_trusted_ca_pem == ca.cert_pem


def test_trusted_ca_both_given(tmp_path, ca):
    b64 = base64.b64encode(ca.cert_pem).decode()
    p = one_problem(write(tmp_path, f"autocert_trusted_ca: {b64}\nautocert_trusted_ca_file: {ca.cert_path}\n"))
    assert "autocert_trusted_ca" in p and "autocert_trusted_ca_file" in p and "only one" in p


def test_bad_trusted_ca(tmp_path, ca):
    found = problems_of(None, {**ENV, "AUTOCERT_TRUSTED_CA": "%%%not base64%%%"})
    assert found[0].startswith("autocert_trusted_ca (from environment AUTOCERT_TRUSTED_CA):") and "base64" in found[0]
    no_cert = base64.b64encode(b"hello").decode()
    assert "no PEM certificate" in one_problem(None, {**ENV, "AUTOCERT_TRUSTED_CA": no_cert})
    assert "base64-encoded" in one_problem(None, {**ENV, "AUTOCERT_TRUSTED_CA": ca.cert_pem.decode()})
    p = one_problem(write(tmp_path, "autocert_trusted_ca_file: nope.pem\n"))
    assert p.startswith("autocert_trusted_ca_file:") and str(tmp_path / "nope.pem") in p


def test_autocert_dir_defaults():
    assert load_config(None, {"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}).autocert_dir == \
        "/xdg/autocert-proxy/autocert"
    assert load_config(None, {"HOME": "/home/u"}).autocert_dir == "/home/u/.local/share/autocert-proxy/autocert"
    assert load_config(None, {"XDG_DATA_HOME": "", "HOME": "/home/u"}).autocert_dir == \
        "/home/u/.local/share/autocert-proxy/autocert"


def test_autocert_dir_given(tmp_path):
    assert load_config(write(tmp_path, "autocert_dir: certs\n"), ENV).autocert_dir == str(tmp_path / "certs")
    assert load_config(None, {**ENV, "AUTOCERT_DIR": "/var/lib/x"}).autocert_dir == "/var/lib/x"
    for url in ("s3://bucket.s3.eu-west-1.amazonaws.com/prefix", "gs://bucket/prefix"):
        assert load_config(None, {**ENV, "AUTOCERT_DIR": url}).autocert_dir == url
    p = one_problem(None, {**ENV, "AUTOCERT_DIR": "azure://container"})
    assert p.startswith("autocert_dir (from environment AUTOCERT_DIR):") and "'azure'" in p and "gs://" in p


def test_must_staple_with_lets_encrypt_warns():
    o = load_config(None, {**ENV, "AUTOCERT": "1", "AUTOCERT_MUST_STAPLE": "1"})
    assert any("must-staple" in w for w in o.warnings)
    o = load_config(None, {**ENV, "AUTOCERT": "1", "AUTOCERT_MUST_STAPLE": "1", "AUTOCERT_CA": "https://ca.example/d",
                           "ROUTES": ONE_ROUTE[len("routes: "):]})
    assert o.warnings == ()


# --------------------------------------------------------------------------- nothing accepted that should not be

@pytest.mark.parametrize("value", ["s3://", "gs://", "s3:///prefix", "gs:///only/a/prefix"])
def test_bucket_url_without_bucket_is_refused(value):
    p = one_problem(None, {**ENV, "AUTOCERT_DIR": value})
    assert p.startswith(f"autocert_dir (from environment AUTOCERT_DIR): {value!r}: missing bucket name"), p
    assert "accepted: a directory path" in p and "s3://BUCKET/PREFIX" in p and "gs://BUCKET/PREFIX" in p


@pytest.mark.parametrize("value", [
    "s3://my-bucket/some/prefix", "s3://my-bucket", "s3://my.bucket.s3.eu-west-3.amazonaws.com/p/",
    "gs://my-bucket/certs", "/data/autocert", "relative/dir",
    "s3://", "gs://", "s3:///prefix", "gs://UPPER/x", "s3://b/a/../b", "s3://bk?x=1", "s3://user:pw@bkt/x",
    "s3://bkt:9000/p", "s3://bkt.s3.a.b.amazonaws.com/p", "gs://x/p", "s3://Not_A_Bucket!/p", "ftp://host/x",
])
def test_autocert_dir_is_accepted_exactly_when_start_up_can_open_it(value, tmp_path):
    # --check (load_config) and start-up (open_storage) must agree on every value
    from proxy.storage import StorageError, open_storage
    try:
        resolved = load_config(write(tmp_path, f"autocert_dir: {value!r}\n"), ENV).autocert_dir
    except ConfigError as e:
        resolved = None
        assert len(e.problems) == 1 and e.problems[0].startswith(f"autocert_dir: {value!r}: "), e.problems
    try:
        open_storage(resolved if resolved is not None else value)
        opens = True
    except StorageError:
        opens = False
    assert (resolved is not None) == opens, (value, resolved)


def test_empty_file_warns_that_nothing_is_routed(tmp_path):
    o = load_config(write(tmp_path, ""), ENV)
    assert o.routes == () and o.warnings == ("routes: none configured; the proxy starts and answers every "
                                             "request with 404",)
    assert load_config(write(tmp_path, "routes: []\n"), ENV).warnings == o.warnings
    assert load_config(write(tmp_path, ONE_ROUTE), ENV).warnings == ()


def test_certificate_entry_reports_every_problem():
    found = problems_of(None, {**ENV, "CERTIFICATES": "[{cert: 1}]"})
    assert found == [
        "certificates[0].cert (from environment CERTIFICATES): 1 is not a string; expected a file path or inline PEM text",
        "certificates[0].key (from environment CERTIFICATES): missing; expected a file path or inline PEM text",
    ]
    found = problems_of(None, {**ENV, "CERTIFICATES": "[{cert: [a.pem], key: {k: 1}, keyfile: x}]"})
    assert [p.split(" ", 1)[0] for p in found] == ["certificates[0].keyfile", "certificates[0].cert",
                                                    "certificates[0].key"], found


# --------------------------------------------------------------------------- Pomerium's names

@pytest.mark.parametrize("name,value,needles", [
    ("CERTIFICATE", base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode(),
     ["CERTIFICATE (environment): Pomerium setting 'certificate'", "certificate_file"]),
    ("CERTIFICATE_KEY", base64.b64encode(b"-----BEGIN PRIVATE KEY-----\n").decode(),
     ["CERTIFICATE_KEY (environment): Pomerium setting 'certificate_key'", "certificate_key_file"]),
    ("HEADERS", "X-Frame-Options:DENY", ["HEADERS (environment): Pomerium setting 'headers'"]),
    ("IDP_PROVIDER", "google", ["IDP_PROVIDER (environment)", "does not authenticate", "public"]),
    ("DOWNSTREAM_MTLS_CA", "Zm9v", ["DOWNSTREAM_MTLS_CA (environment)", "'downstream_mtls.ca'",
                                    "does not authenticate"]),
    ("TIMEOUT_WRITE", "0s", ["TIMEOUT_WRITE (environment): Pomerium setting 'timeout_write'"]),
])
def test_pomerium_variable_this_proxy_does_not_take_is_refused(name, value, needles):
    p = one_problem(None, {**ENV, name: value})
    for n in needles:
        assert n in p, (n, p)
    assert f"unset {name}" in p


def test_every_pomerium_variable_is_refused_or_read(tmp_path):
    # the whole table, through load_config: each name set alone is read (ours), an error or
    # (OpenTelemetry's own variables) a warning; never ignored without a word
    silent = []
    for name, key in sorted(pomerium_names.ENVIRONMENT.items()):
        if key in KNOWN_KEYS:
            continue
        try:
            o = load_config(write(tmp_path, ONE_ROUTE), {**ENV, name: "x"})
            named = any(w.startswith(f"{name} (environment)") for w in o.warnings) and name.startswith("OTEL_")
        except ConfigError as e:
            named = any(p.startswith(f"{name} (environment): Pomerium setting") for p in e.problems)
        if not named:
            silent.append(name)
    assert not silent
    assert len(pomerium_names.ENVIRONMENT) > 150


def test_ordinary_environment_is_not_pomerium_s():
    env = {**ENV, "PATH": "/bin", "SHELL": "/bin/sh", "LANG": "C.UTF-8", "AWS_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": "x", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", "XDG_DATA_HOME": "/x",
           "STORAGE_EMULATOR_HOST": "http://127.0.0.1:2", "HOSTNAME": "h", "TERM": "xterm", "USER": "u",
           "DEBUG": "1", "PORT": "8080", "HOST": "0.0.0.0", "policy": "lower case is not Pomerium's",
           "KUBERNETES_SERVICE_HOST": "10.0.0.1", "ROUTES_FILE": "x", "CERTIFICATE_PATH": "/x"}
    assert load_config(None, env).warnings == ("routes: none configured; the proxy starts and answers every "
                                               "request with 404",)


def test_opentelemetry_variables_warn_instead_of_stopping_the_proxy():
    o = load_config(None, {**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                           "ROUTES": ONE_ROUTE[len("routes: "):]})
    assert o.warnings == ("OTEL_EXPORTER_OTLP_ENDPOINT (environment): Pomerium reads it for tracing; "
                          "autocert-proxy exports no traces, so it has no effect here",)


def test_empty_pomerium_variable_counts_as_unset():
    load_config(None, {**ENV, "POLICY": "", "CERTIFICATE": ""})


def test_routes_in_pomerium_base64_form_are_named():
    b64 = base64.b64encode(b"- from: https://a.example.com\n  to: http://127.0.0.1:9\n").decode()
    p = one_problem(None, {**ENV, "ROUTES": b64})
    assert p.startswith("routes (from environment ROUTES): holds base64-encoded YAML") and "YAML or JSON" in p


def test_pomerium_key_in_file_is_named_not_corrected(tmp_path):
    found = problems_of(write(tmp_path, """
        insecure_server: true
        cookie_secret: abc
        routes:
          - from: https://a.example.com
            to: http://127.0.0.1:9
            set_request_headers: {X-A: b}
            allowed_users: [me@example.com]
            colour: red
    """))
    by_key = {p.split(":", 1)[0]: p for p in found}
    assert by_key["insecure_server"].startswith("insecure_server: Pomerium setting 'insecure_server' is not supported")
    assert "does not authenticate, every route would be public" in by_key["cookie_secret"]
    p = by_key["routes[0].set_request_headers"]
    assert p == "routes[0].set_request_headers: Pomerium route setting 'set_request_headers' is not supported by " \
                "autocert-proxy: it has no equivalent here"
    assert "preserve_host_header" not in p and "did you mean" not in p
    assert by_key["routes[0].allowed_users"].endswith("this proxy does not authenticate, the route would be public")
    assert by_key["routes[0].colour"].startswith("routes[0].colour: unknown key")   # not Pomerium's: as before
    assert len(found) == 5, found


def test_no_pomerium_key_is_ever_suggested_as_another_setting(tmp_path):
    for key in sorted(pomerium_names.OPTIONS - set(KNOWN_KEYS)):
        p = one_problem(write(tmp_path, f"{key}: 1\n"))
        assert p.startswith(f"{key}: Pomerium setting {key!r} is not supported") and "did you mean" not in p, p
    for key in sorted(pomerium_names.ROUTE_OPTIONS - set(ROUTE_KEYS)):
        p = one_problem(write(tmp_path, f"routes: [{{from: 'https://a.example.com', to: 'http://h:1', {key}: 1}}]\n"))
        assert p.startswith(f"routes[0].{key}: Pomerium route setting {key!r}") and "did you mean" not in p, p


def test_refusals_are_the_table_minus_what_the_proxy_accepts():
    # a key added to the accepted keys (issue 20 adds policy, certificate, ...) leaves the refusals by itself
    assert pomerium_names.refusal("certificate", KNOWN_KEYS) is not None
    assert pomerium_names.refusal("certificate", KNOWN_KEYS + ("certificate",)) is None
    assert pomerium_names.route_refusal("prefix_rewrite", ROUTE_KEYS) is not None
    assert pomerium_names.route_refusal("prefix_rewrite", ROUTE_KEYS + ("prefix_rewrite",)) is None
    env = {"CERTIFICATE": "x", "HEADERS": "y"}
    assert [p.split(" ")[0] for p in pomerium_names.environment_refusals(env, KNOWN_KEYS)[0]] == \
        ["CERTIFICATE", "HEADERS"]
    assert pomerium_names.environment_refusals(env, KNOWN_KEYS + ("certificate", "headers")) == ([], [])
    assert pomerium_names.refusal("address", KNOWN_KEYS) is None          # ours
    assert pomerium_names.refusal("workers", KNOWN_KEYS) is None          # not Pomerium's


def test_pomerium_route_matching_keys(tmp_path):
    [a, b, c] = routes_of(tmp_path, """
        policy:
          - from: https://a.example.com:8443
            to: http://127.0.0.1:9000
            prefix: /api
            allow_websockets: true
            name: A
            description: the A app
            logo_url: https://a.example.com/logo.png
            cors_allow_preflight: true
            allow_public_unauthenticated_access: true
          - from: https://app-*.example.com
            to: http://127.0.0.1:9000
            regex: "/v[0-9]+/.*"
            regex_priority_order: 5
            allow_upgrades: true
          - from: https://app-*.example.com
            to: http://127.0.0.1:9000
            path: /exact
    """)
    assert (a.host, a.port, a.prefix, a.upgrades) == ("a.example.com", 8443, "/api", frozenset({"websocket"}))
    assert (b.host, b.regex, b.regex_priority_order, b.upgrades) == ("app-*.example.com", "/v[0-9]+/.*", 5,
                                                                    frozenset({"*"}))
    assert (c.path, c.port, c.upgrades) == ("/exact", None, frozenset())


@pytest.mark.parametrize("extra,fragment", [
    ("regex: '/a(b'", "routes[0].regex: '/a(b' is not a valid regular expression"),
    ("regex: '/a(?=b)'", "routes[0].regex: '/a(?=b)' uses a lookaround or backreference"),
    ("regex: '/(a)\\1'", "RE2"),
    ("prefix: api", "routes[0].prefix: 'api' must start with '/'"),
    ("path: 3", "routes[0].path: expected a non-empty string"),
    ("{prefix: /a, path: /a}", "at most one of 'prefix', 'path', 'regex'"),
    ("regex_priority_order: high", "routes[0].regex_priority_order: expected a whole number"),
    ("allow_websockets: maybe", "routes[0].allow_websockets:"),
])
def test_bad_route_matching_keys(tmp_path, extra, fragment):
    extra = extra.strip("{}").replace(", ", "\n    ")
    p = one_problem(write(tmp_path, f"routes:\n  - from: https://a.example.com\n    to: http://h:1\n    {extra}\n"))
    assert fragment in p, p


def test_policy_and_routes_together_refused(tmp_path):
    p = one_problem(write(tmp_path, "routes: []\npolicy: [{from: 'https://a.example.com', to: 'http://h:1'}]\n"))
    assert p.startswith("policy: 'policy' is the older name of 'routes'"), p


def test_profile(tmp_path):
    assert load_config(None, ENV).autocert_profile == ""
    assert load_config(write(tmp_path, "autocert_profile: shortlived\n"), ENV).autocert_profile == "shortlived"
    assert load_config(None, {**ENV, "AUTOCERT_PROFILE": " tlsserver "}).autocert_profile == "tlsserver"
    for bad in ("short lived", "x" * 256):
        p = one_problem(None, {**ENV, "AUTOCERT_PROFILE": bad})
        assert p.startswith("autocert_profile (from environment AUTOCERT_PROFILE):") and "profile name" in p
    p = one_problem(write(tmp_path, "autocert_profile: [a, b]\n"), ENV)
    assert p.startswith("autocert_profile:") and "not a string" in p
