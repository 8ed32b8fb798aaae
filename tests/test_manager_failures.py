"""The autocert manager when the CA or the storage fails (issue 23): the proxy started from its
CLI against a real Pebble and real storage made to misbehave (a CA that is down or restarted,
a storage directory made read-only, a stored certificate that is corrupt); a labelled double
only where no real component can misbehave so (a CA sending an unusable certificate).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from proxy.autocert import layout
from proxy.autocert.issuer import issuer_id
from proxy.autocert.schedule import DEFAULT_RETRY_CAP
from tests.infra.proxyproc import ProxyProcess, free_port

CAP = DEFAULT_RETRY_CAP


def attempts(proxy: ProxyProcess, name: str) -> list[tuple[int, float]]:
    """(attempt number, announced delay in s) of every failed order the proxy logged for ``name``."""
    pat = re.compile(rf"obtaining a certificate for {re.escape(name)} failed \(attempt (\d+)\); "
                     rf"next attempt in (\d+)s")
    return [(int(m.group(1)), float(m.group(2))) for m in pat.finditer(proxy.log())]


def state_path(store: Path, ca_url: str, name: str) -> Path:
    return store / layout.state_key(issuer_id(ca_url), name)


def read_state(store: Path, ca_url: str, name: str) -> dict:
    return json.loads(state_path(store, ca_url, name).read_text())


# --------------------------------------------------------------------------------------------
# item 1: any number of failures gives a capped, jittered backoff
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored, attempt, low, high", [
    # ~250 days of failures at the 6 h cap: 2 ** 1024 overflowed a float
    ({"failures": 1024, "last_error": "an old error"}, 1025, 0.8 * CAP, CAP),
    # a state file edited by hand (or written by something else): its fields are ignored
    ({"failures": "many", "next_attempt": "soon"}, 1, 0.8 * 60, 1.2 * 60),
], ids=["1024-failures", "edited-state-file"])
def test_a_long_failing_name_still_backs_off(start_proxy, tmp_path, stored, attempt, low, high):
    """The CA is down (nothing listens at its port): every order fails at once. The failure
    after a stored state must still set a next attempt; before the fix the error escaped
    and the name was retried at every check."""
    ca = f"https://127.0.0.1:{free_port()}/dir"
    store = tmp_path / "ac"
    path = state_path(store, ca, "long.test")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    proxy = start_proxy({"autocert": True, "autocert_ca": ca, "autocert_dir": str(store),
                         "routes": [{"from": "https://long.test", "to": "http://127.0.0.1:9"}]},
                        env={"AUTOCERT_PROXY_CHECK_INTERVAL": "0.1", "AUTOCERT_PROXY_RETRY_BASE": "60"})
    proxy.wait_log("obtaining a certificate for long.test failed")
    before = time.time()
    time.sleep(1.0)   # ten maintenance checks
    assert [a for a, _ in attempts(proxy, "long.test")] == [attempt], proxy.log()[-3000:]
    assert "checking long.test failed" not in proxy.log()
    (_, announced), = attempts(proxy, "long.test")
    assert low - 1 <= announced <= high + 1
    state = read_state(store, ca, "long.test")
    assert state["failures"] == attempt
    assert before - 2 + low <= state["next_attempt"] <= before + high + 1
    assert "cannot reach the CA" in state["last_error"]


async def test_the_next_attempt_is_set_even_if_the_delay_cannot_be_computed(tmp_path, monkeypatch):
    """A labelled double: ``retry_delay`` replaced by one that raises. No real input makes it
    fail any more (tests/test_schedule.py); this pins the manager's order of operations for the
    day a change to the schedule does: the name still waits (the cap), it is not retried at
    every check."""
    from proxy.autocert import manager as manager_module
    from proxy.autocert.manager import AutocertManager, NameState
    from proxy.config import Address, Options, Route, Upstream
    from proxy.storage.file import FileStorage
    from proxy.tls.certcache import CertificateCache

    def broken(*args, **kwargs):
        raise OverflowError("a schedule that cannot count")

    monkeypatch.setattr(manager_module, "retry_delay", broken)
    route = Route(from_url="https://a.test", scheme="https", host="a.test", path_prefix="/",
                  to=(Upstream("http", "127.0.0.1", 9),))
    ca = "https://127.0.0.1:1/dir"
    options = Options(address=Address("127.0.0.1", 1), routes=(route,), autocert=True,
                      autocert_ca=ca, autocert_dir=str(tmp_path / "ac"))
    storage = FileStorage(str(tmp_path / "ac"))
    m = AutocertManager(options, CertificateCache(), {}, storage=storage)
    state = NameState(failures=3)
    before = time.time()
    await m._failed("a.test", state, "the CA refused", None)
    assert state.failures == 4 and state.last_error == "the CA refused"
    assert before + CAP - 1 <= state.next_attempt <= time.time() + CAP
    assert read_state(tmp_path / "ac", ca, "a.test")["next_attempt"] == state.next_attempt
    await storage.close()
