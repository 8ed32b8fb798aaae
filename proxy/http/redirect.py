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


def redirect_location(authority: bytes, target: bytes, https_port: int) -> bytes:
    """https:// URL for a request's host (its valid authority) and origin-form target."""
    host = codec.host_name(authority)
    if https_port != 443:
        host = f"{host}:{https_port}"
    return b"https://" + host.encode("ascii") + target


class RedirectConnection(LocalConnection):
    what = "redirect listener"

    def __init__(self, stream: Stream, https_port: Callable[[], int],
                 http01: Http01Lookup = _no_challenges, timeout: float = 10.0):
        super().__init__(stream, timeout)
        self.https_port = https_port
        self.http01 = http01

    async def answer(self, side: Side, req: h11.Request) -> None:
        try:   # the proxy's rule: the authority of an absolute-form target, else a valid Host
            authority, target = codec.origin_form(req.method, req.target)
            authority = authority or codec.header_value(req.headers, b"host") or b""
            host = codec.host_name(authority)
        except codec.BadRequest as e:
            headers, body = error_page(400, str(e))
            self.send(side, req, 400, headers, body)
            return
        path = target.split(b"?", 1)[0].decode("latin-1")
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
        location = redirect_location(authority, target, self.https_port())
        headers, body = error_page(status, "Moved to HTTPS.")
        self.send(side, req, status, headers + [(b"location", location)], body)
