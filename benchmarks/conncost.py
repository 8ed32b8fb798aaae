#!/usr/bin/env python3
"""Where a new TLS connection's server cost goes, ours next to nginx: CPU split user/system
and the system calls per connection.

    .venv/bin/python benchmarks/conncost.py [--seconds S] [--only ours,nginx] [--perf] [--reuse]

Each server (set up exactly as in run.py: same certificate, pinned to core 0) takes
`tlsload` full handshakes (TCP connect -> handshake -> close_notify -> read to EOF -> close)
from 4 client processes on core 1. Printed per connection:
- user and system CPU microseconds (from /proc, the whole process tree), over S seconds;
- the system calls, by name, counted by `strace -f -c` in a second, separate run (strace
  slows the server down a lot, so its run gives no timing; the counts per connection are
  what it is for);
- with --perf, the share of CPU by shared object and the top symbols from `perf record -e
  cpu-clock` (a timer sample: this VM has no hardware counters), kernel included.
Wall-clock figures on this shared VM move; the syscall counts do not. The figures are for
telling where ours spends more than nginx, not a benchmark result (that is run.py).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def proc_times(root: int) -> tuple[float, float, int]:
    """(user, system) CPU seconds and minor page faults over a process tree."""
    u = s = flt = 0
    for p in run.tree_pids(root):
        try:
            st = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = st[st.rfind(")") + 2:].split()
        flt += int(f[7])
        u += int(f[11])
        s += int(f[12])
    return u / run.CLK_TCK, s / run.CLK_TCK, flt


WRK_PATH = None   # set by --wrk: load with wrk -c4 on this path instead of tlsload


def tlsload(b: run.Bench, srv: run.Server, seconds: float, reuse: bool) -> int:
    """Operations done: new connections (tlsload), or with --wrk MiB moved (1 MiB requests)."""
    if WRK_PATH:
        script = b.workdir / "post.lua" if WRK_PATH == "/upload" else None
        return b.wrk(srv, WRK_PATH, max(1, round(seconds)), 4, script)["requests"]
    cmd = [str(b.tlsload), "-p", str(srv.port), "-s", "localhost", "-c", str(b.hs_procs),
           "-d", str(seconds)] + (["-r"] if reuse else [])
    r = run.run(run.pinned(run.CLIENT_CORE, cmd), seconds + 60)
    m = re.search(r"connections=(\d+) failures=(\d+)", r.stdout)
    if not m:
        raise SystemExit(f"tlsload: {r.stdout} {r.stderr}")
    return int(m.group(1))


def strace_counts(b: run.Bench, srv: run.Server, seconds: float, reuse: bool) -> tuple[int, dict[str, int], dict[str, int]]:
    """Connections, and syscalls -> calls / errors, under strace -f -c on the server's tree."""
    out = srv.workdir / "strace.txt"
    pids = [p for p in run.tree_pids(srv.pid)]
    argv = ["strace", "-f", "-c", "-o", str(out)]
    for p in pids:
        argv += ["-p", str(p)]
    st = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    n = tlsload(b, srv, seconds, reuse)
    time.sleep(0.5)
    st.terminate()
    st.wait(30)
    calls: dict[str, int] = {}
    errors: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and not parts[-1].startswith("total"):
            name = parts[-1]
            calls[name] = int(parts[3])
            errors[name] = int(parts[4]) if len(parts) == 6 else 0
    return n, calls, errors


def perf_profile(b: run.Bench, srv: run.Server, seconds: float, reuse: bool) -> str:
    data = srv.workdir / "perf.data"
    pids = ",".join(str(p) for p in run.tree_pids(srv.pid))
    pr = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o", str(data), "-p", pids],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    tlsload(b, srv, seconds, reuse)
    pr.send_signal(2)
    pr.wait(60)
    out = []
    for sort in ("dso", "dso,sym"):
        r = run.run(["perf", "report", "-i", str(data), "--stdio", "--sort", sort, "--percent-limit",
                     "0.8" if sort == "dso" else "0.3"], 120)
        out.append("\n".join(ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", default="ours,nginx")
    ap.add_argument("--reuse", action="store_true", help="resumption on (tlsload -r)")
    ap.add_argument("--perf", action="store_true", help="also a perf cpu-clock profile by object and symbol")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--floor", action="store_true", help="also measure benchmarks/floor.py (as 'floor')")
    ap.add_argument("--floor-io", action="store_true",
                    help="also measure benchmarks/floor_io.py membio, sockbio and syslib (as 'membio', 'sockbio', 'syslib')")
    ap.add_argument("--wrk", metavar="PATH", help="bulk load instead: wrk -c4 on /1m, /upload "
                    "or /small; figures per request")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure the proxy from another checkout (e.g. a git worktree of the "
                         "last commit) as 'base', same set-up: A/B in one run")
    ap.add_argument("--base-env", action="append", metavar="K=V", help="environment for 'base' (repeatable)")
    ap.add_argument("--base-python", metavar="PATH",
                    help="run 'base' on this interpreter (a venv's python with the proxy's "
                         "dependencies installed, e.g. one made from the distribution's python3)")
    ap.add_argument("--ours", metavar="DIR", help="run 'ours' from this checkout (default: this one)")
    ap.add_argument("--idle", type=int, metavar="N", help="instead: memory per idle TLS connection, N connections")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the CPU measurement, servers interleaved")
    a = ap.parse_args()
    b = run.Bench(quick=True, only=a.only.split(","), keep=False)
    b.setup()
    results = {}
    try:
        global WRK_PATH
        WRK_PATH = a.wrk
        names = a.only.split(",") + (["floor"] if a.floor else []) + (["base"] if a.baseline else []) \
            + (["membio", "sockbio", "syslib"] if a.floor_io else [])
        names = [n for n in names if n]
        servers = {}
        for name in names:
            if name == "base":
                srv = b.make_variant("base", a.baseline)
                srv.env.update(kv.split("=", 1) for kv in a.base_env or ())
                if a.base_python:
                    srv.argv[0] = a.base_python
            else:
                srv = b.make_variant(name, a.ours if name == "ours" else None)
            servers[name] = srv
        if a.idle:   # memory per idle TLS connection on each fresh server (run.py's method)
            b.n_idle = a.idle
            try:
                for name, srv in servers.items():
                    srv.start()
                    m = b.idle_memory(srv)
                    print(f"  {name:7s} idle: {m['kib_per_conn']:5.1f} KiB per connection "
                          f"({m['opened']} connections, RSS {m['before_kib']} -> {m['after_kib']} KiB)")
                    srv.stop()
            finally:
                for srv in servers.values():
                    srv.stop()
            return
        try:
            for srv in servers.values():
                srv.start()
                tlsload(b, srv, 1.0, a.reuse)                   # warm-up
            for name in names:
                results[name] = {"n": 0, "user": 0.0, "sys": 0.0, "flt": 0}
            for _ in range(a.rounds):
                for name, srv in servers.items():
                    u0, s0, f0 = proc_times(srv.pid)
                    n = tlsload(b, srv, a.seconds, a.reuse)
                    u1, s1, f1 = proc_times(srv.pid)
                    r = results[name]
                    r["n"] += n
                    r["flt"] += f1 - f0
                    r["user"] += u1 - u0
                    r["sys"] += s1 - s0
            for name, srv in servers.items():
                r = results[name]
                r["user"] = r["user"] / r["n"] * 1e6
                r["sys"] = r["sys"] / r["n"] * 1e6
                r["flt"] = r["flt"] / r["n"]
                r["n"] /= a.rounds
                if not a.no_strace:
                    r["strace"] = strace_counts(b, srv, 3.0, a.reuse)
                if a.perf:
                    r["perf"] = perf_profile(b, srv, a.seconds, a.reuse)
        finally:
            for srv in servers.values():
                srv.stop()
    finally:
        b.close()
    names = list(results)
    if a.wrk:
        print(f"per request (wrk -c4 {a.wrk}):")
    else:
        print("per connection (tlsload, %s):" % ("resumption on" if a.reuse else "full handshakes"))
    for name in names:
        r = results[name]
        print(f"  {name:7s} {r['n'] / a.seconds:7.0f} {'req' if a.wrk else 'conn'}/s   CPU user {r['user']:6.0f} us  system {r['sys']:6.0f} us"
              f"  total {r['user'] + r['sys']:6.0f} us   page faults {r['flt']:6.1f}")
    if not a.no_strace:
        allsys = sorted({s for n in names for s in results[n]["strace"][1]},
                        key=lambda s: -max(results[n]["strace"][1].get(s, 0) / results[n]["strace"][0] for n in names))
        print("system calls per %s (strace -f -c; errors in brackets):" % ("request" if a.wrk else "connection"))
        print("  %-18s" % "" + "".join(f"{n:>16s}" for n in names))
        tot = {n: 0.0 for n in names}
        for s in allsys:
            row = []
            for n in names:
                conns, calls, errs = results[n]["strace"]
                c = calls.get(s, 0) / conns
                tot[n] += c
                e = errs.get(s, 0) / conns
                row.append(f"{c:8.2f}" + (f" [{e:5.2f}]" if e else "        "))
            print("  %-18s" % s + "".join(f"{x:>16s}" for x in row))
        print("  %-18s" % "total" + "".join(f"{tot[n]:8.2f}        " for n in names))
    if a.perf:
        for n in names:
            print(f"--- perf {n} ---")
            print(results[n]["perf"])


if __name__ == "__main__":
    main()
