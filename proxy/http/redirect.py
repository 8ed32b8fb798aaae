"""The plain-HTTP listener: answers ACME HTTP-01 challenges, redirects everything else to HTTPS."""
from __future__ import annotations

import logging
from typing import Awaitable, Callable, Optional

import h11

from ..tls.transport import Stream
from . import codec
from .local import LocalConnection
from .proxy import Side, error_page

log = logging.getLogger("proxy.redirect")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

# (host, token) -> key authorization, or None when there is no such pending challenge.
Http01Lookup = Callable[[str, str], Awaitable[Optional[str]]]


async def _no_challenges(host: str, token: str) -> Optional[str]:
    return None


def redirect_location(host_header: bytes, target: bytes, https_port: int) -> bytes:
    authority = codec.split_host(host_header)
    if https_port != 443:
        authority = f"{authority}:{https_port}"
    if not target.startswith(b"/"):
        target = _origin_form(target)
    return b"https://" + authority.encode("ascii") + target


def _origin_form(target: bytes) -> bytes:
    """absolute-form "http://host/p?q" (RFC 9112 3.2.2) -> "/p?q"; its authority is not
    trusted (the Host header decides); anything else ("*") -> "/"."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return b"/"
    cuts = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    if not cuts:
        return b"/"
    tail = rest[min(cuts):]
    return tail if tail.startswith(b"/") else b"/" + tail


class RedirectConnection(LocalConnection):
    what = "redirect listener"

    def __init__(self, stream: Stream, https_port: Callable[[], int],
                 http01: Http01Lookup = _no_challenges, timeout: float = 10.0):
        super().__init__(stream, timeout)
        self.https_port = https_port
        self.http01 = http01

    async def answer(self, side: Side, req: h11.Request) -> None:
        host_header = codec.header_value(req.headers, b"host")
        host = codec.split_host(host_header or b"")
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        if path.startswith(CHALLENGE_PREFIX):
            token = path[len(CHALLENGE_PREFIX):]
            key_auth = await self.http01(host, token) if token and "/" not in token else None
            if key_auth is not None:
                body = key_auth.encode()
                log.info("answered HTTP-01 challenge for %s", host)
                self.send(side, req, 200, [(b"content-type", b"text/plain")], body)
            else:
                headers, body = error_page(404, "No such ACME challenge.")
                self.send(side, req, 404, headers, body)
            return
        if not host:
            headers, body = error_page(400, "A Host header is required.")
            self.send(side, req, 400, headers, body)
            return
        status = 301 if req.method in (b"GET", b"HEAD") else 308
        location = redirect_location(host_header, req.target, self.https_port())
        headers, body = error_page(status, "Moved to HTTPS.")
        self.send(side, req, status, headers + [(b"location", location)], body)
