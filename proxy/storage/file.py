"""FileStorage: keys are files below a root directory (certmagic's layout, so a directory written
by Caddy or Pomerium can be reused).

Writes are atomic: a temporary file in the target directory (created 0600 from the start),
write, fsync, rename over the target, fsync the directory. Directories are created 0700.

Locks (see ``LeaseLocks``) are files ``locks/<name>.lock`` holding ``{"owner", "expires"}``:
- create: the record is written to a temporary file and hard-linked to the lock path; the
  link fails if the lock exists (an O_EXCL create that never shows a half-written record).
  Filesystems without hard links fall back to O_CREAT|O_EXCL + write.
- renew / take over / release: compare-and-swap on the file's content: under an ``flock`` on
  ``locks/<name>.lock.cas`` (held for the few milliseconds of read-compare-rename, released by
  the kernel if the process dies), the record is re-read and replaced (temp + rename) or
  unlinked only if it is still byte-for-byte the version the caller saw. Owners are unique
  per acquisition and expiry changes on every renewal, so a version never repeats.

Blocking file work runs in a thread (``asyncio.to_thread``): fsync can stall for a long time
on a busy or networked disk, and the event loop also serves TLS handshakes.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile

from . import LeaseLocks, LockRecord, SETTING, check_key, decode_record, lock_key, probe
from .base import KeyInfo, NotFound, Storage, StorageError

log = logging.getLogger("proxy.storage.file")

_TMP = ".tmp-"


class FileStorage(LeaseLocks, Storage):
    def __init__(self, root: str, *, lease_seconds: float = 10.0) -> None:
        self.root = os.path.abspath(root)
        self.lease_seconds = float(lease_seconds)

    def describe(self) -> str:
        return self.root

    # ------------------------------------------------------------------ helpers
    def _path(self, key: str, *, allow_root: bool = False) -> str:
        k = check_key(key, allow_root=allow_root)
        return os.path.join(self.root, *k.split("/")) if k else self.root

    def _err(self, op: str, key: str, e: OSError) -> StorageError:
        return StorageError(f"file storage {self.root}: {op} {key!r} failed: {e.strerror or e}")

    def _makedirs(self, directory: str) -> None:
        # 0700 for every directory we create (os.makedirs gives intermediate directories the
        # umask's default instead); existing directories are left as they are.
        if os.path.isdir(directory):
            return
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
                continue
            os.chmod(d, 0o700)         # exactly 0700 whatever the umask

    def _write_temp(self, directory: str, data: bytes, mode: int = 0o600) -> str:
        """A complete, fsynced temporary file in ``directory`` holding ``data``: its path."""
        self._makedirs(directory)
        # mkstemp creates the file O_EXCL with mode 0600: never readable by others, even briefly.
        fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if mode != 0o600:
                    os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def _write_atomic(self, path: str, data: bytes, mode: int) -> None:
        directory = os.path.dirname(path)
        tmp = self._write_temp(directory, data, mode)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    # ------------------------------------------------------------------ key-value
    async def store(self, key: str, value: bytes, *, private: bool = False) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._write_atomic, path, bytes(value),
                                    0o600 if private else 0o644)
        except OSError as e:
            raise self._err("store", key, e) from e

    async def load(self, key: str) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()
        try:
            return await asyncio.to_thread(read)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"file storage {self.root}: {key!r} not found") from None
        except OSError as e:
            raise self._err("load", key, e) from e

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        try:
            await asyncio.to_thread(remove)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"file storage {self.root}: {key!r} not found") from None
        except OSError as e:
            raise self._err("delete", key, e) from e

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await asyncio.to_thread(os.path.exists, path)

    async def list(self, prefix: str, recursive: bool = False) -> list[str]:
        base = check_key(prefix, allow_root=True)
        directory = self._path(base, allow_root=True)
        join = (lambda rel: f"{base}/{rel}") if base else (lambda rel: rel)

        def walk() -> list[str]:
            out: list[str] = []
            if not recursive:
                with os.scandir(directory) as it:
                    out = [join(e.name) for e in it if not e.name.startswith(_TMP)]
                return sorted(out)
            for dirpath, dirnames, filenames in os.walk(directory):
                rel = os.path.relpath(dirpath, directory)
                for n in filenames:
                    if n.startswith(_TMP):
                        continue
                    out.append(join(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}"))
            return sorted(out)
        try:
            return await asyncio.to_thread(walk)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise self._err("list", prefix, e) from e

    async def stat(self, key: str) -> KeyInfo:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"file storage {self.root}: {key!r} not found") from None
        except OSError as e:
            raise self._err("stat", key, e) from e
        if not os.path.isfile(path):
            raise NotFound(f"file storage {self.root}: {key!r} is a directory, not a key")
        return KeyInfo(key=check_key(key), size=st.st_size, modified=st.st_mtime)

    async def verify(self) -> None:
        """Fail fast when the directory cannot be created, written and read back."""
        try:
            await asyncio.to_thread(self._makedirs, self.root)
        except OSError as e:
            raise StorageError(f"{SETTING}={self.root!r}: cannot create the directory: "
                               f"{e.strerror or e}; give a writable directory path") from e
        await probe(self)

    async def close(self) -> None:
        await self._close_leases()

    # ------------------------------------------------------------------ lock primitives
    def _lock_path(self, name: str) -> str:
        return self._path(lock_key(name))

    async def _lock_create(self, name: str, data: bytes) -> object | None:
        path = self._lock_path(name)

        def create() -> bool:
            directory = os.path.dirname(path)
            tmp = self._write_temp(directory, data)
            try:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    return _create_excl(path, data)   # no hard links on this filesystem
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            _fsync_dir(directory)
            return True
        try:
            return data if await asyncio.to_thread(create) else None
        except OSError as e:
            raise self._err("create lock", name, e) from e

    async def _lock_read(self, name: str) -> LockRecord | None:
        path = self._lock_path(name)

        def read() -> tuple[bytes, float] | None:
            try:
                with open(path, "rb") as f:
                    return f.read(), os.fstat(f.fileno()).st_mtime
            except FileNotFoundError:
                return None
        try:
            got = await asyncio.to_thread(read)
        except OSError as e:
            raise self._err("read lock", name, e) from e
        if got is None:
            return None
        data, mtime = got
        rec = decode_record(data)
        if rec is None:        # half-written by a crashed O_EXCL creator: expire by mtime
            return LockRecord("<unreadable>", mtime + self.lease_seconds, data)
        return LockRecord(rec[0], rec[1], data)

    async def _lock_replace(self, name: str, data: bytes, token: object) -> object | None:
        path = self._lock_path(name)

        def cas() -> bool:
            with _cas_guard(path):
                if _read_or_none(path) != token:
                    return False
                self._write_atomic(path, data, 0o600)
                return True
        try:
            return data if await asyncio.to_thread(cas) else None
        except OSError as e:
            raise self._err("replace lock", name, e) from e

    async def _lock_delete(self, name: str, token: object) -> bool:
        path = self._lock_path(name)

        def cad() -> bool:
            with _cas_guard(path):
                if _read_or_none(path) != token:
                    return False
                os.unlink(path)
                _fsync_dir(os.path.dirname(path))
                return True
        try:
            return await asyncio.to_thread(cad)
        except OSError as e:
            raise self._err("release lock", name, e) from e


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _create_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return True


_warned_flock = False


@contextlib.contextmanager
def _cas_guard(lock_path: str):
    """Exclusive flock on ``<lock>.cas`` for a read-compare-replace (milliseconds long)."""
    global _warned_flock
    fd = os.open(lock_path + ".cas", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if not _warned_flock:
                log.warning("flock unsupported on %s (%s): lock takeover is less strict",
                            lock_path, e)
                _warned_flock = True
        yield
    finally:
        os.close(fd)
