"""``tigbev cache info | verify | dump``: what a cache holds, whether every byte of it is sound, one sample as npz."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.cache.schema import (
    RAGGED_ARRAYS,
    shard_arrays,
    shard_index_path,
    shard_path,
    tokens_sha256,
)
from tigbev.cache.store import (
    CacheError,
    CacheReader,
    fs_and_path,
    holds_fill,
    open_array,
    read_parquet_rows,
    shard_files,
)

__all__ = ["Fault", "cache_info", "dump_sample", "keypoint_features", "verify_cache"]


@dataclass(frozen=True)
class Fault:
    """One problem found by verify: which sample (or -1 for the whole cache), which array, what."""

    sample_idx: int
    token: str
    array: str
    message: str

    def __str__(self) -> str:
        where = f"sample {self.sample_idx} ({self.token})" if self.sample_idx >= 0 else "cache"
        return f"{where}, array {self.array}: {self.message}"


def _stored_bytes(url: str) -> dict[str, int]:
    """Bytes on storage per array name (summed over shards)."""
    fs, root = fs_and_path(url)
    sizes: dict[str, int] = {}
    for path, size in fs.du(root, total=False, withdirs=False).items():
        rel = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/")) else path
        parts = rel.split("/")
        if parts[0] == "shards" and len(parts) > 3:  # shards/<k>/<array>/<chunk or zarr.json>
            name = parts[2]
        elif parts[0] in ("bev", "done") and len(parts) > 1:
            name = parts[0]
        else:
            name = "metadata"
        sizes[name] = sizes.get(name, 0) + int(size)
    return sizes


def cache_info(url: str) -> dict[str, Any]:
    """Summary of a cache: samples, completeness, bytes per sample per array, compression ratio, teacher, grid."""
    reader = CacheReader(url, require_complete=False)
    m = reader.manifest
    group = reader.group
    done = np.asarray(group["done"][:]).astype(bool)
    stored = _stored_bytes(reader.url)
    # Members are opened by name, never listed: the cache folder also holds Parquet files zarr does not know.
    raw: dict[str, int] = {"done": int(group["done"].nbytes)}
    if m.features.mode == "dense":
        raw["bev"] = int(group["bev"].nbytes * done.sum() / max(len(done), 1))
    for shard in range(m.num_shards):
        if not done[m.shard_range(shard).start:m.shard_range(shard).stop].all():
            continue
        for name in RAGGED_ARRAYS:
            arr = open_array(group, f"{shard_path(shard)}/{name}")
            if arr is not None:
                raw[name] = raw.get(name, 0) + int(arr.nbytes)
    n_done = max(int(done.sum()), 1)
    data_arrays = [k for k in stored if k not in ("metadata", "done")]
    total_stored = sum(stored[k] for k in data_arrays)
    total_raw = sum(raw.get(k, 0) for k in data_arrays)
    return {
        "url": reader.url,
        "samples": m.dataset.num_samples,
        "done": int(done.sum()),
        "complete": m.complete,
        "split": m.dataset.split,
        "version": m.dataset.version,
        "features": {"mode": m.features.mode, "dtype": m.features.dtype, "channels": m.features.channels},
        "grid": m.grid.to_dict(),
        "teacher_sha256": m.teacher.checkpoint_sha256,
        "bytes_per_sample": {k: stored[k] / n_done for k in sorted(data_arrays)},
        "bytes_per_sample_total": total_stored / n_done,
        "compression_ratio": total_raw / total_stored if total_stored else float("nan"),
        "format_version": m.format_version,
        "writers": live_writers(reader.url),
    }


def live_writers(url: str) -> list[str]:
    """The extractions writing this cache now (their live leases), described; nothing is changed."""
    import time

    from tigbev.cache.lease import WriterLease

    fs, root = fs_and_path(url)
    now = time.time()
    return [lease.describe(now) for lease in WriterLease(fs, root, url, []).others(remove_stale=False)]


def verify_cache(url: str) -> list[Fault]:
    """Prove a cache complete and intact: for every array of every sample the index lists, the array's metadata
    exists, its rows have the manifest's shape and dtype, the array holds exactly the rows the index says, every
    zarr shard file those rows live in exists, every chunk reads with a valid checksum, and no stored value is the
    fill value (which no written sample holds: it would mean a lost chunk). Then the index against the manifest."""
    faults: list[Fault] = []
    try:
        reader = CacheReader(url, require_complete=False)
        m = reader.manifest
        group = reader.group
        fs, root = fs_and_path(reader.url)
    except CacheError as exc:
        return [Fault(-1, "", "manifest", str(exc))]
    root = root.rstrip("/")

    def lost_files(arr, path: str, rows: range) -> list[str]:
        return [k for k in shard_files(arr, rows) if not fs.exists(f"{root}/{path}/{k}")]

    done_arr = open_array(group, "done")
    if done_arr is None:
        return [Fault(-1, "", "done", "array metadata done/zarr.json is missing")]
    n = m.dataset.num_samples
    lost = lost_files(done_arr, "done", range(n))
    if lost:
        faults.append(Fault(-1, "", "done", f"chunk file(s) {', '.join('done/' + k for k in lost)} missing: those "
                                            "shards read as not written"))
    try:
        done = np.asarray(done_arr[:]).astype(bool)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a fault to report, not to raise
        return [*faults, Fault(-1, "", "done", f"unreadable: {_short(exc)}")]
    if not m.complete:
        faults.append(Fault(-1, "", "manifest", f"incomplete: {int(done.sum())} of {n} done"))
    elif not done.all():
        faults.append(Fault(-1, "", "manifest", f"marked complete, but only {int(done.sum())} of {n} samples are "
                                                "done"))
    bev = None
    if m.features.mode == "dense":
        bev = open_array(group, "bev")
        if bev is None:
            faults.append(Fault(-1, "", "bev", "array metadata bev/zarr.json is missing"))
        else:
            faults += _layout_faults(m, "bev", bev, -1, "")
    for shard in range(m.num_shards):
        r = m.shard_range(shard)
        if not done[r.start:r.stop].all():
            faults += [Fault(i, "", "done", "sample not written") for i in r if not done[i]]
            continue
        try:
            rows = read_parquet_rows(f"{reader.url}/{shard_index_path(shard)}")
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults += [Fault(i, "", "index", f"shard index unreadable: {_short(exc)}") for i in r]
            continue
        if rows["sample_idx"] != list(r):
            faults += [Fault(i, "", "index", "shard index lists other samples") for i in r]
            continue
        for name in shard_arrays(m.features):
            faults += _shard_array_faults(m, group, shard, name, rows, r, lost_files)
        if bev is not None:
            lost = lost_files(bev, "bev", r)
            for i in r:
                token = rows["token"][i - r.start]
                if lost:
                    faults.append(Fault(i, token, "bev", f"chunk file bev/{lost[0]} is missing"))
                    continue
                try:
                    if holds_fill(np.asarray(bev[i])).any():
                        faults.append(Fault(i, token, "bev", "holds fill values: a chunk is missing"))
                except Exception as exc:  # noqa: BLE001 - reported as a fault
                    faults.append(Fault(i, token, "bev", f"unreadable: {_short(exc)}"))
    if m.complete:
        try:
            index = read_parquet_rows(f"{reader.url}/index.parquet")
            if len(index["token"]) != n:
                faults.append(Fault(-1, "", "index", f"{len(index['token'])} rows for {n} samples"))
            elif tokens_sha256(index["token"]) != m.dataset.tokens_sha256:
                faults.append(Fault(-1, "", "index", "sample tokens differ from the manifest's fingerprint"))
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults.append(Fault(-1, "", "index", f"unreadable: {_short(exc)}"))
    return faults


def _layout_faults(m, name: str, arr, sample_idx: int, token: str) -> list[Fault]:
    row_shape, dtype = m.row_spec(name)
    if tuple(arr.shape[1:]) != row_shape or str(arr.dtype) != dtype:
        return [Fault(sample_idx, token, name, f"stored as {arr.dtype} rows of shape {tuple(arr.shape[1:])}, the "
                                               f"manifest says {dtype} rows of shape {row_shape}")]
    return []


def _shard_array_faults(m, group, shard: int, name: str, rows: dict[str, list[Any]], r: range,
                        lost_files) -> list[Fault]:
    """Every fault of one ragged array of one finished shard, named by sample."""
    path = f"{shard_path(shard)}/{name}"
    spans = [(i, rows["token"][j], *_rows_of(name, rows, j)) for j, i in enumerate(r)]
    expected = max((start + count for _, _, start, count in spans), default=0)
    arr = open_array(group, path)
    if arr is None:
        return [Fault(i, t, name, f"array metadata {path}/zarr.json is missing") for i, t, _, _ in spans]
    layout = _layout_faults(m, name, arr, spans[0][0], spans[0][1])
    if layout:
        return layout
    faults = []
    if arr.shape[0] != expected:
        faults.append(Fault(spans[0][0], spans[0][1], name, f"{path} stores {arr.shape[0]} rows, the shard index "
                                                            f"lists {expected}"))
    lost = set(lost_files(arr, path, range(expected)))
    per_file = (arr.shards or arr.chunks)[0]
    try:
        data = np.asarray(arr[...]) if not lost else None
    except Exception:  # noqa: BLE001 - find which samples are hit, below
        data = None
    for i, token, start, count in spans:
        if count == 0:
            continue
        if start + count > arr.shape[0]:
            faults.append(Fault(i, token, name, f"rows {start}..{start + count} lie past the array's end "
                                                f"({arr.shape[0]} rows stored)"))
            continue
        files = shard_files(arr, range(start, start + count))
        if lost & set(files):
            faults.append(Fault(i, token, name, f"chunk file {path}/{sorted(lost & set(files))[0]} is missing "
                                                f"(rows {start}..{start + count}, {per_file} rows per file)"))
            continue
        try:
            part = data[start:start + count] if data is not None else np.asarray(arr[start:start + count])
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults.append(Fault(i, token, name, f"unreadable: {_short(exc)}"))
            continue
        hit = holds_fill(part)
        if hit.any():
            faults.append(Fault(i, token, name, f"{int(hit.reshape(len(part), -1).any(axis=1).sum())} of {count} rows "
                                                "hold the fill value: a chunk is missing"))
    return faults


def _rows_of(name: str, rows: dict[str, list[Any]], j: int) -> tuple[int, int]:
    if name in ("boxes", "keypoints"):
        return rows["box_offset"][j], rows["num_boxes"][j]
    if name == "depth":
        return rows["depth_offset"][j], rows["num_depth"][j]
    if name == "fg_scale":
        return rows["fg_scale_row"][j], 1
    return rows["fg_offset"][j], rows["num_fg_cells"][j]


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 160 else text[:157] + "..."


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
