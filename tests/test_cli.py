"""The command line as a user runs it: --check, --version, --help, environment overrides."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from tests.infra.proxyproc import REPO, free_port

SCRIPT = Path(sys.executable).parent / "autocert-proxy"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in {"ADDRESS", "ROUTES", "LOG_LEVEL", "CERTIFICATES"} and not k.startswith("AUTOCERT")}
    env.update(extra)
    return env


def run(*args, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env or clean_env(), cwd=str(REPO), timeout=timeout)


def write(tmp_path: Path, config: dict, name="config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(config, sort_keys=False))
    return p


GOOD = {"address": "127.0.0.1:8443",
        "routes": [{"from": "https://app.example.com", "to": "http://127.0.0.1:9000"}]}


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"autocert-proxy {__version__}"


def test_help():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--config", "--check", "--version"):
        assert flag in r.stdout


def test_python_dash_m_works_too(tmp_path):
    r = subprocess.run([sys.executable, "-m", "proxy", "--config", write(tmp_path, GOOD), "--check"],
                       capture_output=True, text=True, env=clean_env(), cwd=str(REPO), timeout=30)
    assert r.returncode == 0, r.stderr


def test_check_ok(tmp_path, ca):
    leaf = ca.issue(["app.example.com"])
    cfg = dict(GOOD, certificates=[{"cert": str(leaf.cert_path), "key": str(leaf.key_path)}])
    r = run("--config", write(tmp_path, cfg), "--check")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert "1 routes" in r.stdout and "1 certificates" in r.stdout


def test_check_loads_every_key(tmp_path, ca):
    # a key whose public part matches but whose private part is broken: start-up's cheap match
    # accepts it, --check loads it and says so
    from tests.test_keymatch import corrupt_private_part
    leaf = ca.issue(["app.example.com"])
    bad = tmp_path / "bad.key"
    bad.write_bytes(corrupt_private_part(leaf.key_pem))
    cfg = dict(GOOD, certificates=[{"cert": str(leaf.cert_path), "key": str(bad)}])
    r = run("--config", write(tmp_path, cfg), "--check")
    assert r.returncode == 2, r.stdout
    assert "certificates[0].key:" in r.stderr and str(bad) in r.stderr and "private key" in r.stderr, r.stderr


def test_check_example_config():
    r = run("--config", REPO / "config.example.yaml", "--check")
    assert r.returncode == 0, r.stderr


def _bad_cases(ca, tmp_path):
    a, b = ca.issue(["a.example.com"]), ca.issue(["b.example.com"])
    return [
        ({"adress": ":443"}, ["adress", "address"]),                      # unknown key, suggestion
        ({"address": "localhost"}, ["address", "localhost"]),
        ({"address": ":99999"}, ["address", "99999"]),
        ({"http_redirect_addr": "127.0.0.1:8443"}, ["http_redirect_addr"]),   # overlaps address
        ({"routes": [{"from": "ftp://x.example.com", "to": "http://127.0.0.1:1"}]}, ["routes[0].from", "ftp"]),
        ({"routes": [{"from": "https://x.example.com", "to": "https://127.0.0.1:1"}]}, ["routes[0].to", "https"]),
        ({"routes": [{"from": "https://x.example.com"}]}, ["routes[0]", "to"]),
        ({"routes": [{"from": "https://x.example.com", "to": "http://h:1", "preserve_host_header": "maybe"}]},
         ["routes[0].preserve_host_header", "maybe"]),
        ({"routes": [{"from": "https://x.example.com", "to": "http://h:1", "colour": "red"}]},
         ["routes[0]", "colour"]),
        ({"log_level": "loud"}, ["log_level", "loud"]),
        ({"access_log_format": "xml"}, ["access_log_format", "xml"]),
        ({"timeout_idle": "soon"}, ["timeout_idle", "soon"]),
        ({"default_upstream_timeout": "-1s"}, ["default_upstream_timeout"]),
        ({"autocert": "maybe"}, ["autocert", "maybe"]),
        ({"autocert_email": "not-an-email"}, ["autocert_email", "not-an-email"]),
        ({"autocert_ca": "http://acme.example.com/dir"}, ["autocert_ca"]),
        ({"workers": 0}, ["workers"]),
        ({"certificates": [{"cert": str(a.cert_path), "key": str(b.key_path)}]}, ["certificates[0]", "match"]),
        ({"certificates": [{"cert": str(tmp_path / "missing.pem"), "key": str(a.key_path)}]},
         ["certificates[0].cert", "missing.pem"]),
        ({"certificate_file": str(a.cert_path)}, ["certificate_key_file"]),
    ]


def test_every_config_error_names_its_key(tmp_path, ca):
    failures = []
    for i, (extra, needles) in enumerate(_bad_cases(ca, tmp_path)):
        cfg = dict(GOOD, **extra)
        r = run("--config", write(tmp_path, cfg, f"bad{i}.yaml"), "--check")
        missing = [n for n in needles if n not in r.stderr]
        if r.returncode == 0 or missing:
            failures.append((extra, r.returncode, missing, r.stderr))
    assert not failures, "\n\n".join(map(repr, failures))


def test_all_problems_listed_at_once(tmp_path):
    cfg = dict(GOOD, log_level="loud", timeout_idle="soon", address="nope")
    r = run("--config", write(tmp_path, cfg), "--check")
    assert r.returncode != 0
    for key in ("log_level", "timeout_idle", "address"):
        assert key in r.stderr


def test_missing_config_file(tmp_path):
    r = run("--config", tmp_path / "nope.yaml", "--check")
    assert r.returncode != 0
    assert "nope.yaml" in r.stderr


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("routes: [\n  - from: x\n")
    r = run("--config", p, "--check")
    assert r.returncode != 0 and "broken.yaml" in r.stderr


def test_environment_error_names_variable(tmp_path):
    r = run("--config", write(tmp_path, GOOD), "--check", env=clean_env(AUTOCERT="maybe"))
    assert r.returncode != 0
    assert "AUTOCERT" in r.stderr and "maybe" in r.stderr


def test_invalid_config_does_not_start(tmp_path):
    port = free_port()
    cfg = dict(GOOD, address=f"127.0.0.1:{port}", log_level="loud")
    r = run("--config", write(tmp_path, cfg), timeout=20)   # no --check: it would run
    assert r.returncode != 0
    assert "log_level" in r.stderr and "loud" in r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_address_in_use_exits_non_zero(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = dict(GOOD, address=f"127.0.0.1:{port}")
        r = run("--config", write(tmp_path, cfg), timeout=20)
    assert r.returncode != 0
    assert str(port) in r.stderr


def test_environment_overrides_file(start_proxy):
    env_port = free_port()
    file_port = free_port()
    routes = '[{from: "https://env.test", response: {status: 200, body: "from env"}}]'
    p = start_proxy({"_port": env_port, "address": f"127.0.0.1:{file_port}",
                     "routes": [{"from": "https://file.test", "response": {"status": 200, "body": "from file"}}]},
                    env={"ADDRESS": f"127.0.0.1:{env_port}", "ROUTES": routes})
    r = p.curl("env.test", "/")
    assert r.returncode == 0 and r.stdout == b"from env", r.stderr
    assert p.curl("file.test", "/", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"404"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", file_port), timeout=1).close()


def test_environment_boolean_forms(tmp_path):
    for value in ("true", "TRUE", "1", "t", "false", "0", "f"):
        cfg = dict(GOOD, routes=[dict(GOOD["routes"][0])])
        r = run("--config", write(tmp_path, cfg), "--check", env=clean_env(AUTOCERT_USE_STAGING=value))
        assert r.returncode == 0, (value, r.stderr)
