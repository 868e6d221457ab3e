"""The cache at nuScenes scale: a store of up to 28,130 samples (nuScenes train) with small synthetic records, through
extraction's writer, ``cache info``, ``cache verify``, a reader starting in a fresh process (what each DataLoader
worker does), a DataLoader with workers, and the compatibility check. Time and peak memory per size; the per-sample
time at each size over the smallest size's says whether it grows linearly (1.0).

    python benchmarks/scale.py --out runs/scale [--sizes 1000,7000,28130] [--channels 16]

Records are small (2 boxes, 60 depth rows, the cells around 4 x 4 keypoints per box, 16 channels): the point is what
grows with the sample count (index, flags, shard files, start-up), not the bytes per sample, which the bench's
storage section measures. Each step runs in its own spawned process, so its peak RSS is its own. Writes
``OUT/scale.json`` and ``OUT/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 8


def _manifest(url: str, n: int, channels: int) -> Any:
    from tigbev.cache.schema import DatasetFingerprint, tokens_sha256
    from tigbev.config import ExtractTeacherConfig
    from tigbev.geometry import BevGrid
    from tigbev.stages.extract_teacher import build_manifest

    cfg = ExtractTeacherConfig(teacher_checkpoint=Path("synthetic.pt"), dataroot=Path("."), split="scale",
                               out_dir=url, keypoint_grid=4, shard_samples=SHARD, batch_size=SHARD)
    fp = _fingerprint(n)
    assert fp.tokens_sha256 == tokens_sha256(_tokens(n))
    return build_manifest(cfg, teacher_sha="0" * 64, teacher_config={"num_sweeps": 1, "synthetic": True},
                          grid=BevGrid.square(51.2, 1.6), channels=channels, dataset=fp), DatasetFingerprint


def _tokens(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def _fingerprint(n: int) -> Any:
    from tigbev.cache.schema import DatasetFingerprint, tokens_sha256

    return DatasetFingerprint(version="v1.0-scale", split="scale", num_samples=n, tokens_sha256=tokens_sha256(
        _tokens(n)), records_sha256={"sample": "0" * 64}, image_sizes={"CAM_FRONT": ["1600x900"]})


def _record(m: Any, i: int, rng: np.random.Generator) -> Any:
    from tigbev.cache.record import MapVariant, SampleRecord, box_keypoints, foreground_cells, quantise

    boxes = np.zeros((2, 10), np.float32)
    boxes[:, :2] = rng.uniform(-40, 40, (2, 2))
    boxes[:, 3:6] = (4.0, 1.8, 1.6)
    depth = np.zeros((60, 5), np.float32)
    depth[:, :3] = rng.uniform(0, 100, (60, 3))
    depth[:, 3] = -1
    depth[:, 4] = np.repeat(np.arange(6), 10)
    cells = foreground_cells(box_keypoints(boxes, m.keypoints), m.grid, m.features.margin_cells)
    feats, scale = quantise(rng.normal(size=(len(cells), m.features.channels)).astype(np.float32), "float16",
                            channel_axis=1)
    return SampleRecord(sample_idx=i, token=f"{i:032x}", scene=f"scene-{i // 40:04d}", timestamp_us=i,
                        boxes=boxes, depth=depth, depth_per_camera=[10] * 6,
                        variants=(MapVariant(aug_from_lidar=np.eye(4, dtype=np.float32), cells=cells, features=feats,
                                             scale=scale),))


def _write(url: str, n: int, channels: int) -> dict[str, Any]:
    from tigbev.cache.store import CacheWriter

    manifest, _ = _manifest(url, n, channels)
    writer = CacheWriter(url, manifest)
    rng = np.random.default_rng(0)
    m = writer.manifest
    t = time.perf_counter()
    quarters, marks = [m.num_shards * q // 4 for q in (1, 2, 3, 4)], []
    with writer.lease(list(range(m.num_shards))):
        for shard in range(m.num_shards):
            writer.write_shard(shard, [_record(m, i, rng) for i in m.shard_range(shard)])
            if shard + 1 in quarters:
                marks.append(time.perf_counter() - t)
        assert writer.finalize()
    spans = [b - a for a, b in zip([0.0, *marks[:-1]], marks)]
    # Within one run: a write that slowed down as the store grows shows as a last quarter slower than the first.
    return {"seconds": time.perf_counter() - t, "quarter_seconds": spans,
            "last_over_first_quarter": spans[-1] / spans[0] if spans[0] > 0 else float("nan")}


def _info(url: str, n: int, channels: int) -> dict[str, Any]:
    from tigbev.cache.tools import cache_info

    t = time.perf_counter()
    info = cache_info(url)
    return {"seconds": time.perf_counter() - t, "samples": info.get("samples", n)}


def _verify(url: str, n: int, channels: int) -> dict[str, Any]:
    from tigbev.cache.tools import verify_cache

    t = time.perf_counter()
    faults = verify_cache(url)
    assert not faults, faults[:3]
    return {"seconds": time.perf_counter() - t}


def _early_check(url: str, n: int, channels: int) -> dict[str, Any]:
    """What train-student runs before its first step: the files, the listed files' sha256 and every done shard's
    index (no record read)."""
    from tigbev.cache.store import CacheReader
    from tigbev.cache.tools import refuse_damaged

    t = time.perf_counter()
    refuse_damaged(CacheReader(url))
    return {"seconds": time.perf_counter() - t}


def _reader_start(url: str, n: int, channels: int) -> dict[str, Any]:
    """What a DataLoader worker does first: open the store, the manifest and the index, read one sample."""
    from tigbev.cache.store import CacheReader

    last = f"{n - 1:032x}"
    t = time.perf_counter()
    r = CacheReader(url)
    r.read(r.sample_idx(last))
    return {"seconds": time.perf_counter() - t}


class _Reads:
    def __init__(self, url: str, n: int):
        from tigbev.cache.store import CacheReader

        self.reader, self.n = CacheReader(url), n

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return len(self.reader.read((i * 7919) % self.n).boxes)


def _loader(url: str, n: int, channels: int) -> dict[str, Any]:
    """A DataLoader with 2 workers over the cache: time to the first batch (both workers start, each opening the
    store itself) and to the end of 64 random reads."""
    from torch.utils.data import DataLoader

    t = time.perf_counter()
    it = iter(DataLoader(_Reads(url, n), batch_size=4, num_workers=2, multiprocessing_context="spawn"))
    next(it)
    first = time.perf_counter() - t
    for _ in it:
        pass
    return {"seconds": time.perf_counter() - t, "first_batch_s": first}


def _compat(url: str, n: int, channels: int) -> dict[str, Any]:
    from tigbev.cache.store import CacheReader

    r = CacheReader(url)
    _ = r.manifest
    t = time.perf_counter()
    r.check_compatible(_fingerprint(n))
    return {"seconds": time.perf_counter() - t}


STEPS = {"write (extraction's writer)": _write, "cache info": _info, "cache verify": _verify,
         "train-student's early check": _early_check,
         "reader start-up (one worker)": _reader_start, "DataLoader, 2 workers, 64 reads": _loader,
         "compatibility check": _compat}


def _child(conn: Any, step: str, url: str, n: int, channels: int) -> None:
    try:
        out = STEPS[step](url, n, channels)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(("ok", out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(exc)))


def run_step(step: str, url: str, n: int, channels: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, step, url, n, channels))
    p.start()
    kind, payload = parent.recv()
    p.join()
    if kind != "ok":
        raise RuntimeError(f"{step} at {n} samples: {payload}")
    return payload


def main() -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="1000,7000,28130")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--steps", default=";".join(STEPS), help="';'-separated subset of the steps (write first)")
    args = ap.parse_args()
    steps = [x for x in STEPS if x in args.steps.split(";")]
    sizes = [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {step: {} for step in steps}
    with tqdm(total=len(sizes) * len(steps), desc="scale", unit="step") as bar:
        for n in sizes:
            url = str(args.out / f"cache-{n}")
            shutil.rmtree(url, ignore_errors=True)
            for step in steps:
                results[step][str(n)] = run_step(step, url, n, args.channels)
                bar.update(1)
            shutil.rmtree(url, ignore_errors=True)
    base = str(sizes[0])
    for step, per in results.items():
        for n, r in per.items():
            r["per_sample_over_smallest"] = (r["seconds"] / int(n)) / (per[base]["seconds"] / int(base))
    report = {"sizes": sizes, "channels": args.channels, "shard_samples": SHARD,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": results}
    (args.out / "scale.json").write_text(json.dumps(report, indent=1))
    head = "| step | " + " | ".join(f"{n} samples: s (MiB peak)" for n in sizes) + \
        f" | per sample at {sizes[-1]} over {sizes[0]} |"
    lines = [head, "|---|" + "---|" * (len(sizes) + 1)]
    if "write (extraction's writer)" in results:
        w = results["write (extraction's writer)"]
        lines.insert(0, "Writer, last quarter of the shards over the first (same run; 1.0 = linear): " + ", ".join(
            f"{n}: {w[str(n)]['last_over_first_quarter']:.2f}" for n in sizes) + "\n")
    for step, per in results.items():
        cells = [f"{per[str(n)]['seconds']:.2f} ({per[str(n)]['peak_rss_mib']:.0f})" for n in sizes]
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {per[str(sizes[-1])]['per_sample_over_smallest']:.2f} |")
    md = "\n".join(lines) + "\n"
    (args.out / "scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
