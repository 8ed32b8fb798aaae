#!/usr/bin/env python3
"""Python bytecodes executed per proxied keep-alive request, by function (or by line).

    .venv/bin/python benchmarks/opcodes.py [--requests N] [--path /small|/1m] [--top K]
                                           [--lines FUNCTION]

The proxy spends most of a small request in the interpreter (instructions.py --by-object:
about 85 % in libpython), so the number of bytecodes each function executes shows where a
request's time goes, function by function, which callgrind cannot (it sees only the
interpreter's C functions). Counting is exact and repeatable: the proxy runs with a tracer
(sys.settrace with f_trace_opcodes) switched on by SIGUSR1 after warm-up and off by SIGUSR2
after exactly N requests over 10 keep-alive TLS connections. Tracing makes the proxy slow,
so this tool says nothing about time: instructions.py stays the measure, this one says where
to look. ``--lines FUNCTION`` counts that function's bytecodes line by line instead.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def serve() -> None:
    """Runs the proxy (argv after --serve) with the tracer behind SIGUSR1/SIGUSR2."""
    counts: collections.Counter = collections.Counter()
    only = os.environ.get("OPCODES_LINES")
    out = os.environ["OPCODES_OUT"]

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            co = frame.f_code
            if only is None:
                counts[f"{Path(co.co_filename).name}:{co.co_firstlineno}:{co.co_name}"] += 1
            elif co.co_name == only:
                counts[f"{Path(co.co_filename).name}:{frame.f_lineno}"] += 1
        return tracer

    def start(*_):
        counts.clear()
        sys.settrace(tracer)

    def stop(*_):
        sys.settrace(None)
        Path(out).write_text("".join(f"{v} {k}\n" for k, v in counts.most_common()))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from proxy.cli import main as proxy_main
    sys.argv = ["autocert-proxy"] + sys.argv[sys.argv.index("--serve") + 1:]
    sys.exit(proxy_main())


def main() -> None:
    sys.path.insert(0, str(HERE))
    import instructions
    import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--path", default="/small", help="/small (100 bytes) or /1m (1 MiB)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--lines", metavar="FUNCTION", help="count this function's bytecodes by line")
    ap.add_argument("--handshakes", type=int, default=0, metavar="N",
                    help="count N new connections instead (tlsload's cycle: handshake, close_notify, "
                         "no request)")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="acp-opcodes-")) / "counts.txt"

    def adjust(b: run.Bench, srv: run.Server) -> None:
        srv.env = dict(srv.env or os.environ, OPCODES_OUT=str(out),
                       AUTOCERT_PROXY_PURE_PYTHON="1")   # the tracer sees Python source only
        if a.lines:
            srv.env["OPCODES_LINES"] = a.lines
        srv.argv = [b.proxy_python, str(Path(__file__).resolve()), "--serve"] + srv.argv[3:]   # after `-m proxy`

    with instructions.warm_proxy(adjust, 10, a.path, timeout=120) as (srv, ctx, conns):
        for _ in range(20):
            instructions.handshake_only(ctx, srv.port)
        os.kill(srv.pid, signal.SIGUSR1)
        time.sleep(0.3)
        if a.handshakes:
            for _ in range(a.handshakes):
                instructions.handshake_only(ctx, srv.port)
            time.sleep(0.5)   # let the proxy see the closes
        else:
            for i in range(a.requests):
                instructions.get(conns[i % len(conns)], a.path)
        os.kill(srv.pid, signal.SIGUSR2)
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.1)
        time.sleep(0.3)
    try:
        rows = [(int(v), k) for v, k in (line.split(" ", 1) for line in out.read_text().splitlines())]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    total = sum(v for v, _ in rows)
    what = f"in {a.lines}()" if a.lines else "in all"
    per = a.handshakes or a.requests
    if a.handshakes:
        print(f"new connections: {total / per:,.0f} bytecodes per connection {what} "
              f"(handshake + close_notify, no request; {per} connections)")
    else:
        print(f"keep-alive GET {a.path}: {total / per:,.0f} bytecodes per request {what} "
              f"({per} requests over {len(conns)} connections)")
    if a.lines:
        rows.sort(key=lambda r: int(r[1].rsplit(":", 1)[1]) if r[1].rsplit(":", 1)[1].isdigit() else 0)
    for v, k in rows[: a.top if not a.lines else None]:
        print(f"{v / per:9.1f}  {k}")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
    else:
        main()
