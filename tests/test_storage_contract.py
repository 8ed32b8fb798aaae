"""Every storage backend (file, S3 on moto server, GCS on fake-gcs-server) against the contract
in proxy/storage/base.py. Servers are real subprocesses on 127.0.0.1 (tests/infra)."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import uuid

import pytest

from proxy.storage import (KeyInfo, NotFound, StorageError, check, open_storage,
                           parse_location)
from proxy.storage.file import FileStorage
from proxy.storage.gcs import GCSStorage, ServiceAccountCredentials
from proxy.storage.s3 import S3Storage
from tests.infra.gcsserver import gcs_env, gcs_server  # noqa: F401  (fixtures)
from tests.infra.s3server import free_port, s3_env, s3_server  # noqa: F401  (fixtures)

BACKENDS = ["file", "s3", "gcs"]

# Bound on one lock step that involves storage round trips but no lease to run out: moto and
# fake-gcs-server answer a lock request in 10-60 ms (p95) on a loaded 2-core machine, so this
# only bounds a hang; waits that depend on a lease are derived from the lease they set.
STEP = 10.0
# Lock tests each take 1-5 s (loaded machine); a hang fails here, not at the suite's 300 s.
LOCK_TEST_TIMEOUT = 60


async def warmed(*stores):
    """Make every instance do one request first, so building its client (aiobotocore parses
    the S3 model: 0.3-1.5 s on a loaded machine) does not fall inside a timed lease window."""
    for st in stores:
        await asyncio.wait_for(st.exists("warm-up"), STEP)
    return stores


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def location(backend, request, tmp_path):
    """An autocert_dir value for the backend, unique per test (shared servers)."""
    prefix = f"t-{uuid.uuid4().hex[:10]}/autocert"
    if backend == "file":
        return str(tmp_path / "store")
    if backend == "s3":
        return request.getfixturevalue("s3_env").url(prefix)
    return request.getfixturevalue("gcs_env").url(prefix)


@pytest.fixture
async def make(location):
    """Factory: a new Storage instance (another 'proxy instance') on the same location."""
    opened = []

    def _make(lease: float = 10.0):
        st = open_storage(location, lease_seconds=lease)
        opened.append(st)
        return st
    yield _make
    for st in opened:
        await st.close()


@pytest.fixture
async def st(make):
    return make()


def raw_names(backend, request, location) -> list[str]:
    """Every object/file the backend really wrote, as seen by the server or the filesystem."""
    if backend == "s3":
        return request.getfixturevalue("s3_server").object_keys()
    if backend == "gcs":
        return request.getfixturevalue("gcs_server").object_names()
    out = []
    for d, _, files in os.walk(location):
        out += [os.path.relpath(os.path.join(d, f), location) for f in files]
    return out


# ----------------------------------------------------------------------------- key-value

async def test_roundtrip_overwrite_and_missing(st):
    await st.store("certificates/ca/example.com/example.com.crt", b"cert-1\x00\xff")
    assert await st.load("certificates/ca/example.com/example.com.crt") == b"cert-1\x00\xff"
    await st.store("certificates/ca/example.com/example.com.crt", b"cert-2")
    assert await st.load("certificates/ca/example.com/example.com.crt") == b"cert-2"
    await st.store("empty", b"")
    assert await st.load("empty") == b""
    with pytest.raises(NotFound):
        await st.load("certificates/ca/nope.crt")
    with pytest.raises(NotFound):
        await st.stat("certificates/ca/nope.crt")
    big = os.urandom(300_000)
    await st.store("big.bin", big)
    assert await st.load("big.bin") == big


async def test_delete_key_and_prefix(st):
    await st.store("a/b/one", b"1")
    await st.store("a/b/two", b"2")
    await st.store("a/c", b"3")
    await st.store("ab", b"sibling that shares the name's first letters")
    await st.delete("a/b/one")
    assert not await st.exists("a/b/one")
    with pytest.raises(NotFound):
        await st.delete("a/b/one")
    await st.delete("a")                               # a "directory": everything below it
    assert await st.list("", recursive=True) == ["ab"]
    with pytest.raises(NotFound):
        await st.delete("a")


async def test_list_stat_exists(st):
    for k in ["certificates/ca/x.com/x.com.crt", "certificates/ca/x.com/x.com.key",
              "certificates/ca/y.com/y.com.crt", "certificates/top.json", "acme/u.json"]:
        await st.store(k, b"v" * 7)
    assert await st.list("certificates") == ["certificates/ca", "certificates/top.json"]
    assert await st.list("certificates/ca") == ["certificates/ca/x.com", "certificates/ca/y.com"]
    assert await st.list("certificates", recursive=True) == [
        "certificates/ca/x.com/x.com.crt", "certificates/ca/x.com/x.com.key",
        "certificates/ca/y.com/y.com.crt", "certificates/top.json"]
    assert await st.list("") == ["acme", "certificates"]
    assert await st.list("missing/prefix") == []
    assert await st.list("missing", recursive=True) == []
    info = await st.stat("certificates/top.json")
    assert isinstance(info, KeyInfo)
    assert info.key == "certificates/top.json" and info.size == 7
    assert abs(info.modified - time.time()) < 120
    assert await st.exists("certificates/top.json")
    assert await st.exists("certificates/ca")          # a "directory" exists
    assert not await st.exists("certificates/nope")


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", "a//b", "", "./a"])
async def test_keys_cannot_escape(st, bad):
    with pytest.raises(StorageError):
        await st.store(bad, b"x")
    with pytest.raises(StorageError):
        await st.load(bad)


async def test_every_object_below_the_prefix(backend, request, location, st):
    before = set(raw_names(backend, request, location))
    await st.store("certificates/ca/x/x.crt", b"1")
    await st.store("acme/ca/users/a/a.key", b"2", private=True)
    await st.lock("issue-x")                            # locks too
    try:
        names = raw_names(backend, request, location)
    finally:
        await st.unlock("issue-x")
    if backend == "file":
        assert "locks/issue-x.lock" in names
        return                                          # os.walk of the root: trivially below
    prefix = parse_location(location).prefix + "/"
    mine = [n for n in names if n.startswith(prefix)]
    assert sorted(mine) == sorted(prefix + k for k in
                                  ["certificates/ca/x/x.crt", "acme/ca/users/a/a.key",
                                   "locks/issue-x.lock"])
    # nothing written outside the prefix (the bucket is shared with other tests)
    assert set(names) - before == set(mine), sorted(set(names) - before)


def test_file_modes(tmp_path):
    async def go():
        st = FileStorage(str(tmp_path / "root"))
        old = os.umask(0)                               # our modes must not depend on umask
        try:
            await st.store("acme/ca/users/me/me.key", b"secret", private=True)
            await st.store("certificates/ca/x/x.crt", b"public")
        finally:
            os.umask(old)
        mode = lambda p: stat.S_IMODE(os.stat(tmp_path / "root" / p).st_mode)  # noqa: E731
        assert mode("acme/ca/users/me/me.key") == 0o600
        assert mode("certificates/ca/x/x.crt") == 0o644
        for d in ["", "acme", "acme/ca/users/me", "certificates/ca/x"]:
            assert mode(d) == 0o700, d
        # overwriting a public file with a private value makes it private (temp + rename)
        await st.store("certificates/ca/x/x.crt", b"now secret", private=True)
        assert mode("certificates/ca/x/x.crt") == 0o600
        # no temporary files left behind
        assert sorted(os.listdir(tmp_path / "root" / "certificates/ca/x")) == ["x.crt"]
    asyncio.run(go())


def test_file_store_is_atomic_rename(tmp_path, monkeypatch):
    """A failing write leaves the old value whole and no temporary file behind."""
    async def go():
        st = FileStorage(str(tmp_path))
        await st.store("k", b"old value")
        real_fsync = os.fsync

        def broken_fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(5, "Input/output error")
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(StorageError) as e:
            await st.store("k", b"new value that never lands")
        assert "'k'" in str(e.value) and str(tmp_path) in str(e.value)
        monkeypatch.undo()
        assert await st.load("k") == b"old value"
        assert os.listdir(tmp_path) == ["k"]
    asyncio.run(go())


# ----------------------------------------------------------------------------- locks

@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_lock_exclusion_between_instances(make):
    lease = 1.0
    a, b = await warmed(make(lease=lease), make(lease=lease))
    await asyncio.wait_for(a.lock("order-example.com"), STEP)
    # B must keep waiting past two of A's leases: A's renewals keep the lock alive.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.lock("order-example.com"), timeout=2.2 * lease)
    assert not a.held("order-example.com").lost.is_set()
    assert b.held("order-example.com") is None
    # another name is independent
    await asyncio.wait_for(b.lock("order-other.com"), timeout=STEP)
    await b.unlock("order-other.com")
    await a.unlock("order-example.com")
    await asyncio.wait_for(b.lock("order-example.com"), timeout=STEP)
    await b.unlock("order-example.com")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_lock_exclusion_between_tasks_of_one_instance(make):
    st = make(lease=2.0)
    inside, overlaps = 0, 0

    async def worker():
        nonlocal inside, overlaps
        async with st.locked("shared"):
            inside += 1
            overlaps += inside > 1
            await asyncio.sleep(0.02)
            inside -= 1
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(5))), timeout=3 * STEP)
    assert overlaps == 0


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_lapsed_lease_is_taken_over_and_holder_learns_it(make):
    lease = 1.0
    a, b, c = await warmed(make(lease=lease), make(lease=lease), make(lease=lease))
    t0 = time.monotonic()                   # before A writes its expiry (now + lease)
    await asyncio.wait_for(a.lock("renew"), STEP)
    h = a.held("renew")
    h.renewal.cancel()                                  # the holder "dies": no more renewals
    await asyncio.wait_for(b.lock("renew"), timeout=lease + STEP)
    # taken over only after the lease lapsed (time measured with a monotonic clock from
    # before A's expiry was computed; 10 ms for the record's rounding to 1 ms)
    assert time.monotonic() - t0 > lease - 0.01
    # the old holder's next renewal is refused (conditional write on its stale version)
    h.expires = time.time() + 100                       # pretend its own clock still says fine
    h.renewal = asyncio.get_running_loop().create_task(a._renew(h))
    await asyncio.wait_for(h.lost.wait(), timeout=lease / 3 + STEP)
    # its unlock must not release B's lock: the record is still B's ...
    await a.unlock("renew")
    record = await asyncio.wait_for(c._lock_read("renew"), STEP)
    assert record is not None and record.owner == b.held("renew").owner
    # ... and stays B's past B's own lease, as B keeps renewing it
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(c.lock("renew"), timeout=1.5 * lease)
    assert not b.held("renew").lost.is_set()
    assert c.held("renew") is None
    await b.unlock("renew")
    await asyncio.wait_for(c.lock("renew"), timeout=STEP)
    await c.unlock("renew")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_holder_whose_lease_ran_out_marks_lost(make):
    lease = 0.6
    a, = await warmed(make(lease=lease))
    await asyncio.wait_for(a.lock("stall"), STEP)
    h = a.held("stall")
    h.renewal.cancel()                                  # (none in flight to overwrite expires)
    h.expires = time.time() - 1                         # as if the loop stalled past the lease
    h.renewal = asyncio.get_running_loop().create_task(a._renew(h))
    await asyncio.wait_for(h.lost.wait(), timeout=lease / 3 + STEP)


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_holder_whose_renewal_hangs_past_the_lease_marks_lost(make):
    """A renewal request still unanswered when the lease runs out cannot save the lock (a
    waiter may take it over from then on): the holder must learn it then, not when the store
    finally answers (S3 allowed 3 x timeout = 30 s per call; the file backend, forever)."""
    lease = 0.6
    a, = await warmed(make(lease=lease))
    await asyncio.wait_for(a.lock("hang"), STEP)
    h = a.held("hang")
    asked = asyncio.Event()

    async def never_answers(name, data, token):
        asked.set()
        await asyncio.Event().wait()
    a._lock_replace = never_answers
    await asyncio.wait_for(asked.wait(), timeout=lease / 3 + STEP)
    lease_end = h.expires
    await asyncio.wait_for(h.lost.wait(), timeout=lease + 2.0)
    assert time.time() >= lease_end - 0.05              # not before the lease really ended
    await a.unlock("hang")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_lock_whose_acquiring_answer_was_slow_is_renewed_in_time(make):
    """The lease starts when lock() writes its expiry, before the request: if the answer took
    most of the lease (a new S3 client's first request took 1.5 s on a loaded machine), the
    first renewal must come at once, not a fixed lease/3 after lock() returned (by then the
    lease had run out: the holder lost the lock and a waiter took it)."""
    lease = 1.5
    a, = await warmed(make(lease=lease))
    real = a._lock_create

    async def slow_answer(name, data):
        token = await real(name, data)
        await asyncio.sleep(0.75 * lease)               # the answer took 3/4 of the lease
        return token
    a._lock_create = slow_answer
    await asyncio.wait_for(a.lock("slow"), STEP)
    await asyncio.sleep(lease)
    assert not a.held("slow").lost.is_set()
    await a.unlock("slow")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_unlock_only_releases_own_lock(make):
    a, b, c = make(lease=2.0), make(lease=2.0), make(lease=2.0)
    await asyncio.wait_for(a.lock("mine"), STEP)
    await b.unlock("mine")                              # B does not hold it: no effect
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(c.lock("mine"), timeout=0.8)
    await a.unlock("mine")
    await asyncio.wait_for(c.lock("mine"), timeout=STEP)
    await c.unlock("mine")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
async def test_unreadable_lock_record_expires_by_age(backend, make):
    """A lock object someone left half-written (crash between create and write) does not
    block forever: it lapses one lease after it was last modified."""
    lease = 1.0
    a = make(lease=lease)
    await a.store("locks/garbled.lock", b"{not json")
    await asyncio.wait_for(a.lock("garbled"), timeout=lease + STEP)
    await a.unlock("garbled")


@pytest.mark.timeout(LOCK_TEST_TIMEOUT)
@pytest.mark.parametrize("method", ["put_object", "get_object"])
async def test_s3_lock_cancelled_as_an_answer_arrives_stops(s3_env, method):
    """lock() cancelled by its caller (a timeout, shutdown) in the very loop step in which an
    S3 answer arrives must stop. Python 3.11's asyncio.wait_for returns the result and drops
    such a cancellation (CPython gh-86296): with it around every S3 call, lock() kept polling
    until it got the lock, which never happens while the holder renews, and the caller's
    own wait_for waited with it (a contract test hung until pytest-timeout)."""
    url = s3_env.url(f"t-{uuid.uuid4().hex[:10]}/autocert")
    a, b = open_storage(url, lease_seconds=5.0), open_storage(url, lease_seconds=5.0)
    waiter = None
    try:
        await asyncio.wait_for(a.lock("busy"), STEP)
        client = await b._c()
        real = getattr(client, method)

        async def answered_then_cancelled(**kw):
            try:
                return await real(**kw)
            finally:
                waiter.cancel()                         # the caller gives up as the answer is in
        setattr(client, method, answered_then_cancelled)
        waiter = asyncio.get_running_loop().create_task(b.lock("busy"))
        done, _ = await asyncio.wait([waiter], timeout=STEP)
        assert done, "lock() went on polling after it was cancelled"
        assert waiter.cancelled()
        assert b.held("busy") is None
    finally:
        if waiter is not None and not waiter.done():    # the bug: let the stuck lock() end
            delattr(client, method)
            await a.unlock("busy")
            await asyncio.wait([waiter], timeout=STEP)
        await a.close()
        await b.close()


async def test_s3_client_is_built_off_the_event_loop(s3_env, monkeypatch):
    """Building an aiobotocore client parses botocore's S3 model (0.25-0.9 s of CPU): done on
    the event loop it stalled every other task, lease renewals included (a 1 s lease test lost
    its lock to a waiter that was just creating its client)."""
    import threading
    import botocore.loaders
    parsed_on = []
    real = botocore.loaders.JSONFileLoader.load_file

    def spy(self, file_path):
        data = real(self, file_path)
        if data is not None:   # (a probe for a file that does not exist reads nothing)
            parsed_on.append((str(file_path), threading.get_ident()))
        return data
    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", spy)
    st = open_storage(s3_env.url(f"t-{uuid.uuid4().hex[:10]}/autocert"))
    try:
        await asyncio.wait_for(st.exists("k"), STEP)
    finally:
        await st.close()
    model = [t for p, t in parsed_on if os.sep + "s3" + os.sep in p and "service-2" in p]
    assert model, parsed_on
    on_loop = [p for p, t in parsed_on if t == threading.get_ident()]
    assert not on_loop, on_loop   # the model, its endpoint rules, partitions: none parsed on the loop


# ----------------------------------------------------------------------------- faults

async def test_unreachable_store_is_a_storage_error_not_a_hang():
    port = free_port()                                  # nothing listens there
    for st in [S3Storage("bkt", "p", endpoint_url=f"http://127.0.0.1:{port}", timeout=1.0),
               GCSStorage("bkt", "p", endpoint=f"http://127.0.0.1:{port}", timeout=1.0,
                          credentials=_NoAuth())]:
        try:
            for op in [st.load("k"), st.store("k", b"v"), st.lock("l")]:
                with pytest.raises(StorageError) as e:
                    await asyncio.wait_for(op, timeout=30)
                assert not isinstance(e.value, NotFound)
                assert "'k'" in str(e.value) or "'locks/l.lock'" in str(e.value)
            with pytest.raises(StorageError) as e:
                await asyncio.wait_for(check(st), timeout=30)
            assert "autocert_dir" in str(e.value)
        finally:
            await st.close()


class _NoAuth:
    async def token(self, http):
        return None


async def test_check_missing_bucket_names_the_setting(backend, request, monkeypatch):
    if backend == "file":
        blocker = request.getfixturevalue("tmp_path") / "a-file"
        blocker.write_bytes(b"")
        st = open_storage(str(blocker / "autocert"))
    elif backend == "s3":
        request.getfixturevalue("s3_env")
        st = open_storage("s3://no-such-bucket/prefix")
    else:
        request.getfixturevalue("gcs_env")
        st = open_storage("gs://no-such-bucket/prefix")
    try:
        with pytest.raises(StorageError) as e:
            await asyncio.wait_for(check(st), timeout=30)
    finally:
        await st.close()
    msg = str(e.value)
    assert "autocert_dir" in msg
    if backend != "file":
        assert "no-such-bucket" in msg and "does not exist" in msg


async def test_check_accepts_a_good_location(st):
    await check(st)
    assert await st.list("", recursive=True) == []      # the probe cleans up after itself


def test_s3_refused_credentials_name_the_setting(monkeypatch):
    """moto with authentication switched on refuses the made-up access key: a real refusal."""
    import subprocess
    import sys
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREFUSED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "refused")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.05)

        async def go():
            st = S3Storage("autocert", "p", endpoint_url=f"http://127.0.0.1:{port}",
                           region="us-east-1", timeout=5)
            try:
                await asyncio.wait_for(check(st), timeout=30)
            finally:
                await st.close()
        with pytest.raises(StorageError) as e:
            asyncio.run(go())
        msg = str(e.value)
        assert "autocert_dir" in msg and "refused" in msg, msg
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- locations

@pytest.mark.parametrize("value,expected", [
    ("/data/autocert", ("file", "/data/autocert", "", "", None)),
    ("s3://my-bucket/some/prefix", ("s3", "", "my-bucket", "some/prefix", None)),
    ("s3://my-bucket", ("s3", "", "my-bucket", "", None)),
    ("s3://my.bucket.s3.eu-west-3.amazonaws.com/some/prefix/",
     ("s3", "", "my.bucket", "some/prefix", "eu-west-3")),
    ("s3://bkt.s3.amazonaws.com/p", ("s3", "", "bkt", "p", "us-east-1")),
    ("gs://my-bucket/certs", ("gs", "", "my-bucket", "certs", None)),
])
def test_parse_location(value, expected):
    loc = parse_location(value)
    assert (loc.kind, loc.path, loc.bucket, loc.prefix, loc.region) == expected


@pytest.mark.parametrize("value", ["", "ftp://host/x", "s3://", "s3:///prefix", "gs://UPPER/x",
                                   "s3://b/a/../b", "s3://bk?x=1", "s3://user:pw@bkt/x",
                                   "s3://bkt.s3.a.b.amazonaws.com/p", "gs://x/p"])
def test_malformed_locations_name_the_setting(value):
    with pytest.raises(StorageError) as e:
        open_storage(value)
    assert "autocert_dir" in str(e.value)
    assert "accepted" in str(e.value)


def test_factory_picks_the_backend(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), FileStorage)
    s3 = open_storage("s3://bkt.s3.eu-west-3.amazonaws.com/p", lease_seconds=3)
    assert isinstance(s3, S3Storage) and s3.region == "eu-west-3" and s3.lease_seconds == 3
    assert s3.describe() == "s3://bkt/p"
    gs = open_storage("gs://bkt/p/q")
    assert isinstance(gs, GCSStorage) and gs.prefix == "p/q"


# ----------------------------------------------------------------------------- GCS auth

async def test_gcs_service_account_jwt_flow(tmp_path, monkeypatch):
    """A service-account key is turned into a signed JWT, exchanged at token_uri (a real
    local HTTP server that verifies the signature), and the token is sent as a Bearer."""
    from aiohttp import web
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    import base64

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    seen = {"token_requests": 0, "auth": []}

    def unb64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    async def token(request):
        form = await request.post()
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        h, c, s = form["assertion"].split(".")
        key.public_key().verify(unb64(s), f"{h}.{c}".encode(), padding.PKCS1v15(),
                                hashes.SHA256())
        claims = json.loads(unb64(c))
        assert claims["iss"] == "sa@proj.iam.gserviceaccount.com"
        assert claims["aud"] == str(request.url)
        assert "devstorage" in claims["scope"] and claims["exp"] > time.time()
        seen["token_requests"] += 1
        return web.json_response({"access_token": "tok-123", "expires_in": 3600})

    async def bucket(request):
        seen["auth"].append(request.headers.get("Authorization"))
        return web.json_response({"name": "bkt"})

    async def objects(request):
        seen["auth"].append(request.headers.get("Authorization"))
        return web.json_response({"items": [{"name": "p/k"}]})

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/storage/v1/b/bkt", bucket)
    app.router.add_get("/storage/v1/b/bkt/o", objects)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        creds = tmp_path / "sa.json"
        creds.write_text(json.dumps({
            "type": "service_account", "client_email": "sa@proj.iam.gserviceaccount.com",
            "private_key": pem, "private_key_id": "kid1",
            "token_uri": f"http://127.0.0.1:{port}/token"}))
        monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
        st = GCSStorage("bkt", "p", endpoint=f"http://127.0.0.1:{port}")
        try:
            assert await st.list("") == ["k"]
            assert await st.list("", recursive=True) == ["k"]
        finally:
            await st.close()
        assert seen["token_requests"] == 1               # cached for the second request
        assert seen["auth"] == ["Bearer tok-123", "Bearer tok-123"]
        assert isinstance(ServiceAccountCredentials, type)
    finally:
        await runner.cleanup()


async def test_unlock_cancelled_while_the_renewal_winds_down_is_cancelled(tmp_path):
    """unlock() waits for the renewal task to end; if unlock() itself is cancelled meanwhile
    (shutdown), the cancellation reaches its caller instead of being swallowed with the
    renewal's own CancelledError."""
    s = open_storage(str(tmp_path / "autocert"), lease_seconds=30.0)
    try:
        await asyncio.wait_for(s.lock("slow"), STEP)
        h = s.held("slow")
        h.renewal.cancel()

        async def slow_to_stop():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)   # winding down (a storage call in flight)
                raise
        h.renewal = asyncio.get_running_loop().create_task(slow_to_stop())
        await asyncio.sleep(0)
        unlocking = asyncio.get_running_loop().create_task(s.unlock("slow"))
        await asyncio.sleep(0.05)
        unlocking.cancel()
        done, _ = await asyncio.wait([unlocking], timeout=STEP)
        assert done and unlocking.cancelled()
    finally:
        await s.close()
