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


# --------------------------------------------------------------------------- issue 16: accepted, dropped

NO_ROUTES_WARNING = "warning: routes: none configured; the proxy starts and answers every request with 404"


def _refused_at_check_and_start(tmp_path, cfg: dict, env: dict) -> list[str]:
    """--check and a plain start both exit 2 with the same problems, and nothing listens."""
    port = free_port()
    path = write(tmp_path, dict(cfg, address=f"127.0.0.1:{port}"))
    checked = run("--config", path, "--check", env=clean_env(**env))
    started = run("--config", path, env=clean_env(**env), timeout=20)   # would run (and time out) if accepted
    assert checked.returncode == 2 and started.returncode == 2, (checked, started)
    assert checked.stderr == started.stderr and "Traceback" not in started.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return checked.stderr.splitlines()


@pytest.mark.parametrize("value", ["s3://", "gs://"])
def test_bucket_url_without_bucket_is_refused_by_check_and_start(tmp_path, value):
    lines = _refused_at_check_and_start(tmp_path, GOOD, {"AUTOCERT_DIR": value})
    assert lines[1] == (f"  - autocert_dir (from environment AUTOCERT_DIR): {value!r}: missing bucket name; "
                        f"accepted: a directory path, s3://BUCKET/PREFIX, s3://BUCKET.s3.REGION.amazonaws.com/PREFIX "
                        f"or gs://BUCKET/PREFIX"), lines


def test_check_refuses_what_start_up_cannot_open(tmp_path):
    # the storage parser's own refusals (bad bucket name, port) now stop --check too
    for value, reason in (("s3://Not_A_Bucket!/p", "bucket name 'Not_A_Bucket!' has characters other than"),
                          ("s3://bucket:9000/p", "a port is not allowed in the URL"),
                          ("gs:///only/a/prefix", "missing bucket name")):
        r = run("--config", write(tmp_path, dict(GOOD, autocert_dir=value)), "--check")
        assert r.returncode == 2 and f"autocert_dir: {value!r}: " in r.stderr and reason in r.stderr, r.stderr


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
def test_check_warns_about_a_certificate_outside_its_validity(tmp_path, ca, when):
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    if when == "expired":
        leaf = ca.issue(["app.example.com"], not_before=now - dt.timedelta(days=100), not_after=now - dt.timedelta(days=1))
    else:
        leaf = ca.issue(["app.example.com"], not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=90))
    cfg = dict(GOOD, certificate_file=str(leaf.cert_path), certificate_key_file=str(leaf.key_path))
    r = run("--config", write(tmp_path, cfg), "--check")
    assert r.returncode == 0, r.stderr
    assert "1 certificates" in r.stdout
    expected = "expired on" if when == "expired" else "is not valid before"
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("autocert-proxy: warning: certificate_file:")]
    assert len(warning) == 1 and expected in warning[0] and str(leaf.cert_path) in warning[0], r.stderr


def test_empty_file_checks_with_a_warning_and_the_proxy_answers_404(tmp_path, start_proxy):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    r = run("--config", empty, "--check")
    assert r.returncode == 0 and "0 routes" in r.stdout, r.stderr
    assert r.stderr == f"autocert-proxy: {NO_ROUTES_WARNING}\n"
    p = start_proxy({})       # only the address the test needs
    out = p.curl("anything.test", "/", "-o", "/dev/null", "-w", "%{http_code}")
    assert out.stdout == b"404", out.stderr
    assert "WARNING proxy: routes: none configured" in p.log(), p.log()


def test_every_problem_of_a_certificate_entry_is_listed(tmp_path):
    r = run("--config", write(tmp_path, GOOD), "--check", env=clean_env(CERTIFICATES="[{cert: 1}]"))
    assert r.returncode == 2
    assert "certificates[0].cert (from environment CERTIFICATES): 1 is not a string" in r.stderr, r.stderr
    assert "certificates[0].key (from environment CERTIFICATES): missing" in r.stderr, r.stderr


def test_pomerium_variables_are_refused_by_check_and_start(tmp_path, ca):
    import base64
    leaf = ca.issue(["app.example.com"])
    routes = b"- from: https://app.example.com\n  to: http://127.0.0.1:9\n"
    env = {"POLICY": base64.b64encode(routes).decode(),
           "CERTIFICATE": base64.b64encode(leaf.cert_pem).decode(),
           "CERTIFICATE_KEY": base64.b64encode(leaf.key_path.read_bytes()).decode(),
           "AWS_REGION": "eu-west-1", "DEBUG": "1"}    # ordinary variables: not Pomerium's
    lines = _refused_at_check_and_start(tmp_path, GOOD, env)
    problems = [ln for ln in lines if ln.startswith("  - ")]
    # POLICY is read (the older name of ROUTES), in YAML or JSON; its base64 form is named
    assert problems[0].startswith("  - policy (from environment POLICY): holds base64-encoded YAML"), lines
    assert [ln.split(" ")[3] for ln in problems[1:]] == ["CERTIFICATE", "CERTIFICATE_KEY"], lines
    assert "Pomerium setting 'certificate' is not supported by autocert-proxy: use certificate_file" in problems[1]
    assert "use certificate_key_file" in problems[2]


def test_routes_in_pomerium_base64_form_are_refused(tmp_path):
    import base64
    routes = base64.b64encode(b"- from: https://app.example.com\n  to: http://127.0.0.1:9\n").decode()
    lines = _refused_at_check_and_start(tmp_path, {}, {"ROUTES": routes})
    assert lines[1].startswith("  - routes (from environment ROUTES): holds base64-encoded YAML"), lines


def test_check_names_a_pomerium_route_key_instead_of_suggesting_another(tmp_path):
    cfg = dict(GOOD, routes=[dict(GOOD["routes"][0], set_request_headers={"X-A": "b"},
                                  allow_any_authenticated_user=True)])
    r = run("--config", write(tmp_path, cfg), "--check")
    assert r.returncode == 2
    assert "did you mean" not in r.stderr and "preserve_host_header" not in r.stderr, r.stderr
    assert ("routes[0].set_request_headers: Pomerium route setting 'set_request_headers' is not supported "
            "by autocert-proxy") in r.stderr
    assert ("routes[0].allow_any_authenticated_user: Pomerium route setting 'allow_any_authenticated_user' is not "
            "supported by autocert-proxy: this proxy does not authenticate, the route would be public") in r.stderr
