"""GCSStorage: keys are objects ``<prefix>/<key>`` in one Google Cloud Storage bucket.

Talks to the GCS JSON API directly with aiohttp (already a dependency through aiobotocore)
rather than gcloud-aio-storage: every write is a MULTIPART upload we build ourselves, which is
what preconditions need (fake-gcs-server honours ``ifGenerationMatch`` only on multipart
uploads, and GCS itself accepts them there), and it adds no dependency.

Authentication (Application Default Credentials, in this order):
``STORAGE_EMULATOR_HOST`` set -> no auth, requests go to the emulator;
``GOOGLE_APPLICATION_CREDENTIALS`` (or gcloud's well-known file) with a ``service_account``
key -> a JWT signed with ``cryptography`` exchanged for a token, or an ``authorized_user``
refresh token; otherwise the GCE/GKE metadata server. Tokens are cached until 60 s before
they expire.

Locks (see ``LeaseLocks``) are objects ``<prefix>/locks/<name>.lock`` holding
``{"owner", "expires"}``: create = multipart upload with ``ifGenerationMatch=0``; renew and
take over = multipart upload with ``ifGenerationMatch=<generation read>``; release =
DELETE with ``ifGenerationMatch=<our generation>`` after re-reading the generation (the
emulator ignores preconditions on DELETE; GCS honours them). 412 = someone else won.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import time
import uuid
from urllib.parse import quote

import aiohttp

from . import LeaseLocks, LockRecord, SETTING, check_key, decode_record, lock_key, probe
from .base import KeyInfo, NotFound, Storage, StorageError

log = logging.getLogger("proxy.storage.gcs")

GCS_API = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"


def _rfc3339(s: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# ----------------------------------------------------------------------------- credentials

class Credentials:
    """Bearer-token source; ``None`` token means no Authorization header (emulator)."""

    async def token(self, http: aiohttp.ClientSession) -> str | None:
        return None


class _CachedToken(Credentials):
    def __init__(self) -> None:
        self._token: str | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def token(self, http: aiohttp.ClientSession) -> str | None:
        async with self._lock:
            if self._token is None or time.time() > self._until:
                tok, lifetime = await self._fetch(http)
                self._token, self._until = tok, time.time() + max(0.0, lifetime - 60)
            return self._token

    async def _fetch(self, http: aiohttp.ClientSession) -> tuple[str, float]:
        raise NotImplementedError

    @staticmethod
    async def _token_response(resp: aiohttp.ClientResponse, what: str) -> tuple[str, float]:
        body = await resp.read()
        if resp.status != 200:
            raise StorageError(f"GCS credentials ({what}) refused: HTTP {resp.status}: "
                               f"{body[:200].decode('utf-8', 'replace')}")
        obj = json.loads(body)
        return obj["access_token"], float(obj.get("expires_in", 3600))


class ServiceAccountCredentials(_CachedToken):
    """A service-account JSON key: RS256 JWT (signed with cryptography) for an access token."""

    def __init__(self, info: dict) -> None:
        super().__init__()
        from cryptography.hazmat.primitives import serialization
        self.email = info["client_email"]
        self.token_uri = info.get("token_uri") or DEFAULT_TOKEN_URI
        self._key = serialization.load_pem_private_key(info["private_key"].encode(), None)
        self._key_id = info.get("private_key_id")

    def assertion(self, now: float | None = None) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        now = int(now if now is not None else time.time())
        header = {"alg": "RS256", "typ": "JWT"}
        if self._key_id:
            header["kid"] = self._key_id
        claims = {"iss": self.email, "scope": SCOPE, "aud": self.token_uri,
                  "iat": now, "exp": now + 3600}
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
        signing_input = (b64(json.dumps(header, separators=(",", ":")).encode()) + b"." +
                         b64(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return (signing_input + b"." + b64(sig)).decode()

    async def _fetch(self, http):
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": self.assertion()}
        async with http.post(self.token_uri, data=form) as resp:
            return await self._token_response(resp, f"service account {self.email}")


class AuthorizedUserCredentials(_CachedToken):
    """``gcloud auth application-default login`` credentials (a refresh token)."""

    def __init__(self, info: dict) -> None:
        super().__init__()
        self.info = info

    async def _fetch(self, http):
        form = {"grant_type": "refresh_token", "client_id": self.info["client_id"],
                "client_secret": self.info["client_secret"],
                "refresh_token": self.info["refresh_token"]}
        async with http.post(self.info.get("token_uri") or DEFAULT_TOKEN_URI, data=form) as resp:
            return await self._token_response(resp, "authorized user")


class MetadataServerCredentials(_CachedToken):
    """The GCE / GKE / Cloud Run metadata server's default service account."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__()
        self.host = host or os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"

    async def _fetch(self, http):
        url = (f"http://{self.host}/computeMetadata/v1/instance/service-accounts/default/token")
        try:
            async with http.get(url, headers={"Metadata-Flavor": "Google"},
                                timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return await self._token_response(resp, "metadata server")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise StorageError(
                "no GCS credentials: GOOGLE_APPLICATION_CREDENTIALS is not set and the GCE "
                f"metadata server ({self.host}) is unreachable: {e or type(e).__name__}") from e


def default_credentials() -> Credentials:
    """Application Default Credentials (minus the emulator case, handled by GCSStorage)."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        well_known = os.path.join(os.environ.get("CLOUDSDK_CONFIG") or
                                  os.path.expanduser("~/.config/gcloud"),
                                  "application_default_credentials.json")
        path = well_known if os.path.exists(well_known) else None
    if path is None:
        return MetadataServerCredentials()
    try:
        with open(path, "rb") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise StorageError(f"GOOGLE_APPLICATION_CREDENTIALS={path!r}: cannot read a JSON "
                           f"credentials file: {e}") from e
    kind = info.get("type")
    try:
        if kind == "service_account":
            return ServiceAccountCredentials(info)
        if kind == "authorized_user":
            return AuthorizedUserCredentials(info)
    except (KeyError, ValueError, TypeError) as e:
        raise StorageError(f"credentials file {path!r}: malformed {kind} key ({e})") from e
    raise StorageError(f"credentials file {path!r}: type {kind!r} is not supported; "
                       f"accepted: service_account, authorized_user")


# ----------------------------------------------------------------------------- storage

class GCSStorage(LeaseLocks, Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 credentials: Credentials | None = None, lease_seconds: float = 10.0,
                 timeout: float = 10.0) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix, allow_root=True)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint is None and emulator:
            endpoint = emulator if "://" in emulator else f"http://{emulator}"
            credentials = credentials or Credentials()      # the emulator wants no auth
        self.endpoint = (endpoint or GCS_API).rstrip("/")
        self._credentials = credentials
        self.lease_seconds = float(lease_seconds)
        self.timeout = float(timeout)
        self._http: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}" if self.prefix else f"gs://{self.bucket}"

    # ------------------------------------------------------------------ plumbing
    def _obj(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, obj: str) -> str:
        return obj[len(self.prefix) + 1:] if self.prefix else obj

    def _o_url(self, obj: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(obj, safe='')}"

    async def _request(self, op: str, key: str, method: str, url: str, *,
                       params: dict | None = None, data: bytes | None = None,
                       headers: dict | None = None) -> tuple[int, dict, bytes]:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=self.timeout * 3, connect=self.timeout, sock_read=self.timeout))
        if self._credentials is None:
            self._credentials = default_credentials()
        hdrs = dict(headers or {})
        try:
            token = await self._credentials.token(self._http)
            if token:
                hdrs["Authorization"] = f"Bearer {token}"
            async with self._http.request(method, url, params=params, data=data,
                                          headers=hdrs) as resp:
                return resp.status, dict(resp.headers), await resp.read()
        except StorageError as e:
            raise StorageError(f"{self.describe()}: {op} {key!r} failed: {e}") from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            why = str(e) or type(e).__name__
            raise StorageError(f"{self.describe()}: {op} {key!r} failed: {why}") from e

    def _fail(self, op: str, key: str, status: int, body: bytes) -> StorageError:
        msg = body[:300].decode("utf-8", "replace").strip()
        with_hint = ""
        if status in (401, 403):
            with_hint = " (credentials refused: check the service account's bucket permissions)"
        return StorageError(f"{self.describe()}: {op} {key!r} failed: HTTP {status}{with_hint}: "
                            f"{msg}")

    async def _upload(self, op: str, key: str, obj: str, value: bytes,
                      params: dict | None = None) -> tuple[int, dict]:
        """Multipart upload (atomic; the only upload type the emulator checks conditions on)."""
        boundary = "autocert-" + uuid.uuid4().hex
        meta = json.dumps({"name": obj, "contentType": "application/octet-stream"}).encode()
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            meta, f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            value, f"\r\n--{boundary}--\r\n".encode()])
        url = f"{self.endpoint}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        q = {"uploadType": "multipart", **(params or {})}
        status, _, resp = await self._request(
            op, key, "POST", url, params=q, data=body,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"})
        if status == 200:
            return status, json.loads(resp)
        if status in (409, 412) or (status == 404 and "ifGenerationMatch" in q
                                    and q["ifGenerationMatch"] != "0"):
            return status, {}              # precondition lost (404: the record is gone)
        raise self._fail(op, key, status, resp)

    # ------------------------------------------------------------------ key-value
    async def store(self, key: str, value: bytes, *, private: bool = False) -> None:
        k = check_key(key)
        await self._upload("store", k, self._obj(k), bytes(value))

    async def _get_media(self, op: str, k: str) -> tuple[bytes, dict] | None:
        status, headers, body = await self._request(op, k, "GET", self._o_url(self._obj(k)),
                                                    params={"alt": "media"})
        if status == 404:
            return None
        if status != 200:
            raise self._fail(op, k, status, body)
        return body, headers

    async def load(self, key: str) -> bytes:
        k = check_key(key)
        got = await self._get_media("load", k)
        if got is None:
            raise NotFound(f"{self.describe()}: {k!r} not found")
        return got[0]

    async def _meta(self, op: str, k: str) -> dict | None:
        status, _, body = await self._request(op, k, "GET", self._o_url(self._obj(k)))
        if status == 404:
            return None
        if status != 200:
            raise self._fail(op, k, status, body)
        return json.loads(body)

    async def _objects(self, raw_prefix: str, delimiter: bool,
                       max_results: int | None = None) -> tuple[list[str], list[str]]:
        url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o"
        # GCS never sends more than 1000 per page; asking for that makes emulators page too
        params = {"prefix": raw_prefix, "maxResults": str(max_results or 1000)}
        if delimiter:
            params["delimiter"] = "/"
        names: list[str] = []
        dirs: list[str] = []
        while True:
            status, _, body = await self._request("list", raw_prefix, "GET", url, params=params)
            if status != 200:
                raise self._fail("list", raw_prefix, status, body)
            obj = json.loads(body)
            names += [i["name"] for i in obj.get("items", [])]
            dirs += obj.get("prefixes", [])
            token = obj.get("nextPageToken")
            if not token or max_results:
                return names, dirs
            params["pageToken"] = token

    async def _delete_obj(self, op: str, k: str, obj: str, params: dict | None = None) -> int:
        status, _, body = await self._request(op, k, "DELETE", self._o_url(obj), params=params)
        if status not in (200, 204, 404, 412):
            raise self._fail(op, k, status, body)
        return status

    async def delete(self, key: str) -> None:
        k = check_key(key)
        below, _ = await self._objects(self._obj(k) + "/", delimiter=False)
        status = await self._delete_obj("delete", k, self._obj(k))
        for name in below:
            await self._delete_obj("delete", k, name)
        if status == 404 and not below:
            raise NotFound(f"{self.describe()}: {k!r} not found")

    async def exists(self, key: str) -> bool:
        k = check_key(key)
        if await self._meta("stat", k) is not None:
            return True
        names, _ = await self._objects(self._obj(k) + "/", delimiter=False, max_results=1)
        return bool(names)

    async def list(self, prefix: str, recursive: bool = False) -> list[str]:
        p = check_key(prefix, allow_root=True)
        raw = self._obj(p) + "/" if p else (self.prefix + "/" if self.prefix else "")
        names, dirs = await self._objects(raw, delimiter=not recursive)
        out = [self._rel(n) for n in names if not n.endswith("/")]
        out += [self._rel(d.rstrip("/")) for d in dirs]
        return sorted(set(out))

    async def stat(self, key: str) -> KeyInfo:
        k = check_key(key)
        meta = await self._meta("stat", k)
        if meta is None:
            raise NotFound(f"{self.describe()}: {k!r} not found")
        return KeyInfo(key=k, size=int(meta["size"]), modified=_rfc3339(meta["updated"]))

    async def verify(self) -> None:
        """Fail fast: bucket missing, credentials refused or store unreachable."""
        where = f"{SETTING}={self.describe()!r}"
        url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}"
        try:
            status, _, body = await self._request("check bucket", "", "GET", url)
        except StorageError as e:
            raise StorageError(f"{where}: cannot reach GCS at {self.endpoint}: {e}") from e
        if status == 404:
            raise StorageError(f"{where}: bucket {self.bucket!r} does not exist; create it or "
                               f"give an existing bucket")
        if status in (401, 403):
            raise StorageError(f"{where}: access to bucket {self.bucket!r} refused (HTTP "
                               f"{status}); check the credentials (GOOGLE_APPLICATION_CREDENTIALS "
                               f"or the instance's service account) and its bucket role")
        if status != 200:
            raise StorageError(f"{where}: {self._fail('check bucket', '', status, body)}")
        await probe(self)

    async def close(self) -> None:
        await self._close_leases()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    # ------------------------------------------------------------------ lock primitives
    async def _lock_write(self, name: str, data: bytes, generation: str) -> object | None:
        k = lock_key(name)
        status, meta = await self._upload("write lock", k, self._obj(k), data,
                                          {"ifGenerationMatch": generation})
        return str(meta["generation"]) if status == 200 else None

    async def _lock_create(self, name: str, data: bytes) -> object | None:
        return await self._lock_write(name, data, "0")

    async def _lock_replace(self, name: str, data: bytes, token: object) -> object | None:
        return await self._lock_write(name, data, str(token))

    async def _lock_read(self, name: str) -> LockRecord | None:
        k = lock_key(name)
        got = await self._get_media("read lock", k)
        if got is None:
            return None
        data, headers = got
        generation = headers.get("X-Goog-Generation") or headers.get("x-goog-generation")
        if generation is None:
            meta = await self._meta("read lock", k)
            if meta is None:
                return None
            generation = meta["generation"]
            # The data may belong to an older generation; a replace with this generation
            # is still safe (it is conditional) and the expiry we act on is only staler.
        rec = decode_record(data)
        if rec is None:      # not a record we can parse: expire it by age
            modified = headers.get("Last-Modified")
            ts = email.utils.parsedate_to_datetime(modified).timestamp() if modified else time.time()
            return LockRecord("<unreadable>", ts + self.lease_seconds, str(generation))
        return LockRecord(rec[0], rec[1], str(generation))

    async def _lock_delete(self, name: str, token: object) -> bool:
        k = lock_key(name)
        # fake-gcs-server ignores ifGenerationMatch on DELETE: re-read the generation first so
        # we never delete a record someone else wrote after taking over. On GCS the
        # precondition itself closes the remaining gap.
        meta = await self._meta("release lock", k)
        if meta is None or str(meta.get("generation")) != str(token):
            return False
        status = await self._delete_obj("release lock", k, self._obj(k),
                                        {"ifGenerationMatch": str(token)})
        return status in (200, 204)
