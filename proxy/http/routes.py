"""The route table: (host, path) -> route. Pure.

Host: exact name first, then a wildcard covering one label (``*.example.com``). Path: the
longest matching prefix; a prefix matches whole segments ("/api" matches "/api" and
"/api/x", not "/apix").
"""
from __future__ import annotations

import itertools
from typing import Iterable, Optional

from ..config import Route, Upstream


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix + "/") or path.startswith(prefix + "?")


class RouteTable:
    def __init__(self, routes: Iterable[Route]):
        self._by_host: dict[str, list[Route]] = {}
        for r in routes:
            self._by_host.setdefault(r.host, []).append(r)
        for rs in self._by_host.values():
            rs.sort(key=lambda r: len(r.path_prefix), reverse=True)
        self._rr: dict[int, itertools.cycle] = {}

    def match(self, host: str, path: str) -> Optional[Route]:
        cands = self._by_host.get(host)
        if cands is None:
            head, dot, rest = host.partition(".")
            cands = self._by_host.get(f"*.{rest}") if dot else None
        if not cands:
            return None
        for r in cands:
            if _prefix_matches(r.path_prefix, path):
                return r
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
        return list(self._by_host)
