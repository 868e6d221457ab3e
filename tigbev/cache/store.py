"""Reading and writing the teacher cache (layout and meaning: tigbev/cache/schema.py). numpy, zarr, pyarrow only.

The one shim for the zarr v3 API: store opening (local path or fsspec URL), array creation with codecs, and
checksum errors turned into errors that name the sample and the array.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tigbev.cache.lease import LeaseConflict, WriterLease
from tigbev.cache.schema import (
    CACHE_ATTR,
    INDEX_COLUMNS,
    CacheFormatError,
    DatasetFingerprint,
    Manifest,
    missing_value,
    shard_arrays,
    shard_index_path,
    shard_path,
    tokens_sha256,
)
from tigbev.errors import TigbevError

__all__ = ["CacheError", "CacheReader", "CacheWriter", "CachedSample", "SampleRecord", "fs_and_path", "holds_fill",
           "open_array", "read_parquet_rows", "remote_errors", "shard_files", "tokens_sha256"]

_RAGGED_CHUNK_BYTES = 256 * 1024  # inner chunk size of ragged arrays: a sample reads a few chunks, not a shard


class CacheError(TigbevError):
    """A cache that is missing, incomplete, corrupt, or does not match what is asked of it."""


def _codecs(kind: str) -> list[Any]:
    """Compression + checksum chain: zstd inside blosc with byte shuffle for numbers, crc32c last (verified on read)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "bitshuffle" if kind == "int8" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


CODECS_DESCRIPTION = {"compressor": "blosc(zstd, clevel 5, byte shuffle; bit shuffle for int8)", "checksum": "crc32c",
                      "zarr_format": 3, "ragged_inner_chunk_bytes": _RAGGED_CHUNK_BYTES}


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _open_store(url: str, mode: str):
    """A zarr store for a local path or an fsspec URL (s3://, gs://, memory://, ...), opened in this process.

    Call it in the process that reads: fsspec gives each process its own filesystem instance (its instance cache
    is per pid), so a store opened in a DataLoader worker never uses the parent's event loop.
    """
    import zarr

    if _is_remote(url):
        with remote_errors(url):
            return zarr.storage.FsspecStore.from_url(url, read_only=mode == "r")
    path = url.removeprefix("file://")
    return zarr.storage.LocalStore(path, read_only=mode == "r")


def fs_and_path(url: str):
    """(fsspec filesystem, path) of a URL or local path (fsspec keeps one instance per process)."""
    import fsspec

    return fsspec.core.url_to_fs(url)


_CONNECTION_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                      "ConnectionClosedError", "NoCredentialsError", "ServerDisconnectedError", "gaierror")


def _connection_cause(exc: BaseException) -> BaseException | None:
    """The first error in ``exc``'s chain that says the store could not be reached, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _CONNECTION_ERRORS:
            return e
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]
        stack += list(getattr(e, "exceptions", ()))
    return None


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Turns a failure to reach a remote store into ``CacheError("cannot reach <url>: <cause>")``."""
    try:
        yield
    except CacheError:
        raise
    except Exception as exc:
        cause = _connection_cause(exc) if _is_remote(url) else None
        if cause is None:
            raise
        raise CacheError(f"cannot reach {url}: {type(cause).__name__}: {cause}") from exc


def _write_parquet(url: str, rows: list[dict[str, Any]]) -> None:
    """Write index rows as Parquet, atomically (temporary name, then move)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int64": pa.int64(), "string": pa.string(), "list<int64>": pa.list_(pa.int64())}
    schema = pa.schema([(name, types[t]) for name, t in INDEX_COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with remote_errors(url):
        fs, path = fs_and_path(url)
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        fs.mv(tmp, path)


def write_json_file(url: str, relpath: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON at ``url/relpath``, atomically (temporary name, then move)."""
    with remote_errors(url):
        fs, root = fs_and_path(url)
        path = f"{root.rstrip('/')}/{relpath}"
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(json.dumps(payload, indent=2).encode())
        fs.mv(tmp, path)


def read_parquet_rows(url: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    with remote_errors(url):
        fs, path = fs_and_path(url)
        if not fs.exists(path):
            raise CacheError(f"cache index {url} is missing")
        with fs.open(path, "rb") as f:
            return pq.read_table(f).to_pydict()


@dataclass
class SampleRecord:
    """What extraction writes for one sample (all in the un-augmented key lidar frame)."""

    sample_idx: int
    token: str
    scene: str
    timestamp_us: int
    boxes: NDArray[np.float32]  # (M, 10): box layout + label
    keypoints: NDArray[np.float32]  # (M, K, 2)
    depth: NDArray[np.float32]  # (P, 5): u, v, depth, box index, camera index; sorted by camera
    depth_per_camera: list[int]
    fg_cells: NDArray[np.int32]  # (F,) foreground mode
    fg_features: NDArray  # (F, C) float16 or int8
    fg_scale: NDArray[np.float32] | None  # (C,) int8 only
    bev: NDArray[np.float16] | None  # (C, H, W) dense mode


@dataclass
class CachedSample:
    """One sample as read back. ``map_cells``/``map_features`` hold the stored teacher map cells (dense mode: all).

    Use :meth:`CacheReader.dense_map` to rebuild a (C, H, W) float32 map with zeros where nothing is stored.
    """

    sample_idx: int
    token: str
    boxes: NDArray[np.float32]  # (M, 9)
    labels: NDArray[np.int64]  # (M,)
    keypoints: NDArray[np.float32]  # (M, K, 2)
    depth: NDArray[np.float32]  # (P, 5)
    depth_per_camera: list[int]
    map_cells: NDArray[np.int64] | None  # (F,) flat cell indices, None in dense mode
    map_features: NDArray[np.float32]  # (F, C) foreground, or (C, H, W) dense, float32


def _ragged_chunk_rows(row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, _RAGGED_CHUNK_BYTES // row_bytes)


def _array_kwargs(dtype: str) -> dict[str, Any]:
    """Fill value no sample holds, every chunk stored (even one of fill values), codecs with checksum."""
    return {"fill_value": missing_value(dtype), "config": {"write_empty_chunks": True}, "compressors": _codecs(dtype)}


def shard_files(arr: Any, rows: range) -> list[str]:
    """Store keys (relative to the array) of the zarr shard files that hold ``rows`` of a row-sharded array."""
    if len(rows) == 0:
        return []
    per_file = (arr.shards or arr.chunks)[0]
    tail = (0,) * (arr.ndim - 1)
    return [arr.metadata.encode_chunk_key((i, *tail)) for i in range(rows.start // per_file,
                                                                       (rows.stop - 1) // per_file + 1)]


def holds_fill(data: NDArray) -> NDArray[np.bool_]:
    """Which elements equal their dtype's fill value (schema.missing_value): data that was never read."""
    fill = missing_value(str(data.dtype))
    return np.isnan(data) if isinstance(fill, float) else data == fill


def open_array(group: Any, path: str) -> Any | None:
    """The zarr array at ``path`` of ``group``, or None when its metadata (``zarr.json``) is missing."""
    import zarr

    try:
        node = group[path]
    except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    return node if isinstance(node, zarr.Array) else None


class CacheWriter:
    """Creates a cache (or opens an existing one with the same manifest) and writes whole sample shards.

    ``url`` must be new, an empty directory, or a cache of the same manifest (to resume it); anything else is
    refused before anything is written. Writing needs a :meth:`lease` on the shards (one writer per shard).
    """

    def __init__(self, url: str, manifest: Manifest):
        import zarr

        self.url = url.rstrip("/")
        self.manifest = manifest
        with remote_errors(self.url):
            self.fs, self.root = fs_and_path(self.url)
            _check_output(self.fs, self.root, self.url)
            store = _open_store(self.url, "w")
            try:
                try:
                    group = zarr.open_group(store=store, mode="r+")
                except (FileNotFoundError, zarr.errors.NodeNotFoundError):
                    # The group and its manifest are written in one go, so a part starting at the same moment
                    # never sees a group without a manifest; if another part created it first, this opens theirs.
                    group = zarr.open_group(store=store, mode="a", zarr_format=3,
                                            attributes={CACHE_ATTR: manifest.to_dict()})
                existing = Manifest.parse(group.attrs.get(CACHE_ATTR))
            except CacheFormatError as exc:
                raise CacheError(f"{self.url} holds a zarr group that is not a cache of this tigbev ({exc}); choose "
                                 "another output") from None
            problems = _resume_mismatches(existing, manifest)
            if problems:
                raise CacheError(f"{self.url} holds a different cache ({'; '.join(problems)}); choose another "
                                 "output or delete it")
            self.manifest = existing
            self.group = group
            self._create_fixed_arrays()  # whoever comes first creates them; the others find them
        self._lock = threading.Lock()

    def lease(self, shards: Sequence[int]) -> WriterLease:
        """This writer's lease on ``shards`` (a context manager); raises CacheError naming a live other writer."""
        lease = WriterLease(self.fs, self.root, self.url, shards)
        try:
            with remote_errors(self.url):
                return lease.acquire()
        except LeaseConflict as exc:
            raise CacheError(str(exc)) from None

    def _create_fixed_arrays(self) -> None:
        m = self.manifest
        n, s = m.dataset.num_samples, m.shard_samples
        import zarr
        from zarr.codecs import Crc32cCodec

        # Several parts may start at once: whoever creates an array first wins, the others reuse it. Never
        # overwrite here, or a late starter would wipe the done flags of an early one.
        specs: list[tuple[str, dict[str, Any]]] = [
            ("done", {"shape": (n,), "chunks": (s,), "dtype": "uint8", "compressors": [Crc32cCodec()],
                      "fill_value": missing_value("uint8")})]
        if m.features.mode == "dense":
            bev = m.array("bev")
            specs.append(("bev", {"shape": (n, *bev.row_shape), "chunks": (1, *bev.row_shape),
                                  "shards": (s, *bev.row_shape), "dtype": bev.dtype, **_array_kwargs(bev.dtype)}))
        for name, spec in specs:
            try:
                self.group.create_array(name, overwrite=False, **spec)
            except zarr.errors.ContainsArrayError:
                pass

    def done_flags(self) -> NDArray[np.bool_]:
        with remote_errors(self.url):
            return np.asarray(self.group["done"][:]).astype(bool)

    def write_shard(self, shard: int, records: Sequence[SampleRecord]) -> None:
        """Write one whole shard: ragged arrays, dense rows, the shard's index; then (only then) its done flags.

        A shard already marked done is never rewritten (it may be another writer's finished work).
        """
        m = self.manifest
        expected = list(m.shard_range(shard))
        if [r.sample_idx for r in records] != expected:
            raise CacheError(f"shard {shard} must hold samples {expected[0]}..{expected[-1]} in order")
        if self.done_flags()[expected[0]:expected[-1] + 1].all():
            raise CacheError(f"{self.url}: shard {shard} is already complete; it is not written again")
        try:
            with remote_errors(self.url):
                self._write_shard(shard, records, expected)
        except OSError as exc:  # e.g. the disk is full: what is done stays done, the rest resumes
            done = int(self.done_flags().sum())
            raise CacheError(f"cannot write shard {shard} of cache {self.url}: {exc}; the {done} samples already "
                             "done are kept, rerun the same command to resume") from exc

    def _write_shard(self, shard: int, records: Sequence[SampleRecord], expected: list[int]) -> None:
        m = self.manifest
        g = self.group.require_group(shard_path(shard))
        rows, offsets = [], {"box": 0, "depth": 0, "fg": 0}
        for j, r in enumerate(records):
            rows.append({
                "sample_idx": r.sample_idx, "token": r.token, "scene": r.scene, "timestamp_us": r.timestamp_us,
                "shard": shard, "num_boxes": len(r.boxes), "box_offset": offsets["box"], "num_depth": len(r.depth),
                "depth_offset": offsets["depth"], "depth_per_camera": list(r.depth_per_camera),
                "num_fg_cells": len(r.fg_cells), "fg_offset": offsets["fg"], "fg_scale_row": j,
            })
            offsets["box"] += len(r.boxes)
            offsets["depth"] += len(r.depth)
            offsets["fg"] += len(r.fg_cells)
        arrays = {}
        for name in shard_arrays(m.features):  # every ragged array of this storage, as its spec says
            spec = m.array(name)
            parts = [np.asarray(getattr(r, name)).reshape(-1, *spec.row_shape) for r in records]
            arrays[name] = np.concatenate(parts).astype(spec.dtype)
        for name, data in arrays.items():
            rows_per_chunk = _ragged_chunk_rows(data.shape[1:], data.dtype)
            shard_rows = max(rows_per_chunk, -(-len(data) // rows_per_chunk) * rows_per_chunk)
            # overwrite: this shard is not done, so what is there is a killed writer's partial output (the lease
            # guarantees no live writer holds it).
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(rows_per_chunk, *data.shape[1:]),
                                 shards=(shard_rows, *data.shape[1:]), overwrite=True,
                                 **_array_kwargs(str(data.dtype)))
            if len(data):
                arr[...] = data
        if m.features.mode == "dense":
            self.group["bev"][expected[0]:expected[-1] + 1] = np.stack([r.bev for r in records])
        _write_parquet(f"{self.url}/{shard_index_path(shard)}", rows)
        with self._lock:
            self.group["done"][expected[0]:expected[-1] + 1] = 1

    def finalize(self) -> bool:
        """When every sample is done: write the consolidated index and mark the manifest complete."""
        if not self.done_flags().all():
            return False
        rows: list[dict[str, Any]] = []
        for shard in range(self.manifest.num_shards):
            part = read_parquet_rows(f"{self.url}/{shard_index_path(shard)}")
            rows += [dict(zip(part, vals)) for vals in zip(*part.values())]
        _write_parquet(f"{self.url}/index.parquet", rows)
        manifest = self.manifest.to_dict()
        manifest["complete"] = True
        with remote_errors(self.url):
            self.group.attrs[CACHE_ATTR] = manifest
        self.manifest = Manifest.parse(manifest)
        return True


def _check_output(fs: Any, root: str, url: str) -> None:
    """An extraction's output must be new, an empty directory, or a cache (checked by its manifest next)."""
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise CacheError(f"--out {url} is a file, not a cache directory")
    entries = fs.ls(root, detail=False)
    if entries and not fs.exists(f"{root.rstrip('/')}/zarr.json"):
        names = sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        raise CacheError(f"--out {url} is a non-empty directory that is not a tigbev cache (holds "
                         f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); choose a new or empty one")


def _resume_mismatches(existing: Manifest, wanted: Manifest) -> list[str]:
    """An existing cache may be resumed only if everything that shapes its content is the same."""
    a, b = existing.to_dict(), wanted.to_dict()
    keys = ("teacher", "dataset", "grid", "features", "keypoints", "depth", "boxes", "shard_samples")
    return [f"{k} differs" for k in keys if a[k] != b[k]]


class CacheReader:
    """Random access to a finished cache.

    The store is opened lazily and again in every process that reads (each DataLoader worker, forked or spawned,
    opens its own: fork-safe for remote stores). Reads never return fill values for data that is not there: before
    an array of a shard is first read, the zarr shard files its rows live in are checked to exist, and a sample's
    rows must lie inside the stored array; otherwise a :class:`CacheError` names the sample and the array.
    """

    def __init__(self, url: str, *, require_complete: bool = True):
        self.url = str(url).rstrip("/")
        self.require_complete = require_complete
        self._pid: int | None = None
        self._group: Any = None
        self._arrays: dict[tuple[int, str], Any] = {}
        _ = self.manifest  # fail early on a missing or foreign cache

    def __getstate__(self) -> dict[str, Any]:  # spawned workers re-open the store themselves
        state = self.__dict__.copy()
        state.update(_pid=None, _group=None, _arrays={})
        return state

    @property
    def group(self):
        """The zarr group, opened in this process."""
        if self._pid != os.getpid():
            self._group, self._arrays, self._pid = self._open_group(), {}, os.getpid()
        return self._group

    def _open_group(self):
        import zarr

        try:
            with remote_errors(self.url):
                return zarr.open_group(store=_open_store(self.url, "r"), mode="r")
        except CacheError:
            raise
        except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
            raise CacheError(f"no cache at {self.url}") from exc
        except Exception as exc:  # zarr raises several types for a folder that is not a group
            raise CacheError(f"{self.url} is not a readable zarr cache: {exc}") from exc

    @cached_property
    def manifest(self) -> Manifest:
        try:
            with remote_errors(self.url):
                m = Manifest.parse(self.group.attrs.get(CACHE_ATTR))
        except CacheFormatError as exc:
            raise CacheError(f"{self.url}: {exc}") from exc
        if self.require_complete and not m.complete:
            raise CacheError(f"cache {self.url} is incomplete ({int(np.asarray(self.group['done'][:]).sum())} of "
                             f"{m.dataset.num_samples} samples done); rerun extract-teacher to finish it")
        return m

    @cached_property
    def index(self) -> dict[str, list[Any]]:
        return read_parquet_rows(f"{self.url}/index.parquet")

    @cached_property
    def _token_to_idx(self) -> dict[str, int]:
        return {t: i for i, t in zip(self.index["sample_idx"], self.index["token"])}

    def __len__(self) -> int:
        return self.manifest.dataset.num_samples

    @property
    def tokens(self) -> list[str]:
        return list(self.index["token"])

    def sample_idx(self, token: str) -> int:
        try:
            return self._token_to_idx[token]
        except KeyError:
            raise CacheError(f"sample {token} is not in cache {self.url}") from None

    def check_compatible(self, expected: DatasetFingerprint, *, grid: dict[str, float] | None = None) -> None:
        """Raise a CacheError that says what differs when the cache was not computed from this dataset split (its
        tokens, records and image sizes: :meth:`NuScenesReader.fingerprint`) or lies on another grid."""
        errors = self.manifest.compatibility_errors(dataset=expected, grid=grid)
        if errors:
            raise CacheError(f"cache {self.url} does not match: " + "; ".join(errors))

    def _fault(self, sample_idx: int, name: str, what: str) -> CacheError:
        token = self.index["token"][sample_idx]
        return CacheError(f"cache {self.url}: sample {sample_idx} ({token}), array {name}: {what} (`tigbev cache "
                          "verify` lists every fault)")

    def _array(self, sample_idx: int, shard: int, name: str, rows: range):
        """The array ``name`` of ``shard``, checked once per process: metadata present, shard files present, and
        ``rows`` inside it (a missing chunk would otherwise read back as fill values)."""
        group = self.group
        key = (shard, name)
        arr = self._arrays.get(key)
        if arr is None:
            path = name if name == "bev" else f"{shard_path(shard)}/{name}"
            with remote_errors(self.url):
                arr = open_array(group, path)
                if arr is None:
                    raise self._fault(sample_idx, name, f"array metadata {path}/zarr.json is missing")
                m = self.manifest
                stored = range(0, arr.shape[0]) if name != "bev" else m.shard_range(shard)
                fs, root = fs_and_path(self.url)
                lost = [k for k in shard_files(arr, stored) if not fs.exists(f"{root.rstrip('/')}/{path}/{k}")]
            if lost:
                raise self._fault(sample_idx, name, f"chunk file {path}/{lost[0]} is missing")
            row_shape, dtype = m.row_spec(name)
            if tuple(arr.shape[1:]) != row_shape or str(arr.dtype) != dtype:
                raise self._fault(sample_idx, name, f"stored as {arr.dtype} rows of shape {tuple(arr.shape[1:])}, "
                                                    f"the manifest says {dtype} rows of shape {row_shape}")
            self._arrays[key] = arr
        if rows.stop > arr.shape[0]:
            raise self._fault(sample_idx, name, f"rows {rows.start}..{rows.stop} lie past the array's end "
                                                f"({arr.shape[0]} rows stored)")
        return arr

    def _read(self, sample_idx: int, shard: int, name: str, start: int, count: int) -> NDArray:
        rows = range(start, start + count)
        arr = self._array(sample_idx, shard, name, rows)
        try:
            with remote_errors(self.url):
                data = np.asarray(arr[rows.start:rows.stop])
        except CacheError:
            raise
        except Exception as exc:  # a checksum mismatch is a ValueError, a lost chunk a KeyError/FileNotFoundError
            raise self._fault(sample_idx, name, f"unreadable ({exc})") from exc
        if holds_fill(data).any():  # an inner chunk missing from its shard file reads as the fill value
            raise self._fault(sample_idx, name, "holds the fill value: a chunk is missing")
        return data

    def read(self, sample_idx: int) -> CachedSample:
        m = self.manifest
        if not 0 <= sample_idx < len(self):
            raise CacheError(f"sample index {sample_idx} out of range for cache {self.url} ({len(self)} samples)")
        row = {k: v[sample_idx] for k, v in self.index.items()}
        if row["sample_idx"] != sample_idx:
            raise CacheError(f"cache {self.url}: index row {sample_idx} holds sample {row['sample_idx']}")
        shard = row["shard"]
        boxes = self._read(sample_idx, shard, "boxes", row["box_offset"], row["num_boxes"])
        keypoints = self._read(sample_idx, shard, "keypoints", row["box_offset"], row["num_boxes"])
        depth = self._read(sample_idx, shard, "depth", row["depth_offset"], row["num_depth"])
        if m.features.mode == "dense":
            feats = self._read(sample_idx, shard, "bev", sample_idx, 1)[0].astype(np.float32)
            cells = None
        else:
            cells = self._read(sample_idx, shard, "fg_cells", row["fg_offset"], row["num_fg_cells"]).astype(np.int64)
            feats = self._read(sample_idx, shard, "fg_features", row["fg_offset"], row["num_fg_cells"])
            if m.features.dtype == "int8":
                scale = self._read(sample_idx, shard, "fg_scale", row["fg_scale_row"], 1)[0]
                feats = feats.astype(np.float32) * scale[None, :]
            else:
                feats = feats.astype(np.float32)
        return CachedSample(
            sample_idx=sample_idx, token=row["token"], boxes=boxes[:, :9].copy(),
            labels=boxes[:, 9].astype(np.int64), keypoints=keypoints, depth=depth,
            depth_per_camera=list(row["depth_per_camera"]), map_cells=cells, map_features=feats,
        )

    def dense_map(self, sample: CachedSample) -> NDArray[np.float32]:
        """(C, H, W) teacher map of a sample; in foreground mode zeros where no cell is stored."""
        if sample.map_cells is None:
            return sample.map_features
        nx, ny = self.manifest.grid.nx, self.manifest.grid.ny
        c = self.manifest.features.channels
        out = np.zeros((c, ny * nx), dtype=np.float32)
        out[:, sample.map_cells] = sample.map_features.T
        return out.reshape(c, ny, nx)

