"""The retry schedule for any number of consecutive failures (issue 23, item 1).

A name that keeps failing for months (4 failures a day at the 6 h cap: about 1000 by day 250)
must still get a capped, jittered delay: ``base * 2 ** (failures - 1)`` computed before the cap
overflowed a float at 1025 failures.
"""
from __future__ import annotations

import random

import pytest

from proxy.autocert.schedule import DEFAULT_RETRY_CAP, retry_delay
from tests.test_autocert_units import FixedRandom

CAP = DEFAULT_RETRY_CAP


@pytest.mark.parametrize("failures", [1024, 1025, 1026, 5000, 10 ** 6])
def test_any_failure_count_gives_a_capped_jittered_delay(failures):
    # the jitter at the cap: -20 % .. +20 % of the cap, then never above the cap
    assert retry_delay(failures, rng=FixedRandom(0.0)) == pytest.approx(0.8 * CAP)
    assert retry_delay(failures, rng=FixedRandom(0.25)) == pytest.approx(0.9 * CAP)
    assert retry_delay(failures, rng=FixedRandom(0.75)) == CAP
    spread = {retry_delay(failures, rng=random.Random(seed)) for seed in range(20)}
    assert len(spread) > 5 and all(0.8 * CAP <= d <= CAP for d in spread)


@pytest.mark.parametrize("base", [1e-9, 0.05, 1.0, 60.0, 1e6])
def test_the_delay_never_falls_as_failures_grow(base):
    last = 0.0
    for failures in [*range(1, 80), 1023, 1024, 1025, 2048, 10 ** 6]:
        d = retry_delay(failures, base=base, rng=FixedRandom(0.5))
        assert last <= d <= CAP
        last = d
    assert last == CAP


def test_retry_after_beyond_the_cap_still_counts_at_any_count():
    week = 7 * 24 * 3600.0
    assert retry_delay(10 ** 6, retry_after=week, rng=FixedRandom(0.0)) == week
