"""The route table: (host, port, path) -> route. Pure.

Pomerium's rules: routes are tried in file order (stably reordered by
``regex_priority_order``, highest first) and the first match wins. Host: exact, or a pattern
where ``*`` stands for one or more characters (``*.example.com`` also covers
``a.b.example.com``). A route whose ``from`` has a port matches only that port (the Host
header's, else the listener's). Path: ``prefix`` (raw string prefix), ``path`` (exact) or
``regex`` (whole path). A path in ``from`` is this proxy's own form (Pomerium refuses it): a
prefix of whole segments, longest first ("/api" matches "/api" and "/api/x", not "/apix").
"""
from __future__ import annotations

import itertools
import re
from typing import Iterable, Optional

from ..config import Route, Upstream


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix + "/") or path.startswith(prefix + "?")


class _Rule:
    """One route's matching, compiled once at load."""
    __slots__ = ("route", "plain", "port", "prefix", "path", "regex")

    def __init__(self, route: Route):
        self.route = route
        self.port = route.port
        self.prefix = route.prefix
        self.path = route.path
        self.regex = re.compile(route.regex) if route.regex is not None else None
        self.plain = (route.port is None and route.prefix is None and route.path is None
                      and route.regex is None and route.path_prefix == "/")

    def matches(self, path: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if not _prefix_matches(self.route.path_prefix, path):
            return False
        if self.path is not None:
            return path == self.path
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        if self.prefix is not None:
            return path.startswith(self.prefix)
        return True


def _host_pattern(host: str) -> "re.Pattern":
    return re.compile(".+".join(re.escape(part) for part in host.split("*")))


def request_port(authority: Optional[bytes], default: int) -> int:
    """The port of a Host header value, else ``default`` (the listener's)."""
    if authority:
        colon = authority.rfind(b":")
        if colon > authority.rfind(b"]"):
            digits = authority[colon + 1:]
            if digits.isdigit():
                return int(digits)
    return default


class RouteTable:
    def __init__(self, routes: Iterable[Route], port: int = 443):
        ordered = sorted(routes, key=lambda r: -r.regex_priority_order)
        # file order, except this proxy's own from-paths: longest first
        ranked = sorted(enumerate(ordered), key=lambda t: (-len(t[1].path_prefix), t[0]))
        rules = [_Rule(r) for _, r in ranked]
        self._port = port
        self._ported = any(r.port is not None for r in rules)
        self._wild = [(_host_pattern(r.route.host), r) for r in rules if "*" in r.route.host]
        self._by_host: dict[str, list[_Rule]] = {}
        for r in rules:
            if "*" not in r.route.host:
                self._by_host.setdefault(r.route.host, [])
        for host, cands in self._by_host.items():
            cands += [r for r in rules if r.route.host == host
                      or ("*" in r.route.host and _host_pattern(r.route.host).fullmatch(host))]
        self._rr: dict[int, itertools.cycle] = {}

    def match(self, host: str, path: str, authority: Optional[bytes] = None) -> Optional[Route]:
        cands = self._by_host.get(host)
        if cands is None:
            if not self._wild:
                return None
            cands = [r for pattern, r in self._wild if pattern.fullmatch(host)]
        port = request_port(authority, self._port) if self._ported else self._port
        for r in cands:
            if r.plain or r.matches(path, port):
                return r.route
        return None

    def upstream(self, route: Route) -> Upstream:
        """Round-robin over the route's upstreams."""
        if len(route.to) == 1:
            return route.to[0]
        cyc = self._rr.get(id(route))
        if cyc is None:
            cyc = self._rr[id(route)] = itertools.cycle(route.to)
        return next(cyc)

    def hosts(self) -> list[str]:
        return list(dict.fromkeys([*self._by_host, *(r.route.host for _, r in self._wild)]))


def upgrade_allowed(route: Route, upgrade: bytes) -> bool:
    """Pomerium forwards an Upgrade only where the route allows it; elsewhere the upstream
    sees a plain request (Envoy drops the Upgrade and Connection: upgrade headers)."""
    allowed = route.upgrades
    if not allowed:
        return False
    return "*" in allowed or upgrade.strip().lower().decode("latin-1") in allowed
