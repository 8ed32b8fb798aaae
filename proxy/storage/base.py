"""Storage: the key-value interface every backend (file, S3, GCS) implements, and its contract.

Contract (the tests in tests/test_storage_contract.py hold every backend to it):
- Keys are "/"-separated relative paths ("certificates/<issuer>/<name>/<name>.crt"). A backend
  maps them below its own root or prefix and never outside it.
- ``store`` is atomic: a reader sees the whole old value or the whole new value, never part
  of one. ``private=True`` marks secrets (private keys): the file backend writes them 0600.
- ``load`` / ``stat`` / ``delete`` on a missing key raise ``NotFound`` (never return None).
  ``delete`` of a "directory" prefix removes everything below it.
- ``list(prefix)`` returns the keys directly below ``prefix`` (recursive=False) or all keys
  below it (recursive=True); a missing prefix gives an empty list.
- ``lock(name, lease)`` waits until this caller holds the lock ``name`` exclusively, across
  processes and machines sharing the store. A holder's lease is renewed in the background
  while held; a lease not renewed for ``lease`` seconds has lapsed and may be taken over by
  one (and only one) waiter. ``unlock`` releases it only if we still hold it.
  Use ``async with storage.locked(name):``.
- Errors other than NotFound (store unreachable, permission refused) raise ``StorageError``
  with a message naming the backend and the key.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator


class StorageError(Exception):
    """The store failed (unreachable, refused, corrupt). The message names backend and key."""


class NotFound(StorageError):
    """The key does not exist."""


@dataclass(frozen=True)
class KeyInfo:
    key: str
    size: int
    modified: float  # unix time


class Storage(abc.ABC):
    """Key-value store with locks. See the module docstring for the contract."""

    lease_seconds: float = 10.0

    @abc.abstractmethod
    async def store(self, key: str, value: bytes, *, private: bool = False) -> None: ...

    @abc.abstractmethod
    async def load(self, key: str) -> bytes: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def list(self, prefix: str, recursive: bool = False) -> list[str]: ...

    @abc.abstractmethod
    async def stat(self, key: str) -> KeyInfo: ...

    @abc.abstractmethod
    async def lock(self, name: str) -> None: ...

    @abc.abstractmethod
    async def unlock(self, name: str) -> None: ...

    async def close(self) -> None:
        """Release resources (HTTP sessions, lease-renewal tasks)."""

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        await self.lock(name)
        try:
            yield
        finally:
            await self.unlock(name)

    def describe(self) -> str:
        """Human-readable location, e.g. "/data/autocert" or "s3://bucket/prefix"."""
        return type(self).__name__
