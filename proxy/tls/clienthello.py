"""ClientHello facts (server name, ALPN offers) from the first bytes of a connection. Pure.

Used only when the engine must fetch something asynchronously before OpenSSL sees the
handshake (a challenge certificate or a certificate another instance obtained). Anything
malformed or incomplete yields ``None``: OpenSSL then rejects it as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class HelloFacts:
    server_name: Optional[str]
    alpn: tuple[bytes, ...]


def _u16(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def alpn_names(wire) -> list[bytes]:
    """The protocol names of a wire-format ALPN list (each a length byte, then the name)."""
    out = []
    i = 0
    while i < len(wire):
        n = wire[i]
        out.append(bytes(wire[i + 1:i + 1 + n]))
        i += 1 + n
    return out


def parse_client_hello(data: bytes) -> Optional[HelloFacts]:
    """Parse a ClientHello contained in the first TLS record of ``data``."""
    try:
        if len(data) < 5 or data[0] != 0x16:
            return None
        rec_len = _u16(data, 3)
        body = data[5:5 + rec_len]
        if len(body) < 4 or body[0] != 0x01:
            return None
        hs_len = int.from_bytes(body[1:4], "big")
        hello = body[4:4 + hs_len]
        if len(hello) < hs_len:
            return None   # ClientHello spans several records: rare, and we only peek
        i = 2 + 32                                   # version, random
        i += 1 + hello[i]                            # session id
        i += 2 + _u16(hello, i)                      # cipher suites
        i += 1 + hello[i]                            # compression methods
        if i + 2 > len(hello):
            return HelloFacts(None, ())
        end = i + 2 + _u16(hello, i)
        i += 2
        name: Optional[str] = None
        alpn: list[bytes] = []
        while i + 4 <= end:
            ext_type, ext_len = _u16(hello, i), _u16(hello, i + 2)
            ext = hello[i + 4:i + 4 + ext_len]
            i += 4 + ext_len
            if ext_type == 0 and len(ext) >= 5:       # server_name
                j = 2
                while j + 3 <= len(ext):
                    kind, n = ext[j], _u16(ext, j + 1)
                    if kind == 0:
                        name = ext[j + 3:j + 3 + n].decode("ascii").lower().rstrip(".")
                        break
                    j += 3 + n
            elif ext_type == 16 and len(ext) >= 2:    # ALPN
                alpn += alpn_names(ext[2:])
        return HelloFacts(name, tuple(alpn))
    except (IndexError, UnicodeDecodeError):
        return None
