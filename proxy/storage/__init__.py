"""Storage backends (file, S3, GCS) behind one factory, and the lease-lock algorithm they share.

``open_storage(autocert_dir)`` picks the backend from the setting's value; ``check(storage)``
fails fast at start when the location is unusable (missing bucket, refused credentials).

Every backend implements locks with four primitives on one "lock record" per name
(``locks/<name>.lock`` below the backend's root): create-if-absent, read (record + version
token), replace-if-version-matches and delete-if-version-matches. ``LeaseLocks`` turns them
into ``lock``/``unlock`` with a lease renewed in the background; see its docstring.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .base import KeyInfo, NotFound, Storage, StorageError

__all__ = [
    "Storage", "StorageError", "NotFound", "KeyInfo", "LeaseHandle",
    "open_storage", "check", "parse_location", "Location", "LocationError",
]

log = logging.getLogger("proxy.storage")

SETTING = "autocert_dir"
ACCEPTED = ("a directory path, s3://BUCKET/PREFIX, s3://BUCKET.s3.REGION.amazonaws.com/PREFIX "
            "or gs://BUCKET/PREFIX")


# ----------------------------------------------------------------------------- keys

def check_key(key: str, *, allow_root: bool = False) -> str:
    """Validate a "/"-separated relative key; return it without a trailing "/".

    Rejects absolute keys, empty components, "." and ".." (a key may never leave the root)."""
    if not isinstance(key, str):
        raise StorageError(f"storage key must be a string, got {type(key).__name__}")
    k = key.rstrip("/")
    if k == "":
        if allow_root:
            return ""
        raise StorageError("storage key is empty")
    if k.startswith("/") or "\\" in k or "\x00" in k:
        raise StorageError(f"storage key {key!r} is not a relative '/'-separated path")
    for part in k.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"storage key {key!r} contains an empty, '.' or '..' component")
    return k


def lock_key(name: str) -> str:
    return "locks/" + check_key(name) + ".lock"


# ----------------------------------------------------------------------------- locations

@dataclass(frozen=True)
class Location:
    kind: str            # "file" | "s3" | "gs"
    path: str = ""       # file: the directory
    bucket: str = ""
    prefix: str = ""     # object-key prefix without leading/trailing "/"
    region: str | None = None


class LocationError(StorageError):
    """A malformed ``autocert_dir``; ``why`` is the reason alone (config names the key its own way)."""

    def __init__(self, value: str, why: str):
        self.value, self.why = value, why
        super().__init__(f"{SETTING}={value!r}: {why}; accepted: {ACCEPTED}")


_bad = LocationError


def parse_location(location: str) -> Location:
    """Parse an ``autocert_dir`` value. Raises LocationError naming the setting when malformed.

    The one parser of storage locations: ``--check`` (through proxy.config) and start-up
    (``open_storage``) both call it, so they accept exactly the same values."""
    if not isinstance(location, str) or not location.strip():
        raise _bad(str(location), "empty value")
    value = location.strip()
    if "://" not in value:
        if _SCHEME_WITHOUT_SLASHES.match(value):
            raise _bad(value, "a storage URL needs '://' after its scheme")
        return Location("file", path=os.path.abspath(os.path.expanduser(value)))
    if any(c <= " " or c == "\x7f" for c in value):
        raise _bad(value, "white space or control characters in the URL")   # urlsplit drops some
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ("s3", "gs"):
        raise _bad(value, f"unknown scheme {parts.scheme!r}")
    if "?" in value or "#" in value:
        raise _bad(value, "a query or fragment ('?', '#') is not allowed in the URL")
    if "@" in parts.netloc:
        raise _bad(value, "credentials ('user@') are not allowed in the URL")
    if ":" in parts.netloc:
        raise _bad(value, "a port is not allowed in the URL")
    host = parts.netloc
    if not host:
        raise _bad(value, "missing bucket name")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except StorageError:
            raise _bad(value, f"prefix {prefix!r} has empty, '.' or '..' components") from None
    region = None
    bucket = host
    if scheme == "s3":
        bucket, region = _s3_host(value, host)
    _check_bucket(value, bucket, scheme)
    return Location(scheme, bucket=bucket, prefix=prefix, region=region)


_SCHEME_WITHOUT_SLASHES = re.compile(r"(?i)(s3|gs):")


def _s3_host(value: str, host: str) -> tuple[str, str | None]:
    """(bucket, region) of an s3:// host: BUCKET, BUCKET.s3.amazonaws.com (us-east-1) or
    BUCKET.s3.REGION.amazonaws.com."""
    labels = host.lower().split(".")
    if labels[-2:] == ["amazonaws", "com"]:
        if len(labels) >= 4 and labels[-3] == "s3":
            return host.rsplit(".", 3)[0], "us-east-1"
        if len(labels) >= 5 and labels[-4] == "s3":
            return host.rsplit(".", 4)[0], labels[-3]
        raise _bad(value, f"AWS host {host!r} is not BUCKET.s3.REGION.amazonaws.com")
    if "s3" in labels[1:-2]:
        # BUCKET.s3.REGION.example.com: an S3-compatible endpoint's host, not a bucket name
        raise _bad(value, f"host {host!r} looks like an S3 endpoint, not a bucket; for an "
                          f"S3-compatible store write s3://BUCKET/PREFIX and set AWS_ENDPOINT_URL_S3")
    return host, None


_BUCKET_CHARS = {"s3": frozenset("abcdefghijklmnopqrstuvwxyz0123456789-."),
                 "gs": frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")}


def _check_bucket(value: str, bucket: str, scheme: str) -> None:
    """The providers' naming rules (S3: 3-63 characters; GCS: 3-63, or up to 222 with dots and
    at most 63 between them), so that a typo is a start-up error, not a missing bucket."""
    what, chars = ("S3", "a-z 0-9 - .") if scheme == "s3" else ("GCS", "a-z 0-9 - _ .")
    longest = 222 if scheme == "gs" and "." in bucket else 63
    if not 3 <= len(bucket) <= longest:
        why = f"has {len(bucket)} characters, {what} bucket names have 3 to {longest}"
    elif not set(bucket) <= _BUCKET_CHARS[scheme]:
        why = f"has characters other than {chars}"
    elif not (bucket[0].isalnum() and bucket[-1].isalnum()):
        why = "must begin and end with a letter or a digit"
    elif ".." in bucket:
        why = "has two adjacent periods"
    elif any(len(part) > 63 for part in bucket.split(".")):
        why = "has more than 63 characters between two periods"
    elif _IPV4.fullmatch(bucket):
        why = "is formatted as an IP address"
    else:
        return
    raise _bad(value, f"bucket name {bucket!r} {why}")


_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


def open_storage(location: str, *, lease_seconds: float = 10.0,
                 timeout: float = 10.0) -> Storage:
    """Open the backend for an ``autocert_dir`` value (nothing is contacted yet; see ``check``).

    ``lease_seconds``: lock lease; ``timeout``: connect/read timeout of every request (S3/GCS)."""
    loc = parse_location(location)
    if loc.kind == "file":
        from .file import FileStorage
        return FileStorage(loc.path, lease_seconds=lease_seconds)
    if loc.kind == "s3":
        from .s3 import S3Storage
        return S3Storage(loc.bucket, loc.prefix, region=loc.region,
                         lease_seconds=lease_seconds, timeout=timeout)
    from .gcs import GCSStorage
    return GCSStorage(loc.bucket, loc.prefix, lease_seconds=lease_seconds, timeout=timeout)


async def check(storage: Storage) -> None:
    """Fail fast: raise StorageError naming ``autocert_dir`` if the store cannot be written and
    read back (missing directory permissions, missing bucket, refused credentials, unreachable)."""
    verify = getattr(storage, "verify", None)
    if verify is not None:
        await verify()
        return
    await probe(storage)


async def probe(storage: Storage) -> None:
    """Write, read back and delete a small object; errors name the setting."""
    key = f"probe/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        await storage.store(key, b"probe")
        if await storage.load(key) != b"probe":
            raise StorageError(f"{storage.describe()}: probe object read back differently")
        await storage.delete(key)
    except StorageError as e:
        raise StorageError(f"{SETTING}={storage.describe()!r} is not usable: {e}") from e


# ----------------------------------------------------------------------------- leases

@dataclass
class LockRecord:
    """What a lock object holds, plus the backend's version token (ETag, generation, owner)."""
    owner: str
    expires: float
    token: object


@dataclass
class LeaseHandle:
    """A lock this instance holds. ``lost`` is set when a renewal found someone else's record
    (or our lease ran out before we could renew): the holder must stop relying on it."""
    name: str
    owner: str
    token: object
    expires: float
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    renewal: asyncio.Task | None = None


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def encode_record(owner: str, expires: float) -> bytes:
    return json.dumps({"owner": owner, "expires": round(expires, 3)}).encode()


def decode_record(data: bytes) -> tuple[str, float] | None:
    try:
        obj = json.loads(data)
        return str(obj["owner"]), float(obj["expires"])
    except (ValueError, KeyError, TypeError):
        return None


class LeaseLocks:
    """Lease locks on top of four conditional primitives (mixed into every backend).

    lock(name): loop { create-if-absent -> held; else read the record; if its ``expires`` is
    in the past, replace it conditionally on the version we read (exactly one waiter's
    conditional replace can succeed) -> held; else sleep 50-250 ms (jittered) }.
    While held, a task renews the record a third of a lease after it was last written,
    conditionally on our last version; a failed condition (or our lease running out before a
    renewal got through, even while that renewal is still in flight) sets
    ``handle.lost``. unlock(name) deletes the record conditionally on our version.
    Expiry times are unix wall-clock times: instances sharing a store need synced clocks
    (as certmagic assumes); clock skew must stay well below the lease.
    """

    lease_seconds: float
    poll_interval = (0.05, 0.25)

    # --- primitives (backend-specific); all raise StorageError on failure of the store
    async def _lock_create(self, name: str, data: bytes) -> object | None:
        """Create the record if absent; return its version token, or None if it exists."""
        raise NotImplementedError

    async def _lock_read(self, name: str) -> LockRecord | None:
        """Return the current record, or None if there is none."""
        raise NotImplementedError

    async def _lock_replace(self, name: str, data: bytes, token: object) -> object | None:
        """Replace the record if its version is still ``token``; new token, or None if not."""
        raise NotImplementedError

    async def _lock_delete(self, name: str, token: object) -> bool:
        """Delete the record if its version is still ``token``."""
        raise NotImplementedError

    # --- algorithm
    def _leases(self) -> dict[str, LeaseHandle]:
        d = self.__dict__.get("_lease_handles")
        if d is None:
            d = self.__dict__["_lease_handles"] = {}
        return d

    def held(self, name: str) -> LeaseHandle | None:
        """The handle of a lock this instance holds (``handle.lost`` tells if it was lost)."""
        return self._leases().get(name)

    async def lock(self, name: str) -> None:
        check_key(name)
        lease = self.lease_seconds
        while True:
            owner = new_owner()
            expires = time.time() + lease
            token = await self._lock_create(name, encode_record(owner, expires))
            if token is None:
                current = await self._lock_read(name)
                if current is None:
                    continue                     # released between our two requests
                if current.expires < time.time():
                    expires = time.time() + lease
                    token = await self._lock_replace(name, encode_record(owner, expires),
                                                     current.token)
                    if token is not None:
                        log.warning("%s: took over lock %r whose lease lapsed (holder %s)",
                                    self.describe(), name, current.owner)
            if token is not None:
                return self._start_lease(name, owner, token, expires)
            await asyncio.sleep(random.uniform(*self.poll_interval))

    def _start_lease(self, name: str, owner: str, token: object, expires: float) -> None:
        handle = LeaseHandle(name, owner, token, expires)
        leases = self._leases()
        old = leases.get(name)
        if old is not None and old.renewal is not None:
            old.renewal.cancel()                 # a lost handle nobody unlocked
        handle.renewal = asyncio.get_running_loop().create_task(
            self._renew(handle), name=f"lease-renewal:{name}")
        leases[name] = handle

    def _next_renewal(self, h: LeaseHandle) -> float:
        """Seconds until the next renewal: a third of a lease after the record was written.
        Counted from the expiry it holds, not from now: the request that acquired or renewed
        the lock may itself have taken a good part of the lease (an S3 client's first request
        builds the client: up to 1.5 s on a loaded machine), and a fixed lease/3 after that
        could come after the lease had already run out."""
        lease = self.lease_seconds
        return min(lease / 3, max(0.0, h.expires - time.time() - 2 * lease / 3))

    async def _renew(self, h: LeaseHandle) -> None:
        lease = self.lease_seconds
        delay = self._next_renewal(h)
        while True:
            await asyncio.sleep(delay)
            delay = lease / 3                    # after a failed attempt: retry this much later
            left = h.expires - time.time()
            if left <= 0:
                log.error("%s: lease on lock %r ran out before it could be renewed; lock lost",
                          self.describe(), h.name)
                h.lost.set()
                return
            expires = time.time() + lease
            try:
                # A renewal still in flight when our lease runs out cannot help any more: a
                # waiter may take the lock over now. Without this bound a slow store (S3 allows
                # 3 x timeout per call) kept ``lost`` unset long after the lease had lapsed.
                async with asyncio.timeout(left):
                    token = await self._lock_replace(h.name, encode_record(h.owner, expires),
                                                     h.token)
            except TimeoutError:
                log.error("%s: lease on lock %r ran out while its renewal was in flight; "
                          "lock lost", self.describe(), h.name)
                h.lost.set()
                return
            except StorageError as e:
                log.warning("%s: renewing lock %r failed (will retry): %s",
                            self.describe(), h.name, e)
                continue
            if token is None:
                log.error("%s: lock %r was taken over by another instance; lock lost",
                          self.describe(), h.name)
                h.lost.set()
                return
            h.token, h.expires = token, expires
            delay = self._next_renewal(h)

    async def unlock(self, name: str) -> None:
        h = self._leases().pop(name, None)
        if h is None:
            return                               # not ours: never touch another's lock
        if h.renewal is not None:
            h.renewal.cancel()
            # Not ``await h.renewal``: its CancelledError could not be told from a cancellation
            # of unlock() itself, which must go on to the caller. A renewal that failed is not
            # unlock's error: its exception is marked retrieved.
            await asyncio.wait([h.renewal])
            if not h.renewal.cancelled():
                h.renewal.exception()
        if h.lost.is_set():
            return
        if not await self._lock_delete(name, h.token):
            log.warning("%s: lock %r was no longer ours at unlock", self.describe(), name)

    async def _close_leases(self) -> None:
        for name in list(self._leases()):
            try:
                await self.unlock(name)
            except StorageError as e:
                log.warning("%s: releasing lock %r at close failed: %s", self.describe(), name, e)
