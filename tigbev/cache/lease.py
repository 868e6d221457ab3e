"""Writer leases: one extraction per shard of a cache at a time, and no lock that a killed writer leaves stuck.

A writer that is about to write shards of a cache puts a lease file in ``CACHE/writers/`` (its id, host, pid, the
shards it will write, a heartbeat it refreshes every few seconds from a background thread) and removes it when it
stops. A later writer whose shards overlap a *live* lease is refused with a message that names the running one. A
lease is stale, and is ignored and removed, when its process is known dead (same host, pid gone) or its heartbeat
is older than ``stale_after_s`` (any host: a machine that died, a process that hangs).

Two writers that start at the same moment both write their lease, then both read the folder again; the one whose
lease sorts later (start time, then id) withdraws. This needs only create, read, list and delete of small files,
which every fsspec store has (local disk, S3, GCS, memory).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from tigbev.cache.schema import LEASE_DIR

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "Lease", "LeaseConflict", "WriterLease"]

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


class LeaseConflict(Exception):
    """Another live writer holds shards this writer wants (the message names it)."""


@dataclass(frozen=True)
class Lease:
    writer_id: str
    host: str
    pid: int
    started_unix: float
    heartbeat_unix: float
    shards: tuple[int, ...]
    command: str

    @classmethod
    def parse(cls, text: str) -> Lease:
        d = json.loads(text)
        return cls(writer_id=str(d["writer_id"]), host=str(d["host"]), pid=int(d["pid"]),
                   started_unix=float(d["started_unix"]), heartbeat_unix=float(d["heartbeat_unix"]),
                   shards=tuple(int(k) for k in d["shards"]), command=str(d.get("command", "")))

    def to_json(self) -> str:
        d = asdict(self)
        d["shards"] = list(self.shards)
        return json.dumps(d)

    def is_stale(self, now: float, stale_after_s: float) -> bool:
        if now - self.heartbeat_unix > stale_after_s:
            return True
        return self.host == platform.node() and not _pid_alive(self.pid)

    def describe(self, now: float) -> str:
        span = _span(self.shards)
        return (f"pid {self.pid} on {self.host} (writer {self.writer_id}, shards {span}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_unix))}, heartbeat "
                f"{max(0.0, now - self.heartbeat_unix):.0f} s ago)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _span(shards: tuple[int, ...]) -> str:
    if not shards:
        return "none"
    return f"{shards[0]}" if len(shards) == 1 else f"{shards[0]}..{shards[-1]} ({len(shards)})"


class WriterLease:
    """This process's lease on some shards of the cache at ``url``; use as a context manager.

    Args:
        fs, root: the fsspec filesystem and the cache's path in it.
        shards: the shards this writer will write.
        stale_after_s: a lease whose heartbeat is older than this is dead (must exceed ``heartbeat_s`` well).
    """

    def __init__(self, fs: Any, root: str, url: str, shards: Iterable[int], *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.fs, self.url = fs, url
        self.dir = f"{root.rstrip('/')}/{LEASE_DIR}"
        now = time.time()
        self.lease = Lease(writer_id=f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", host=platform.node(),
                           pid=os.getpid(), started_unix=now, heartbeat_unix=now, shards=tuple(sorted(shards)),
                           command=" ".join(sys.argv))
        self.path = f"{self.dir}/{self.lease.writer_id}.json"
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def others(self, *, remove_stale: bool = True) -> list[Lease]:
        """Live leases of other writers (stale ones are removed on the way, unless ``remove_stale`` is False)."""
        try:
            paths = [p for p in self.fs.ls(self.dir, detail=False, refresh=True) if str(p).endswith(".json")]
        except FileNotFoundError:
            return []
        now = time.time()
        live = []
        for path in paths:
            if str(path).rsplit("/", 1)[-1] == self.path.rsplit("/", 1)[-1]:
                continue
            try:
                with self.fs.open(path, "r") as f:
                    lease = Lease.parse(f.read())
            except FileNotFoundError:  # removed meanwhile
                continue
            except (ValueError, KeyError, TypeError):  # a lease cut short by a crash mid-write: stale by definition
                if remove_stale:
                    self._remove(path)
                continue
            if lease.is_stale(now, self.stale_after_s):
                if remove_stale:
                    self._remove(path)
                continue
            live.append(lease)
        return live

    def _conflicts(self, leases: list[Lease]) -> list[Lease]:
        mine = set(self.lease.shards)
        return [lease for lease in leases if mine & set(lease.shards)]

    def _refuse(self, holders: list[Lease]) -> LeaseConflict:
        now = time.time()
        who = "; ".join(h.describe(now) for h in holders)
        return LeaseConflict(f"cache {self.url} is being written by {who}; wait for it to finish (a lease whose "
                             f"process died is ignored once its heartbeat is {self.stale_after_s:.0f} s old, at once "
                             f"on the same host)")

    def acquire(self) -> WriterLease:
        holders = self._conflicts(self.others())
        if holders:
            raise self._refuse(holders)
        self._write()
        # Both of two simultaneous starters see each other now; the later one (start time, then id) withdraws.
        key = (self.lease.started_unix, self.lease.writer_id)
        earlier = [lease for lease in self._conflicts(self.others())
                   if (lease.started_unix, lease.writer_id) < key]
        if earlier:
            self._remove(self.path)
            raise self._refuse(earlier)
        self._thread = threading.Thread(target=self._beat, name="cache-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)
        with self.fs.open(self.path, "w") as f:
            f.write(self.lease.to_json())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.lease = replace(self.lease, heartbeat_unix=time.time())
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed beat only ages the lease; the writer notices real I/O errors
                pass

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove(self.path)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
