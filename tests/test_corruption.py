"""A corruption campaign over a finished cache: random single-byte flips, truncations and deletions of every kind of
file it holds (records, shard indexes, metadata, index tables, done flags, the manifest), seeded. For each damaged
copy, ``verify_cache`` must report a fault, and reading every sample must either return exactly the intact cache's
arrays or raise the project's error, never other arrays in silence."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tigbev.cache.schema import CONFIG_DIR
from tigbev.cache.store import CacheReader
from tigbev.cache.tools import verify_cache
from tigbev.errors import TigbevError

CASES = 300
SEED = 20261208


def _content(reader: CacheReader, i: int) -> list[Any]:
    """Everything a student reads of sample ``i``, as comparable values."""
    s = reader.read(i)
    values: list[Any] = [s.sample_idx, s.token, s.boxes, s.labels, s.depth, list(s.depth_per_camera),
                         s.keypoint_spec, s.keypoints]
    for m in s.maps:
        values += [m.aug_from_lidar, m.cells, m.stored, m.scale]
    return values


def _equal(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _damage(rng: np.random.Generator, root: Path, files: list[str], kind: str) -> str:
    """Apply one damage of ``kind`` to a random file of ``files`` under ``root``; return what was done."""
    name = files[int(rng.integers(len(files)))]
    path = root / name
    data = path.read_bytes()
    if kind == "delete" or not data:
        path.unlink()
        return f"deleted {name}"
    if kind == "truncate":
        size = int(rng.integers(len(data)))
        path.write_bytes(data[:size])
        return f"truncated {name} to {size} of {len(data)} bytes"
    at = int(rng.integers(len(data)))
    flipped = bytearray(data)
    flipped[at] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(flipped))
    return f"flipped byte {at} of {name} ({len(data)} bytes)"


def _same_json(source: Path, copy: Path, what: str) -> bool:
    """Whether a damaged JSON file still parses to the same content as the intact one."""
    name = what.split(" of ", 1)[-1].split(" (", 1)[0] if what.startswith("flipped") else ""
    if not name.endswith(".json"):
        return False
    try:
        return json.loads((copy / name).read_bytes()) == json.loads((source / name).read_bytes())
    except ValueError:
        return False


def _read_outcome(url: str, n: int, intact: list[list[Any]]) -> str:
    """'equal' (every sample reads as the intact cache's), 'refused' (the project's error: at opening, naming the
    cache, or at a sample, naming it) or 'silent: ...' (some sample read back other arrays without an error)."""
    try:
        reader = CacheReader(url)
    except TigbevError as exc:
        assert url in str(exc) or "cache" in str(exc), str(exc)
        return "refused"
    refused = False
    for i in range(n):
        try:
            got = _content(reader, i)
        except TigbevError as exc:
            assert f"sample {i}" in str(exc) or url in str(exc), str(exc)
            refused = True
            continue
        if not _equal(got, intact[i]):
            return f"silent: sample {i}"
    return "refused" if refused else "equal"


def test_every_damage_is_reported_by_verify_and_never_read_as_other_arrays(synth_cache: str,
                                                                             tmp_path: Path) -> None:
    source = Path(synth_cache)
    # Every file but the extraction parts' configurations, which record the options of each run, are rewritten by
    # every rerun and are never read back.
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                   if p.is_file() and not str(p.relative_to(source)).startswith(f"{CONFIG_DIR}/"))
    reader = CacheReader(synth_cache)
    n = len(reader)
    intact = [_content(reader, i) for i in range(n)]
    assert verify_cache(synth_cache) == []
    rng = np.random.default_rng(SEED)
    kinds = ("flip", "truncate", "delete")
    counts: Counter[str] = Counter()
    missed_by_verify, silent = [], []
    for case in range(CASES):
        kind = kinds[case % 3] if case % 6 else "flip"  # half of the cases are flips: the subtle kind
        copy = tmp_path / f"case-{case}"
        shutil.copytree(source, copy)
        what = _damage(rng, copy, files, kind)
        faults = verify_cache(str(copy))
        outcome = _read_outcome(str(copy), n, intact)
        counts["cases"] += 1
        if not faults and _same_json(source, copy, what):  # white space changed for white space: the same file
            counts["same JSON"] += 1
            shutil.rmtree(copy)
            continue
        counts["caught by verify"] += bool(faults)
        counts["caught at read"] += outcome == "refused"
        counts["read equal"] += outcome == "equal"
        if not faults:
            missed_by_verify.append(what)
        if outcome.startswith("silent"):
            silent.append(f"{what}: {outcome}")
        shutil.rmtree(copy)
    counts["silent"] = len(silent)
    report = tmp_path / "corruption-campaign.json"
    report.write_text(json.dumps({"seed": SEED, "files": files, **counts, "missed_by_verify": missed_by_verify},
                                 indent=2))
    print(dict(counts))
    assert not silent, silent
    assert not missed_by_verify, missed_by_verify
    assert counts["cases"] == CASES


@pytest.mark.parametrize("name", ["zarr.json", "index.parquet", "shards/000000/records/zarr.json"])
def test_a_flip_in_the_metadata_is_a_fault(synth_cache: str, tmp_path: Path, name: str) -> None:
    """Each metadata file, damaged in its middle, is a fault of verify (not an unexpected exception)."""
    copy = tmp_path / "cache"
    shutil.copytree(synth_cache, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    assert verify_cache(str(copy)), name
