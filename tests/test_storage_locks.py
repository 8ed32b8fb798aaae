"""Locks across real processes: each locker is a separate Python process (its own event loop,
its own Storage instance), as separate proxy instances would be.

- ten processes contend for one lock; inside the critical section each appends enter/exit to a
  shared log and does a read-sleep-write increment of a shared counter file (a lost-update
  detector): no overlap, no lost increment;
- a holder killed with SIGKILL stops renewing; a waiting process takes the lock over once the
  (2 s) lease has lapsed, and not while the holder was alive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tests.infra.gcsserver import gcs_server  # noqa: F401  (fixture)
from tests.infra.s3server import s3_server  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''
    import asyncio, os, sys, time
    from proxy.storage import open_storage

    url, name, log, counter, hold, lease, mode = sys.argv[1:8]

    def append(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)

    async def main():
        st = open_storage(url, lease_seconds=float(lease))
        me = str(os.getpid())
        append(f"ready {me} {time.time():.6f}")
        await st.lock(name)
        append(f"enter {me} {time.time():.6f}")
        if mode == "hold-forever":
            while True:
                await asyncio.sleep(3600)
        with open(counter) as f:
            n = int(f.read() or 0)
        await asyncio.sleep(float(hold))
        with open(counter + ".tmp", "w") as f:
            f.write(str(n + 1))
        os.replace(counter + ".tmp", counter)
        append(f"exit {me} {time.time():.6f}")
        await st.unlock(name)
        await st.close()

    asyncio.run(main())
''')


@pytest.fixture(params=["file", "s3", "gcs"])
def shared(request, tmp_path):
    """(autocert_dir URL, env for subprocesses) for one backend, unique prefix per test."""
    prefix = f"locks-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env["PYTHONPATH"] = ROOT
    if request.param == "file":
        return str(tmp_path / "store"), env
    srv = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    env.update(srv.env)
    return srv.url(prefix), env


def spawn(tmp_path, url, env, name, log, counter, hold=0.05, lease=2.0, mode="once"):
    script = tmp_path / "locker.py"
    if not script.exists():
        script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), url, name, str(log), str(counter),
                             str(hold), str(lease), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_log(log) -> list[tuple[str, int, float]]:
    if not os.path.exists(log):
        return []
    out = []
    for line in open(log).read().splitlines():
        kind, pid, ts = line.split()
        out.append((kind, int(pid), float(ts)))
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def finish(procs, timeout: float):
    deadline = time.monotonic() + timeout
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate(timeout=10)
            errors.append(f"pid {p.pid} did not finish in time: {err.decode()[-2000:]}")
            continue
        if p.returncode != 0:
            errors.append(f"pid {p.pid} exited {p.returncode}: {err.decode()[-2000:]}")
    assert not errors, "\n".join(errors)


def test_ten_processes_never_overlap(shared, tmp_path):
    url, env = shared
    log, counter = tmp_path / "log", tmp_path / "counter"
    counter.write_text("0")
    procs = [spawn(tmp_path, url, env, "issue-example.com", log, counter) for _ in range(10)]
    try:
        finish(procs, timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    events = [e for e in read_log(log) if e[0] != "ready"]
    assert len(events) == 20, events
    # The log is appended inside the critical section (O_APPEND: file order = real order):
    # a correct lock gives enter/exit pairs of the same process, strictly alternating.
    for i in range(0, 20, 2):
        (k1, p1, t1), (k2, p2, t2) = events[i], events[i + 1]
        assert (k1, k2) == ("enter", "exit") and p1 == p2, events[i:i + 2]
        if i:
            assert t1 >= events[i - 1][2]          # entered after the previous exit
    assert len({p for _, p, _ in events}) == 10
    assert counter.read_text() == "10"             # no lost update


def test_killed_holder_loses_lock_after_lease(shared, tmp_path):
    url, env = shared
    lease = 2.0
    log, counter = tmp_path / "log", tmp_path / "counter"
    counter.write_text("0")
    holder = spawn(tmp_path, url, env, "renew-example.com", log, counter, lease=lease,
                   mode="hold-forever")
    waiter = None
    try:
        wait_for(lambda: any(k == "enter" for k, _, _ in read_log(log)), 20, "holder to lock")
        waiter = spawn(tmp_path, url, env, "renew-example.com", log, counter, lease=lease)
        wait_for(lambda: any(k == "ready" and p == waiter.pid for k, p, _ in read_log(log)),
                 20, "waiter to start")
        # The live holder renews its lease: the waiter stays out well past one lease.
        time.sleep(lease * 1.5)
        assert [p for k, p, _ in read_log(log) if k == "enter"] == [holder.pid]
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.time()
        holder.wait(timeout=10)
        wait_for(lambda: any(k == "enter" and p == waiter.pid for k, p, _ in read_log(log)),
                 lease * 5, "waiter to take over the lapsed lock")
        finish([waiter], timeout=20)
        took_over_at = next(t for k, p, t in read_log(log) if k == "enter" and p == waiter.pid)
        # not before the dead holder's lease could have lapsed (its last renewal was at most
        # lease/3 before the kill, so expiry came at least 2/3 lease after its last renewal)
        assert took_over_at - killed_at > lease * 2 / 3 - 0.1
        assert counter.read_text() == "1"
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
