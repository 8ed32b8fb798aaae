"""A directory made read-only for real, also for root (the tests run as root, who ignores
permission bits): a read-only bind mount of it onto itself, so every write below it fails with
EROFS, as on a disk the kernel remounted read-only after errors. Falls back to
``chattr -R +i`` (EPERM) where mounts are not allowed; skips the test where neither works.

    with read_only(store / "certificates"):
        ...            # the proxy (a subprocess, same mount namespace) cannot write there
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    p = str(path)
    if _run("mount", "--bind", p, p):
        if not _run("mount", "-o", "remount,ro,bind", p):
            _run("umount", p)
            pytest.skip(f"cannot remount {p} read-only")
        undo = [("umount", p), ("umount", "-l", p)]
    elif _run("chattr", "-R", "+i", p):
        undo = [("chattr", "-R", "-i", p)]
    else:
        pytest.skip("no way to make a directory read-only for root here (mount, chattr)")
    try:
        yield
    finally:
        for cmd in undo:
            if _run(*cmd):
                break
