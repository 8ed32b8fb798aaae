"""Counters and gauges in Prometheus' text format. A process-wide registry: incrementing is a
dict update, cheap enough for the request path. Faults nobody can act on at once (storage
unreachable, OCSP responder failing, ACME errors) are counted here as well as logged."""
from __future__ import annotations

import threading
from typing import Callable, Iterable

_lock = threading.Lock()   # the ACME issuer's worker threads count too
_counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
_help: dict[str, str] = {}
_gauges: list[Callable[[], Iterable[tuple[str, dict, float]]]] = []

HELP = {
    "autocert_proxy_http_requests_total": "HTTP requests answered, by status code",
    "autocert_proxy_tls_handshake_errors_total": "TLS handshakes that failed",
    "autocert_proxy_acme_orders_total": "ACME orders, by result",
    "autocert_proxy_storage_errors_total": "Storage operations that failed, by operation",
    "autocert_proxy_ocsp_fetch_errors_total": "OCSP fetches or verifications that failed",
    "autocert_proxy_ocsp_revoked_total": "Certificates found revoked by their OCSP responder",
    "autocert_proxy_certificate_not_after_seconds": "Expiry (unix time) of each served certificate",
}


def inc(name: str, value: float = 1.0, **labels: str) -> None:
    key = (name, tuple(sorted(labels.items())))
    with _lock:
        _counters[key] = _counters.get(key, 0.0) + value


_request_keys: dict[int, tuple] = {}


def count_request(status: int) -> None:
    """``autocert_proxy_http_requests_total{code=status}`` += 1, the per-request counter.
    Called from the event loop only; a dict update needs no lock for that (the GIL makes it
    atomic against the threads that take ``_lock``), and the key is built once per status."""
    key = _request_keys.get(status)
    if key is None:
        key = _request_keys[status] = ("autocert_proxy_http_requests_total", (("code", str(status)),))
    _counters[key] = _counters.get(key, 0.0) + 1.0


def value(name: str, **labels: str) -> float:
    return _counters.get((name, tuple(sorted(labels.items()))), 0.0)


def register_gauges(fn: Callable[[], Iterable[tuple[str, dict, float]]]) -> None:
    _gauges.append(fn)


def _labels(items) -> str:
    if not items:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def render() -> str:
    lines: list[str] = []
    seen: set[str] = set()
    with _lock:
        counters = sorted(_counters.items())
    samples = [(n, l, v, "counter") for (n, l), v in counters]
    for fn in _gauges:
        for n, labels, v in fn():
            samples.append((n, tuple(sorted(labels.items())), v, "gauge"))
    for n, l, v, kind in samples:
        if n not in seen:
            seen.add(n)
            if n in HELP:
                lines.append(f"# HELP {n} {HELP[n]}")
            lines.append(f"# TYPE {n} {kind}")
        lines.append(f"{n}{_labels(l)} {v:g}")
    return "\n".join(lines) + "\n"
