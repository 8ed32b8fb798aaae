"""Why a listener could not be opened, said in one line that names the address and the fix."""
from __future__ import annotations

import errno
import os

UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


class ListenError(OSError):
    """A listener address that could not be bound (the message is the whole explanation)."""


def unprivileged_port_start(path: str = UNPRIVILEGED_PORT_START) -> int:
    """The lowest port anyone may bind (Linux's sysctl; 1024 where it cannot be read)."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def listen_error(address, err: OSError, port_start: int) -> ListenError:
    """``err`` from binding ``address`` (a config.Address) as the operator needs to read it."""
    where = f"cannot listen on {address}"
    if err.errno in (errno.EACCES, errno.EPERM) and address.port < port_start:
        text = (f"{where}: permission denied: ports below {port_start} need root or "
                "CAP_NET_BIND_SERVICE (see packaging/autocert-proxy.service)")
    elif err.errno == errno.EADDRINUSE:
        text = f"{where}: address already in use (another process listens there)"
    elif err.errno == errno.EADDRNOTAVAIL:
        text = f"{where}: the address is not one of this host's"
    else:   # (the OS's words: err's own text repeats the address; getaddrinfo's errnos are < 0)
        reason = os.strerror(err.errno) if (err.errno or 0) > 0 else (err.strerror or str(err))
        text = f"{where}: {reason.lower()}"
    e = ListenError(text)
    e.errno = err.errno
    return e
