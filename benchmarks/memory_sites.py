#!/usr/bin/env python3
"""Where the memory of one idle TLS connection goes, by allocation site.

    .venv/bin/python benchmarks/memory_sites.py [--targets ours,sockbio,nginx] [--conns 100,500]
        [--rss] [--heaptrack] [--python] [--src DIR] [--env K=V] [--client idleconns|pq] [--top 40]

Each target (ours: the proxy from this checkout or --src, e.g. a git worktree; membio /
sockbio: floor_io.py; floor: floor.py; nginx, run as one process) is set up as conncost.py
--idle sets it up (run.Bench: same certificate, upstream, core pinning). A fresh server takes
N idle connections (handshake completed, held; one handshake at a time, so that no
handshake's temporary memory is counted) for two values of N, and every figure is a slope,
(value at N2 - value at N1) / (N2 - N1), which leaves start-up and fixed costs out:

- --rss: RSS per connection (run.py's measurement), and how much of it is the brk heap
  ([heap] in /proc/PID/smaps: C allocations) and how much anonymous mappings (pymalloc's
  arenas: Python objects);
- --heaptrack: the server under heaptrack with PYTHONMALLOC=malloc (so that Python objects
  are malloc calls too); the heap at its peak (all N connections open) by backtrace, each
  backtrace given an owner (OpenSSL's SSL object, record layers, session, key shares...,
  uvloop, Python objects: table OWNERS), bytes per connection. RSS minus this live heap is
  the allocators' overhead;
- --python (ours only): tracemalloc and gc inside the proxy (a wrapper around ``python -m
  proxy`` whose thread dumps when asked): Python bytes per connection by source line and
  live GC objects per connection by type (coroutines and bound methods by name).

The client is benchmarks/idleconns.py (Python's ssl on OpenSSL 3.0: key share X25519), or
with --client pq an OpenSSL 4.0 client (pyOpenSSL) offering its default key shares,
X25519MLKEM768 and X25519, as current browsers do.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

# Runs the proxy with a thread that, when the file OUT.go appears, writes Python memory by line
# and objects by type to OUT.N (a thread: a signal handler would only run once the event loop
# wakes up for something else, i.e. when the connections close).
PY_WRAPPER = r'''
import gc, os, signal, sys, tracemalloc, collections, json, threading, time
tracemalloc.start(6)
out = sys.argv.pop(1)
def watch():
    while True:
        time.sleep(0.1)
        if os.path.exists(out + ".go"):
            os.unlink(out + ".go")
            dump(0, None)
threading.Thread(target=watch, daemon=True).start()
def dump(signum, frame):
    gc.collect()
    snap = tracemalloc.take_snapshot()
    lines = collections.Counter()
    counts = collections.Counter()
    for st in snap.statistics("traceback"):
        # the innermost frame inside the proxy's own code, else the innermost frame
        key = None
        for fr in st.traceback:
            if "/proxy/" in fr.filename:
                key = f"{fr.filename.split('/proxy/')[-1]}:{fr.lineno}"
                break
        if key is None:
            fr = st.traceback[0]
            key = f"{fr.filename.rsplit('/', 2)[-2:]} :{fr.lineno}".replace("'", "")
        lines[key] += st.size
        counts[key] += st.count
    types = collections.Counter()
    tsize = collections.Counter()
    for o in gc.get_objects():
        t = type(o).__qualname__
        m = type(o).__module__
        k = f"{m}.{t}"
        try:   # which coroutine, which bound method, which callback
            if t == "coroutine":
                k += " " + o.cr_code.co_qualname
            elif t == "method":
                k += " " + o.__func__.__qualname__
            elif t in ("TimerHandle", "Handle"):
                k += " " + getattr(o._callback, "__qualname__", "?")
        except Exception:
            pass
        types[k] += 1
        try:
            tsize[k] += sys.getsizeof(o)
        except Exception:
            pass
    with open(out + f".{signum}.{dump.n}", "w") as f:
        json.dump({"traced": tracemalloc.get_traced_memory()[0], "lines": lines, "counts": counts,
                   "types": types, "tsize": tsize}, f)
    dump.n += 1
dump.n = 0
import runpy
sys.argv[0] = "proxy"
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
'''


# An idle client on OpenSSL 4.0 (pyOpenSSL, cryptography's OpenSSL): its default key shares
# are X25519MLKEM768 and X25519, as browsers and OpenSSL 3.5+ clients offer them today, where
# idleconns.py (Python's ssl, OpenSSL 3.0) offers X25519 only. GROUPS: a groups list to offer
# instead ("" = OpenSSL's default).
PQ_CLIENT = r'''
import socket, sys
from OpenSSL import SSL
port, n, groups = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
ctx.set_alpn_protos([b"http/1.1"])
if groups:
    from OpenSSL.SSL import _lib
    assert _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) == 1
held, failed, group = [], 0, ""
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    c = SSL.Connection(ctx, s)
    c.set_tlsext_host_name(b"localhost")
    c.set_connect_state()
    try:
        c.do_handshake()
        held.append(c)
    except SSL.Error as e:
        failed += 1
print(f"ready {len(held)} {failed} 0 {c.get_protocol_version_name()} {c.get_cipher_name()}", flush=True)
sys.stdin.readline()
'''
CLIENT = "idleconns"   # or "pq": PQ_CLIENT with the groups in PQ_GROUPS
PQ_GROUPS = ""


@contextlib.contextmanager
def held(b: run.Bench, srv: run.Server, n: int, conc: int):
    if CLIENT == "pq":
        script = b.workdir / "pqclient.py"
        script.write_text(PQ_CLIENT)
        argv = [b.venv_python, str(script), str(srv.port), str(n), PQ_GROUPS]
    else:
        argv = [b.venv_python, str(HERE / "idleconns.py"), str(srv.port), str(n), "localhost", str(conc)]
    client = subprocess.Popen(
        run.pinned(run.CLIENT_CORE, argv),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        if not line.startswith("ready") or int(line.split()[1]) < n:
            raise SystemExit(f"{srv.name}: client: {line} {srv.tail(300)}")
        time.sleep(2.0)
        yield
    finally:
        run.release_idle_client(client)


def served_pid(srv: run.Server) -> int:
    """The server process itself under heaptrack's shell script (its first argument is not a shell)."""
    for p in run.tree_pids(srv.pid):
        try:
            argv0 = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0.endswith(("python", "nginx")):
            return p
    return srv.pid


def heap_kib(pid: int) -> tuple[int, int]:
    """([heap] Rss, anonymous Rss outside [heap]) in KiB, from smaps."""
    heap = anon = 0
    cur = None
    for line in open(f"/proc/{pid}/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            cur = parts[5] if len(parts) > 5 else ""
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            if cur == "[heap]":
                heap += kib
            elif cur == "":
                anon += kib
    return heap, anon


def make(b: run.Bench, name: str, src: str | None, env: list[str]) -> run.Server:
    srv = b.make_variant(name, (src or str(run.REPO)) if name == "ours" else None)
    if name == "nginx":   # one process, so that heaptrack sees the connections
        conf = Path(srv.argv[srv.argv.index("-c") + 1])
        conf.write_text(conf.read_text().replace("master_process on;", "master_process off;"))
    srv.env.update(kv.split("=", 1) for kv in env)
    return srv


def measure_rss(b, name, src, env, ns, conc):
    vals = []
    for n in ns:
        srv = make(b, name, src, env)
        srv.start()
        try:
            time.sleep(1.0)
            pid = served_pid(srv)
            r0, h0 = run.rss_kib(srv.pid), heap_kib(pid)
            with held(b, srv, n, conc):
                r1, h1 = run.rss_kib(srv.pid), heap_kib(pid)
            vals.append((n, r1 - r0, h1[0] - h0[0], h1[1] - h0[1]))
        finally:
            srv.stop()
    for n, r, h, a in vals:
        print(f"  {name:7s} N={n:5d} RSS +{r / n:5.2f} KiB/conn  [heap] +{h / n:5.2f}  anon mmaps +{a / n:5.2f}")
    (n1, r1, h1, a1), (n2, r2, h2, a2) = vals[0], vals[-1]
    if n2 != n1:
        d = n2 - n1
        print(f"  {name:7s} slope N={n1}->{n2}: RSS {(r2 - r1) / d:5.2f} KiB/conn, [heap] {(h2 - h1) / d:5.2f}, "
              f"anon {(a2 - a1) / d:5.2f}")


def peak_stacks(path: Path) -> dict[str, int]:
    """heaptrack's peak consumption by full backtrace (root first, ';'-separated)."""
    out = Path(str(path) + ".peak")
    run.run(["heaptrack_print", "-f", str(path), "-p", "0", "-a", "0", "-T", "0",
             "--flamegraph-cost-type", "peak", "-F", str(out)], 900)
    stacks: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines():
        st, _, cost = line.rpartition(" ")
        if st and cost.isdigit():
            stacks[st] = stacks.get(st, 0) + int(cost)
    return stacks


# Owner of an allocation: the first of these (innermost first) found in its backtrace.
OWNERS = [
    # OpenSSL, by what the bytes are for
    ("tls_construct_new_session_ticket", "OpenSSL: session ticket construction (kept)"),
    ("ssl_session_dup", "OpenSSL: SSL_SESSION (dup for tickets)"),
    ("SSL_SESSION_new", "OpenSSL: SSL_SESSION"),
    ("ssl_get_new_session", "OpenSSL: SSL_SESSION"),
    ("tls_process_client_hello", "OpenSSL: ClientHello state (kept)"),
    ("tls_parse_ctos_key_share", "OpenSSL: client key share (peer_tmp)"),
    ("tls_construct_stoc_key_share", "OpenSSL: server key share / ECDHE key"),
    ("ssl_generate_pkey", "OpenSSL: server key share / ECDHE key"),
    ("ssl_derive", "OpenSSL: key derivation"),
    ("tls13_change_cipher_state", "OpenSSL: TLS 1.3 cipher state (record layer keys)"),
    ("tls_new_record_layer", "OpenSSL: record layer object"),
    ("ssl_set_new_record_layer", "OpenSSL: record layer object"),
    ("tls_setup_read_buffer", "OpenSSL: record read buffer"),
    ("tls_setup_write_buffer", "OpenSSL: record write buffer"),
    ("ssl3_init_finished_mac", "OpenSSL: handshake transcript"),
    ("ssl3_digest_cached_records", "OpenSSL: handshake transcript"),
    ("ssl_handshake_hash", "OpenSSL: handshake transcript"),
    ("BUF_MEM", "OpenSSL: BIO/handshake buffers"),
    ("ossl_ssl_connection_new", "OpenSSL: SSL object (SSL_new)"),
    ("SSL_new", "OpenSSL: SSL object (SSL_new)"),
    ("SSL_set_SSL_CTX", "OpenSSL: SSL_set_SSL_CTX (context switch)"),
    ("BIO_new", "OpenSSL: BIOs"),
    ("SSL_do_handshake", "OpenSSL: other handshake allocations"),
    ("SSL_read", "OpenSSL: SSL_read"),
    ("SSL_write", "OpenSSL: SSL_write"),
    ("SSL_", "OpenSSL: other SSL_ calls"),
    ("CRYPTO_", "OpenSSL: other"),
    # bindings, event loop, interpreter
    ("Connection.__init__", "pyOpenSSL Connection"),
    ("allocate_owning_object", "cffi: ffi.new buffers"),
    ("_cffi_", "cffi"),
    ("httptools", "httptools parser objects"),
    ("uvloop", "uvloop/libuv"),
    ("uv_", "uvloop/libuv"),
    ("sock_", "Python socket"),
    ("_PyObject_GC_New", "Python objects (GC)"),
    ("gc_alloc", "Python objects (GC)"),
    ("dictresize", "Python dicts"),
    ("new_keys_object", "Python dicts"),
    ("_PyObject_Malloc", "Python objects (other)"),
    ("PyMem_", "Python other"),
]


def owner(stack: str) -> str:
    frames = stack.split(";")
    # only the frames inside the innermost Python frame: the interpreter and the event loop
    # are on every stack further out
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].startswith("_PyEval_EvalFrameDefault"):
            frames = frames[i:]
            break
    for key, label in OWNERS:
        for fr in reversed(frames):
            if key in fr:
                return label
    return "other: " + frames[-1][:60]


def run_heaptrack(b, name, src, env, ns, conc, top):
    files = []
    for n in ns:
        srv = make(b, name, src, env + ["PYTHONMALLOC=malloc"])
        out = srv.workdir / f"heaptrack-{n}"
        srv.argv = ["heaptrack", "-o", str(out)] + srv.argv
        srv.start(timeout=300)
        try:
            time.sleep(1.0)
            with held(b, srv, n, conc):
                pass
        finally:
            # SIGTERM to the server process only; heaptrack's shell waits for its writer
            with contextlib.suppress(ProcessLookupError):
                os.kill(served_pid(srv), signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.proc.wait(120)
            srv.stop()
        files.append(sorted(srv.workdir.glob(f"heaptrack-{n}.*"))[0])
    a, z = peak_stacks(files[0]), peak_stacks(files[-1])
    d = ns[-1] - ns[0]
    by_owner: dict[str, float] = {}
    by_stack = []
    for st in set(a) | set(z):
        v = (z.get(st, 0) - a.get(st, 0)) / d
        if v:
            by_owner[owner(st)] = by_owner.get(owner(st), 0) + v
            by_stack.append((v, st))
    total = sum(by_owner.values())
    print(f"=== {name}: heap at its peak (heaptrack, PYTHONMALLOC=malloc), N={ns[0]} -> {ns[-1]}: "
          f"{total:.0f} bytes per connection ===")
    for lbl, v in sorted(by_owner.items(), key=lambda kv: -abs(kv[1])):
        if abs(v) >= 4:
            print(f"  {v:8.0f} B  {lbl}")
    print("--- top backtraces (innermost 8 frames) ---")
    for v, st in sorted(by_stack, key=lambda x: -abs(x[0]))[:top]:
        fr = [f for f in st.split(";") if f]
        print(f"  {v:8.0f} B  {owner(st)}:  " + " <- ".join(reversed(fr[-8:])))


def run_python(b, src, env, ns, conc, top):
    import json
    dumps = []
    for n in ns:
        srv = make(b, "ours", src, env)
        outp = srv.workdir / "pydump"
        wrapper = srv.workdir / "pywrap.py"
        wrapper.write_text(PY_WRAPPER)
        srv.argv = [b.proxy_python, str(wrapper), str(outp)] + srv.argv[3:]   # after `-m proxy`
        srv.start()
        try:
            time.sleep(1.0)
            with held(b, srv, n, conc):
                Path(str(outp) + ".go").touch()
                deadline = time.monotonic() + 120
                while not list(srv.workdir.glob("pydump.*.*")) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)
        finally:
            srv.stop()
        f = sorted(srv.workdir.glob("pydump.*.*"))[-1]
        dumps.append(json.loads(f.read_text()))
        f.unlink()
    d = ns[-1] - ns[0]
    a, z = dumps[0], dumps[-1]
    print(f"=== ours: Python (tracemalloc), N={ns[0]} -> {ns[-1]}: "
          f"{(z['traced'] - a['traced']) / d:.0f} bytes per connection traced ===")
    rows = sorted(((z["lines"].get(k, 0) - a["lines"].get(k, 0)) / d, k,
                   (z["counts"].get(k, 0) - a["counts"].get(k, 0)) / d) for k in set(z["lines"]) | set(a["lines"]))
    for size, k, cnt in sorted(rows, reverse=True)[:top]:
        if abs(size) >= 8:
            print(f"  {size:8.0f} B  {cnt:6.2f} blocks  {k}")
    print("=== ours: GC-tracked objects per connection by type (count, getsizeof bytes) ===")
    rows = sorted(((z["tsize"].get(k, 0) - a["tsize"].get(k, 0)) / d, k,
                   (z["types"].get(k, 0) - a["types"].get(k, 0)) / d) for k in set(z["types"]) | set(a["types"]))
    for size, k, cnt in sorted(rows, reverse=True)[:top]:
        if abs(cnt) >= 0.05:
            print(f"  {size:8.0f} B  {cnt:6.2f}  {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="ours,sockbio")
    ap.add_argument("--conns", default="100,500", help="two connection counts N1,N2")
    ap.add_argument("--concurrency", type=int, default=1, help="handshakes in flight while opening")
    ap.add_argument("--heaptrack", action="store_true")
    ap.add_argument("--python", action="store_true")
    ap.add_argument("--rss", action="store_true")
    ap.add_argument("--src", help="ours from this checkout")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="server environment")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (heaptrack files)")
    ap.add_argument("--client", choices=["idleconns", "pq"], default="idleconns",
                    help="pq: an OpenSSL 4.0 client (pyOpenSSL) offering its default key shares "
                         "(X25519MLKEM768, X25519) instead of idleconns.py (OpenSSL 3.0, X25519)")
    ap.add_argument("--client-groups", default="", help="with --client pq: the groups it offers")
    a = ap.parse_args()
    global CLIENT, PQ_GROUPS
    CLIENT, PQ_GROUPS = a.client, a.client_groups
    ns = [int(x) for x in a.conns.split(",")]
    b = run.Bench(quick=True, only=["ours"], keep=a.keep)
    b.setup()
    try:
        for name in a.targets.split(","):
            if a.rss:
                measure_rss(b, name, a.src, a.env, ns, a.concurrency)
            if a.heaptrack:
                run_heaptrack(b, name, a.src, a.env, ns, a.concurrency, a.top)
            if a.python and name == "ours":
                run_python(b, a.src, a.env, ns, a.concurrency, a.top)
    finally:
        b.close()


if __name__ == "__main__":
    main()
