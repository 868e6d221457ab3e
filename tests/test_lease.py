"""Writer leases: never shared by two live writers, written whole, never dropped when unreadable, and a clock that
runs ahead is named instead of blocking every writer."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tigbev.cache.lease import Lease, LeaseClockSkew, LeaseConflict, LeaseUnreadable, WriterLease
from tigbev.cache.schema import LEASE_DIR
from tigbev.cache.store import fs_and_path
from tigbev.errors import TigbevError

FAST_BEAT_S = 0.0005


def _store(tmp_path: Path) -> tuple[Any, str, str]:
    url = str(tmp_path / "cache")
    fs, root = fs_and_path(url)
    return fs, root, url


def _foreign(tmp_path: Path, name: str, content: bytes) -> Path:
    """A lease file of another writer, with exactly ``content``."""
    folder = tmp_path / "cache" / LEASE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts fsync calls and skips the sync itself (milliseconds each on a busy disk). What a reader sees is
    decided by the rename, not by fsync, which only makes a write survive a power loss."""
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    return calls


def test_two_contending_writers_never_hold_one_shard_at_once(tmp_path: Path, fsyncs: list[int]) -> None:
    """Two writers take and give back shard 0 thousands of times, each heartbeating every half millisecond while
    it holds; a checker records who holds the shard at every moment and flags any moment with two holders."""
    fs, root, url = _store(tmp_path)
    guard = threading.Lock()
    holder: list[str | None] = [None]
    overlaps: list[str] = []
    held = {"a": 0, "b": 0}
    refused = {"a": 0, "b": 0}
    beats = [0]
    attempts_each, deadline = 1500, time.monotonic() + 10
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        rng = random.Random(name)
        try:
            for _ in range(attempts_each):
                if time.monotonic() > deadline:
                    return
                lease = WriterLease(fs, root, url, [0], heartbeat_s=FAST_BEAT_S)
                try:
                    lease.acquire()
                except LeaseConflict:
                    refused[name] += 1
                    time.sleep(rng.uniform(0, 0.002))  # let the holder run; then contend again
                    continue
                with guard:  # from here until release starts, this writer holds shard 0
                    if holder[0] is not None:
                        overlaps.append(f"{name} acquired shard 0 while {holder[0]} held it")
                    holder[0] = name
                    held[name] += 1
                time.sleep(rng.uniform(0, 0.003))  # hold it while the heartbeat rewrites the lease
                with guard:
                    holder[0] = None
                    beats[0] += lease.lease.heartbeat_unix > lease.lease.started_unix
                lease.release()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert overlaps == [], overlaps[:5]
    # The race was real: both writers held the shard many times, were refused many times, and heartbeat meanwhile.
    assert min(held.values()) >= 100 and min(refused.values()) >= 100, (held, refused)
    assert beats[0] >= 50, beats
    assert fs.ls(f"{root}/{LEASE_DIR}", detail=False) == []


def test_a_heartbeat_never_leaves_the_lease_empty_or_partial(tmp_path: Path, fsyncs: list[int]) -> None:
    """A reader reads the lease file over and over while its holder heartbeats thousands of times: every read
    finds the file, and every read parses."""
    fs, root, url = _store(tmp_path)
    holder = WriterLease(fs, root, url, [0, 1], heartbeat_s=0).acquire()  # heartbeats back to back
    path = Path(holder.path)
    bad: list[str] = []
    seen_beats: set[float] = set()
    deadline = time.monotonic() + 5
    try:
        while len(fsyncs) < 3000 and time.monotonic() < deadline:
            try:
                text = path.read_text()
                seen_beats.add(Lease.parse(text).heartbeat_unix)
            except (OSError, ValueError) as exc:
                bad.append(f"{type(exc).__name__}: {exc}")
    finally:
        holder.release()
    assert bad == [], f"{len(bad)} bad reads, e.g. {bad[:3]}"
    assert len(fsyncs) >= 1000 and len(seen_beats) >= 300, f"{len(fsyncs)} heartbeats, {len(seen_beats)} seen"
    assert len(fsyncs) >= len(seen_beats)  # every write is fsynced before it is renamed into place
    assert not path.exists() and list(path.parent.iterdir()) == []  # no temporary file left either


UNPARSABLE = {
    "empty": (b"", "the file is empty"),
    "truncated": (b'{"writer_id": "w-1", "host": "h", "pid": 12, "started_', "not JSON"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "list": (b"[1, 2, 3]", "not a JSON object"),
    "pid_string": (json.dumps({"writer_id": "w", "host": "h", "pid": "12", "started_unix": 1.0,
                               "heartbeat_unix": 1.0, "shards": [0]}).encode(), "field 'pid' is '12', not an integer"),
    "shards_string": (json.dumps({"writer_id": "w", "host": "h", "pid": 12, "started_unix": 1.0,
                                  "heartbeat_unix": 1.0, "shards": "0"}).encode(), "field 'shards' is '0'"),
    "heartbeat_null": (json.dumps({"writer_id": "w", "host": "h", "pid": 12, "started_unix": 1.0,
                                   "heartbeat_unix": None, "shards": [0]}).encode(),
                       "field 'heartbeat_unix' is None, not a finite number"),
    "missing_host": (json.dumps({"writer_id": "w", "pid": 12, "started_unix": 1.0, "heartbeat_unix": 1.0,
                                 "shards": [0]}).encode(), "field 'host' is missing"),
}


@pytest.mark.parametrize("kind", sorted(UNPARSABLE))
def test_an_unparsable_lease_is_named_and_kept(kind: str, tmp_path: Path) -> None:
    content, why = UNPARSABLE[kind]
    bad = _foreign(tmp_path, "other-writer.json", content)
    fs, root, url = _store(tmp_path)
    lease = WriterLease(fs, root, url, [5])  # even shards the bad file may not hold: its shards cannot be told
    with pytest.raises(LeaseUnreadable) as caught:
        lease.acquire()
    message = str(caught.value)
    assert isinstance(caught.value, TigbevError) and isinstance(caught.value, LeaseConflict)
    assert "\n" not in message and str(bad) in message and why in message, message
    assert "delete that file and rerun" in message
    assert bad.read_bytes() == content  # left in place, unchanged
    assert not Path(lease.path).exists()  # and this writer holds nothing
    with pytest.raises(LeaseUnreadable, match="cannot be read"):  # `cache info` does not skip it either
        lease.others(remove_stale=False)
    assert bad.read_bytes() == content


def _ahead_lease(ahead_s: float, shards: tuple[int, ...] = (0, 1, 2)) -> Lease:
    now = time.time()
    return Lease(writer_id="fast-clock-7-abc", host="fast-clock-host", pid=7, started_unix=now + ahead_s,
                 heartbeat_unix=now + ahead_s, shards=shards, command="tigbev extract-teacher")


def test_a_heartbeat_ahead_of_this_clock_is_a_named_skew_after_a_bounded_wait(tmp_path: Path) -> None:
    fs, root, url = _store(tmp_path)
    path = _foreign(tmp_path, "fast-clock-7-abc.json", _ahead_lease(3600).to_json().encode())
    start = time.monotonic()
    with pytest.raises(LeaseClockSkew) as caught:
        WriterLease(fs, root, url, [1], heartbeat_s=0.05, skew_wait_s=0.5).acquire()
    took = time.monotonic() - start
    message = str(caught.value)
    assert 0.5 <= took < 3, took
    assert "\n" not in message and "0 s ago" not in message
    assert re.match(r"the lease of host fast-clock-host is ahead of this host's clock by 3(599|600) s: ",
                    message), message
    skew = caught.value
    assert str(path) in message and _utc(skew.heartbeat_unix) in message and _utc(skew.now_unix) in message
    assert abs(skew.heartbeat_unix - skew.now_unix - 3600) < 5 and not skew.advanced
    assert "did not advance" in message and "delete that file and rerun" in message
    assert path.exists()  # never taken for a dead writer's
    # Described (e.g. by `cache info`) as ahead, not as a fresh heartbeat.
    (lease,) = WriterLease(fs, root, url, []).others(remove_stale=False)
    assert re.search(r"heartbeat 3(599|600) s ahead of this host.s clock", lease.describe(time.time()))


def test_a_skewed_lease_that_goes_during_the_wait_lets_the_writer_in(tmp_path: Path) -> None:
    fs, root, url = _store(tmp_path)
    path = _foreign(tmp_path, "fast-clock-7-abc.json", _ahead_lease(3600).to_json().encode())
    threading.Timer(0.3, path.unlink).start()  # its writer finishes
    start = time.monotonic()
    lease = WriterLease(fs, root, url, [1], heartbeat_s=0.05, skew_wait_s=20).acquire()
    assert time.monotonic() - start < 5
    lease.release()


def test_a_skewed_heartbeat_that_advances_is_reported_alive(tmp_path: Path) -> None:
    fs, root, url = _store(tmp_path)
    path = _foreign(tmp_path, "fast-clock-7-abc.json", _ahead_lease(600).to_json().encode())
    stop = threading.Event()

    def beat() -> None:  # the skewed writer is alive and keeps beating
        while not stop.wait(0.05):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(_ahead_lease(600).to_json())
            tmp.replace(path)

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(LeaseClockSkew, match=r"ahead of this host's clock by 600 s: .*its heartbeat advanced "
                                                 r"\(its writer is alive\)") as caught:
            WriterLease(fs, root, url, [2], heartbeat_s=0.05, skew_wait_s=0.4).acquire()
    finally:
        stop.set()
    assert caught.value.advanced


def test_a_heartbeat_slightly_ahead_is_an_ordinary_live_writer(tmp_path: Path) -> None:
    fs, root, url = _store(tmp_path)
    _foreign(tmp_path, "fast-clock-7-abc.json", _ahead_lease(1.0).to_json().encode())
    start = time.monotonic()
    with pytest.raises(LeaseConflict, match=r"being written by pid 7 on fast-clock-host .*heartbeat") as caught:
        WriterLease(fs, root, url, [0], skew_wait_s=30).acquire()
    assert type(caught.value) is LeaseConflict and time.monotonic() - start < 2  # refused at once, no waiting


def test_the_lease_errors_survive_pickling() -> None:
    errors = [LeaseUnreadable("/c/writers/x.json", "/c", "the file is empty"),
              LeaseClockSkew("/c/writers/x.json", "/c", "h", 7, (0, 1), 2e9, 2e9 - 3600, 60.0, True)]
    for exc in errors:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args
        assert vars(back) == vars(exc)


def test_leases_on_a_remote_store_are_written_in_one_put(tmp_path: Path) -> None:
    """fsspec's memory store stands in for S3/GCS: no temporary file, leases exclusive, heartbeats readable."""
    fs = fsspec.filesystem("memory")
    root = f"/lease-test-{tmp_path.name}"
    url = f"memory://{root}"
    first = WriterLease(fs, root, url, [0, 1], heartbeat_s=0.01).acquire()
    try:
        with pytest.raises(LeaseConflict, match="being written by pid"):
            WriterLease(fs, root, url, [1]).acquire()
        time.sleep(0.1)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{LEASE_DIR}", detail=False)]
        assert names == [first.path.rsplit("/", 1)[-1]]
        assert Lease.parse(fs.cat_file(first.path).decode()).heartbeat_unix > first.lease.started_unix
        fs.pipe_file(f"{root}/{LEASE_DIR}/broken.json", b'{"writer_id": ')
        with pytest.raises(LeaseUnreadable, match=rf"writer lease memory://{root}/{LEASE_DIR}/broken.json cannot"):
            WriterLease(fs, root, url, [7]).acquire()
        fs.rm(f"{root}/{LEASE_DIR}/broken.json")
    finally:
        first.release()
    assert fs.ls(f"{root}/{LEASE_DIR}", detail=False) == []
    fs.rm(root, recursive=True)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
