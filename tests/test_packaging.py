"""packaging/: the systemd unit, its system user, the example configuration and the container
file, checked with systemd's own tools; and the proxy started as the unit starts it, as an
unprivileged user holding only CAP_NET_BIND_SERVICE (setpriv), on ports 80 and 443.

No container engine runs here: the container file is checked for what it shares with the
unit and the configuration (command, config path, storage, user, ports), never built.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from proxy.config import Address, load_config
from proxy.listening import listen_error, unprivileged_port_start
from tests.infra import syscall_filter, unprivileged
from tests.infra.gcsserver import gcs_server  # noqa: F401  (fixture)
from tests.infra.pebble import pebble_factory  # noqa: F401  (fixture)
from tests.infra.proxyproc import REPO, ProxyProcess
from tests.infra.s3server import s3_server  # noqa: F401  (fixture)
from tests.test_autocert import FAST, wait_pebble_cert

PACKAGING = REPO / "packaging"
UNIT = PACKAGING / "autocert-proxy.service"
INSTALLED = Path(sys.executable).parent / "autocert-proxy"   # where the install put the command
NOBODY = unprivileged.NOBODY


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """The unit's [Service] settings, each key with its values in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def containerfile() -> dict[str, list[str]]:
    """The final stage's instructions of packaging/Containerfile: name -> its arguments."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", (PACKAGING / "Containerfile").read_text())
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, args = line.strip().partition(" ")
            if name.upper() == "FROM":
                out = {}   # a new stage
            out.setdefault(name.upper(), []).append(args.strip())
    return out


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's systemd package (scripts/test.sh does)"
    return path


def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the command this checkout's install made
    (systemd-analyze verify requires the executable to exist)."""
    assert INSTALLED.exists(), INSTALLED
    exec_start = unit_settings()["ExecStart"][0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(exec_start.split()[0], str(INSTALLED)))
    return unit


# --------------------------------------------------------------------------------------------
# the unit, its user, the configuration, the container file
# --------------------------------------------------------------------------------------------
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    out = subprocess.run([systemd_tool("systemd-analyze"), "verify", str(installed_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values too: it must say nothing at all
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    out = subprocess.run([systemd_tool("systemd-analyze"), "security", "--offline=yes",
                          str(installed_unit(tmp_path))], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for autocert-proxy\.service: ([\d.]+) (\w+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", out.stdout


def test_unit_grants_only_the_low_port_capability_reloads_on_sighup_and_keeps_state(tmp_path):
    s = unit_settings()
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    # The default autocert_dir, under the unit's environment (%S is /var/lib for a system
    # unit), is inside its StateDirectory; autocert_dir in the file still wins.
    env = dict(e.replace("%S", "/var/lib").split("=", 1) for e in s["Environment"])
    config = PACKAGING / "config.yaml"
    assert load_config(str(config), env).autocert_dir == f"/var/lib/{s['StateDirectory'][0]}/autocert"
    custom = tmp_path / "config.yaml"
    custom.write_text(config.read_text() + "\nautocert_dir: /srv/certs\n")
    assert load_config(str(custom), env).autocert_dir == "/srv/certs"


def test_sysusers_file_creates_the_units_user(tmp_path):
    (tmp_path / "etc").mkdir()
    out = subprocess.run([systemd_tool("systemd-sysusers"), f"--root={tmp_path}",
                          str(PACKAGING / "autocert-proxy.sysusers")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    s = unit_settings()
    user = users[s["User"][0]]
    assert int(user[2]) < 1000 and user[6] == "/usr/sbin/nologin"   # a system user, no login
    assert s["Group"][0] in (tmp_path / "etc/group").read_text()


def test_example_configuration_passes_check_in_the_unit_and_in_the_container():
    for env in ({"XDG_DATA_HOME": "/var/lib"}, {"AUTOCERT_DIR": "/data/autocert"}):
        out = subprocess.run([str(INSTALLED), "--check", "--config", str(PACKAGING / "config.yaml")],
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert out.returncode == 0 and "configuration OK" in out.stdout, out


def test_container_file_runs_the_units_command_as_non_root_with_storage_on_the_volume():
    c = containerfile()
    env = dict(a.split("=", 1) for a in c["ENV"])
    assert env["AUTOCERT_DIR"] == "/data/autocert"   # as Pomerium's images
    assert c["VOLUME"] == ["/data"] and env["AUTOCERT_DIR"].startswith("/data/")
    assert sorted(c["EXPOSE"][0].split()) == ["443", "80"]
    user = c["USER"][-1].split(":")[0]
    assert user not in ("0", "root") and f"--uid {user}" in " ".join(c["RUN"])
    command = json.loads(c["ENTRYPOINT"][0]) + json.loads(c["CMD"][0])
    assert command == shlex.split(unit_settings()["ExecStart"][0])
    config_path = command[command.index("--config") + 1]
    assert f"COPY packaging/config.yaml {config_path}" in [f"COPY {a}" for a in c["COPY"]]
    assert config_path == "/etc/autocert-proxy/config.yaml"


def test_memory_deny_write_execute_would_stop_the_proxy_so_the_unit_leaves_it_out():
    """systemd's MemoryDenyWriteExecute= refuses writable+executable memory; cffi makes the TLS
    callbacks there. Linux's PR_SET_MDWE (6.3+) is the same rule, applied here to one process."""
    assert "MemoryDenyWriteExecute" not in unit_settings()
    code = ("import ctypes, sys\n"
            "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"   # PR_SET_MDWE
            "from proxy.tls.certcache import CertificateCache\n"
            "from proxy.tls.engine import TLSEngine\n"
            "TLSEngine(CertificateCache())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    if out.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert out.returncode != 0 and "write+execute memory" in out.stderr, out


def test_listen_errors_name_the_address_and_the_fix():
    def err(code: int) -> OSError:
        return OSError(code, "error while attempting to bind")
    low = str(listen_error(Address("127.0.0.1", 443), err(errno.EACCES), 1024))
    assert low == ("cannot listen on 127.0.0.1:443: permission denied: ports below 1024 need root or "
                   "CAP_NET_BIND_SERVICE (see packaging/autocert-proxy.service)")
    assert str(listen_error(Address("", 80), err(errno.EACCES), 70)) == "cannot listen on :80: permission denied"
    assert str(listen_error(Address("::1", 8443), err(errno.EADDRINUSE), 1024)) == \
        "cannot listen on [::1]:8443: address already in use (another process listens there)"
    unresolved = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert str(listen_error(Address("nosuch.invalid", 443), unresolved, 1024)) == \
        "cannot listen on nosuch.invalid:443: name or service not known"


# --------------------------------------------------------------------------------------------
# ports 80 and 443 as an unprivileged user
# --------------------------------------------------------------------------------------------
def wait_ports_free(ports, timeout: float = 20.0) -> None:
    """Other tests (Caddy's ACME server, another checkout's) may hold 127.0.0.1:80/443 for a while."""
    deadline = time.monotonic() + timeout
    busy = list(ports)
    while busy:
        for port in list(busy):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                    busy.remove(port)
                except OSError:
                    pass
        if busy and time.monotonic() > deadline:
            pytest.fail(f"127.0.0.1 port(s) {busy} stayed in use by another process for {timeout}s "
                        f"(see `ss -ltnp`): this test needs them free")
        if busy:
            time.sleep(0.2)


@pytest.fixture
def shared_dir():
    """A directory the unprivileged user can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="autocert-proxy-packaging-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def unprivileged_proxy(workdir: Path, config: dict, capability: bool, sandbox: bool = False,
                       env=None) -> ProxyProcess:
    """The installed command as nobody; with ``sandbox``, under the unit's NoNewPrivileges= and
    SystemCallFilter= too (tests/infra/syscall_filter.py; systemd's other options need systemd)."""
    prefix = unprivileged.command(REPO, workdir, capability=capability, no_new_privs=sandbox)
    if sandbox:
        allowed = workdir / "syscalls.txt"
        allowed.write_text("\n".join(sorted(syscall_filter.allowed(unit_settings()["SystemCallFilter"]))))
        prefix += [sys.executable, syscall_filter.__file__, str(allowed)]
    check = subprocess.run([*prefix, str(INSTALLED), "--version"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"nobody cannot run {INSTALLED}: {check.stdout}{check.stderr}"
    return ProxyProcess(workdir, config, env=env, command=[*prefix, str(INSTALLED)])


def start_on_low_ports(proxy: ProxyProcess, attempts: int = 3) -> None:
    """Start ``proxy`` once 127.0.0.1:443 and :80 are free; again if another process took
    one of them between that look and the proxy's bind (it exits saying so)."""
    for attempt in range(1, attempts + 1):
        wait_ports_free([443, 80])
        taken = proxy.log().count("already in use")
        try:
            proxy.start()
            deadline = time.monotonic() + 15
            while "listening for HTTP (redirect, HTTP-01) on 127.0.0.1:80" not in proxy.log():
                if proxy.proc.poll() is not None:
                    raise RuntimeError(f"proxy exited with {proxy.proc.returncode}:\n{proxy.log()}")
                assert time.monotonic() < deadline, f"not listening on :80 after 15 s:\n{proxy.log()}"
                time.sleep(0.05)
            return
        except RuntimeError:
            if proxy.log().count("already in use") == taken or attempt == attempts:
                raise
            proxy.stop()


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.parametrize("storage", ["directory", "s3", "gcs"])
def test_unprivileged_user_with_the_capability_gets_and_serves_a_pebble_certificate_on_443_and_80(
        storage, pebble_factory, shared_dir, upstream, tmp_path, request):
    """As the unit runs it: user nobody, CAP_NET_BIND_SERVICE alone, no_new_privs, the unit's
    system-call filter; ACME on 443 and 80 (Pebble validates there), certificates stored in
    a directory, S3 (moto) or GCS (fake-gcs-server)."""
    ca = pebble_factory(tls_port=443, http_port=80)
    env = dict(FAST)
    if storage == "directory":
        where = shared_dir / "autocert"
        where.mkdir()
        os.chown(where, NOBODY, NOBODY)
        autocert_dir = str(where)
    else:
        srv = request.getfixturevalue("s3_server" if storage == "s3" else "gcs_server")
        autocert_dir = srv.url(f"unprivileged-{time.time_ns()}")
        env.update(srv.env)
    config = {
        "address": "127.0.0.1:443", "_port": 443,
        "http_redirect_addr": "127.0.0.1:80",
        "autocert": True,
        "autocert_ca": ca.directory_url,
        "autocert_trusted_ca": base64.b64encode(ca.trusted_ca_pem).decode(),
        "autocert_dir": autocert_dir,
        "routes": [{"from": "https://svc.test", "to": upstream.url}],
    }
    proxy = unprivileged_proxy(shared_dir, config, capability=True, sandbox=True, env=env)
    try:
        start_on_low_ports(proxy)
        status = process_status(proxy.proc.pid)
        assert status["Uid"].split()[:2] == [str(NOBODY), str(NOBODY)], status["Uid"]
        assert int(status["CapEff"], 16) == 1 << 10   # CAP_NET_BIND_SERVICE and nothing else
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        wait_pebble_cert(proxy, "svc.test")
        root = tmp_path / "root.pem"
        root.write_bytes(ca.issuing_root_pem())
        out = proxy.curl("svc.test", "/hello", cacert=root)
        assert out.returncode == 0, out.stderr
        assert b'"path": "/hello"' in out.stdout
        # port 80 answers too: the redirect to https
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                              "--resolve", "svc.test:80:127.0.0.1", "http://svc.test/x"],
                             capture_output=True, text=True, timeout=15)
        assert out.stdout == "301 https://svc.test/x", out
        if storage == "directory":   # what it stored belongs to the user it runs as
            stored = [p for p in where.rglob("*") if p.is_file()]
            assert stored and all(p.stat().st_uid == NOBODY for p in stored)
    finally:
        assert proxy.stop() == 0, proxy.log()[-3000:]
    assert "Operation not permitted" not in proxy.log(), proxy.log()[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_unprivileged_user_without_the_capability_exits_with_one_line_naming_the_address(shared_dir, workers):
    start = unprivileged_port_start()
    if start <= 443:
        pytest.skip(f"anyone may bind port 443 here (net.ipv4.ip_unprivileged_port_start = {start})")
    config = {"address": "127.0.0.1:443", "_port": 443, "http_redirect_addr": "127.0.0.1:80",
              "workers": workers, "routes": [{"from": "https://svc.test", "response": {"status": 200}}]}
    proxy = unprivileged_proxy(shared_dir, config, capability=False)
    proxy.start(wait=False)
    try:
        rc = proxy.proc.wait(30)   # (a supervisor restarting its workers would never exit)
    except subprocess.TimeoutExpired:
        proxy.kill()
        raise AssertionError(f"still running after 30 s:\n{proxy.log()[-3000:]}")
    log = proxy.log()
    assert rc != 0, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert 1 <= len(errors) <= workers, log   # (each worker says it once)
    for line in errors:
        assert line.endswith(f"cannot listen on 127.0.0.1:443: permission denied: ports below {start} "
                             "need root or CAP_NET_BIND_SERVICE (see packaging/autocert-proxy.service)"), log
    proxy.stop()


# --------------------------------------------------------------------------------------------
# alerting on the proxy's own metrics
# --------------------------------------------------------------------------------------------
def test_alert_rule_fires_for_a_certificate_with_under_14_days_left(start_proxy, ca, tmp_path):
    """packaging/prometheus-alerts.yml evaluated by promtool on the expiry series a running
    proxy reports: the one with 10 days left alerts, the one with 60 does not. (promtool's
    clock starts at 0: each series is given as the seconds it had left at the scrape.)"""
    import yaml
    from tests.infra.proxyproc import free_port
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (scripts/test.sh does)"
    soon, later = ca.issue(["soon.test"], days=10), ca.issue(["later.test"], days=60)
    mport = free_port()
    start_proxy({"metrics_address": f"127.0.0.1:{mport}",
                 "certificates": [{"cert": str(c.cert_path), "key": str(c.key_path)} for c in (soon, later)],
                 "routes": [{"from": "https://soon.test", "response": {"status": 200}}]})
    scraped = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{mport}/metrics"],
                             capture_output=True, text=True, timeout=10).stdout
    now = time.time()
    series = re.findall(r"^(autocert_proxy_certificate_not_after_seconds\{[^}]*\}) (\S+)$", scraped, re.M)
    assert len(series) == 2, scraped
    rules = shutil.copy(PACKAGING / "prometheus-alerts.yml", tmp_path / "rules.yml")
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": f"{float(v) - now:.0f}x120"} for s, v in series],
        "alert_rule_test": [{"eval_time": "90m", "alertname": "CertificateExpiresSoon", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "name": "soon.test", "source": "manual"},
            "exp_annotations": {"summary": "soon.test (manual certificate) expires in less than 14 days"},
        }]}],
    }]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / "test.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
