"""``tigbev cache info | verify | dump``: what a cache holds, whether every byte of it is sound, one sample as npz."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.cache_schema import RAGGED_ARRAYS, shard_index_path, shard_path
from tigbev.cache_store import CacheError, CacheReader, fs_and_path, read_parquet_rows

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
            arr = _member(group, f"{shard_path(shard)}/{name}")
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
        "grid": m.grid,
        "teacher_sha256": m.teacher.checkpoint_sha256,
        "bytes_per_sample": {k: stored[k] / n_done for k in sorted(data_arrays)},
        "bytes_per_sample_total": total_stored / n_done,
        "compression_ratio": total_raw / total_stored if total_stored else float("nan"),
        "format_version": m.format_version,
    }


def verify_cache(url: str) -> list[Fault]:
    """Read every chunk (checksums are checked on read) and check the index against the manifest and the arrays."""
    faults: list[Fault] = []
    try:
        reader = CacheReader(url, require_complete=False)
        m = reader.manifest
    except CacheError as exc:
        return [Fault(-1, "", "manifest", str(exc))]
    group = reader.group
    try:
        done = np.asarray(group["done"][:]).astype(bool)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a fault to report, not to raise
        return [Fault(-1, "", "done", f"unreadable: {exc}")]
    if not m.complete:
        faults.append(Fault(-1, "", "manifest", f"incomplete: {int(done.sum())} of {m.dataset.num_samples} done"))
    for shard in range(m.num_shards):
        r = m.shard_range(shard)
        if not done[r.start:r.stop].all():
            for i in r:
                if not done[i]:
                    faults.append(Fault(i, "", "done", "sample not written"))
            continue
        try:
            rows = read_parquet_rows(f"{reader.url}/{shard_index_path(shard)}")
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults += [Fault(i, "", "index", f"shard index unreadable: {exc}") for i in r]
            continue
        if rows["sample_idx"] != list(r):
            faults += [Fault(i, "", "index", "shard index lists other samples") for i in r]
            continue
        for name in RAGGED_ARRAYS:
            arr = _member(group, f"{shard_path(shard)}/{name}")
            if arr is None:
                continue
            try:
                np.asarray(arr[...])
                continue
            except Exception:  # noqa: BLE001, S110 - find which samples are hit, below
                pass
            for j, i in enumerate(r):
                start, count = _rows_of(name, rows, j)
                try:
                    np.asarray(arr[start:start + count])
                except Exception as exc:  # noqa: BLE001 - reported as a fault
                    faults.append(Fault(i, rows["token"][j], name, f"unreadable: {_short(exc)}"))
        for name in ("boxes", "depth"):
            arr = _member(group, f"{shard_path(shard)}/{name}")
            for j, i in enumerate(r):
                start, count = _rows_of(name, rows, j)
                if arr is None or start + count > arr.shape[0]:
                    faults.append(Fault(i, rows["token"][j], name, "missing, or the index points past its end"))
        if m.features.mode == "dense":
            for i in r:
                try:
                    np.asarray(group["bev"][i])
                except Exception as exc:  # noqa: BLE001 - reported as a fault
                    faults.append(Fault(i, rows["token"][i - r.start], "bev", f"unreadable: {_short(exc)}"))
    if m.complete:
        try:
            index = read_parquet_rows(f"{reader.url}/index.parquet")
            if len(index["token"]) != m.dataset.num_samples:
                faults.append(Fault(-1, "", "index", f"{len(index['token'])} rows for {m.dataset.num_samples} samples"))
            else:
                from tigbev.cache_store import tokens_sha256

                if tokens_sha256(index["token"]) != m.dataset.tokens_sha256:
                    faults.append(Fault(-1, "", "index", "sample tokens differ from the manifest's fingerprint"))
        except Exception as exc:  # noqa: BLE001 - reported as a fault
            faults.append(Fault(-1, "", "index", f"unreadable: {_short(exc)}"))
    return faults


def _member(group, path: str):
    """The array at ``path``, or None when it does not exist (e.g. fg_scale in float16 mode)."""
    try:
        return group[path]
    except KeyError:
        return None


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

    from tigbev.geometry import BevGrid
    from tigbev.models.bev_sampling import sample_bev

    grid = BevGrid(**reader.manifest.grid)
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
