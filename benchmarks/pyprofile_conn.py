#!/usr/bin/env python3
"""Python functions called per new TLS connection (or per 1 MiB response), counted with cProfile.

    .venv/bin/python benchmarks/pyprofile_conn.py [--handshakes N] [--path /1m --requests N] [--top K]

Runs the proxy's App in this process (uvloop, one manual certificate, one route to a
throwaway upstream nginx, as run.py sets it up), profiles only while the client (a
subprocess: tlsload's cycle in Python) makes N connections, and prints the functions by
calls per connection and by own time. cProfile's overhead distorts times; the call
counts are exact, and they say which Python operations a connection pays for.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import run  # noqa: E402

CLIENT = textwrap.dedent("""
    import socket, ssl, sys, re
    port, n, path, requests = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    def conn():
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost")
    if path == "-":
        for _ in range(n):
            s = conn()
            try: s.unwrap()
            except (ssl.SSLError, OSError): pass
            s.close()
    else:
        s = conn()
        req = f"GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n".encode()
        for _ in range(requests):
            s.sendall(req); buf = b""
            while b"\\r\\n\\r\\n" not in buf: buf += s.recv(65536)
            head, _, body = buf.partition(b"\\r\\n\\r\\n")
            left = int(re.search(rb"(?i)content-length:\\s*(\\d+)", head).group(1)) - len(body)
            while left > 0: left -= len(s.recv(262144))
        s.close()
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--path", default="-", help="- (handshakes only) or a path for keep-alive requests")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    b = run.Bench(quick=True, only=["ours"], keep=False)
    b.setup()
    try:
        import uvloop
        from proxy.config import load_config
        from proxy.app import App
        port = run.free_port()
        cfg = b.workdir / "config.yaml"
        import yaml
        cfg.write_text(yaml.safe_dump({
            "address": f"127.0.0.1:{port}",
            "routes": [{"from": "https://localhost", "to": f"http://127.0.0.1:{b.up_port}"}],
            "certificates": [{"cert": str(b.leaf.cert_path), "key": str(b.leaf.key_path)}],
            "log_level": "warning", "autocert_dir": str(b.workdir / "ac"),
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCERT", "ROUTES", "ADDRESS"))}
        env["HOME"] = str(b.workdir)
        options = load_config(str(cfg), env)
        prof = cProfile.Profile()

        async def go():
            app = App(options, env)
            await app.start()

            async def client(n, path, requests):
                p = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), str(n), path,
                                                         str(requests))
                assert await p.wait() == 0

            await client(5, "-", 0)                       # warm-up
            if a.path != "-":
                await client(1, a.path, 5)
            gc_before = [g["collections"] for g in gc.get_stats()]
            gc_time = [0.0, 0]

            def on_gc(phase, info, _t=[0.0]):
                if phase == "start":
                    _t[0] = time.perf_counter()
                else:
                    gc_time[0] += time.perf_counter() - _t[0]
                    gc_time[1] += info["collected"]
            gc.callbacks.append(on_gc)
            prof.enable()
            if a.path == "-":
                await client(a.handshakes, "-", 0)
            else:
                await client(1, a.path, a.requests)
            await asyncio.sleep(0.5)
            prof.disable()
            gc.callbacks.remove(on_gc)
            n = a.handshakes if a.path == "-" else a.requests
            after = [g["collections"] for g in gc.get_stats()]
            print(f"gc: collections per generation {[x - y for x, y in zip(after, gc_before)]} "
                  f"over {n}, {gc_time[0] / n * 1e6:.1f} us per unit (profiled), {gc_time[1]} objects collected")
            await app.shutdown()

        uvloop.run(go())
        n = a.handshakes if a.path == "-" else a.requests
        st = pstats.Stats(prof)
        rows = []
        for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
            rows.append((nc / n, tt / n * 1e6, ct / n * 1e6, f"{Path(fn).name}:{line}({name})"))
        unit = "connection" if a.path == "-" else "request"
        print(f"per {unit}: {sum(r[0] for r in rows):.0f} function calls, {sum(r[1] for r in rows):.0f} us (profiled)")
        print(f"{'calls':>8s} {'own us':>8s} {'cum us':>8s}  function   (by calls)")
        for r in sorted(rows, key=lambda r: -r[0])[:a.top]:
            print(f"{r[0]:8.2f} {r[1]:8.1f} {r[2]:8.1f}  {r[3]}")
        print(f"{'calls':>8s} {'own us':>8s} {'cum us':>8s}  function   (by own time)")
        for r in sorted(rows, key=lambda r: -r[1])[:a.top]:
            print(f"{r[0]:8.2f} {r[1]:8.1f} {r[2]:8.1f}  {r[3]}")
    finally:
        b.close()


if __name__ == "__main__":
    main()
