"""A systemd unit's ``SystemCallFilter=`` applied to one command, without systemd: the same
groups (as ``systemd-analyze syscall-filter`` lists them), loaded with libseccomp, every other
system call failing with EPERM (``SystemCallErrorNumber=EPERM``).

    python syscall_filter.py ALLOWED_FILE COMMAND [ARGS...]

runs COMMAND with only the system calls named in ALLOWED_FILE (one a line); ``allowed()``
computes them from the unit's settings. The filter needs no_new_privs (the unit's
``NoNewPrivileges=yes``): set it first, e.g. with ``setpriv --no-new-privs``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000


def groups() -> dict[str, list[str]]:
    """systemd's system-call groups: '@name' -> its members (names and '@groups')."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = found.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return found


def expand(names, table: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for n in names:
        out |= expand(table[n], table) if n.startswith("@") else {n}
    return out


def allowed(filters: list[str]) -> set[str]:
    """The system calls a unit's ``SystemCallFilter=`` lines leave (an allow list, then
    ``~`` deny lists taken from it; ``@default`` is always allowed)."""
    table = groups()
    allow = expand(["@default"], table)
    for f in filters:
        if f.startswith("~"):
            allow -= expand(f[1:].split(), table)
        else:
            allow |= expand(f.split(), table)
    return allow


def main() -> None:
    names = open(sys.argv[1]).read().split()
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO | errno.EPERM)
    for name in names:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:   # (names of other architectures resolve to nothing here)
            assert lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0, name
    assert lib.seccomp_load(ctx) == 0, "seccomp_load failed (no_new_privs not set?)"
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
