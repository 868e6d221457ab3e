"""Reading and writing the teacher cache (layout and meaning: tigbev/cache/schema.py). numpy, zarr, pyarrow only.

The one shim for the zarr v3 API: store opening (local path or fsspec URL), array creation with codecs, and
checksum errors turned into errors that name the sample and the array.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tigbev.cache.lease import LeaseConflict, WriterLease
from tigbev.cache.record import CachedSample, SampleRecord, dense_map, pack_record, unpack_record
from tigbev.cache.schema import (
    CACHE_ATTR,
    CHECKSUM_ATTR,
    FILES_KEY,
    INDEX_COLUMNS,
    RECORDS_ARRAY,
    CacheFormatError,
    DatasetFingerprint,
    FeatureStorage,
    Manifest,
    checked_file,
    manifest_digest,
    shard_index_path,
    shard_path,
    tokens_sha256,
)
from tigbev.cache.shard_file import RecordsFile, ShardFileError
from tigbev.errors import TigbevError, first_sentence

__all__ = ["RECORDS_CHUNK_BYTES", "CacheError", "CacheReader", "CacheWriter", "CachedSample", "SampleFault",
           "SampleRecord", "StoreUnreachable", "check_manifest_digest", "codecs_description", "file_digests",
           "fs_and_path", "read_parquet_rows", "records_compressor", "records_key", "remote_errors", "tokens_sha256"]

RECORDS_CHUNK_BYTES = 64 * 1024
"""Inner chunk size of the records arrays: a read fetches the chunks its record overlaps, at most one extra
chunk's worth of bytes at each end."""


class CacheError(TigbevError):
    """A cache that is missing, incomplete, corrupt, or does not match what is asked of it."""


class StoreUnreachable(CacheError):
    """A remote store that cannot be reached (a down endpoint, a refused connection): not a fault of the cache."""


class SampleFault(CacheError):
    """A sample whose record cannot be read: ``what`` went wrong, in which record ``sections``."""

    def __init__(self, url: str, sample_idx: int, token: str, what: str, sections: Sequence[str] = ()):
        self.url, self.sample_idx, self.token, self.what, self.sections = url, sample_idx, token, what, tuple(sections)
        hit = f" (sections {', '.join(sections)})" if sections else ""
        super().__init__(f"cache {url}: sample {sample_idx} ({token}), array {RECORDS_ARRAY}{hit}: {what} "
                         "(`tigbev cache verify` lists every fault)")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its fields where it is unpickled (another process)
        return type(self), (self.url, self.sample_idx, self.token, self.what, self.sections)


def records_compressor(features: FeatureStorage, choice: str = "auto") -> str:
    """The records' compressor for an extraction's ``compression`` choice: ``auto`` is zstd for dense maps (mostly
    zeros after the teacher's ReLU, 2-10x smaller) and none for foreground cells (a read is then a ranged read plus
    a checksum)."""
    if choice == "auto":
        return "zstd" if features.mode == "dense" else "none"
    if choice not in ("none", "zstd"):
        raise CacheError(f"records compression must be 'auto', 'none' or 'zstd', got {choice!r}")
    return choice


def _records_codecs(compressor: str) -> list[Any]:
    """Inner-chunk codecs of the records arrays: [blosc(zstd)] + crc32c."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return ([BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")] if compressor == "zstd" else []) + \
        [Crc32cCodec()]


def codecs_description(compressor: str) -> dict[str, Any]:
    """What the manifest records about the codecs (``records_compressor`` is what the writer uses; readers follow
    each array's zarr.json)."""
    return {"zarr_format": 3, "records_compressor": compressor,
            "records": f"sharding_indexed: one shard file per sample shard; inner chunks "
                       f"{'blosc(zstd, clevel 3)' if compressor == 'zstd' else 'uncompressed'} + crc32c; index bytes "
                       "+ crc32c at the end"}


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
    """Turns a failure to reach a remote store into ``StoreUnreachable("cannot reach <url>: <cause>")``."""
    try:
        yield
    except CacheError:
        raise
    except Exception as exc:
        cause = _connection_cause(exc) if _is_remote(url) else None
        if cause is None:
            raise
        raise StoreUnreachable(f"cannot reach {url}: {type(cause).__name__}: {cause}") from exc


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


def read_parquet_rows(url: str, *, sha256: str | None = None) -> dict[str, list[Any]]:
    """The rows of an index table, as columns; a CacheError naming the file when it is missing, unreadable, or
    (given ``sha256``, as a complete cache's manifest lists it) not the file that was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with remote_errors(url):
        fs, path = fs_and_path(url)
        if not fs.exists(path):
            raise CacheError(f"cache index {url} is missing")
        with fs.open(path, "rb") as f:
            data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CacheError(f"cache index {url} is damaged: its sha256 differs from the one the manifest lists "
                         "(`tigbev cache verify` lists every fault)")
    try:
        return pq.read_table(pa.BufferReader(data)).to_pydict()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CacheError(f"cache index {url} is damaged ({type(exc).__name__}: {first_sentence(str(exc))}; "
                         "`tigbev cache verify` lists every fault)") from None


def file_digests(url: str) -> dict[str, list[Any]]:
    """``{path: [bytes, sha256]}`` of the files of a cache that a complete manifest lists (schema.checked_file)."""
    with remote_errors(url):
        fs, root = fs_and_path(url)
        root = root.rstrip("/")
        out: dict[str, list[Any]] = {}
        for full in sorted(fs.find(root)):
            rel = str(full)[len(root) + 1:]
            if checked_file(rel):
                data = fs.cat_file(full)
                out[rel] = [len(data), hashlib.sha256(data).hexdigest()]
    return out


def check_manifest_digest(url: str, manifest: Any, digest: Any) -> None:
    """A CacheError when the manifest is not the one written: its digest differs, or one of the digest and the
    file list is there without the other (every complete cache has both; an incomplete one neither)."""
    if not isinstance(manifest, dict):
        return  # no manifest at all: Manifest.parse says so
    extra = manifest.get("extra")
    listed = isinstance(extra, dict) and FILES_KEY in extra
    if digest is None and not listed:
        return
    if digest is None or not listed or digest != manifest_digest(manifest):
        raise CacheError(f"cache {url}: the manifest in zarr.json is damaged (its sha256 differs from the one "
                         "stored beside it); re-extract the cache, or restore zarr.json from a copy")


def records_key(shard: int) -> str:
    """Store key (relative to the cache) of shard ``shard``'s records array."""
    return f"{shard_path(shard)}/{RECORDS_ARRAY}"


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
            try:
                self._create_fixed_arrays()  # whoever comes first creates them; the others find them
            except OSError as exc:
                raise _unwritable(self.url, exc, "its done flags", f"{self.url}/done") from exc
        self._lock = threading.Lock()

    def lease(self, shards: Sequence[int]) -> WriterLease:
        """This writer's lease on ``shards`` (a context manager); raises CacheError naming a live other writer."""
        lease = WriterLease(self.fs, self.root, self.url, shards)
        try:
            with remote_errors(self.url):
                return lease.acquire()
        except LeaseConflict as exc:
            raise CacheError(str(exc)) from None
        except OSError as exc:
            raise _unwritable(self.url, exc, "its writer lease", lease.path) from exc

    def _create_fixed_arrays(self) -> None:
        import zarr
        from zarr.codecs import Crc32cCodec

        m = self.manifest
        # Several parts may start at once: whoever creates the flags first wins, the others reuse them. Never
        # overwrite here, or a late starter would wipe the done flags of an early one.
        try:
            self.group.create_array("done", shape=(m.dataset.num_samples,), chunks=(m.shard_samples,), dtype="uint8",
                                    compressors=[Crc32cCodec()], fill_value=0, overwrite=False)
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
        with remote_errors(self.url):  # this shard's flags only: reading all of them per shard is quadratic
            done = np.asarray(self.group["done"][expected[0]:expected[-1] + 1]).astype(bool)
        if done.all():
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
        rows, blobs, offset = [], [], 0
        for r in records:
            blob = pack_record(m, r)
            rows.append({"sample_idx": r.sample_idx, "token": r.token, "scene": r.scene,
                         "timestamp_us": r.timestamp_us, "shard": shard, "record_offset": offset,
                         "record_bytes": len(blob), "num_boxes": len(r.boxes), "num_depth": len(r.depth),
                         "depth_per_camera": list(r.depth_per_camera), "num_cells": r.num_cells})
            blobs.append(blob)
            offset += len(blob)
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        chunk = m.records_chunk_bytes
        g = self.group.require_group(shard_path(shard))
        # overwrite: this shard is not done, so what is there is a killed writer's partial output (the lease
        # guarantees no live writer holds it). One zarr shard file holds the whole array.
        arr = g.create_array(RECORDS_ARRAY, shape=data.shape, dtype="uint8", chunks=(chunk,),
                             shards=(max(chunk, -(-len(data) // chunk) * chunk),), overwrite=True, fill_value=0,
                             compressors=_records_codecs(m.codecs.get("records_compressor", "none")),
                             config={"write_empty_chunks": True})
        arr[...] = data
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
        manifest["extra"] = {**manifest.get("extra", {}), FILES_KEY: file_digests(self.url)}
        with remote_errors(self.url):
            self.group.attrs.update({CACHE_ATTR: manifest, CHECKSUM_ATTR: manifest_digest(manifest)})
        self.manifest = Manifest.parse(manifest)
        return True


def _unwritable(url: str, exc: OSError, what: str, path: str) -> CacheError:
    """A cache file that could not be written before any shard (a full disk, no permission), named with the cache,
    the file and the system's reason."""
    reason = exc.strerror or str(exc)
    return CacheError(f"cannot write {what} of cache {url}: {reason} ({exc.filename or path}); no shard was written, "
                      "free the space (or fix the permission) and rerun the same command")


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
    keys = ("teacher", "dataset", "grid", "features", "keypoints", "depth", "boxes", "variants", "shard_samples",
            "records_chunk_bytes", "codecs")
    return [f"{k} differs" for k in keys if a[k] != b[k]]


class CacheReader:
    """Random access to a finished cache.

    The store is opened lazily and again in every process that reads (each DataLoader worker, forked or spawned,
    opens its own: fork-safe for remote stores). A sample is one ranged read of its shard's records file, every
    inner chunk it touches checked by its crc32c (:class:`~tigbev.cache.shard_file.RecordsFile`); a missing or
    damaged file or chunk is a :class:`CacheError` that names the sample, the array and the record sections hit.
    """

    def __init__(self, url: str, *, require_complete: bool = True):
        self.url = str(url).rstrip("/")
        self.require_complete = require_complete
        self._pid: int | None = None
        self._group: Any = None
        self._files: dict[int, RecordsFile] = {}
        _ = self.manifest  # fail early on a missing or foreign cache

    def __getstate__(self) -> dict[str, Any]:  # spawned workers re-open the store themselves
        state = self.__dict__.copy()
        state.update(_pid=None, _group=None, _files={})
        return state

    @property
    def group(self):
        """The zarr group, opened in this process."""
        self._in_this_process()
        return self._group

    def _in_this_process(self) -> None:
        if self._pid != os.getpid():
            self._files = {}  # a forked child must not share the parent's file offsets or connections
            self._group, self._pid = self._open_group(), os.getpid()

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
                attrs = dict(self.group.attrs)
            raw = attrs.get(CACHE_ATTR)
            m = Manifest.parse(raw)  # first: a cache of another format version is named as such
            check_manifest_digest(self.url, raw, attrs.get(CHECKSUM_ATTR))
        except CacheFormatError as exc:
            raise CacheError(f"{self.url}: {exc}") from exc
        if self.require_complete and not m.complete:
            raise CacheError(f"cache {self.url} is incomplete ({int(np.asarray(self.group['done'][:]).sum())} of "
                             f"{m.dataset.num_samples} samples done); rerun extract-teacher to finish it")
        return m

    @cached_property
    def index(self) -> dict[str, list[Any]]:
        listed = self.manifest.extra.get(FILES_KEY, {}).get("index.parquet")
        return read_parquet_rows(f"{self.url}/index.parquet", sha256=listed[1] if listed else None)

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

    def records_file(self, shard: int) -> RecordsFile:
        """Shard ``shard``'s records array, opened once per process (raises ShardFileError)."""
        self._in_this_process()
        f = self._files.get(shard)
        if f is None:
            f = self.open_records(shard)
            if len(self._files) >= 64:  # keep a bounded number of open files
                self._files.pop(next(iter(self._files))).close()
            self._files[shard] = f
        return f

    def open_records(self, shard: int) -> RecordsFile:
        """Shard ``shard``'s records array, opened now and not kept: its metadata read and its shard index read and
        checked (raises ShardFileError). The caller closes it."""
        fs, root = fs_and_path(self.url)
        with remote_errors(self.url):
            return RecordsFile(fs, f"{root.rstrip('/')}/{records_key(shard)}", local=not _is_remote(self.url))

    def record_row(self, sample_idx: int) -> dict[str, Any]:
        if not 0 <= sample_idx < len(self):
            raise CacheError(f"sample index {sample_idx} out of range for cache {self.url} ({len(self)} samples)")
        row = {k: v[sample_idx] for k, v in self.index.items()}
        if row["sample_idx"] != sample_idx:
            raise CacheError(f"cache {self.url}: index row {sample_idx} holds sample {row['sample_idx']}")
        return row

    def sections_hit(self, row: dict[str, Any], chunks: Sequence[int], size: int) -> list[str]:
        """Labels of the record sections of ``row`` that lie in inner chunks ``chunks`` (of ``size`` bytes) of its
        shard's records array."""
        m = self.manifest
        spans = [(c * size - row["record_offset"], (c + 1) * size - row["record_offset"]) for c in chunks]
        return [s.label for s in m.sections(row["num_boxes"], row["num_depth"], row["num_cells"])
                if s.nbytes and any(s.offset < hi and s.offset + s.nbytes > lo for lo, hi in spans)]

    def read_row(self, row: dict[str, Any]) -> CachedSample:
        """The sample of index row ``row`` (one ranged read; CacheError naming the sample on any fault)."""
        i, token = row["sample_idx"], row["token"]
        records = None
        try:
            with remote_errors(self.url):
                records = self.records_file(row["shard"])
                buf = records.read(row["record_offset"], row["record_bytes"])
            return unpack_record(self.manifest, buf, sample_idx=i, token=token, num_boxes=row["num_boxes"],
                                 num_depth=row["num_depth"], depth_per_camera=row["depth_per_camera"],
                                 num_cells=row["num_cells"])
        except ShardFileError as exc:
            hit = [] if records is None else self.sections_hit(row, exc.chunks, records.chunk_bytes)
            raise SampleFault(self.url, i, token, str(exc), hit) from None
        except CacheFormatError as exc:
            raise SampleFault(self.url, i, token, str(exc)) from None

    def read(self, sample_idx: int) -> CachedSample:
        return self.read_row(self.record_row(sample_idx))

    def dense_map(self, sample: CachedSample) -> NDArray[np.float32]:
        """(C, H, W) canonical teacher map of a sample; in foreground mode zeros where no cell is stored."""
        return dense_map(sample.map_cells, sample.map_features, self.manifest.grid)
