#!/usr/bin/env python3
"""autocert-proxy side by side with nginx and Caddy: one command, one machine, one run.

    .venv/bin/python benchmarks/run.py            # full run (about 8 minutes)
    .venv/bin/python benchmarks/run.py --quick    # short durations, fewer connections/certs

Every server gets the same ECDSA P-256 certificate and proxies to the same upstream (a
separate nginx serving static files). Servers under test are pinned to core 0, the load
generators and the upstream to core 1 (taskset). See benchmarks/README.md for the method.
Results: printed, and written to benchmarks/results/<date>.md and benchmarks/results/latest.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.infra.pki import TestCA  # noqa: E402
from tests.infra.proxyproc import PASSED_THROUGH  # noqa: E402

SERVER_CORE = "0"
CLIENT_CORE = "1"
SERVERS = ("ours", "nginx", "caddy")
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------
# small helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(vals: list[float]) -> float:
    """The middle of the sorted values (of an even number, the upper of the two middle ones)."""
    return sorted(vals)[len(vals) // 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_ready(port: int, sni: str = "localhost", timeout: float = 1.0) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=sni):
                return True
    except OSError:
        return False


def served_cn(port: int, sni: str) -> str:
    from cryptography import x509
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            der = s.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string()


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (nginx master + worker)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(root: int) -> float:
    """user+system CPU seconds of a process tree (live processes)."""
    total = 0
    for p in tree_pids(root):
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def release_idle_client(client: subprocess.Popen) -> None:
    """Tells idleconns.py (or a client like it) to close its connections, and waits for it."""
    with contextlib.suppress(Exception):
        client.stdin.write("\n")
        client.stdin.flush()
    try:
        client.wait(60)
    except subprocess.TimeoutExpired:
        client.kill()


def rss_kib(root: int) -> int:
    """Sum of VmRSS over a process tree, KiB."""
    total = 0
    for p in tree_pids(root):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def pinned(core: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", core] + cmd


class NA(Exception):
    """A measurement that could not be made: shown as n/a with the reason."""


# ----------------------------------------------------------------------------------------
# servers

@dataclass
class Server:
    name: str
    workdir: Path
    port: int
    argv: list[str]
    env: dict
    proc: Optional[subprocess.Popen] = None
    startup_s: Optional[float] = None
    cores: str = SERVER_CORE

    def start(self, timeout: float = 120.0, sni: str = "localhost") -> float:
        logf = open(self.workdir / f"{self.name}.out", "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(pinned(self.cores, self.argv), env=self.env, stdout=logf,
                                     stderr=subprocess.STDOUT, cwd=str(self.workdir),
                                     start_new_session=True)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise NA(f"exited with {self.proc.returncode}: {self.tail()}")
            if tls_ready(self.port, sni, timeout=0.5):
                self.startup_s = time.monotonic() - t0
                return self.startup_s
            if time.monotonic() > deadline:
                self.stop()
                raise NA(f"not listening after {timeout}s: {self.tail()}")
            time.sleep(0.01)

    def tail(self, n: int = 600) -> str:
        try:
            return (self.workdir / f"{self.name}.out").read_text(errors="replace")[-n:].replace("\n", " | ")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def nginx_conf(workdir: Path, name: str, body: str, worker_connections: int = 20000) -> Path:
    d = workdir / name
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    (d / "tmp").chmod(0o777)    # nginx workers run as "nobody" when started by root
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {worker_connections * 2 + 100};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
{body}
}}
""")
    return conf


class Bench:
    def __init__(self, quick: bool, only: list[str], keep: bool, rounds: int = 0):
        self.quick = quick
        self.only = only
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="acp-bench-"))
        self.workdir.chmod(0o755)   # the static files must be readable by nginx workers
        self.venv_python = str(REPO / ".venv" / "bin" / "python")
        if not Path(self.venv_python).exists():
            self.venv_python = sys.executable
        # the interpreter our proxy runs on (the tools and clients stay on venv_python): a venv
        # of another Python with this checkout installed, e.g. the distribution's python3
        self.proxy_python = os.environ.get("ACP_BENCH_PYTHON") or self.venv_python
        self.results: dict[str, dict[str, object]] = {}     # metric -> server -> value | NA
        self.notes: list[str] = []
        self.loads: list[str] = []
        self.failed_start: dict[str, NA] = {}
        self.samples: dict[str, dict[str, list[float]]] = {}   # metric -> server -> rounds, in order
        self.partial: set[tuple[str, str]] = set()   # (metric, server) with a failed round
        self.rounds = rounds or (2 if quick else 3)
        self.extra: dict[str, object] = {}
        self.upstream: Optional[Server] = None
        self.d_keepalive = 3 if quick else 8
        self.d_handshake = 3 if quick else 6
        self.d_bulk = 3 if quick else 6
        self.n_idle = 1000 if quick else 10000
        self.n_certs = 1000 if quick else 10000
        self.hs_procs = 4

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        log(f"work directory {self.workdir}")
        self.ca = TestCA(self.workdir / "pki", name="Bench CA")
        self.leaf = self.ca.issue(["localhost", "bench.test"], filename="leaf")
        www = self.workdir / "www"
        www.mkdir()
        (www / "small").write_bytes(b"x" * 100)
        (www / "1m").write_bytes(os.urandom(MIB))
        self.tlsload = self.workdir / "tlsload"
        r = run(["cc", "-O2", "-o", str(self.tlsload), str(HERE / "tlsload.c"), "-lssl", "-lcrypto"], 60)
        if r.returncode:
            raise SystemExit(f"cannot build tlsload: {r.stderr}")
        (self.workdir / "post.lua").write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = string.rep("a", {MIB})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        # The upstream: its own nginx, one worker, on the load generator's core.
        up_port = free_port()
        conf = nginx_conf(self.workdir, "upstream", f"""
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{up_port} backlog=4096;
        root {www};
        location = /nginx_status {{ stub_status; }}
        location /upload {{ client_max_body_size 0; client_body_buffer_size 2m; return 200 "ok\\n"; }}
        location / {{ }}
    }}
""")
        self.up_port = up_port
        self.upstream = Server("upstream", self.workdir / "upstream", up_port,
                               ["nginx", "-c", str(conf), "-e", str(self.workdir / "upstream" / "error.log")],
                               dict(os.environ))
        # the upstream is plain HTTP: start it pinned to the client core
        logf = open(self.workdir / "upstream" / "upstream.out", "ab")
        self.upstream.proc = subprocess.Popen(
            pinned(CLIENT_CORE, self.upstream.argv), stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", up_port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("upstream nginx did not start")
                time.sleep(0.05)

    def upstream_status(self) -> tuple[int, int]:
        """(accepted connections, requests) of the upstream nginx, from stub_status."""
        with socket.create_connection(("127.0.0.1", self.up_port), timeout=5) as s:
            s.sendall(b"GET /nginx_status HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", data)
        assert m, data
        # the status request itself is one connection and one request
        return int(m.group(1)), int(m.group(3))

    # --- server definitions ---------------------------------------------------------------
    def as_floor(self, srv: Server, script: str, *extra: str) -> None:
        """Runs ``script`` (floor.py, floor_io.py: minimal reference proxies) in ``srv``'s place:
        same certificate, port and upstream; ``extra``: its further arguments."""
        srv.argv = [self.proxy_python, str(HERE / script), str(self.leaf.cert_path), str(self.leaf.key_path),
                    str(srv.port), str(self.up_port), *extra]

    def from_checkout(self, srv: Server, src: str) -> None:
        """Runs our proxy (``srv`` from make_server("ours")) from the checkout ``src`` (e.g. a
        git worktree: A/B against the working tree) instead of this one."""
        srv.env["PYTHONPATH"] = src      # argv is already `python -m proxy ...`

    def make_variant(self, name: str, src: Optional[str] = None) -> Server:
        """A server for the measuring tools (conncost.py, memory_sites.py): "floor" (floor.py),
        "membio" / "sockbio" / "syslib" (floor_io.py), ours from the checkout ``src`` under ``name``
        (e.g. "base", a git worktree), or one of ours / nginx / caddy as run.py makes them."""
        if name in ("membio", "sockbio", "syslib", "floor"):
            srv = self.make_server("ours", tag="-" + name)
            srv.name = name
            if name == "floor":
                self.as_floor(srv, "floor.py")
            else:
                self.as_floor(srv, "floor_io.py", name)
        elif src is not None:
            srv = self.make_server("ours", tag="" if name == "ours" else "-" + name)
            srv.name = name
            self.from_checkout(srv, src)
        else:
            srv = self.make_server(name)
        return srv

    def make_server(self, name: str, certs: Optional[list[tuple[Path, Path, str]]] = None,
                    tag: str = "", workers: int = 1) -> Server:
        """certs: extra (cert, key, name) beyond the main leaf (for the many-certificates test)."""
        port = free_port()
        d = self.workdir / f"{name}{tag}"
        d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        certs = certs or []
        if name == "ours":
            import yaml
            cfg = {
                "address": f"127.0.0.1:{port}",
                "routes": [{"from": "https://localhost", "to": f"http://127.0.0.1:{self.up_port}"},
                           {"from": "https://*.bench.test", "to": f"http://127.0.0.1:{self.up_port}"}],
                "certificates": [{"cert": str(self.leaf.cert_path), "key": str(self.leaf.key_path)}]
                + [{"cert": str(c), "key": str(k)} for c, k, _ in certs],
                "autocert": False,
                "autocert_dir": str(d / "autocert"),
                "log_level": "warning",        # no access-log lines (nginx: access_log off)
                "workers": workers,
                "timeout_idle": "600s",
                "timeout_read_header": "600s",
            }
            (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            env = {k: v for k, v in env.items()   # the parser and compiled/source choices pass through
                   if not k.startswith(("AUTOCERT", "ROUTES", "ADDRESS")) or k in PASSED_THROUGH}
            env["HOME"] = str(d)
            argv = [self.proxy_python, "-m", "proxy", "--config", str(d / "config.yaml")]
        elif name == "nginx":
            common = f"""
            location / {{
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $host;
                proxy_request_buffering off;
            }}"""
            blocks = [f"""
        server {{
            listen 127.0.0.1:{port} ssl default_server backlog=4096;
            server_name localhost;
            ssl_certificate {self.leaf.cert_path};
            ssl_certificate_key {self.leaf.key_path};
            {common}
        }}"""]
            for c, k, n in certs:
                blocks.append(f"""
        server {{ listen 127.0.0.1:{port} ssl; server_name {n};
            ssl_certificate {c}; ssl_certificate_key {k};{common} }}""")
            body = f"""
    upstream up {{ server 127.0.0.1:{self.up_port}; keepalive 64; }}
    client_max_body_size 0;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_header_timeout 600s;
    ssl_protocols TLSv1.2 TLSv1.3;
    server_names_hash_max_size 65536;
    server_names_hash_bucket_size 128;
""" + "".join(blocks)
            conf = nginx_conf(self.workdir, f"{name}{tag}", body)
            argv = ["nginx", "-c", str(conf), "-e", str(d / "error.log")]
        elif name == "caddy":
            load = [{"certificate": str(self.leaf.cert_path), "key": str(self.leaf.key_path)}]
            load += [{"certificate": str(c), "key": str(k)} for c, k, _ in certs]
            cfg = {
                "admin": {"disabled": True},
                "storage": {"module": "file_system", "root": str(d / "data")},
                "apps": {
                    "tls": {"certificates": {"load_files": load},
                            "cache": {"capacity": max(20000, 2 * len(load))}},
                    "http": {"servers": {"bench": {
                        "listen": [f"127.0.0.1:{port}"],
                        "automatic_https": {"disable": True},
                        "tls_connection_policies": [{}],
                        "idle_timeout": "600s",
                        "routes": [{"handle": [{
                            "handler": "reverse_proxy",
                            "upstreams": [{"dial": f"127.0.0.1:{self.up_port}"}],
                        }]}],
                    }}},
                },
            }
            (d / "caddy.json").write_text(json.dumps(cfg))
            env.update(GOMAXPROCS="1", HOME=str(d), XDG_DATA_HOME=str(d / "xdg-data"),
                       XDG_CONFIG_HOME=str(d / "xdg-config"))
            argv = ["caddy", "run", "--config", str(d / "caddy.json")]
        else:
            raise ValueError(name)
        return Server(name, d, port, argv, env)

    # --- measurements ---------------------------------------------------------------------
    def note_load(self, what: str) -> None:
        with contextlib.suppress(OSError):
            self.loads.append(f"{what}: {open('/proc/loadavg').read().split()[0]}")

    def record(self, metric: str, server: str, fn: Callable[[], object]) -> None:
        try:
            value = fn()
        except NA as e:
            value = e
        except subprocess.TimeoutExpired as e:
            value = NA(f"timed out: {e.cmd[0] if e.cmd else ''}")
        except Exception as e:
            traceback.print_exc()
            value = NA(f"{type(e).__name__}: {e}")
        self.results.setdefault(metric, {})[server] = value
        shown = f"n/a ({value})" if isinstance(value, NA) else value
        log(f"  {metric} [{server}]: {shown}")

    def wrk(self, srv: Server, path: str, duration: float, conns: int, script: Optional[Path] = None,
            latency: bool = False) -> dict:
        if not srv.alive():
            raise NA("server not running")
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s"]
        if latency:
            cmd.append("--latency")
        if script:
            cmd += ["-s", str(script)]
        cmd.append(f"https://localhost:{srv.port}{path}")
        cpu0 = cpu_seconds(srv.pid)
        r = run(pinned(CLIENT_CORE, cmd), duration + 60)
        cpu = cpu_seconds(srv.pid) - cpu0
        out = r.stdout
        if r.returncode:
            raise NA(f"wrk failed: {r.stderr.strip()[:200]}")
        m = re.search(r"(\d+) requests in ([\d.]+)(m?s|m)\b", out)
        if not m:
            raise NA(f"wrk output not understood: {out[-200:]}")
        n = int(m.group(1))
        secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}[m.group(3)]
        res = {"requests": n, "seconds": secs, "rps": n / secs, "cpu": cpu}
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errs = re.search(r"Socket errors: (.*)", out)
        res["non2xx"] = int(bad.group(1)) if bad else 0
        res["errors"] = errs.group(1).strip() if errs else ""
        if latency:
            def lat(p: str) -> float:
                mm = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
                if not mm:
                    raise NA("no latency distribution")
                return float(mm.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mm.group(2)]
            res["p50_ms"], res["p99_ms"] = lat("50"), lat("99")
        if n == 0:
            raise NA(f"no successful requests ({res['errors']})")
        if res["non2xx"] > n * 0.01:
            raise NA(f"{res['non2xx']} of {n} responses were not 2xx/3xx")
        return res

    def tls_load(self, srv: Server, reuse: bool, duration: float, sni: str = "localhost") -> dict:
        if not srv.alive():
            raise NA("server not running")
        cmd = [str(self.tlsload), "-p", str(srv.port), "-s", sni, "-c", str(self.hs_procs),
               "-d", str(duration)] + (["-r"] if reuse else [])
        cpu0 = cpu_seconds(srv.pid)
        r = run(pinned(CLIENT_CORE, cmd), duration + 60)
        cpu = cpu_seconds(srv.pid) - cpu0
        m = re.search(r"connections=(\d+) failures=(\d+) reused=(\d+) seconds=([\d.]+)", r.stdout)
        if not m:
            raise NA(f"tlsload: {r.stdout[-200:]} {r.stderr[-200:]}")
        n, fail, reused, secs = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))
        if n == 0:
            state = "server running" if srv.alive() else f"server exited: {srv.tail(300)}"
            raise NA(f"no successful handshakes ({fail} failures; {state})")
        return {"conns": n, "fail": fail, "reused": reused, "rate": n / secs, "cpu_us": cpu / n * 1e6}

    def idle_memory(self, srv: Server) -> dict:
        if not srv.alive():
            raise NA("server not running")
        time.sleep(1.0)
        before = rss_kib(srv.pid)
        client = subprocess.Popen(
            pinned(CLIENT_CORE, [self.venv_python, str(HERE / "idleconns.py"), str(srv.port),
                                 str(self.n_idle), "localhost", "100"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = client.stdout.readline()
            if not line.startswith("ready"):
                raise NA(f"client: {line} {client.stderr.read()[-300:] if client.poll() is not None else ''}")
            parts = line.split(maxsplit=4)
            opened, failed, secs = int(parts[1]), int(parts[2]), float(parts[3])
            if opened < self.n_idle * 0.99:
                raise NA(f"only {opened} of {self.n_idle} connections opened "
                         f"({failed} failed: {parts[4].strip() if len(parts) > 4 else ''})")
            time.sleep(2.0)
            after = rss_kib(srv.pid)
            still = srv.alive()
        finally:
            release_idle_client(client)
        if not still:
            raise NA("server died holding the connections")
        return {"before_kib": before, "after_kib": after, "opened": opened, "seconds": secs,
                "kib_per_conn": (after - before) / opened}

    # --- the run ---------------------------------------------------------------------------
    # Servers run side by side (idle ones cost nothing) and every measurement is repeated in
    # interleaved rounds (ours, nginx, caddy, ours, ...): on a shared, noisy host each server
    # sees the same conditions, and the median of the rounds is reported.
    def start_servers(self, tag: str = "") -> dict[str, Server]:
        servers = {}
        for name in self.only:
            try:
                srv = self.make_server(name, tag=tag)
                srv.start()
                servers[name] = srv
            except NA as e:
                self.failed_start[name] = e
                log(f"  {name} did not start: {e}")
        return servers

    @staticmethod
    def rounds_of(servers: dict[str, Server], fn: Callable[[Server], dict],
                  rounds: int) -> tuple[dict[str, list[dict]], dict[str, NA]]:
        """fn(server) ``rounds`` x, the servers interleaved in each round: the samples per
        server, and the last failure of each server that failed."""
        samples: dict[str, list[dict]] = {n: [] for n in servers}
        errors: dict[str, NA] = {}
        for _ in range(rounds):
            for name, srv in servers.items():
                try:
                    samples[name].append(fn(srv))
                except NA as e:
                    errors[name] = e
                except subprocess.TimeoutExpired as e:
                    errors[name] = NA(f"timed out: {e.cmd}")
                except Exception as e:
                    traceback.print_exc()
                    errors[name] = NA(f"{type(e).__name__}: {e}")
        return samples, errors

    def measure(self, servers: dict[str, Server], metrics: dict[str, Callable[[dict], float]],
                fn: Callable[[Server], dict], rounds: int) -> None:
        """Run fn(server) rounds x interleaved; each metric is the median over the rounds."""
        samples, errors = self.rounds_of(servers, fn, rounds)
        for name in self.only:
            for metric, f in metrics.items():
                if name in self.failed_start:
                    v: object = NA(f"start failed: {self.failed_start[name]}")
                elif samples.get(name):
                    vals = [f(x) for x in samples[name]]
                    v = median(vals)
                    self.samples.setdefault(metric, {})[name] = vals
                    if name in errors:
                        self.partial.add((metric, name))
                else:
                    v = errors.get(name, NA("no sample"))
                self.results.setdefault(metric, {})[name] = v
                log(f"  {metric} [{name}]: {f'n/a ({v})' if isinstance(v, NA) else round(v, 2)}")
        return samples

    def run_main(self) -> None:
        self.note_load("start")
        servers = self.start_servers()
        try:
            for name, srv in servers.items():
                self.results.setdefault("start_1", {})[name] = srv.startup_s
            for name, e in self.failed_start.items():
                self.results.setdefault("start_1", {})[name] = NA(f"start failed: {e}")
            log("== keep-alive")
            for srv in servers.values():     # warm-up
                with contextlib.suppress(Exception):
                    self.wrk(srv, "/small", 2, 50)

            def keepalive(srv: Server) -> dict:
                a0, r0 = self.upstream_status()
                res = self.wrk(srv, "/small", self.d_keepalive, 50, latency=True)
                a1, r1 = self.upstream_status()
                res["up_conns"], res["up_reqs"] = a1 - a0 - 1, r1 - r0 - 1
                return res
            samples = self.measure(servers, {
                "ka_rps": lambda r: r["rps"], "ka_p50": lambda r: r["p50_ms"],
                "ka_p99": lambda r: r["p99_ms"], "ka_cpu": lambda r: r["cpu"] / r["requests"] * 1e6,
                "up_reuse": lambda r: r["up_reqs"] / max(r["up_conns"], 1)}, keepalive, self.rounds)
            for name, ss in samples.items():
                if ss:
                    self.extra.setdefault("upstream", {})[name] = (
                        sum(x["up_conns"] for x in ss), sum(x["up_reqs"] for x in ss))
            self.note_load("after keep-alive")
            log("== new TLS connections")
            for reuse, key in ((False, "hs_new"), (True, "hs_reuse")):
                samples = self.measure(servers, {key: lambda r: r["rate"], key + "_cpu": lambda r: r["cpu_us"],
                                                 key + "_busy": lambda r: r["rate"] * r["cpu_us"] / 1e4},
                                       lambda srv, reuse=reuse: self.tls_load(srv, reuse, self.d_handshake),
                                       self.rounds)
                for name, ss in samples.items():
                    if ss:
                        self.extra.setdefault("resumed", {})[f"{name}/{key}"] = (
                            sum(x["reused"] for x in ss), sum(x["conns"] for x in ss))
            self.note_load("after handshakes")
            log("== 1 MiB throughput")
            self.measure(servers, {"dl": lambda r: r["rps"] * MIB / 1e6,
                                   "dl_cpu": lambda r: r["cpu"] / (r["requests"] * MIB / 1e6) * 1e3},
                         lambda srv: self.wrk(srv, "/1m", self.d_bulk, 4), self.rounds)
            self.measure(servers, {"ul": lambda r: r["rps"] * MIB / 1e6,
                                   "ul_cpu": lambda r: r["cpu"] / (r["requests"] * MIB / 1e6) * 1e3},
                         lambda srv: self.wrk(srv, "/upload", self.d_bulk, 4, script=self.workdir / "post.lua"),
                         self.rounds)
        finally:
            for srv in servers.values():
                srv.stop()
        # 4. idle memory, each on a fresh process, one server at a time
        log("== idle memory")
        self.note_load("before idle memory")
        for name in self.only:
            srv = None
            try:
                srv = self.make_server(name, tag="-mem")
                srv.start()
                mem: dict = {}

                def idle():
                    mem.update(self.idle_memory(srv))
                    return mem["kib_per_conn"]
                self.record("idle_mem", name, idle)
                if mem:
                    self.extra.setdefault("idle", {})[name] = mem
            except NA as e:
                self.results.setdefault("idle_mem", {})[name] = e
            finally:
                if srv is not None:
                    srv.stop()

    def many_certs(self) -> list[tuple[Path, Path, str]]:
        n = self.n_certs
        cache = Path(tempfile.gettempdir()) / f"acp-bench-certs-{n}"
        marker = cache / "done"
        if not marker.exists():
            log(f"generating {n} certificates in {cache} (kept for later runs)")
            shutil.rmtree(cache, ignore_errors=True)
            ca = TestCA(cache, name="Bench Many CA")
            for i in range(n):
                ca.issue([f"site{i:05d}.bench.test"], filename=f"site{i:05d}")
            marker.write_text("ok")
        certs = [(cache / f"site{i:05d}.pem", cache / f"site{i:05d}.key", f"site{i:05d}.bench.test")
                 for i in range(n)]
        # Read once, so that every server's start-up finds them in the page cache: the first
        # server to start would otherwise read 2N files from the disk alone (ours, 10,000
        # certificates: 3.3 s from a cold cache against 0.9 s from a warm one).
        for cert, key, _ in certs:
            cert.read_bytes()
            key.read_bytes()
        return certs

    def bench_many(self, name: str, certs: list[tuple[Path, Path, str]]) -> None:
        """Start-up with N certificates, and the handshake cost with N certificates against
        one: both servers run side by side (one is loaded at a time) and the handshake runs
        are interleaved rounds, as for the other metrics, so that the machine's drift does not
        land on one of the two."""
        log(f"== {name} with 1 and with {len(certs)} certificates")
        self.note_load(f"before {name} with many certificates")
        target = certs[len(certs) // 2][2]
        one = many = None
        try:
            try:
                one = self.make_server(name, tag="-one")
                one.start()
            except NA as e:
                for m in ("hs_1", "hs_1_cpu"):
                    self.results.setdefault(m, {})[name] = NA(f"start failed: {e}")
                one = None
            try:
                many = self.make_server(name, certs=certs, tag="-many")
                many.start(timeout=300, sni=target)
            except NA as e:
                for m in ("start_n", "hs_n", "hs_n_cpu"):
                    self.results.setdefault(m, {})[name] = NA(f"start failed: {e}")
                log(f"  {name} did not start with {len(certs)} certificates: {e}")
                many = None
            runs = {}
            if one is not None:
                runs["1"] = one
            if many is not None:
                self.record("start_n", name, lambda: many.startup_s)
                cn = served_cn(many.port, target)
                if target in cn:
                    runs["n"] = many
                else:
                    for m in ("hs_n", "hs_n_cpu"):
                        self.results.setdefault(m, {})[name] = NA(f"wrong certificate for {target}: {cn}")
            samples, errors = self.rounds_of(
                runs, lambda srv: self.tls_load(srv, False, self.d_handshake,
                                                sni=target if srv is many else "bench.test"), self.rounds)
            for k in runs:
                for metric, field in ((f"hs_{k}", "rate"), (f"hs_{k}_cpu", "cpu_us")):
                    vals = [x[field] for x in samples[k]]
                    if vals:
                        self.samples.setdefault(metric, {})[name] = vals
                        if k in errors:
                            self.partial.add((metric, name))
                    self.record(metric, name, lambda vals=vals, k=k: median(vals) if vals
                                else (_ for _ in ()).throw(errors.get(k, NA("no sample"))))
            if many is not None:
                self.extra.setdefault("many_rss", {})[name] = rss_kib(many.pid)
        finally:
            for srv in (one, many):
                if srv is not None:
                    srv.stop()

    def bench_workers(self) -> None:
        """Keep-alive requests/s of our proxy with workers: 1 and workers: 2, both allowed on
        both cores (the load generator and the upstream share core 1), rounds interleaved."""
        if "ours" not in self.only:
            return
        log("== workers: 1 -> 2 (ours, cores 0-1)")
        servers = {}
        try:
            for w in (1, 2):
                srv = servers[w] = self.make_server("ours", tag=f"-w{w}", workers=w)
                srv.cores = "0,1"
                srv.start()
                with contextlib.suppress(Exception):
                    self.wrk(srv, "/small", 2, 50)   # warm-up
            rps: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(self.rounds):
                for w, srv in servers.items():
                    rps[w].append(self.wrk(srv, "/small", self.d_keepalive, 50)["rps"])
            med = {w: sorted(v)[len(v) // 2] for w, v in rps.items()}
            self.extra["workers"] = (med[1], med[2], rps)
            log(f"  workers 1 -> 2: {med[1]:,.0f} -> {med[2]:,.0f} req/s ({med[2] / med[1]:.2f}x)")
        except NA as e:
            self.notes.append(f"workers scaling not measured: {e}")
        finally:
            for srv in servers.values():
                srv.stop()

    def close(self) -> None:
        """Stops the upstream and, unless ``keep``, removes the work directory."""
        if self.upstream is not None:
            self.upstream.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run_all(self) -> None:
        self.setup()
        try:
            self.run_main()
            self.bench_workers()
            certs = self.many_certs()
            for name in self.only:
                self.bench_many(name, certs)
        finally:
            self.close()

    # --- report ---------------------------------------------------------------------------
    ROWS = [
        # key, label, unit, format, higher_is_better
        ("ka_rps", "1. keep-alive proxied requests/s (wrk -c50, 100 B body)", "req/s", "{:,.0f}", True),
        ("ka_p50", "1. keep-alive latency p50", "ms", "{:.2f}", False),
        ("ka_p99", "1. keep-alive latency p99", "ms", "{:.2f}", False),
        ("ka_cpu", "1. server CPU per keep-alive request", "us", "{:.0f}", False),
        ("up_reuse", "1. upstream requests per upstream connection", "req/conn", "{:,.0f}", True),
        ("hs_new", "2. new TLS connections/s, resumption off (full handshakes)", "conn/s", "{:,.0f}", True),
        ("hs_new_cpu", "2. server CPU per full handshake", "us", "{:.0f}", False),
        ("hs_reuse", "2. new TLS connections/s, resumption on", "conn/s", "{:,.0f}", True),
        ("hs_reuse_cpu", "2. server CPU per resumed handshake", "us", "{:.0f}", False),
        ("dl", "3. 1 MiB responses throughput (wrk -c4)", "MB/s", "{:,.0f}", True),
        ("dl_cpu", "3. server CPU per MB of responses", "ms/MB", "{:.2f}", False),
        ("ul", "3. 1 MiB uploads throughput (wrk -c4, POST)", "MB/s", "{:,.0f}", True),
        ("ul_cpu", "3. server CPU per MB of uploads", "ms/MB", "{:.2f}", False),
        ("idle_mem", "4. memory per idle TLS connection", "KiB", "{:.1f}", False),
        ("start_1", "5. start-up to first handshake, 1 certificate", "s", "{:.2f}", False),
        ("start_n", "5. start-up to first handshake, N certificates", "s", "{:.2f}", False),
        ("hs_1", "5. full handshakes/s, 1 certificate (SNI)", "conn/s", "{:,.0f}", True),
        ("hs_n", "5. full handshakes/s, N certificates (SNI = one of them)", "conn/s", "{:,.0f}", True),
        ("hs_1_cpu", "5. server CPU per handshake, 1 certificate", "us", "{:.0f}", False),
        ("hs_n_cpu", "5. server CPU per handshake, N certificates", "us", "{:.0f}", False),
    ]

    def fmt(self, v, f: str) -> str:
        if v is None:
            return "not run"
        if isinstance(v, NA):
            return "n/a"
        return f.format(v)

    def table(self) -> str:
        n = self.n_certs
        lines = ["| metric | unit | ours | nginx | caddy | ours/nginx | ours/caddy |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for key, label, unit, f, _ in self.ROWS:
            r = self.results.get(key, {})
            vals = [r.get(s) for s in SERVERS]
            def ratio(a, b):
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                    return f"{a / b:.2f}x"
                return "n/a"
            lines.append(f"| {label.replace('N certificates', f'{n:,} certificates')} | {unit} | "
                         + " | ".join(self.fmt(v, f) for v in vals)
                         + f" | {ratio(vals[0], vals[1])} | {ratio(vals[0], vals[2])} |")
        return "\n".join(lines)

    # The targets of issue 6: (label, metric, server, against: (metric, server) or a number,
    # bound on ours/against, whether ours/against must be at least (True) or at most the bound)
    TARGETS = [
        ("keep-alive requests/s >= 0.5x nginx", "ka_rps", ("ka_rps", "nginx"), 0.5, True),
        ("keep-alive requests/s >= 1.0x Caddy", "ka_rps", ("ka_rps", "caddy"), 1.0, True),
        ("new TLS connections/s (full handshakes) >= 0.9x nginx", "hs_new", ("hs_new", "nginx"), 0.9, True),
        ("1 MiB responses MB/s >= 1.0x nginx", "dl", ("dl", "nginx"), 1.0, True),
        ("1 MiB uploads MB/s >= 1.0x nginx", "ul", ("ul", "nginx"), 1.0, True),
        ("memory per idle TLS connection <= 1.5x nginx", "idle_mem", ("idle_mem", "nginx"), 1.5, False),
        ("start-up with N certificates < 3 s", "start_n", 3.0, 1.0, False),
        ("CPU per handshake with N certificates within 10 % of 1 certificate", "hs_n_cpu",
         ("hs_1_cpu", "ours"), 1.1, False),
    ]

    def rounds_of_metric(self, metric: str, name: str) -> Optional[list[float]]:
        """The rounds of ``metric`` for ``name`` in order, None unless every round gave one
        (a failed round would shift the pairs)."""
        if (metric, name) in self.partial:
            return None
        return self.samples.get(metric, {}).get(name)

    def targets(self) -> list[str]:
        """Each target: ours against its reference as the ratio of the medians (the table's
        figure, which decides), and the ratios of the same rounds (each round runs the servers
        back to back, so a pair shares the machine's state of that moment; their median and
        spread show how much the verdict owes to the machine's noise)."""
        lines = ["| target | ratio of medians | paired by round: median (min-max) | met |",
                 "|---|---:|---:|---|"]
        for label, metric, against, bound, at_least in self.TARGETS:
            ours = self.results.get(metric, {}).get("ours")
            if isinstance(against, tuple):
                ref = self.results.get(against[0], {}).get(against[1])
                mine, theirs = self.rounds_of_metric(metric, "ours"), self.rounds_of_metric(*against)
            else:
                ref, mine, theirs = against, None, None
            label = label.replace("N certificates", f"{self.n_certs:,} certificates")
            if not isinstance(ours, (int, float)) or not isinstance(ref, (int, float)) or not ref:
                lines.append(f"| {label} | n/a | | not measured |")
                continue
            r = ours / ref
            paired = ""
            if mine and theirs and len(mine) == len(theirs) and all(theirs):
                pr = sorted(a / b for a, b in zip(mine, theirs))
                paired = f"{pr[len(pr) // 2]:.2f} ({pr[0]:.2f}-{pr[-1]:.2f})"
            met = r >= bound if at_least else r <= bound
            shown = f"{ours:.2f} s" if not isinstance(against, tuple) else f"{r:.3f}"
            lines.append(f"| {label} | {shown} | {paired} | {'yes' if met else 'NO'} |")
        return lines

    def failures(self) -> list[str]:
        out = []
        for key, label, *_ in self.ROWS:
            for s, v in self.results.get(key, {}).items():
                if isinstance(v, NA):
                    out.append(f"- {label} [{s}]: n/a - {v}")
        return out

    def machine(self) -> str:
        def ver(cmd: list[str], pat: str = r"([\d.]+)") -> str:
            try:
                r = run(cmd, 10)
                m = re.search(pat, r.stdout + r.stderr)
                return m.group(1) if m else "?"
            except Exception:
                return "?"
        cpu = "?"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem = "?"
        with contextlib.suppress(OSError):
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) // 1024} MiB"
        pyv = run([self.proxy_python, "-c",
                   "import sys, uvloop, OpenSSL, h11, httptools, cryptography;"
                   "from OpenSSL import SSL;"
                   "print(sys.version.split()[0], uvloop.__version__, OpenSSL.__version__,"
                   " SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(), h11.__version__,"
                   " httptools.__version__, cryptography.__version__, sep='|')"], 30).stdout.strip().split("|")
        while len(pyv) < 7:
            pyv.append("?")
        return "\n".join([
            f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem}",
            f"- kernel: {platform.system()} {platform.release()}",
            f"- Python {pyv[0]}, uvloop {pyv[1]}, pyOpenSSL {pyv[2]} ({pyv[3]}), cryptography {pyv[6]}, "
            f"h11 {pyv[4]}, httptools {pyv[5]} (installed; the proxy's parser is whatever proxy/ uses)",
            "- nginx " + ver(["nginx", "-v"], r"nginx/([\d.]+)")
            + ", caddy " + ver(["caddy", "version"], r"v?([\d.]+)")
            + ", wrk " + ver(["wrk", "-v"], r"wrk (\S+)")
            + ", client OpenSSL " + ver(["openssl", "version"], r"OpenSSL ([\d.]+)"),
            f"- mode: {'--quick' if self.quick else 'full'}; servers on core {SERVER_CORE}, "
            f"load generators and upstream nginx on core {CLIENT_CORE}",
        ])

    def report(self) -> str:
        parts = ["# autocert-proxy vs nginx vs Caddy", "", "## Machine", "", self.machine(), "",
                 "## Results", "", self.table(), "",
                 "Ratios are ours divided by the other server: above 1 is better for rates and "
                 "throughput, below 1 is better for latency, CPU per operation, memory and start-up time.",
                 "", "## Targets (issue 6)", ""] + self.targets() + [
                 "", "The ratio of the medians decides; the paired ratios compare the servers' runs "
                 "of the same round.", ""]
        details = []
        for name, (conns, reqs) in self.extra.get("upstream", {}).items():
            details.append(f"- {name}: {reqs:,} upstream requests over {conns:,} new upstream connections "
                           "during the keep-alive run")
        for key, (reused, conns) in self.extra.get("resumed", {}).items():
            details.append(f"- {key}: {reused:,} of {conns:,} client connections were resumed")
        for key in ("hs_new_busy", "hs_reuse_busy"):
            busy = {name: median(v) for name, v in self.samples.get(key, {}).items() if v}
            if busy:
                details.append(f"- {key[:-5]}: each server's core busy " + ", ".join(
                    f"{name} {b:.0f} %" for name, b in busy.items())
                    + " (below ~95 % the rate is set by the load generator, which needs about as much CPU "
                    "per handshake on the other core: then compare CPU per handshake, not conn/s)")
        for name, m in self.extra.get("idle", {}).items():
            details.append(f"- {name}: RSS {m['before_kib']:,} KiB -> {m['after_kib']:,} KiB with "
                           f"{m['opened']:,} idle TLS connections (opened in {m['seconds']:.1f} s)")
        for name, kib in self.extra.get("many_rss", {}).items():
            details.append(f"- {name}: RSS {kib:,} KiB with {self.n_certs:,} certificates loaded "
                           "(after the handshake run)")
        if "workers" in self.extra:
            one, two, rounds = self.extra["workers"]
            details.append(f"- ours, keep-alive with workers: 1 -> 2 (both on cores 0-1, where wrk and the upstream "
                           f"also run): {one:,.0f} -> {two:,.0f} req/s, {two / one:.2f}x (rounds: "
                           + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(rounds[1], rounds[2])) + ")")
        fmt_of = {k: f for k, _, _, f, _ in self.ROWS}
        for metric in ("ka_rps", "ka_cpu", "hs_new_cpu", "hs_reuse_cpu", "dl", "ul", "hs_1_cpu", "hs_n_cpu"):
            for name, vals in self.samples.get(metric, {}).items():
                details.append(f"- rounds of {metric} [{name}]: " + ", ".join(fmt_of[metric].format(v) for v in vals))
        if self.loads:
            details.append("- 1-minute load average of the machine (other work running on it makes the "
                           "rates noisy; CPU per operation is less sensitive): " + "; ".join(self.loads))
        if details:
            parts += ["## Details", ""] + details + [""]
        fails = self.failures()
        if fails or self.notes:
            parts += ["## Failures and notes", ""] + fails + [f"- {n}" for n in self.notes] + [""]
        parts += ["Method: see benchmarks/README.md. Command: `.venv/bin/python benchmarks/run.py"
                  + (" --quick" if self.quick else "") + "`.", ""]
        return "\n".join(parts)


def _on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _on_term)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short durations, 1,000 idle connections/certificates")
    ap.add_argument("--only", default=",".join(SERVERS), help="comma-separated subset of ours,nginx,caddy")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds per measurement (default 3, --quick 2)")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    for s in only:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    for tool in ("wrk", "nginx", "caddy", "taskset", "cc"):
        if shutil.which(tool) is None:
            log(f"warning: {tool} not found; the measurements that need it will show n/a")
    b = Bench(args.quick, only, args.keep, args.rounds)
    try:
        b.run_all()
    finally:
        text = b.report()
        print()
        print(text)
        if not args.no_write:
            out = HERE / "results"
            out.mkdir(exist_ok=True)
            stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "")
            (out / f"{stamp}.md").write_text(text)
            (out / "latest.md").write_text(text)
            log(f"written {out / (stamp + '.md')} and {out / 'latest.md'}")


if __name__ == "__main__":
    main()
