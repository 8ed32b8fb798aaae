"""The manager's shared-challenge lookups: only managed names reach storage, and concurrent
lookups for one name share a read. In-process, with the real file storage."""
from __future__ import annotations

import asyncio

from proxy.autocert.challenges import HTTP_01, Challenge, storage_key
from proxy.autocert.manager import AutocertManager
from proxy.config import Address, Options, Route, Upstream
from proxy.storage.file import FileStorage
from proxy.tls.certcache import CertificateCache


class CountingStorage(FileStorage):
    def __init__(self, root):
        super().__init__(root)
        self.loads = 0

    async def load(self, key):
        self.loads += 1
        await asyncio.sleep(0.05)   # a slow store, so that lookups overlap
        return await super().load(key)


def options(store) -> Options:
    route = Route(from_url="https://a.test", scheme="https", host="a.test", path_prefix="/",
                  to=(Upstream("http", "127.0.0.1", 9),))
    return Options(address=Address("127.0.0.1", 1), routes=(route,), autocert=True,
                   autocert_ca="https://127.0.0.1:1/dir", autocert_dir=str(store))


async def test_only_managed_names_reach_storage_and_lookups_coalesce(tmp_path):
    storage = CountingStorage(tmp_path / "store")
    m = AutocertManager(options(tmp_path / "store"), CertificateCache(), {}, storage=storage)
    ch = Challenge(HTTP_01, "a.test", "tok", "tok.thumb")
    await storage.store(storage_key(ch, m.issuer_key), ch.to_json())

    assert await m.http01("stranger.test", "tok") is None
    assert await m.http01("a.test", "other-token") is None
    assert storage.loads == 1            # the stranger's name cost nothing
    results = await asyncio.gather(*(m.http01("a.test", "tok") for _ in range(5)))
    assert results == ["tok.thumb"] * 5
    assert storage.loads == 2            # five simultaneous validations, one read
    await storage.close()
