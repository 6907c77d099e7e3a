"""One run per teacher at a time: a claim file `teachers/<name>.lock` held while a run writes.

Two identical runs started together would otherwise both claim the teacher group, and the later
one could re-create arrays the earlier one is filling. The lock is created atomically (O_EXCL on
local disks; write-then-read-back on object stores, which have no exclusive create) and records
host, pid, process start time and the time of the last committed chunk. A lock left by a killed
run does not block the resume: on the same host a lock whose process is gone is taken over; from
another host a lock without progress for `STALE_AFTER` seconds is. Anything else is a one-line
`TeacherBusyError` naming the holder and the lock file.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from types import TracebackType

from mtkd_cache.errors import CacheNotFoundError, TeacherBusyError
from mtkd_cache.format.store import CacheStore

__all__ = ["STALE_AFTER", "TeacherLock", "check_shared_store"]

STALE_AFTER = float(os.environ.get("MTKD_LOCK_STALE_SECONDS", "900"))
"""Seconds without a committed chunk after which another host may take over a lock."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return started is None or _start_time(pid) in (None, started)


class TeacherLock:
    """Context manager holding `teachers/<name>.lock`; `beat()` records progress."""

    def __init__(self, store: CacheStore, teacher: str):
        self.store, self.teacher = store, teacher
        self.key = f"teachers/{teacher}.lock"
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                       "token": uuid.uuid4().hex, "started": time.time(), "progress": time.time()}
        self.held = False

    def _where(self) -> str:
        return self.store.path(self.key) if self.store.is_local else f"{self.store.url}/{self.key}"

    def _create(self) -> bool:
        data = json.dumps(self.record).encode()
        if not self.store.is_local:
            if self.store.exists(self.key):
                return False
            self.store.write_bytes(self.key, data)
            return self._read() == self.record  # another writer's PUT landed last: it holds the lock
        path = self.store.path(self.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _read(self) -> dict[str, object] | None:
        try:
            value = json.loads(self.store.read_bytes(self.key))
        except (CacheNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _stale(self, other: dict[str, object]) -> bool:
        if other.get("host") == self.record["host"] and isinstance(other.get("pid"), int):
            return not _alive(int(other["pid"]), other.get("start"))  # type: ignore[arg-type, call-overload]
        progress = other.get("progress")
        return not isinstance(progress, (int, float)) or time.time() - progress > STALE_AFTER

    def __enter__(self) -> TeacherLock:
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            other = self._read()
            if other is not None and not self._stale(other):
                age = time.time() - float(other.get("progress", 0))  # type: ignore[arg-type]
                raise TeacherBusyError(
                    f"teacher {self.teacher!r} is being computed by another run (pid {other.get('pid')} on "
                    f"{other.get('host')}, last chunk committed {age:.0f}s ago); wait for it to finish (a "
                    f"rerun afterwards finds the teacher complete), or if that run is dead delete "
                    f"{self._where()} and re-run")
            self.store.remove(self.key)  # a killed run's lock (or an unreadable one): take it over
        raise TeacherBusyError(f"teacher {self.teacher!r}: could not take the lock {self._where()} "
                               f"(other runs keep claiming it); retry when they are done")

    def beat(self) -> None:
        """Record progress (called after each committed chunk), so other hosts see the run alive."""
        if self.held:
            self.record["progress"] = time.time()
            self.store.write_bytes(self.key, json.dumps(self.record).encode())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held and (self._read() or {}).get("token") == self.record["token"]:
            self.store.remove(self.key)
        self.held = False


def check_shared_store(store: CacheStore, teacher: str, token: str, rank: int) -> None:
    """Raise unless this rank reads the lock rank 0 holds (token `token`): every node of a multi-node
    job must see one shared cache, not a local copy of it, or ranks would write where rank 0 never reads.

    Raises:
        CacheNotFoundError: this rank sees no such lock, or another one.
    """
    key = f"teachers/{teacher}.lock"
    try:
        seen = json.loads(store.read_bytes(key)).get("token")
    except (CacheNotFoundError, ValueError, AttributeError):
        seen = None
    if seen != token:
        raise CacheNotFoundError(
            f"rank {rank} on {socket.gethostname()} does not see the lock rank 0 holds at {store.url}/{key}: "
            f"{store.url} must be one store shared by every node (a shared file system or an object store "
            f"URL), not a per-node folder")
