"""When to renew, when to ask the CA again, when to retry. Pure: times in, times out.

Renewal (``plan_renewal``): inside the window the CA suggests through ACME Renewal
Information (RFC 9773), at a point of it fixed per certificate, when the CA offers one;
otherwise when a third of the lifetime is left, or half of it for lifetimes under 10 days
(6-day certificates renew on day 3). An ARI window is kept within safe bounds: never before
``ARI_MIN_AGE_FRACTION`` of the lifetime has passed (a CA that answers "renew now" for every
new certificate, or a stale window applied to a new one, cannot drive a re-issue loop: the
failure cert-manager #8993 describes), and never so late that the certificate would be
renewed after ``LATEST_FRACTION`` of its lifetime (such a window is ignored or cut there).

ARI polling (``next_ari_poll``): the CA's Retry-After is honoured, within 1 minute and 12
hours, so the window is looked at least twice a day; 6 hours without Retry-After.

Retries (``retry_delay``): exponential backoff with jitter, from ``base`` doubling up to
``cap`` (certmagic: 1 minute to 6 hours), never earlier than the CA's Retry-After.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional

DEFAULT_RETRY_BASE = 60.0
DEFAULT_RETRY_CAP = 6 * 3600.0

SHORT_LIVED = dt.timedelta(days=10)    # under this lifetime, renew when half of it is left
ARI_MIN_AGE_FRACTION = 0.1             # no ARI renewal in the first 10 % of the lifetime ...
ARI_MIN_AGE_CAP = dt.timedelta(days=1)  # ... nor later than a day after notBefore for that reason
LATEST_FRACTION = 0.9                  # a window that puts renewal later than this is ignored

ARI_POLL_DEFAULT = dt.timedelta(hours=6)
ARI_POLL_MIN = dt.timedelta(minutes=1)
ARI_POLL_MAX = dt.timedelta(hours=12)   # at least twice a day
ARI_POLL_AFTER_ERROR = dt.timedelta(hours=1)

Window = tuple[dt.datetime, dt.datetime]


@dataclass(frozen=True)
class RenewalPlan:
    at: dt.datetime     # renew when now >= at
    source: str         # where ``at`` came from, for `autocert-proxy certs` and the log


def lifetime_renewal(not_before: dt.datetime, not_after: dt.datetime) -> RenewalPlan:
    lifetime = not_after - not_before
    if lifetime < SHORT_LIVED:
        return RenewalPlan(not_after - lifetime / 2, "lifetime: half left (lifetime under 10 days)")
    return RenewalPlan(not_after - lifetime / 3, "lifetime: a third left")


def window_point(serial: int) -> float:
    """Where in an ARI window a certificate renews, in [0, 1): fixed per certificate (the same
    at every check and on every instance), spread across certificates."""
    digest = hashlib.sha256(serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def plan_renewal(not_before: dt.datetime, not_after: dt.datetime,
                 ari_window: Optional[Window] = None, *, now: dt.datetime,
                 point: float = 0.5) -> RenewalPlan:
    """When to renew a certificate valid from ``not_before`` to ``not_after``, given the CA's
    suggested window (None: the CA has no ARI, or it has not been asked yet)."""
    fallback = lifetime_renewal(not_before, not_after)
    if ari_window is None:
        return fallback
    lifetime = not_after - not_before
    if lifetime <= dt.timedelta(0):
        return fallback
    start, end = ari_window
    if end < start:
        return RenewalPlan(fallback.at, f"{fallback.source} (ARI window ignored: it ends before it starts)")
    earliest = not_before + min(lifetime * ARI_MIN_AGE_FRACTION, ARI_MIN_AGE_CAP)
    latest = not_before + lifetime * LATEST_FRACTION
    if start > latest:
        return RenewalPlan(fallback.at, f"{fallback.source} (ARI window ignored: it starts too close "
                                        f"to expiry)")
    end = min(end, latest)
    if end <= now:
        # the CA wants it replaced now (revocation ahead); a certificate this young waits a little
        if now < earliest:
            return RenewalPlan(earliest, "ARI window already over; held until the certificate is "
                                         f"{ARI_MIN_AGE_FRACTION:.0%} through its lifetime")
        return RenewalPlan(max(start, earliest), "ARI window already over: renew now")
    at = max(start + (end - start) * min(max(point, 0.0), 1.0), earliest)
    return RenewalPlan(at, "ARI window")


def renewal_time(not_before: dt.datetime, not_after: dt.datetime,
                 ari_window: Optional[Window] = None, rng: random.Random = random,
                 now: Optional[dt.datetime] = None) -> dt.datetime:
    """``plan_renewal(...).at`` with a random point of the window."""
    return plan_renewal(not_before, not_after, ari_window, point=rng.random(),
                        now=now or dt.datetime.now(dt.timezone.utc)).at


def ari_record(serial: int, window: Optional[Window]) -> bytes:
    """What the manager stores about a certificate's renewal window (None: the CA has no ARI)."""
    start, end = (window[0].isoformat(), window[1].isoformat()) if window else (None, None)
    return json.dumps({"serial": f"{serial:x}", "start": start, "end": end}, sort_keys=True).encode()


def parse_ari_record(data: bytes, serial: int) -> tuple[bool, Optional[Window]]:
    """(known, window) from ``ari_record`` output, for the certificate ``serial``; a record of
    another certificate, or one that cannot be read, is not known."""
    try:
        rec = json.loads(data)
        if rec.get("serial") != f"{serial:x}":
            return False, None
        if rec.get("start") is None:
            return True, None
        return True, (dt.datetime.fromisoformat(rec["start"]), dt.datetime.fromisoformat(rec["end"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return False, None


def next_ari_poll(now: dt.datetime, retry_after: Optional[float] = None,
                  failed: bool = False) -> dt.datetime:
    """When to ask for renewal information again: the CA's Retry-After within 1 minute and
    12 hours; 6 hours without one; an hour after a failed look."""
    if retry_after is None:
        wait = ARI_POLL_AFTER_ERROR if failed else ARI_POLL_DEFAULT
    else:
        wait = min(max(dt.timedelta(seconds=retry_after), ARI_POLL_MIN), ARI_POLL_MAX)
    return now + wait


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
