"""Writer leases: one extraction per shard of a cache at a time, and no lock that a killed writer leaves stuck.

A writer that is about to write shards of a cache puts a lease file in ``CACHE/writers/`` (its id, host, pid, the
shards it will write, a heartbeat it refreshes every few seconds from a background thread) and removes it when it
stops. A later writer whose shards overlap a *live* lease is refused with a message that names the running one. A
lease is stale, and is ignored and removed, when its process is known dead (same host, pid gone) or its heartbeat
is older than ``stale_after_s`` (any host: a machine that died, a process that hangs).

A lease file is always written whole: on local disk to a temporary file in the same folder (flushed and fsynced)
that is then renamed over the lease, on an object store (S3, GCS, memory) in one put, which replaces an object
whole. A reader therefore sees the previous content or the new one, never an empty or partial file, however often
the holder heartbeats. A lease file that cannot be parsed is never taken for a dead writer's: whether its writer is
alive cannot be told, so it is left in place and :class:`LeaseUnreadable` names it. A lease whose heartbeat lies
ahead of this host's clock (by more than ``skew_tolerance_s``) cannot be judged by its age either: the writer waits
at most ``skew_wait_s`` for it to go, then :class:`LeaseClockSkew` names its host and both clocks.

Claiming is write, then look: a writer writes its lease, then lists the folder again, and holds its shards only if
no other lease on them is there. Of two writers that see each other, the one whose lease sorts later (start time,
then id) withdraws at once; the earlier one waits (at most one heartbeat interval) for it to go. Two writers can
never both hold a shard: each one's lease stays in place from its write to its release, so of two writers the one
that looked last sees the other's lease. This needs only create (or rename), read, list and delete of small files,
which every fsspec store has (local disk, S3, GCS, memory).
"""

from __future__ import annotations

import json
import math
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
from tigbev.errors import TigbevError

__all__ = ["HEARTBEAT_S", "SKEW_TOLERANCE_S", "STALE_AFTER_S", "Lease", "LeaseClockSkew", "LeaseConflict",
           "LeaseUnreadable", "WriterLease"]

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
SKEW_TOLERANCE_S = 5.0
"""A heartbeat at most this far ahead of this host's clock is read as "just now" (clocks of hosts kept in step by
NTP differ by far less); one further ahead means the clock of its host or of this one is wrong."""


class LeaseConflict(TigbevError):
    """Another writer's lease on this cache stands in the way of this writer (the message names it)."""


class LeaseUnreadable(LeaseConflict):
    """A lease file that cannot be parsed (cut short, binary, fields of the wrong type); it is left in place.

    Attributes:
        path: the lease file, as the store names it.
        url: the cache.
        why: what is wrong with its content.
    """

    def __init__(self, path: str, url: str, why: str):
        self.path, self.url, self.why = path, url, why
        super().__init__(f"writer lease {path} cannot be read ({why}), so whether its writer is alive cannot be "
                         f"told; if no extraction is running on cache {url}, delete that file and rerun")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its fields where it is unpickled (another process)
        return type(self), (self.path, self.url, self.why)


class LeaseClockSkew(LeaseConflict):
    """A lease whose heartbeat stayed ahead of this host's clock for the whole bounded wait.

    Attributes:
        path: the lease file, as the store names it.
        url: the cache.
        host, pid, shards: the lease's writer and the shards it holds.
        heartbeat_unix: the lease's last heartbeat (by its host's clock).
        now_unix: this host's clock when the lease was last read.
        waited_s: how long this writer waited for the lease to go.
        advanced: whether the lease's heartbeat advanced while this writer waited (its writer is then alive).
    """

    def __init__(self, path: str, url: str, host: str, pid: int, shards: tuple[int, ...], heartbeat_unix: float,
                 now_unix: float, waited_s: float, advanced: bool):
        self.path, self.url, self.host, self.pid, self.shards = path, url, host, pid, tuple(shards)
        self.heartbeat_unix, self.now_unix, self.waited_s, self.advanced = heartbeat_unix, now_unix, waited_s, advanced
        ahead = heartbeat_unix - now_unix
        beat = ("advanced (its writer is alive)" if advanced else "did not advance")
        super().__init__(
            f"the lease of host {host} is ahead of this host's clock by {ahead:.0f} s: {path} (pid {pid}, shards "
            f"{_span(self.shards)}) has its heartbeat at {_utc(heartbeat_unix)}, this host ({platform.node()}) "
            f"reads {_utc(now_unix)}; in {waited_s:.0f} s of waiting its heartbeat {beat}; set both clocks right "
            f"(NTP), or, if no extraction is running on cache {url}, delete that file and rerun")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its fields where it is unpickled (another process)
        return type(self), (self.path, self.url, self.host, self.pid, self.shards, self.heartbeat_unix,
                            self.now_unix, self.waited_s, self.advanced)


_FIELDS: dict[str, tuple[str, str]] = {  # name -> (kind, wording)
    "writer_id": ("str", "a string"), "host": ("str", "a string"), "pid": ("int", "an integer"),
    "started_unix": ("time", "a finite number"), "heartbeat_unix": ("time", "a finite number"),
    "shards": ("shards", "a list of integers"), "command": ("str", "a string"),
}


def _field(d: dict[str, Any], name: str) -> Any:
    """Field ``name`` of a parsed lease, checked against its type (ValueError saying what is wrong)."""
    kind, wording = _FIELDS[name]
    if name not in d:
        if name == "command":
            return ""
        raise ValueError(f"field {name!r} is missing")
    value = d[name]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {"str": isinstance(value, str),
          "int": is_int,
          "time": (is_int or isinstance(value, float)) and _finite(value),
          "shards": isinstance(value, list) and all(isinstance(k, int) and not isinstance(k, bool) for k in value),
          }[kind]
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"field {name!r} is {shown}, not {wording}")
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


@dataclass(frozen=True)
class Lease:
    """The content of one lease file."""

    writer_id: str
    host: str
    pid: int
    started_unix: float
    heartbeat_unix: float
    shards: tuple[int, ...]
    command: str

    @classmethod
    def parse(cls, text: str) -> Lease:
        """The lease ``text`` holds; ValueError saying what is wrong where it is not a lease (no field is coerced:
        a pid that is a string, shards that are not a list of integers are refused)."""
        if not text.strip():
            raise ValueError("the file is empty")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg} at character {exc.pos}") from None
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object but a {type(d).__name__}")
        return cls(writer_id=_field(d, "writer_id"), host=_field(d, "host"), pid=_field(d, "pid"),
                   started_unix=float(_field(d, "started_unix")), heartbeat_unix=float(_field(d, "heartbeat_unix")),
                   shards=tuple(_field(d, "shards")), command=_field(d, "command"))

    def to_json(self) -> str:
        d = asdict(self)
        d["shards"] = list(self.shards)
        return json.dumps(d)

    def is_stale(self, now: float, stale_after_s: float) -> bool:
        """Whether this lease's writer is gone: its heartbeat older than ``stale_after_s``, or its process dead
        (same host only). A heartbeat ahead of ``now`` is never stale by age."""
        if now - self.heartbeat_unix > stale_after_s:
            return True
        return self.host == platform.node() and not _pid_alive(self.pid)

    def describe(self, now: float) -> str:
        """One phrase naming this lease's writer, its shards, its start and its heartbeat's age (or how far the
        heartbeat is ahead of ``now``, this host's clock)."""
        span = _span(self.shards)
        age = now - self.heartbeat_unix
        beat = (f"heartbeat {max(0.0, age):.0f} s ago" if age > -0.5 else
                f"heartbeat {-age:.0f} s ahead of this host's clock")
        return (f"pid {self.pid} on {self.host} (writer {self.writer_id}, shards {span}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_unix))}, {beat})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def _span(shards: tuple[int, ...]) -> str:
    if not shards:
        return "none"
    return f"{shards[0]}" if len(shards) == 1 else f"{shards[0]}..{shards[-1]} ({len(shards)})"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class WriterLease:
    """This process's lease on some shards of the cache at ``url``; use as a context manager.

    Args:
        fs, root: the fsspec filesystem and the cache's path in it.
        url: the cache, as the user named it (for messages).
        shards: the shards this writer will write.
        heartbeat_s: how often the lease's heartbeat is refreshed.
        stale_after_s: a lease whose heartbeat is older than this is dead (must exceed ``heartbeat_s`` well).
        skew_tolerance_s: a heartbeat further ahead of this host's clock than this is a clock skew.
        skew_wait_s: how long :meth:`acquire` waits for a conflicting lease with a skewed heartbeat to go before it
            raises :class:`LeaseClockSkew` (default: ``stale_after_s``).
    """

    def __init__(self, fs: Any, root: str, url: str, shards: Iterable[int], *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, skew_tolerance_s: float = SKEW_TOLERANCE_S,
                 skew_wait_s: float | None = None):
        self.fs, self.url = fs, url
        self.dir = f"{root.rstrip('/')}/{LEASE_DIR}"
        now = time.time()
        self.lease = Lease(writer_id=f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", host=platform.node(),
                           pid=os.getpid(), started_unix=now, heartbeat_unix=now, shards=tuple(sorted(shards)),
                           command=" ".join(sys.argv))
        self.path = f"{self.dir}/{self.lease.writer_id}.json"
        # Not a *.json name: never read as a lease, even when a crash leaves it behind.
        self._tmp = f"{self.dir}/.{self.lease.writer_id}.json.tmp"
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.skew_tolerance_s = skew_tolerance_s
        self.skew_wait_s = stale_after_s if skew_wait_s is None else skew_wait_s
        self._poll_s = min(max(heartbeat_s / 5, 0.001), 0.5)
        self._local = _is_local(fs)
        self._paths: dict[str, str] = {}  # writer id -> the file its lease was read from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def others(self, *, remove_stale: bool = True) -> list[Lease]:
        """Live leases of other writers (stale ones are removed on the way, unless ``remove_stale`` is False).

        A lease whose heartbeat is ahead of this host's clock is live (its age cannot be told). Raises
        :class:`LeaseUnreadable` for a lease file that cannot be parsed, and leaves that file in place."""
        try:
            paths = [str(p) for p in self.fs.ls(self.dir, detail=False, refresh=True) if str(p).endswith(".json")]
        except FileNotFoundError:
            return []
        now = time.time()
        live = []
        for path in paths:
            if path.rsplit("/", 1)[-1] == self.path.rsplit("/", 1)[-1]:
                continue
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:  # removed meanwhile
                continue
            try:
                lease = Lease.parse(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise LeaseUnreadable(self._shown(path), self.url, "not UTF-8 text: binary content") from None
            except ValueError as exc:
                raise LeaseUnreadable(self._shown(path), self.url, str(exc)) from None
            if lease.is_stale(now, self.stale_after_s):
                if remove_stale:
                    self._remove(path)
                continue
            self._paths[lease.writer_id] = path
            live.append(lease)
        return live

    def _shown(self, path: str) -> str:
        """``path`` as the user would name it (a URL on a remote store)."""
        return path if self._local else self.fs.unstrip_protocol(path)

    def _path_of(self, lease: Lease) -> str:
        return self._shown(self._paths.get(lease.writer_id, f"{self.dir}/{lease.writer_id}.json"))

    def _conflicts(self, leases: list[Lease]) -> list[Lease]:
        mine = set(self.lease.shards)
        return [lease for lease in leases if mine & set(lease.shards)]

    def _ahead(self, lease: Lease, now: float) -> bool:
        return lease.heartbeat_unix - now > self.skew_tolerance_s

    def _refuse(self, holders: list[Lease]) -> LeaseConflict:
        now = time.time()
        who = "; ".join(h.describe(now) for h in holders)
        return LeaseConflict(f"cache {self.url} is being written by {who}; wait for it to finish (a lease whose "
                             f"process died is ignored once its heartbeat is {self.stale_after_s:.0f} s old, at once "
                             f"on the same host)")

    def acquire(self) -> WriterLease:
        """Take the lease, or raise :class:`LeaseConflict` (or one of its kinds) naming what stands in the way.

        A conflicting lease whose heartbeat is ahead of this host's clock is waited for (polled) at most
        ``skew_wait_s``; if it is still there then, :class:`LeaseClockSkew` is raised."""
        skew_since: float | None = None
        first_beat: dict[str, float] = {}
        while True:
            holders = self._conflicts(self.others())
            now = time.time()
            live = [h for h in holders if not self._ahead(h, now)]
            if live:
                raise self._refuse(live)
            if holders:  # all ahead of this clock: their age cannot be told; wait a bounded time for them to go
                t = time.monotonic()
                skew_since = t if skew_since is None else skew_since
                for h in holders:
                    first_beat.setdefault(h.writer_id, h.heartbeat_unix)
                waited = t - skew_since
                if waited >= self.skew_wait_s:
                    h = max(holders, key=lambda lease: lease.heartbeat_unix)
                    raise LeaseClockSkew(self._path_of(h), self.url, h.host, h.pid, h.shards, h.heartbeat_unix, now,
                                         waited, h.heartbeat_unix > first_beat[h.writer_id])
                time.sleep(min(self._poll_s, self.skew_wait_s - waited))
                continue
            if self._claim():
                return self

    def _claim(self) -> bool:
        """Write this lease, then look again: True once no other lease on these shards is there (the heartbeat is
        then running); False (lease withdrawn) where a lease ahead of this clock turned up; LeaseConflict where an
        earlier lease is there, or a later one stays past one heartbeat interval."""
        now = time.time()
        self.lease = replace(self.lease, started_unix=now, heartbeat_unix=now)
        key = (self.lease.started_unix, self.lease.writer_id)
        give_up = time.monotonic() + self.heartbeat_s
        try:
            self._write()
            while True:
                rivals = self._conflicts(self.others())
                if not rivals:
                    self._thread = threading.Thread(target=self._beat, name="cache-lease-heartbeat", daemon=True)
                    self._thread.start()
                    return True
                now = time.time()
                if any(self._ahead(r, now) for r in rivals):
                    self._remove(self.path)
                    return False
                earlier = [r for r in rivals if (r.started_unix, r.writer_id) < key]
                if earlier or time.monotonic() >= give_up:  # a later one sees this lease and withdraws, or holds
                    self._remove(self.path)
                    raise self._refuse(earlier or rivals)
                time.sleep(self._poll_s)
        except BaseException:
            self._remove(self.path)
            raise

    def _write(self) -> None:
        """Write this lease whole: a temporary file, flushed and fsynced, renamed over the lease on local disk;
        one put (which replaces an object whole) on a remote store."""
        data = self.lease.to_json().encode()
        self.fs.makedirs(self.dir, exist_ok=True)
        if not self._local:
            self.fs.pipe_file(self.path, data)
            return
        try:
            with self.fs.open(self._tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        except OSError as exc:  # e.g. a full disk: no half-written temporary is left, and the error names the file
            try:
                self.fs.rm(self._tmp)
            except OSError:
                pass
            raise OSError(exc.errno, exc.strerror or str(exc), exc.filename or self.path) from exc

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
        """Stop the heartbeat and remove this lease (and a temporary file a failed write left)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove(self.path)
        if self._local:
            try:
                os.remove(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
