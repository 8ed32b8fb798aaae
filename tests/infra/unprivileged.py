"""Commands run as the unprivileged user ``nobody`` (setpriv), optionally holding only
CAP_NET_BIND_SERVICE, as packaging/autocert-proxy.service runs the proxy.

The tests' Python may sit where only root can reach it (pyenv under /root, mode 0700). Then
the command gets a private mount namespace in which each such directory is covered by an
empty tmpfs (mode 0755) holding bind mounts of just the paths the command needs: the
interpreter, its standard library, the virtual environment, the checkout. Nothing changes
outside that namespace.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

NOBODY = 65534
SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
CAPABILITY = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]


def _blocked(path: Path):
    """(the first directory on the way to ``path`` that others cannot enter, the entry below
    it that leads to ``path``), or None when others can reach ``path``."""
    here = Path("/")
    for part in path.parts[1:]:
        below = here / part
        if not here.stat().st_mode & 0o001:
            return here, below
        here = below
    return None


def needed_paths(repo: Path) -> list[Path]:
    return [Path(sys.executable).resolve().parent, Path(sys.base_prefix).resolve(),
            Path(sys.prefix), repo.resolve()]


def command(repo: Path, workdir: Path, capability: bool, no_new_privs: bool = False) -> list[str]:
    """The argv prefix that runs what follows it as nobody (with the capability if asked);
    ``workdir``, a directory of root's, holds the mount points it needs."""
    setpriv = SETPRIV + (CAPABILITY if capability else []) + (["--no-new-privs"] if no_new_privs else [])
    covers: dict[Path, set[Path]] = {}
    for p in needed_paths(repo):
        found = _blocked(p)
        if found:
            covers.setdefault(found[0], set()).add(found[1])
    if not covers:
        return setpriv + ["--"]
    stash = workdir / "mounts"
    stash.mkdir(exist_ok=True)
    lines = ["set -e"]
    for i, (blocked, entries) in enumerate(sorted(covers.items())):
        for j, entry in enumerate(sorted(entries)):
            held = stash / f"{i}-{j}"
            held.mkdir(exist_ok=True)
            lines.append(f"mount --bind {shlex.quote(str(entry))} {shlex.quote(str(held))}")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(blocked))}")
        for j, entry in enumerate(sorted(entries)):
            held = stash / f"{i}-{j}"
            lines.append(f"mkdir -p {shlex.quote(str(entry))}")
            lines.append(f"mount --move {shlex.quote(str(held))} {shlex.quote(str(entry))}")
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh",
            *setpriv, "--"]
