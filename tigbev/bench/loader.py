"""Section ``loader``: cache reads against a raw memmap of the same bytes."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.bench.config import median

__all__ = ["bench_loader", "loader_rate", "read_time"]


class _CacheReads:
    """A dataset whose item i is the cache's sample i % n, read and decoded (what the camera loader reads)."""

    def __init__(self, url: str, n_items: int):
        from tigbev.cache.store import CacheReader

        self.reader = CacheReader(url)
        self.n_items = n_items

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> int:
        s = self.reader.read(i % len(self.reader))
        return int(s.boxes.nbytes + s.depth.nbytes + sum(
            m.stored.nbytes + (0 if m.cells is None else m.cells.nbytes) for m in s.maps))


class _MemmapReads:
    """Item i: sample i % n's bytes copied out of one raw file through a numpy memmap (no decoding)."""

    def __init__(self, path: Path, offsets: list[tuple[int, int]], n_items: int):
        self.path, self.offsets, self.n_items = str(path), offsets, n_items
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return self.n_items

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}

    def __getitem__(self, i: int) -> int:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, size = self.offsets[i % len(self.offsets)]
        return int(np.array(self._mm[start:start + size]).nbytes)


def _raw_copy(url: str, path: Path) -> list[tuple[int, int]]:
    """Write every sample's record (its stored sections, as the cache holds them before chunking and checksums) to
    one file; (offset, size) per sample."""
    from tigbev.cache.store import CacheReader

    reader = CacheReader(url)
    offsets = []
    with path.open("wb") as f:
        pos = 0
        for i in range(len(reader)):
            row = reader.record_row(i)
            blob = reader.records_file(row["shard"]).read(row["record_offset"], row["record_bytes"]).tobytes()
            f.write(blob)
            offsets.append((pos, len(blob)))
            pos += len(blob)
    return offsets


def read_time(url: str, passes: int = 3) -> float:
    """Seconds per sample read (``CacheReader.read``, in process, warm page cache): the median of ``passes``."""
    reads = _CacheReads(url, 0)
    n = len(reads.reader)
    for i in range(n):  # warm
        reads[i]
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        for i in range(n):
            reads[i]
        times.append((time.perf_counter() - t) / max(n, 1))
    return median(times)


def loader_rate(dataset: Any, workers: int) -> float:
    """Items per second through a DataLoader (batch 1, identity collate), after the first item (worker start-up)."""
    from torch.utils.data import DataLoader

    with warnings.catch_warnings():  # more workers than cores is the point of the measurement: no advice wanted
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                            prefetch_factor=2 if workers > 0 else None)
        it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / max(time.perf_counter() - t, 1e-9)


def bench_loader(url: str, work: Path, *, repeats: int, workers: Sequence[int], n_items: int) -> dict[str, Any]:
    raw = work / "raw-memmap.bin"
    offsets = _raw_copy(url, raw)
    cache_ds, mm_ds = _CacheReads(url, n_items), _MemmapReads(raw, offsets, n_items)
    for i in range(len(offsets)):  # warm the page cache and zarr's metadata for both
        cache_ds[i], mm_ds[i]
    cache_s, mm_s, ratio = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_items):
            cache_ds[i]
        t1 = time.perf_counter()
        for i in range(n_items):
            mm_ds[i]
        t2 = time.perf_counter()
        cache_s.append((t1 - t0) / n_items)
        mm_s.append((t2 - t1) / n_items)
        ratio.append(cache_s[-1] / mm_s[-1])
    per_workers: dict[str, Any] = {}
    for w in workers:
        c, m = [], []
        for _ in range(repeats):
            c.append(loader_rate(cache_ds, w))
            m.append(loader_rate(mm_ds, w))
        per_workers[str(w)] = {"cache_samples_per_s": median(c), "memmap_samples_per_s": median(m),
                               "cache_over_memmap": median(c) / median(m)}
    raw.unlink(missing_ok=True)
    return {"bytes_per_sample_raw": float(np.mean([s for _, s in offsets])),
            "cache_read_s_per_sample": median(cache_s), "memmap_read_s_per_sample": median(mm_s),
            "cache_over_memmap_time": median(ratio), "workers": per_workers}
