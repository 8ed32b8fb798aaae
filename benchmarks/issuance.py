"""Time from process start to serving a Pebble-issued certificate: autocert-proxy vs Caddy.

Both run against the same Pebble (Debian's, started here on 127.0.0.1), each run with an
empty storage directory (so each run registers an account and orders one certificate over
TLS-ALPN-01). The clock starts just before the process is spawned and stops at the first TLS
handshake that presents a certificate issued by Pebble. Runs alternate between the two.

    .venv/bin/python benchmarks/issuance.py [--runs 5]

Prints every run, both medians, and their ratio (proxy / caddy; < 1 means faster than Caddy),
plus the median time from start to the listener accepting connections: for the proxy that is
the Python interpreter and its imports, the rest is the ACME conversation. The machine's load
matters a lot for the first part: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.x509.oid import NameOID  # noqa: E402

from tests.infra.pebble import Pebble  # noqa: E402
from tests.infra.proxyproc import ProxyProcess, free_port, served_certificate, stop_process  # noqa: E402

NAME = "bench.test"
TIMEOUT = 30.0


def pebble_issued(port: int) -> bool:
    try:
        cert = served_certificate(port, NAME)
    except (OSError, ssl.SSLError):
        return False
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(cn) and str(cn[0].value).startswith("Pebble Intermediate CA")


LISTEN: dict[str, list[float]] = {"proxy": [], "caddy": []}


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_issued(port: int, proc: subprocess.Popen, t0: float, who: str) -> float:
    listening = None
    while time.monotonic() - t0 < TIMEOUT:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        if listening is None and accepts(port):
            listening = time.monotonic() - t0
            LISTEN[who].append(listening)
        if listening is not None and pebble_issued(port):
            return time.monotonic() - t0
        time.sleep(0.005)
    raise TimeoutError(f"no Pebble certificate served within {TIMEOUT}s")


def run_proxy(ca: Pebble, work: Path) -> float:
    cfg = {"_port": ca.tls_port, "autocert": True, "autocert_ca": ca.directory_url,
           "autocert_trusted_ca_file": str(ca.trusted_ca_file), "autocert_dir": str(work / "store"),
           "routes": [{"from": f"https://{NAME}", "to": "http://127.0.0.1:9"}]}
    p = ProxyProcess(work, cfg)
    t0 = time.monotonic()
    p.start(wait=False)
    try:
        return wait_issued(p.port, p.proc, t0, "proxy")
    except Exception:
        print(p.log()[-3000:], file=sys.stderr)
        raise
    finally:
        p.stop()


def run_caddy(ca: Pebble, work: Path, caddy: str) -> float:
    work.mkdir(parents=True, exist_ok=True)
    (work / "Caddyfile").write_text(f"""{{
    admin off
    acme_ca {ca.directory_url}
    acme_ca_root {ca.trusted_ca_file}
    storage file_system {work / "store"}
    https_port {ca.tls_port}
    http_port {ca.http_port}
    skip_install_trust
}}
{NAME} {{
    bind 127.0.0.1
    respond "hi"
}}
""")
    env = dict(os.environ, HOME=str(work), XDG_DATA_HOME=str(work / "data"), XDG_CONFIG_HOME=str(work / "config"))
    log_path = work / "caddy.log"
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen([caddy, "run", "--config", str(work / "Caddyfile"), "--adapter", "caddyfile"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        return wait_issued(ca.tls_port, proc, t0, "caddy")
    except Exception:
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        stop_process(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    caddy = shutil.which("caddy")
    tmp = Path(tempfile.mkdtemp(prefix="issuance-bench-"))
    ca = Pebble(tmp / "pebble", tls_port=free_port(), http_port=free_port())
    ca.start()
    proxy_times: list[float] = []
    caddy_times: list[float] = []
    try:
        for i in range(args.runs):
            proxy_times.append(run_proxy(ca, tmp / f"proxy-{i}"))
            print(f"run {i + 1}: autocert-proxy {proxy_times[-1]:.3f} s", end="", flush=True)
            if caddy:
                caddy_times.append(run_caddy(ca, tmp / f"caddy-{i}", caddy))
                print(f"   caddy {caddy_times[-1]:.3f} s", end="")
            print()
    finally:
        ca.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    pm = statistics.median(proxy_times)
    print(f"autocert-proxy: median {pm:.3f} s over {len(proxy_times)} runs "
          f"(process start to serving the Pebble-issued certificate; "
          f"of which start to listening {statistics.median(LISTEN['proxy']):.3f} s)")
    if caddy_times:
        cm = statistics.median(caddy_times)
        print(f"caddy {subprocess.run([caddy, 'version'], capture_output=True, text=True).stdout.split()[0]}: "
              f"median {cm:.3f} s over {len(caddy_times)} runs "
              f"(start to listening {statistics.median(LISTEN['caddy']):.3f} s)")
        print(f"ratio autocert-proxy / caddy: {pm / cm:.2f}")
    else:
        print("caddy not installed: no comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
