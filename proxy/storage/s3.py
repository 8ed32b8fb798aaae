"""S3Storage: keys are objects ``<prefix>/<key>`` in one bucket (aiobotocore).

Credentials come from the standard AWS chain (environment, shared files, instance/container
roles). The endpoint comes from botocore itself, which honours ``AWS_ENDPOINT_URL_S3`` and
``AWS_ENDPOINT_URL`` (checked with botocore 1.43); ``endpoint_url=`` overrides both.
Each PutObject is atomic: a reader never sees part of an object.

Locks (see ``LeaseLocks``) are objects ``<prefix>/locks/<name>.lock`` holding
``{"owner", "expires"}``, using S3 conditional writes (AWS since 2024, moto too):
create = PutObject(IfNoneMatch="*"); renew and take over a lapsed lease =
PutObject(IfMatch=<the ETag read>); release = DeleteObject(IfMatch=<our ETag>).
412 PreconditionFailed (or 409 ConditionalRequestConflict) means someone else won.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from . import LeaseLocks, LockRecord, SETTING, check_key, decode_record, lock_key, probe
from .base import KeyInfo, NotFound, Storage, StorageError

log = logging.getLogger("proxy.storage.s3")

_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _load_botocore_data(session: AioSession) -> str | None:
    """Fill the session loader's cache with what create_client("s3") parses (best effort:
    anything missing here is simply loaded by create_client itself), and return the region
    the environment or ~/.aws/config names (a file read, too)."""
    try:
        loader = session.get_component("data_loader")
        for type_name in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model("s3", type_name)
        for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
            loader.load_data(name)
    except Exception as e:                              # noqa: BLE001 (an optimisation only)
        log.debug("preloading botocore data failed: %s", e)
    return session.get_config_variable("region")


class S3Storage(LeaseLocks, Storage):
    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None,
                 endpoint_url: str | None = None, lease_seconds: float = 10.0,
                 timeout: float = 10.0) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix, allow_root=True)
        self.region = region
        self.endpoint_url = endpoint_url
        self.lease_seconds = float(lease_seconds)
        self.timeout = float(timeout)
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None
        self._client_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # ------------------------------------------------------------------ plumbing
    async def _c(self):
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                session = AioSession()
                # create_client parses botocore's S3 model and endpoint rules synchronously:
                # 0.25-0.5 s on an idle 2-core machine, up to 0.9 s loaded, with the event loop
                # stalled (no proxy traffic, no lease renewals of other locks). Parse them in a
                # thread first; the session's loader caches them for create_client.
                configured = await asyncio.to_thread(_load_botocore_data, session)
                region = self.region or configured or "us-east-1"
                config = AioConfig(connect_timeout=self.timeout, read_timeout=self.timeout,
                                   retries={"max_attempts": 2, "mode": "standard"})
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(session.create_client(
                    "s3", region_name=region, endpoint_url=self.endpoint_url, config=config))
                self._stack = stack
        return self._client

    def _obj(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, obj: str) -> str:
        return obj[len(self.prefix) + 1:] if self.prefix else obj

    def _err(self, op: str, key: str, e: Exception) -> StorageError:
        if isinstance(e, ClientError):
            why = f"{_code(e)}: {e.response.get('Error', {}).get('Message', '')}"
        else:
            why = str(e) or type(e).__name__
        return StorageError(f"{self.describe()}: {op} {key!r} failed: {why}")

    async def _call(self, op: str, key: str, method: str, **kw):
        """One S3 call; maps transport failures and hangs to StorageError (not NotFound)."""
        c = await self._c()
        try:
            # botocore's own timeouts bound each attempt; this bounds retries + body reads.
            # asyncio.timeout, not wait_for: on Python 3.11 a wait_for whose call completes in
            # the same loop step as a cancellation from outside returns the result and drops
            # the cancellation (CPython gh-86296), so a lock() cancelled by its caller's
            # timeout kept polling until it got the lock: a hang while another holder renews.
            async with asyncio.timeout(self.timeout * 3):
                return await getattr(c, method)(Bucket=self.bucket, **kw)
        except ClientError:
            raise
        except (BotoCoreError, OSError, asyncio.TimeoutError) as e:
            raise self._err(op, key, e) from e

    async def _read_body(self, resp, op: str, key: str) -> bytes:
        try:
            async with resp["Body"] as body, asyncio.timeout(self.timeout * 3):
                return await body.read()        # asyncio.timeout: see _call
        except (BotoCoreError, OSError, asyncio.TimeoutError) as e:
            raise self._err(op, key, e) from e

    # ------------------------------------------------------------------ key-value
    async def store(self, key: str, value: bytes, *, private: bool = False) -> None:
        k = check_key(key)
        try:
            await self._call("store", k, "put_object", Key=self._obj(k), Body=bytes(value))
        except ClientError as e:
            raise self._err("store", k, e) from e

    async def load(self, key: str) -> bytes:
        k = check_key(key)
        try:
            resp = await self._call("load", k, "get_object", Key=self._obj(k))
        except ClientError as e:
            if _code(e) in _MISSING:
                raise NotFound(f"{self.describe()}: {k!r} not found") from None
            raise self._err("load", k, e) from e
        return await self._read_body(resp, "load", k)

    async def _objects(self, prefix: str, delimiter: bool):
        """All (objects, common prefixes) below ``prefix`` (a raw object prefix)."""
        objs: list[dict] = []
        dirs: list[str] = []
        kw = {"Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = "/"
        while True:
            try:
                resp = await self._call("list", prefix, "list_objects_v2", **kw)
            except ClientError as e:
                raise self._err("list", prefix, e) from e
            objs.extend(resp.get("Contents", []))
            dirs.extend(p["Prefix"] for p in resp.get("CommonPrefixes", []))
            if not resp.get("IsTruncated"):
                return objs, dirs
            kw["ContinuationToken"] = resp["NextContinuationToken"]

    async def delete(self, key: str) -> None:
        k = check_key(key)
        found = await self.exists_object(k)
        below, _ = await self._objects(self._obj(k) + "/", delimiter=False)
        if not found and not below:
            raise NotFound(f"{self.describe()}: {k!r} not found")
        names = ([self._obj(k)] if found else []) + [o["Key"] for o in below]
        for i in range(0, len(names), 1000):
            batch = {"Objects": [{"Key": n} for n in names[i:i + 1000]], "Quiet": True}
            try:
                if len(names) == 1:
                    await self._call("delete", k, "delete_object", Key=names[0])
                else:
                    resp = await self._call("delete", k, "delete_objects", Delete=batch)
                    if resp.get("Errors"):
                        err = resp["Errors"][0]
                        raise StorageError(f"{self.describe()}: delete {err.get('Key')!r} "
                                           f"failed: {err.get('Code')}: {err.get('Message')}")
            except ClientError as e:
                raise self._err("delete", k, e) from e

    async def exists_object(self, k: str) -> bool:
        try:
            await self._call("stat", k, "head_object", Key=self._obj(k))
            return True
        except ClientError as e:
            if _code(e) in _MISSING or _status(e) == 404:
                return False
            raise self._err("stat", k, e) from e

    async def exists(self, key: str) -> bool:
        k = check_key(key)
        if await self.exists_object(k):
            return True
        try:
            resp = await self._call("list", k, "list_objects_v2",
                                    Prefix=self._obj(k) + "/", MaxKeys=1)
        except ClientError as e:
            raise self._err("list", k, e) from e
        return bool(resp.get("Contents"))

    async def list(self, prefix: str, recursive: bool = False) -> list[str]:
        p = check_key(prefix, allow_root=True)
        raw = self._obj(p) + "/" if p else (self.prefix + "/" if self.prefix else "")
        objs, dirs = await self._objects(raw, delimiter=not recursive)
        out = [self._rel(o["Key"]) for o in objs if not o["Key"].endswith("/")]
        out += [self._rel(d.rstrip("/")) for d in dirs]
        return sorted(set(out))

    async def stat(self, key: str) -> KeyInfo:
        k = check_key(key)
        try:
            resp = await self._call("stat", k, "head_object", Key=self._obj(k))
        except ClientError as e:
            if _code(e) in _MISSING or _status(e) == 404:
                raise NotFound(f"{self.describe()}: {k!r} not found") from None
            raise self._err("stat", k, e) from e
        return KeyInfo(key=k, size=int(resp["ContentLength"]),
                       modified=resp["LastModified"].timestamp())

    async def verify(self) -> None:
        """Fail fast: bucket missing, credentials refused or store unreachable."""
        where = f"{SETTING}={self.describe()!r}"
        try:
            await self._call("check bucket", "", "head_bucket")
        except ClientError as e:
            status = _status(e)
            if status == 404 or _code(e) in ("404", "NoSuchBucket"):
                raise StorageError(f"{where}: bucket {self.bucket!r} does not exist; create it "
                                   f"or give an existing bucket") from e
            if status in (401, 403):
                raise StorageError(f"{where}: access to bucket {self.bucket!r} refused "
                                   f"({_code(e)}); check the AWS credentials and the bucket "
                                   f"policy (needs s3:GetObject, PutObject, DeleteObject, "
                                   f"ListBucket)") from e
            raise StorageError(f"{where}: {self._err('check bucket', '', e)}") from e
        except NoCredentialsError as e:
            raise StorageError(f"{where}: no AWS credentials found (environment, shared "
                               f"credentials file or instance role)") from e
        except StorageError as e:
            raise StorageError(f"{where}: cannot reach the S3 endpoint: {e}") from e
        await probe(self)

    async def close(self) -> None:
        await self._close_leases()
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    # ------------------------------------------------------------------ lock primitives
    async def _lock_put(self, name: str, data: bytes, **cond) -> object | None:
        k = lock_key(name)
        try:
            resp = await self._call("write lock", k, "put_object", Key=self._obj(k),
                                    Body=data, **cond)
        except ClientError as e:
            if _code(e) in _LOST_RACE or _status(e) in (409, 412):
                return None
            raise self._err("write lock", k, e) from e
        return resp["ETag"]

    async def _lock_create(self, name: str, data: bytes) -> object | None:
        return await self._lock_put(name, data, IfNoneMatch="*")

    async def _lock_replace(self, name: str, data: bytes, token: object) -> object | None:
        return await self._lock_put(name, data, IfMatch=token)

    async def _lock_read(self, name: str) -> LockRecord | None:
        k = lock_key(name)
        try:
            resp = await self._call("read lock", k, "get_object", Key=self._obj(k))
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise self._err("read lock", k, e) from e
        data = await self._read_body(resp, "read lock", k)
        rec = decode_record(data)
        if rec is None:      # not ours to parse: expire it by age
            return LockRecord("<unreadable>",
                              resp["LastModified"].timestamp() + self.lease_seconds, resp["ETag"])
        return LockRecord(rec[0], rec[1], resp["ETag"])

    async def _lock_delete(self, name: str, token: object) -> bool:
        k = lock_key(name)
        try:
            await self._call("release lock", k, "delete_object", Key=self._obj(k), IfMatch=token)
        except ClientError as e:
            if _code(e) in _LOST_RACE or _status(e) in (404, 409, 412):
                return False
            raise self._err("release lock", k, e) from e
        return True
