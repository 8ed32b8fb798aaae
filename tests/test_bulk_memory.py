"""Bulk transfers through the proxy reuse their memory instead of faulting in fresh pages.

glibc, left to itself, returns freed blocks of a few hundred KiB to the kernel and maps
large ones anew; a proxy moving 256 KiB chunks then takes a page fault for most 4 KiB it
moves (about 235 per 1 MiB response, measured with benchmarks/conncost.py --wrk /1m).
The proxy fixes glibc's thresholds at start (proxy.app.tune_malloc).
"""
from __future__ import annotations

import re
import socket
import ssl

from proxy.app import tune_malloc
from tests.infra.proxyproc import tls_client_context


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return int(st[st.rfind(")") + 2:].split()[7])


def download(s: ssl.SSLSocket, path: str) -> int:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    left = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1)) - len(body)
    total = len(body)
    while left > 0:
        chunk = s.recv(262144)
        assert chunk
        left -= len(chunk)
        total += len(chunk)
    return total


def test_large_responses_do_not_fault_in_fresh_pages(start_proxy, upstream):
    p = start_proxy({"routes": [{"from": "https://localhost", "to": upstream.url}]})
    pid = p.proc.pid
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as raw:
        with tls_client_context().wrap_socket(raw, server_hostname="localhost") as s:
            for _ in range(3):                      # warm-up: pools, heap at its working size
                download(s, "/big?mb=4")
            before = minor_faults(pid)
            mib = 0
            for _ in range(10):
                mib += download(s, "/big?mb=4") / (1 << 20)
            per_mib = (minor_faults(pid) - before) / mib
    # untuned: ~100-240 per MiB; tuned: ~0 (a few for whatever else the process does)
    assert per_mib < 20, per_mib


def test_tune_malloc_leaves_operator_settings_alone():
    assert tune_malloc({"MALLOC_TRIM_THRESHOLD_": "1000000"}) is False
    assert tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) is False
