#!/usr/bin/env python3
"""CPU instructions per proxied keep-alive request, counted by valgrind (callgrind).

    .venv/bin/python benchmarks/instructions.py [--requests N] [--conns K] [--new-conns M]
                                                [--path /1m] [--by-object] [--floor]

Wall-clock and CPU-time figures on a shared 2-core VM move by 10-50 % from one minute to
the next; instruction counts do not (repeat runs agree within ~1 %). This is the A/B tool
for optimising the request path: the proxy runs under callgrind with collection off during
start-up and warm-up, then counts exactly N requests (GET /small, 100-byte body, to the same
upstream nginx as run.py), spread over K keep-alive TLS connections. With --new-conns M it
also counts M new TLS connections (full handshake + one request each) and reports
instructions per connection; with --handshakes H, H connections that only handshake,
send close_notify and read to the end (what run.py's tlsload does, no HTTP request).
--path /1m counts 1 MiB responses instead; --by-object splits
the count by shared object (python, libc memcpy, OpenSSL in cryptography's _rust.abi3.so);
--floor measures benchmarks/floor.py, a minimal callback-only proxy, for reference. Under
valgrind a `rep movsb` copy counts one instruction per byte, so copies weigh more here than
on the CPU. It reports instructions only: the speed comparison with nginx and Caddy stays
in run.py.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n".encode()


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


UPLOAD = b"a" * (1024 * 1024)


def get(sock: ssl.SSLSocket, path: str = "/small") -> None:
    """One request, its whole response read (Content-Length framing). ``/upload``: a POST
    with a 1 MiB body (the upstream reads it and answers 200)."""
    if path == "/upload":
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(UPLOAD))
        sock.sendall(UPLOAD)
    else:
        sock.sendall(request(path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed by the proxy")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {head[:200]!r}")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    left = int(m.group(1)) - len(body)
    while left > 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed mid-body")
        left -= len(chunk)


SNI = "localhost"   # the name the clients send (--sni; --certs N: one of the N names)


def connect(ctx: ssl.SSLContext, port: int, session: Optional[ssl.SSLSession] = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    return ctx.wrap_socket(raw, server_hostname=SNI, session=session)


def control(args: list[str], pid: int) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def exclusive_profile(f: Path) -> str:
    """callgrind_annotate's listing of every function by exclusive instructions."""
    return subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(f)],
                          capture_output=True, text=True, timeout=300).stdout


def by_object(f: Path, top: int = 12) -> str:
    """Instructions by shared object (python, libssl, libcrypto, uvloop, libc...)."""
    per: dict[str, int] = {}
    for line in exclusive_profile(f).splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(.*?\)\s+(\S+?):(.*?)(?: \[(.*)\])?$", line)
        if m:
            obj = Path(m.group(4) or m.group(2)).name
            per[obj] = per.get(obj, 0) + int(m.group(1).replace(",", ""))
    total = sum(per.values()) or 1
    return "\n".join(f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top])


def functions(f: Path, top: int) -> str:
    """The ``top`` functions by exclusive instructions."""
    rows = []
    for line in exclusive_profile(f).splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)$", line)
        if m and not m.group(3).startswith("PROGRAM TOTALS"):
            rows.append(f"  {m.group(2):>5s}%  {m.group(3)[:110]}")
    return "\n".join(rows[:top])


def callers(f: Path, symbol: str) -> str:
    """Who calls ``symbol`` (a substring of a function name), with the instructions spent in
    it from each caller: callgrind_annotate's caller tree, the block for that function."""
    r = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--tree=caller", "--threshold=100", str(f)],
                       capture_output=True, text=True, timeout=300)
    out, block = [], []
    for line in r.stdout.splitlines():
        if not line.strip():
            if any("*" in ln and symbol in ln for ln in block):
                out.extend(ln[:150] for ln in block)
                out.append("")
            block = []
        else:
            block.append(line)
    return "\n".join(out)


def inclusive(f: Path, symbol: str) -> str:
    """Instructions spent in functions whose name contains ``symbol``, callees included."""
    r = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(f)],
                       capture_output=True, text=True, timeout=300)
    return "\n".join(ln[:150] for ln in r.stdout.splitlines() if symbol in ln and "%)" in ln)


def report(dump: Path, a) -> None:
    if a.by_object:
        print(by_object(dump))
    if a.functions:
        print(functions(dump, a.functions))
    for sym in a.callers or ():
        print(callers(dump, sym))
    for sym in a.inclusive or ():
        print(inclusive(dump, sym))


def handshake_only(ctx: ssl.SSLContext, port: int, session: Optional[ssl.SSLSession] = None,
                   want_session: bool = False) -> tuple[bool, Optional[ssl.SSLSession]]:
    """tlsload's cycle: connect, handshake (resuming ``session`` if given), close_notify, read
    to the peer's, close. Returns (whether the session was resumed, with ``want_session`` the
    session to resume: the server's tickets are read first, briefly waiting for them)."""
    s = connect(ctx, port, session)
    reused, got = s.session_reused, None
    if want_session:
        s.settimeout(0.2)
        try:
            s.recv(1)
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        got = s.session
    try:
        s.unwrap()
    except (ssl.SSLError, OSError):
        pass
    s.close()
    return reused, got


def dump_ir(out: Path, pid: int) -> tuple[int, Path]:
    """Dumps the counters (which resets them): the instructions in that dump, and its file."""
    before = set(out.parent.glob(out.name + ".*"))
    control(["-d"], pid)
    for _ in range(100):
        new = set(out.parent.glob(out.name + ".*")) - before
        if new:
            break
        time.sleep(0.1)
    (f,) = new
    time.sleep(0.2)
    for line in f.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1]), f
    raise SystemExit(f"no totals in {f}")


@contextlib.contextmanager
def warm_proxy(adjust: Callable[[run.Bench, run.Server], None], conns: int, path: str,
               timeout: float, certs: int = 0) -> Iterator[tuple[run.Server, ssl.SSLContext, list[ssl.SSLSocket]]]:
    """Our proxy set up as run.py sets it up (same certificate, same upstream nginx), its
    command line first adjusted by ``adjust(bench, server)``. Yields (server, client context,
    ``conns`` keep-alive connections, each warmed with 20 requests for ``path``: pools, caches,
    first-use imports); afterwards closes them and stops the proxy and the upstream. ``certs``:
    that many more certificates loaded (run.py's, kept in /tmp/acp-bench-certs-N)."""
    b = run.Bench(quick=True, only=["ours"], keep=False)
    b.setup()
    extra = []
    if certs:
        b.n_certs = certs
        extra = b.many_certs()
    srv = b.make_server("ours", certs=extra)
    adjust(b, srv)
    socks: list[ssl.SSLSocket] = []
    try:
        srv.start(timeout=timeout)
        ctx = client_ctx()
        socks = [connect(ctx, srv.port) for _ in range(conns)]
        for s in socks:
            for _ in range(20):
                get(s, path)
        yield srv, ctx, socks
    finally:
        for s in socks:
            s.close()
        srv.stop()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--new-conns", type=int, default=0)
    ap.add_argument("--floor", action="store_true",
                    help="measure benchmarks/floor.py (a minimal callback-only TLS proxy) instead")
    ap.add_argument("--src", metavar="DIR",
                    help="run the proxy from this checkout (e.g. a git worktree: A/B without the working tree's edits)")
    ap.add_argument("--floor-io", choices=("membio", "sockbio", "syslib"),
                    help="measure benchmarks/floor_io.py with that TLS I/O design instead")
    ap.add_argument("--path", default="/small", help="/small (100 bytes), /1m (1 MiB) or /upload (1 MiB POST)")
    ap.add_argument("--resumed", type=int, default=0,
                    help="also count R connections that resume one TLS session (tlsload -r's cycle)")
    ap.add_argument("--handshakes", type=int, default=0,
                    help="also count H connections that only handshake and close (tlsload's cycle)")
    ap.add_argument("--by-object", action="store_true", help="also break the count down by shared object")
    ap.add_argument("--functions", type=int, default=0, metavar="K",
                    help="also list the K functions with the most instructions (exclusive)")
    ap.add_argument("--callers", action="append", metavar="SYMBOL",
                    help="also show who calls SYMBOL (e.g. memcpy), from the caller tree; repeatable")
    ap.add_argument("--inclusive", action="append", metavar="SYMBOL",
                    help="also show the instructions in functions named like SYMBOL, callees included; repeatable")
    ap.add_argument("--certs", type=int, default=0, metavar="N",
                    help="load N more certificates (as run.py's test 5) and send SNI = the middle one's "
                         "name, e.g. --certs 10000 --handshakes 300 against --sni bench.test --handshakes 300")
    ap.add_argument("--sni", help="the server name the clients send (default localhost)")
    ap.add_argument("--save", metavar="FILE", help="keep the keep-alive requests' callgrind dump here "
                    "(for callgrind_annotate --inclusive=yes FILE; the handshakes' in FILE.handshakes)")
    a = ap.parse_args()

    def adjust(b: run.Bench, srv: run.Server) -> None:
        if a.floor:
            b.as_floor(srv, "floor.py")
        if a.src:
            b.from_checkout(srv, a.src)
        if a.floor_io:
            b.as_floor(srv, "floor_io.py", a.floor_io)
        srv.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={srv.workdir / 'callgrind.out'}"] + srv.argv

    global SNI
    if a.certs:
        SNI = f"site{a.certs // 2:05d}.bench.test"   # (run.py's middle name)
    if a.sni:
        SNI = a.sni
    with warm_proxy(adjust, a.conns, a.path, timeout=900, certs=a.certs) as (srv, ctx, conns):
        out = srv.workdir / "callgrind.out"
        control(["-i", "on"], srv.pid)
        dump_ir(out, srv.pid)                 # start from zero
        t0 = time.monotonic()
        for i in range(a.requests):
            get(conns[i % len(conns)], a.path)
        t_req = time.monotonic() - t0
        ir_req, dump = dump_ir(out, srv.pid)
        print(f"keep-alive {'POST' if a.path == '/upload' else 'GET'} {a.path}: {ir_req / a.requests:,.0f} instructions per request "
              f"({a.requests} requests over {a.conns} connections, {t_req:.1f} s under callgrind)")
        report(dump, a)
        if a.save:
            shutil.copyfile(dump, a.save)
        if a.new_conns:
            for _ in range(a.new_conns):
                s = connect(ctx, srv.port)
                get(s, a.path)
                s.close()
            time.sleep(1.0)                   # let the proxy see the closes
            ir_new, dump = dump_ir(out, srv.pid)
            print(f"new connections: {ir_new / a.new_conns:,.0f} instructions per connection "
                  f"(full handshake + 1 request + close, {a.new_conns} connections)")
            report(dump, a)
        if a.handshakes:
            for _ in range(a.handshakes):
                handshake_only(ctx, srv.port)
            time.sleep(1.0)
            ir_hs, dump = dump_ir(out, srv.pid)
            print(f"handshakes: {ir_hs / a.handshakes:,.0f} instructions per connection "
                  f"(full handshake + close_notify both ways, no request, {a.handshakes} connections)")
            report(dump, a)
            if a.save:
                shutil.copyfile(dump, a.save + ".handshakes")
        if a.resumed:
            _, session = handshake_only(ctx, srv.port, want_session=True)
            time.sleep(1.0)
            dump_ir(out, srv.pid)   # (not counted: the full handshake that made the session)
            resumed = sum(handshake_only(ctx, srv.port, session)[0] for _ in range(a.resumed))
            time.sleep(1.0)
            ir_rs, dump = dump_ir(out, srv.pid)
            print(f"resumed handshakes: {ir_rs / a.resumed:,.0f} instructions per connection "
                  f"({resumed} of {a.resumed} resumed; close_notify both ways, no request)")
            report(dump, a)

if __name__ == "__main__":
    main()
