"""Profile our proxy under the keep-alive load of run.py with py-spy (sampling, native frames).

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile_ours.py [SECONDS]

Same set-up as run.py (upstream nginx on core 1, proxy on core 0, wrk -c50 on core 1).
Prints the top functions by self time and by inclusive time, and the upstream connection
reuse (upstream requests per new upstream connection) seen during the run.
"""
from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def main() -> None:
    secs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    b = run.Bench(quick=True, only=["ours"], keep=False)
    b.setup()
    srv = b.make_server("ours")
    srv.start()
    try:
        b.wrk(srv, "/small", 2, 50)   # warm-up
        out = b.workdir / "profile.txt"
        wrk = subprocess.Popen(run.pinned(run.CLIENT_CORE, [
            "wrk", "-t1", "-c50", f"-d{secs + 3}s", f"https://localhost:{srv.port}/small"]),
            stdout=subprocess.PIPE, text=True)
        a0, r0 = b.upstream_status()
        time.sleep(1)
        subprocess.run([str(run.REPO / ".venv/bin/py-spy"), "record", "--native", "--format", "raw",
                        "-r", "200", "-d", str(secs), "-o", str(out), "-p", str(srv.pid)],
                       check=True, capture_output=True)
        wrk_out = wrk.communicate()[0]
        a1, r1 = b.upstream_status()
        print(wrk_out)
        print(f"upstream: {r1 - r0 - 1} requests over {a1 - a0 - 1} new connections")
        self_t: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            n = int(n)
            frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                      if " (" in f else f for f in stack.split(";")]
            total += n
            self_t[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        print(f"\n{total} samples. Top self time:")
        for f, n in self_t.most_common(25):
            print(f"  {100 * n / total:5.1f}%  {f}")
        print("\nTop inclusive time:")
        for f, n in incl.most_common(45):
            print(f"  {100 * n / total:5.1f}%  {f}")
        keep = run.HERE / "results" / "profile-ours.txt"
        keep.write_text(out.read_text())
    finally:
        srv.stop()
        b.close()


if __name__ == "__main__":
    main()
