"""``workers: N``: N processes, each a full proxy instance, sharing the listening ports
(SO_REUSEPORT: the kernel spreads connections) and the certificate storage (its locks make
exactly one of them order a certificate). The parent only supervises: it forwards SIGTERM,
SIGINT and SIGHUP, and restarts a worker that dies unexpectedly (at most once a second).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from .config import Options
from .listening import ListenError

log = logging.getLogger("proxy.workers")
CANNOT_LISTEN = 3   # a worker's exit code: restarting it would fail the same way


def _child(options: Options, runner: Callable) -> None:
    from .app import App
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    code = 0
    try:
        runner(App(options).run_forever())
    except OSError as e:
        log.error("worker %d cannot start: %s", os.getpid(), e)
        code = CANNOT_LISTEN if isinstance(e, ListenError) else 1
    except BaseException:
        log.exception("worker %d crashed", os.getpid())
        code = 1
    os._exit(code)


def run_workers(options: Options, runner: Callable) -> int:
    children: dict[int, float] = {}
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            _child(options, runner)
        children[pid] = time.monotonic()

    def forward(sig, _frame) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for _ in range(options.workers):
        spawn()
    log.info("started %d workers: %s", options.workers, sorted(children))
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        if code == CANNOT_LISTEN:   # stop them all, as a single process would exit
            forward(signal.SIGTERM, None)
            exit_code = 1
            continue
        log.error("worker %d exited with %d; restarting it", pid, code)
        if started is not None and time.monotonic() - started < 1.0:
            time.sleep(1.0)
        spawn()
    return exit_code
