"""`workers: N`: N processes share the listening port and the certificate storage, and
cooperate as instances do: exactly one ACME order per name, every worker serves it."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

from tests.infra.pebble import pebble_factory  # noqa: F401  (fixture)
from tests.infra.proxyproc import free_port, served_certificate


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def from_pebble(cert) -> bool:
    return "Pebble" in cert.issuer.rfc4514_string()


def test_two_workers_one_order_per_name_both_serve(pebble_factory, start_proxy, tmp_path):
    port = free_port()
    ca = pebble_factory(tls_port=port)
    names = ["w1.test", "w2.test"]
    p = start_proxy({
        "_port": port, "workers": 2, "autocert": True, "autocert_ca": ca.directory_url,
        "autocert_trusted_ca_file": str(ca.trusted_ca_file), "autocert_dir": str(tmp_path / "store"),
        "routes": [{"from": f"https://{n}", "response": {"status": 200, "body": n}} for n in names],
    }, env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.2", "AUTOCERT_PROXY_RETRY_BASE": "300"})
    workers = children(p.proc.pid)
    assert len(workers) == 2, workers

    serials: dict[str, set[int]] = {n: set() for n in names}
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and not all(serials.values()):
        for n in names:
            try:
                c = served_certificate(p.port, n)
            except OSError:
                continue
            if from_pebble(c):
                serials[n].add(c.serial_number)
        time.sleep(0.05)
    assert all(serials.values()), (serials, p.log()[-4000:])
    # Many new connections: the kernel spreads them over both workers (SO_REUSEPORT); every
    # one of them serves the same certificate, so both workers hold it.
    for n in names:
        for _ in range(30):
            c = served_certificate(p.port, n)
            assert from_pebble(c), p.log()[-3000:]
            serials[n].add(c.serial_number)
        assert len(serials[n]) == 1, serials
    assert Counter(ca.validated_names()) == {n: 1 for n in names}, ca.validated_names()
    assert all(os.path.exists(f"/proc/{w}") for w in workers)

    p.signal(signal.SIGTERM)
    assert p.proc.wait(20) == 0
    assert not any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
                   for w in workers)


def test_a_dead_worker_is_replaced(start_proxy):
    p = start_proxy({"workers": 2, "routes": [{"from": "https://x.test", "response": {"status": 200}}]})
    before = children(p.proc.pid)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = children(p.proc.pid)
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker not replaced: {children(p.proc.pid)}\n{p.log()}")
    p.wait_log("restarting it", timeout=5)
    assert p.curl("x.test", "/").returncode == 0
