"""Byte-range reads of one sharded zarr v3 array (a shard's ``records``), as the zarr v3 sharding spec lays it out.

zarr-python decodes a selection through its async codec pipeline, about a millisecond per call whatever its size;
a sample record is one contiguous byte range, so reading it directly costs one ranged read and one crc32c per inner
chunk instead. What this reads is exactly what zarr wrote (the array's ``zarr.json``, the shard index at the end
of the shard file, each inner chunk's trailing crc32c), so zarr-python reads the same arrays (``tigbev cache verify``
and the tests compare both). Only the layout tigbev writes is accepted: a 1-D uint8 array in a single shard file,
``sharding_indexed`` with the index at the end (bytes + crc32c), inner chunks ``bytes`` [+ ``blosc``] + ``crc32c``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = ["RecordsFile", "ShardFileError"]

_MISSING = np.uint64(2**64 - 1)  # offset and length of an inner chunk that is not stored (zarr v3 sharding spec)


class ShardFileError(Exception):
    """The array's metadata, shard file or one of its inner chunks is missing, damaged or of another layout.
    ``chunks``: the inner chunks concerned (empty: the whole array)."""

    def __init__(self, message: str, chunks: tuple[int, ...] = ()):
        super().__init__(message)
        self.chunks = chunks

    def __reduce__(self) -> tuple[Any, ...]:  # the chunks travel with the message to another process
        return type(self), (self.args[0], self.chunks)


def _crc32c(data: Any) -> int:
    import google_crc32c

    return google_crc32c.value(data)


class RecordsFile:
    """One records array: ``array_path`` is its folder (``<root>/shards/<k>/records``) on filesystem ``fs``.

    Opened lazily; holds an open file descriptor on local storage (call :meth:`close`, or let it be collected).
    """

    def __init__(self, fs: Any, array_path: str, *, local: bool):
        self._fd: int | None = None
        self.fs, self.array_path, self.local = fs, array_path.rstrip("/"), local
        meta = self._metadata()
        self.nbytes: int = meta["shape"]
        self.chunk_bytes: int = meta["chunk"]
        self.compressed: bool = meta["compressed"]
        self.file_key = f"{self.array_path}/{meta['key']}"
        self.n_chunks = -(-meta["shard"] // self.chunk_bytes)
        self._index = self._read_index()

    # --- metadata and index ----------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        path = f"{self.array_path}/zarr.json"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ShardFileError(f"array metadata {_short_path(path)} is missing") from None
        try:
            meta = json.loads(raw)
            shape, = meta["shape"]
            shard, = meta["chunk_grid"]["configuration"]["chunk_shape"]
            codec, = meta["codecs"]
            cfg = codec["configuration"]
            chunk, = cfg["chunk_shape"]
            inner = [c["name"] for c in cfg["codecs"]]
            index = [c["name"] for c in cfg["index_codecs"]]
            encoding = meta["chunk_key_encoding"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardFileError(f"array metadata {_short_path(path)} is unreadable or not of the records layout "
                                 f"({type(exc).__name__}: {exc})") from None
        problems = []
        if meta.get("data_type") != "uint8":
            problems.append(f"data type {meta.get('data_type')!r}, not uint8")
        if codec.get("name") != "sharding_indexed" or cfg.get("index_location", "end") != "end":
            problems.append("not sharding_indexed with the index at the end")
        if index != ["bytes", "crc32c"]:
            problems.append(f"index codecs {index}, not [bytes, crc32c]")
        if inner not in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]):
            problems.append(f"inner codecs {inner}, not [bytes, crc32c] or [bytes, blosc, crc32c]")
        if shard < shape or shard % chunk:
            problems.append(f"shard of {shard} bytes for {shape} bytes in chunks of {chunk}")
        if encoding.get("name") != "default":
            problems.append(f"chunk key encoding {encoding.get('name')!r}")
        if problems:
            raise ShardFileError(f"array {_short_path(self.array_path)} is not of the records layout: "
                                 + "; ".join(problems))
        sep = encoding.get("configuration", {}).get("separator", "/")
        return {"shape": int(shape), "shard": int(shard), "chunk": int(chunk), "compressed": "blosc" in inner,
                "key": f"c{sep}0"}

    def _size(self) -> int:
        try:
            if self.local:
                return os.path.getsize(self.file_key)
            return int(self.fs.size(self.file_key))
        except FileNotFoundError:
            raise ShardFileError(f"chunk file {_short_path(self.file_key)} is missing") from None

    def _read_index(self) -> np.ndarray:
        size = self._size()
        want = self.n_chunks * 16 + 4
        if size < want:
            raise ShardFileError(f"chunk file {_short_path(self.file_key)} is {size} bytes, shorter than its "
                                 f"shard index ({want} bytes): truncated")
        raw = self._read(size - want, want)
        if _crc32c(np.frombuffer(raw, np.uint8)[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ShardFileError(f"chunk file {_short_path(self.file_key)}: its shard index fails its checksum "
                                 "(damaged or truncated)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_chunks, 2)
        data_end = size - want
        present = index[:, 0] != _MISSING
        if (index[present, 0] + index[present, 1] > data_end).any():
            raise ShardFileError(f"chunk file {_short_path(self.file_key)}: its shard index points past the data "
                                 "(truncated)")
        return index

    def lost_chunks(self) -> tuple[int, ...]:
        """The inner chunks that the shard index marks as not stored (tigbev stores every chunk: each is a loss)."""
        return tuple(int(j) for j in np.flatnonzero(self._index[:, 0] == _MISSING))

    # --- reads -----------------------------------------------------------------------------------------------------
    def _read(self, start: int, length: int) -> bytes:
        try:
            if self.local:
                if self._fd is None:
                    self._fd = os.open(self.file_key, os.O_RDONLY)
                data = os.pread(self._fd, length, start)
            else:
                data = self.fs.cat_file(self.file_key, start=start, end=start + length)
        except FileNotFoundError:
            raise ShardFileError(f"chunk file {_short_path(self.file_key)} is missing") from None
        if len(data) != length:
            raise ShardFileError(f"chunk file {_short_path(self.file_key)}: {len(data)} of {length} bytes at offset "
                                 f"{start} could be read (truncated)")
        return data

    def read(self, start: int, length: int) -> np.ndarray:
        """Bytes ``start .. start + length`` of the array (uint8), every inner chunk they touch checked by its
        crc32c."""
        if length <= 0:
            return np.zeros(0, np.uint8)
        if start < 0 or start + length > self.nbytes:
            raise ShardFileError(f"bytes {start}..{start + length} lie past the array's end ({self.nbytes} bytes "
                                 "stored)")
        first, last = start // self.chunk_bytes, (start + length - 1) // self.chunk_bytes
        entries = self._index[first:last + 1]
        lost = tuple(int(first + j) for j in np.flatnonzero(entries[:, 0] == _MISSING))
        if lost:
            raise ShardFileError(f"inner chunk(s) {', '.join(map(str, lost))} of {_short_path(self.file_key)} are "
                                 "not in its shard index (lost)", lost)
        offsets, sizes = entries[:, 0].astype(np.int64), entries[:, 1].astype(np.int64)
        if bool((offsets[1:] == offsets[:-1] + sizes[:-1]).all()):  # as zarr writes them: one ranged read
            blob = self._read(int(offsets[0]), int(offsets[-1] + sizes[-1] - offsets[0]))
            at = offsets - offsets[0]
        else:
            blob = b"".join(self._read(int(o), int(n)) for o, n in zip(offsets, sizes))
            at = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        view = np.frombuffer(blob, np.uint8)
        pieces = []
        for j, (a, n) in enumerate(zip(at.tolist(), sizes.tolist())):
            chunk = view[a:a + n]
            if n < 4 or _crc32c(chunk[:-4]) != int.from_bytes(chunk[-4:].tobytes(), "little"):
                raise ShardFileError(f"inner chunk {first + j} of {_short_path(self.file_key)} fails its crc32c "
                                     "checksum (damaged)", (first + j,))
            pieces.append(self._decode(chunk[:-4], first + j))
        lo = start - first * self.chunk_bytes
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return data[lo:lo + length]

    def _decode(self, chunk: np.ndarray, j: int) -> np.ndarray:
        if self.compressed:
            from numcodecs import Blosc

            try:
                chunk = np.frombuffer(Blosc().decode(chunk), np.uint8)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is damage
                raise ShardFileError(f"inner chunk {j} of {_short_path(self.file_key)} does not decompress "
                                     f"({exc})", (j,)) from None
        if len(chunk) != self.chunk_bytes:
            raise ShardFileError(f"inner chunk {j} of {_short_path(self.file_key)} holds {len(chunk)} bytes, not "
                                 f"{self.chunk_bytes}", (j,))
        return chunk

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _short_path(path: str) -> str:
    """``shards/<k>/records/...`` part of a path (what messages name)."""
    i = path.rfind("shards/")
    return path[i:] if i >= 0 else path
