"""``tigbev cache info | verify | dump``: what a cache holds, whether every byte of it is sound, one sample as npz."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.cache.schema import (
    CACHE_ATTR,
    CHECKSUM_ATTR,
    FILES_KEY,
    INDEX_COLUMNS,
    RECORDS_ARRAY,
    shard_index_path,
    tokens_sha256,
)
from tigbev.cache.shard_file import ShardFileError
from tigbev.cache.store import (
    CacheError,
    CacheReader,
    SampleFault,
    StoreUnreachable,
    fs_and_path,
    read_parquet_rows,
    records_key,
    remote_errors,
)
from tigbev.errors import first_sentence

__all__ = ["Fault", "cache_info", "dump_sample", "file_faults", "keypoint_features", "listed_file_faults",
           "refuse_damaged", "verify_cache"]

NOT_VERIFIED = "the inner chunks' crc32c (`tigbev cache verify` reads and checks every record)"
"""What :func:`file_faults` leaves unchecked, as ``cache info`` says it."""


@dataclass(frozen=True)
class Fault:
    """One problem found by verify: which sample (or -1 for the whole cache), which array, what."""

    sample_idx: int
    token: str
    array: str
    message: str
    shard: int = -1
    """The shard of a fault that hits a whole shard's samples (``sample_idx`` is then -1)."""

    def __str__(self) -> str:
        where = f"sample {self.sample_idx} ({self.token})" if self.sample_idx >= 0 else \
            f"shard {self.shard}" if self.shard >= 0 else "cache"
        return f"{where}, array {self.array}: {self.message}"


def _stored_bytes(url: str) -> dict[str, int]:
    """Bytes on storage: the records arrays' shard files and metadata, the done flags, everything else."""
    fs, root = fs_and_path(url)
    sizes = {RECORDS_ARRAY: 0, "done": 0, "metadata": 0}
    for path, size in fs.du(root, total=False, withdirs=False).items():
        parts = (path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/")) else path).split("/")
        name = RECORDS_ARRAY if parts[0] == "shards" and len(parts) > 3 and parts[-1] != "zarr.json" else \
            "done" if parts[0] == "done" and parts[-1] != "zarr.json" else "metadata"
        sizes[name] += int(size)
    return sizes


def file_faults(reader: CacheReader) -> Iterator[Fault]:
    """The cheap checks of a cache, in shard order (``cache info`` runs them, and ``train-student`` before its first
    step; :func:`verify_cache` is the full proof): the done flags' chunk files; for a cache marked complete, every
    sample done and the consolidated index; for every done shard, its index file, its records array's metadata and
    shard file, the shard index's crc32c, every inner chunk listed in it, and the array's size against the
    consolidated index. A few small reads per shard and no record: the inner chunks' own checksums are not verified
    (:data:`NOT_VERIFIED`)."""
    found: list[Fault] = []
    for fault in _specific_file_faults(reader, reader.manifest):
        found.append(fault)
        yield fault
    yield from listed_file_faults(reader, already=found)


def _specific_file_faults(reader: CacheReader, m: Any) -> Iterator[Fault]:
    """:func:`file_faults` less the listed files' digests: what each missing or damaged file means."""
    with remote_errors(reader.url):
        fs, root = fs_and_path(reader.url)
        root = root.rstrip("/")
        done = np.asarray(reader.group["done"][:]).astype(bool)
        flag_files, index_files = (_names(fs, f"{root}/{d}") for d in ("done/c", "index"))
        has_index = fs.exists(f"{root}/index.parquet")
    lost_flags = [k for k in range(m.num_shards) if str(k) not in flag_files]
    if lost_flags:
        yield Fault(-1, "", "done", f"chunk file(s) {', '.join(f'done/c/{k}' for k in lost_flags[:5])}"
                                    f"{', ...' if len(lost_flags) > 5 else ''} missing: those shards read as not "
                                    "written")
    ends: dict[int, int] = {}  # each shard's records end, as the consolidated index lists them
    if m.complete:
        if not done.all():
            yield Fault(-1, "", "manifest", f"marked complete, but only {int(done.sum())} of "
                                            f"{m.dataset.num_samples} samples are done")
        if not has_index:
            yield Fault(-1, "", "index", "index.parquet is missing")
        else:
            try:
                rows = reader.index
            except Exception as exc:  # noqa: BLE001 - an unreadable index is a fault to report
                yield Fault(-1, "", "index", f"index.parquet unreadable: {_short(exc)}")
            else:
                for shard, offset, size in zip(rows["shard"], rows["record_offset"], rows["record_bytes"]):
                    ends[shard] = max(ends.get(shard, 0), offset + size)
    for shard in range(m.num_shards):
        r = m.shard_range(shard)
        if not done[r.start:r.stop].all():
            continue
        samples = f"samples {r.start}-{r.stop - 1}" if len(r) > 1 else f"sample {r.start}"
        if shard_index_path(shard).rsplit("/", 1)[1] not in index_files:
            yield Fault(-1, "", "index", f"{shard_index_path(shard)} is missing ({samples})", shard)
        try:
            records = reader.open_records(shard)
        except ShardFileError as exc:
            yield Fault(-1, "", RECORDS_ARRAY, f"{exc} ({samples})", shard)
            continue
        try:
            lost = records.lost_chunks()
            if lost:
                yield Fault(-1, "", RECORDS_ARRAY, f"inner chunk(s) {', '.join(map(str, lost[:5]))}"
                                                   f"{', ...' if len(lost) > 5 else ''} of {records_key(shard)}/c/0 "
                                                   f"are not in its shard index (lost) ({samples})", shard)
            if shard in ends and records.nbytes != ends[shard]:
                yield Fault(-1, "", RECORDS_ARRAY, f"{records_key(shard)} stores {records.nbytes} bytes, the index "
                                                   f"lists {ends[shard]} ({samples})", shard)
        finally:
            records.close()


def listed_file_faults(reader: CacheReader, already: Sequence[Fault] = (),
                       checked: frozenset[str] = frozenset()) -> Iterator[Fault]:
    """The files a complete cache's manifest lists (``extra["files"]``: indexes, flags, metadata) that are missing,
    of another size, or of another sha256 than written. Small files, each read once; a file that one of the
    faults ``already`` found names is not reported twice, and the files in ``checked`` (their digest already
    compared by the caller) are not read again."""
    listed = reader.manifest.extra.get(FILES_KEY, {})
    named = " ".join(str(f) for f in already)
    with remote_errors(reader.url):
        fs, root = fs_and_path(reader.url)
        if listed:  # the group's own metadata: the manifest's digest covers its attributes, this the rest
            try:
                group = json.loads(fs.cat_file(f"{root.rstrip('/')}/zarr.json"))
            except (FileNotFoundError, ValueError):
                group = None
            if not isinstance(group, dict) or set(group) != {"attributes", "zarr_format", "node_type"} or \
                    group["zarr_format"] != 3 or group["node_type"] != "group" or \
                    set(group["attributes"]) != {CACHE_ATTR, CHECKSUM_ATTR}:
                yield Fault(-1, "", "manifest", "zarr.json is damaged: its fields are not those of a cache's group")
        for rel, (size, sha) in sorted(listed.items()):
            if rel in checked or re.search(re.escape(rel) + r"(?!\w)", named):
                continue
            path = f"{root.rstrip('/')}/{rel}"
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                yield Fault(-1, "", _array_of(rel), f"{rel} is missing")
                continue
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                yield Fault(-1, "", _array_of(rel), f"{rel} is damaged: {len(data)} bytes (written: {size}), its "
                                                    "sha256 differs from the one the manifest lists")


def _array_of(rel: str) -> str:
    """The array or table a listed file belongs to, as faults name it."""
    parts = rel.split("/")
    if parts[0] == "index" or rel == "index.parquet":
        return "index"
    if parts[0] == "shards" and RECORDS_ARRAY in parts:
        return RECORDS_ARRAY
    return parts[0] if len(parts) > 1 else "manifest"


def _names(fs: Any, path: str) -> set[str]:
    """The names in folder ``path`` (none when it does not exist)."""
    try:
        return {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def refuse_damaged(reader: CacheReader) -> None:
    """Raise a CacheError naming the first of :func:`file_faults` (none: the cache's files and shard indexes are
    sound)."""
    fault = next(file_faults(reader), None)
    if fault is not None:
        raise CacheError(f"cache {reader.url} is damaged: {fault} (`tigbev cache verify` lists every fault)")


def cache_info(url: str) -> dict[str, Any]:
    """Summary of a cache: samples, completeness, bytes per sample (stored, and raw per record section),
    compression ratio, teacher, grid, variants, the extractions writing it now. ``complete`` only when the manifest
    says so, every sample is done and :func:`file_faults` finds nothing (``faults``); ``not_verified`` says what
    was not checked."""
    reader = CacheReader(url, require_complete=False)
    m = reader.manifest
    done = np.asarray(reader.group["done"][:]).astype(bool)
    faults = list(file_faults(reader))
    stored = _stored_bytes(reader.url)
    section_bytes: dict[str, int] = {}
    n_rows = 0
    done_shards = [k for k in range(m.num_shards) if done[m.shard_range(k).start:m.shard_range(k).stop].all()]
    lost_indexes = {f.shard for f in faults if f.array == "index"}
    for shard in done_shards:
        if shard in lost_indexes:
            continue
        try:
            rows = read_parquet_rows(f"{reader.url}/{shard_index_path(shard)}")
            counts = list(zip(rows["num_boxes"], rows["num_depth"], rows["num_cells"]))
        except (CacheError, KeyError):  # a damaged shard index: its fault is listed, its bytes not counted
            continue
        for num_boxes, num_depth, num_cells in counts:
            for sec in m.sections(num_boxes, num_depth, num_cells):
                section_bytes[sec.spec.name] = section_bytes.get(sec.spec.name, 0) + sec.nbytes
            n_rows += 1
    n = max(n_rows, 1)
    raw_total = sum(section_bytes.values())
    return {
        "url": reader.url,
        "samples": m.dataset.num_samples,
        "done": int(done.sum()),
        "complete": m.complete and bool(done.all()) and not faults,
        "marked_complete": m.complete,
        "faults": [str(f) for f in faults],
        "checked_shards": len(done_shards),
        "not_verified": NOT_VERIFIED,
        "split": m.dataset.split,
        "version": m.dataset.version,
        "features": {"mode": m.features.mode, "dtype": m.features.dtype, "channels": m.features.channels},
        "variants": {"kind": m.variants.kind, "count": m.variants.count},
        "grid": m.grid.to_dict(),
        "teacher_sha256": m.teacher.checkpoint_sha256,
        "bytes_per_sample": {k: v / n for k, v in sorted(section_bytes.items())},
        "bytes_per_sample_total": stored[RECORDS_ARRAY] / n,
        "compression_ratio": raw_total / stored[RECORDS_ARRAY] if stored[RECORDS_ARRAY] else float("nan"),
        "format_version": m.format_version,
        "writers": live_writers(reader.url),
    }


def live_writers(url: str) -> list[str]:
    """The extractions writing this cache now (their live leases), described; nothing is changed."""
    import time

    from tigbev.cache.lease import LeaseUnreadable, WriterLease

    fs, root = fs_and_path(url)
    now = time.time()
    try:
        leases = WriterLease(fs, root, url, []).others(remove_stale=False)
    except LeaseUnreadable as exc:  # shown, not fatal: info describes the cache whatever its leases hold
        return [str(exc)]
    return [lease.describe(now) for lease in leases]


def verify_cache(url: str) -> list[Fault]:
    """Prove a cache complete and intact: the done flags; for every finished shard its index, its records array's
    metadata, shard file and shard index (checksummed), and every sample's record: its byte range inside the
    array, every inner chunk present and passing its crc32c, its sections of the layout the index says, its
    depth rows adding up per camera. Then the consolidated index against the manifest. One fault per sample."""
    faults: list[Fault] = []
    try:
        reader = CacheReader(url, require_complete=False)
        m = reader.manifest
        done_arr = reader.group["done"]
        done = np.asarray(done_arr[:]).astype(bool)
    except StoreUnreachable:  # nothing of the cache was read: not a fault of it
        raise
    except CacheError as exc:
        return [Fault(-1, "", "manifest", str(exc))]
    except Exception as exc:  # noqa: BLE001 - a lost or damaged flags array is a fault to report
        return [Fault(-1, "", "done", f"unreadable: {_short(exc)}")]
    n = m.dataset.num_samples
    digest_checked: set[str] = set()  # listed files whose sha256 the reads below compare already
    fs, root = fs_and_path(reader.url)
    lost_flags = [k for k in range(m.num_shards) if not fs.exists(f"{root.rstrip('/')}/done/c/{k}")]
    if lost_flags:
        faults.append(Fault(-1, "", "done", f"chunk file(s) {', '.join(f'done/c/{k}' for k in lost_flags)} missing: "
                                            "those shards read as not written"))
    if not m.complete:
        faults.append(Fault(-1, "", "manifest", f"incomplete: {int(done.sum())} of {n} done"))
    elif not done.all():
        faults.append(Fault(-1, "", "manifest", f"marked complete, but only {int(done.sum())} of {n} samples are "
                                                "done"))
    for shard in range(m.num_shards):
        r = m.shard_range(shard)
        if not done[r.start:r.stop].all():
            faults += [Fault(i, "", "done", "sample not written") for i in r if not done[i]]
            continue
        listed = m.extra.get(FILES_KEY, {}).get(shard_index_path(shard))
        if listed:
            digest_checked.add(shard_index_path(shard))
        try:
            rows = read_parquet_rows(f"{reader.url}/{shard_index_path(shard)}", sha256=listed[1] if listed else None)
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults += [Fault(i, "", "index", f"shard index unreadable: {_short(exc)}") for i in r]
            continue
        if set(rows) != set(INDEX_COLUMNS):
            faults += [Fault(i, "", "index", f"shard index has columns {sorted(rows)}, not the format's") for i in r]
            continue
        if rows["sample_idx"] != list(r):
            faults += [Fault(i, "", "index", "shard index lists other samples") for i in r]
            continue
        shard_rows = [{k: v[j] for k, v in rows.items()} for j in range(len(r))]
        try:
            records = reader.records_file(shard)
        except ShardFileError as exc:
            faults += [Fault(row["sample_idx"], row["token"], RECORDS_ARRAY, str(exc)) for row in shard_rows]
            continue
        end = shard_rows[-1]["record_offset"] + shard_rows[-1]["record_bytes"]
        if records.nbytes != end:
            faults.append(Fault(r.start, shard_rows[0]["token"], RECORDS_ARRAY,
                                f"{records_key(shard)} stores {records.nbytes} bytes, the shard index lists {end}"))
        for row in shard_rows:
            faults += _record_faults(reader, row)
    if m.complete:
        try:
            index = read_parquet_rows(f"{reader.url}/index.parquet")
            if len(index["token"]) != n:
                faults.append(Fault(-1, "", "index", f"{len(index['token'])} rows for {n} samples"))
            elif tokens_sha256(index["token"]) != m.dataset.tokens_sha256:
                faults.append(Fault(-1, "", "index", "sample tokens differ from the manifest's fingerprint"))
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults.append(Fault(-1, "", "index", f"unreadable: {_short(exc)}"))
    faults += list(listed_file_faults(reader, already=list(faults), checked=frozenset(digest_checked)))
    return faults


def _record_faults(reader: CacheReader, row: dict[str, Any]) -> list[Fault]:
    """The fault of one sample's record, if any (as the reader words it, less the cache prefix)."""
    i, token = row["sample_idx"], row["token"]
    try:
        sample = reader.read_row(row)
    except SampleFault as exc:
        hit = f"sections {', '.join(exc.sections)}: " if exc.sections else ""
        return [Fault(i, token, RECORDS_ARRAY, hit + exc.what)]
    if sum(row["depth_per_camera"]) != len(sample.depth) or \
            (len(sample.depth) and not (np.diff(sample.depth[:, 4]) >= 0).all()):
        return [Fault(i, token, RECORDS_ARRAY, "section depth: rows do not match the per-camera counts")]
    return []


def _short(exc: Exception) -> str:
    return first_sentence(str(exc))


def keypoint_features(reader: CacheReader, sample) -> tuple[np.ndarray, np.ndarray]:
    """Teacher features at the sample's keypoints ((M, K, C) float32) and their validity ((M, K) bool)."""
    import torch

    from tigbev.geometry.bev_sampling import sample_bev

    grid = reader.manifest.grid
    m, k = sample.keypoints.shape[:2]
    fmap = torch.from_numpy(reader.dense_map(sample))[None]
    xy = torch.from_numpy(sample.keypoints.reshape(1, -1, 2)).float()
    feats, valid = sample_bev(fmap, xy, grid)
    return feats[0].reshape(m, k, fmap.shape[1]).numpy(), valid[0].reshape(m, k).numpy()


def dump_sample(url: str, token: str, out: str | Path) -> Path:
    """Write one sample's cached content as npz. Keys: ``boxes`` (M, 9) x y z l w h yaw vx vy (lidar frame),
    ``labels`` (M,), ``keypoints`` (M, K, 2), ``keypoint_features`` (M, K, C), ``keypoint_valid`` (M, K),
    ``depth`` (P, 5) u v depth box_index camera_index, ``depth_per_camera`` (6,), ``map_cells`` (F,) or empty,
    ``map_features`` (F, C) or (C, H, W), ``manifest`` (JSON text)."""
    reader = CacheReader(url)
    sample = reader.read(reader.sample_idx(token))
    kp_feats, kp_valid = keypoint_features(reader, sample)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp, boxes=sample.boxes, labels=sample.labels, keypoints=sample.keypoints, keypoint_features=kp_feats,
        keypoint_valid=kp_valid, depth=sample.depth, depth_per_camera=np.asarray(sample.depth_per_camera),
        map_cells=sample.map_cells if sample.map_cells is not None else np.zeros(0, np.int64),
        map_features=sample.map_features, manifest=np.asarray(json.dumps(reader.manifest.to_dict())),
    )
    tmp.replace(path)
    return path
