"""When to renew and when to retry. Pure: times in, times out.

Renewal: inside the window the CA suggests through ACME Renewal Information (RFC 9773), at a
random point of it, when the CA offers one; otherwise when the last third of the lifetime
begins. Retries: exponential backoff with jitter, from ``base`` doubling up to ``cap``
(certmagic: 1 minute to 6 hours), never earlier than the CA's Retry-After.
"""
from __future__ import annotations

import datetime as dt
import random
from typing import Optional

DEFAULT_RETRY_BASE = 60.0
DEFAULT_RETRY_CAP = 6 * 3600.0


def renewal_time(not_before: dt.datetime, not_after: dt.datetime,
                 ari_window: Optional[tuple[dt.datetime, dt.datetime]] = None,
                 rng: random.Random = random) -> dt.datetime:
    if ari_window is not None:
        start, end = ari_window
        if end > start:
            return start + (end - start) * rng.random()
        return start
    return not_after - (not_after - not_before) / 3


def retry_delay(failures: int, *, base: float = DEFAULT_RETRY_BASE, cap: float = DEFAULT_RETRY_CAP,
                retry_after: Optional[float] = None, rng: random.Random = random) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (failures >= 1); any count
    gives a capped, jittered delay."""
    # 2.0 ** 1024 overflows a float; any base reaches the cap long before 1023 doublings
    exp = min(cap, base * 2.0 ** min(max(0, failures - 1), 1023))
    delay = exp * (0.8 + 0.4 * rng.random())          # +-20 % jitter: instances spread out
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, max(cap, retry_after or 0.0))
