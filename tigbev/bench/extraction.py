"""Sections ``extraction`` (extract-teacher against the teacher's forward-only rate) and ``storage`` (bytes and
fidelity of every storage option)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tigbev.bench.config import STORAGE_OPTIONS, median, storage_name
from tigbev.bench.loader import read_time
from tigbev.bench.world import extract

__all__ = ["bench_extraction", "bench_storage"]


def _forward_only(ckpt: Path, dataroot: Path, tokens: Sequence[str], device: str) -> dict[str, float]:
    """Teacher rates with the teacher already loaded, samples/s: ``read_full`` (read the sweeps + the whole
    CenterPoint forward, head included), ``full`` (forward alone, points in memory), ``read_map`` (read + the
    distilled map only, what extraction computes) and ``map`` (map only, points in memory)."""
    import torch

    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.teacher.checkpoint import load_teacher
    from tigbev.models.teacher.frozen import FrozenTeacher
    from tigbev.utils.device import pick_device

    dev = pick_device(device)
    model, tcfg, _ = load_teacher(ckpt, dev)
    teacher = FrozenTeacher(model)
    reader = NuScenesReader(dataroot, **tcfg.reader_options())
    teacher([torch.from_numpy(reader.load_sample(tokens[0]).lidar.points).to(dev)])  # warm-up

    def full(p: Any) -> None:
        teacher([p]).bev_features.cpu()

    def map_only(p: Any) -> None:
        teacher.bev_map([p]).cpu()

    out: dict[str, float] = {}
    pts: list[Any] = []
    for name, fn in (("full", full), ("map", map_only)):
        start = time.perf_counter()
        for t in tokens:
            p = torch.from_numpy(reader.load_sample(t).lidar.points).to(dev)
            fn(p)
            if name == "full":
                pts.append(p)
        out[f"read_{name}"] = len(tokens) / (time.perf_counter() - start)
        start = time.perf_counter()
        for p in pts:
            fn(p)
        out[name] = len(tokens) / (time.perf_counter() - start)
    return out


def bench_extraction(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], work: Path, *, repeats: int,
                     keypoint_grid: int, device: str, bar: Any) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"read_full": [], "full": [], "read_map": [], "map": []}
    ext, ext_total, ratio_full, ratio_map = [], [], [], []
    for _ in range(repeats):
        f = _forward_only(ckpt, dataroot, tokens, device)
        r = extract(ckpt, dataroot, split, tokens, work / "rate-cache", keypoint_grid=keypoint_grid, device=device)
        for k, v in f.items():
            rates[k].append(v)
        ext.append(len(tokens) / r.loop_seconds)
        ext_total.append(len(tokens) / r.seconds)
        ratio_full.append(ext[-1] / f["read_full"])
        ratio_map.append(ext[-1] / f["read_map"])
        bar.update(1)
    shutil.rmtree(work / "rate-cache", ignore_errors=True)
    return {"samples": len(tokens), "forward_only_samples_per_s": median(rates["read_full"]),
            "teacher_compute_samples_per_s": median(rates["full"]),
            "map_forward_only_samples_per_s": median(rates["read_map"]),
            "map_compute_samples_per_s": median(rates["map"]),
            "extraction_samples_per_s": median(ext), "extraction_with_setup_samples_per_s": median(ext_total),
            "extraction_over_forward": median(ratio_full), "extraction_over_map_forward": median(ratio_map)}


def _fidelity(url: str, ckpt: Path, dataroot: Path, preset: str, device: str, max_samples: int, seed: int
              ) -> dict[str, float]:
    """Relative errors of the TiG feature losses (and of the keypoint features) from the cache vs the live teacher.

    Same keypoints (the cached boxes', un-augmented frame) for both; the student side is a fixed random map on the
    student grid through a seeded adapter, so the only difference is where the teacher features come from.
    """
    import torch

    from tigbev.cache.store import CacheReader
    from tigbev.data.camera_batch import TeacherTargets
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.geometry.bev_sampling import sample_bev
    from tigbev.models.losses import InnerFeatureDistillation
    from tigbev.models.student.student import student_preset
    from tigbev.models.teacher.checkpoint import load_teacher
    from tigbev.models.teacher.frozen import FrozenTeacher
    from tigbev.utils.device import pick_device

    dev = pick_device(device)
    model, tcfg, _ = load_teacher(ckpt, dev)
    teacher = FrozenTeacher(model)
    reader = NuScenesReader(dataroot, **tcfg.reader_options())
    cache = CacheReader(url)
    scfg = student_preset(preset)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    distill = InnerFeatureDistillation(scfg.bev_channels, tcfg.bev_channels, student_grid=scfg.bev_grid,
                                       teacher_grid=tcfg.bev_grid).to(dev)
    h, w = tcfg.bev_grid.shape_hw
    errs: dict[str, list[float]] = {"inter_keypoint": [], "inter_channel": [], "keypoint_features": []}
    seen: set[str] = set()
    for i in range(len(cache)):
        s = cache.read(i)
        if s.token in seen or len(seen) >= max_samples or not len(s.boxes):
            continue
        seen.add(s.token)
        online = teacher.features_for_loss([torch.from_numpy(reader.load_sample(s.token).lidar.points).to(dev)])
        kp = torch.from_numpy(s.keypoints).to(dev)[None]  # (1, M, K, 2)
        mask = torch.ones(kp.shape[:2], dtype=torch.bool, device=dev)
        targets = TeacherTargets(kp_teacher_xy=kp, kp_student_xy=kp, box_mask=mask,
                                 map_cells=None if s.map_cells is None else torch.from_numpy(s.map_cells)[None],
                                 map_features=torch.from_numpy(s.map_features)[None]).to(dev)
        cached = targets.dense_map(h, w)
        student = torch.randn((1, scfg.bev_channels, *scfg.bev_grid.shape_hw), generator=torch.Generator().manual_seed(
            seed + i)).to(dev)
        with torch.no_grad():
            lo = distill.unweighted(student, kp, mask, teacher_bev=online, teacher_keypoints_xy=kp)
            lc = distill.unweighted(student, kp, mask, teacher_bev=cached, teacher_keypoints_xy=kp)
            fo, valid = sample_bev(online.float(), kp.reshape(1, -1, 2), tcfg.bev_grid)
            fc, _ = sample_bev(cached, kp.reshape(1, -1, 2), tcfg.bev_grid)
        for k in ("inter_keypoint", "inter_channel"):
            errs[k].append(abs(float(lc[k]) - float(lo[k])) / max(abs(float(lo[k])), 1e-12))
        v = valid[0]
        errs["keypoint_features"].append(float((fc[0][v] - fo[0][v]).norm() / fo[0][v].norm().clamp(min=1e-12)))
    out = {f"{k}_rel_error": max(v) if v else float("nan") for k, v in errs.items()}
    out["samples"] = len(seen)
    out["max_loss_rel_error"] = max(out["inter_keypoint_rel_error"], out["inter_channel_rel_error"])
    return out


def bench_storage(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], work: Path, *, preset: str,
                  keypoint_grid: int, device: str, seed: int, bar: Any) -> dict[str, Any]:
    from tigbev.cache.tools import cache_info

    out: dict[str, Any] = {}
    for features, dtype, compression in STORAGE_OPTIONS:
        name = storage_name(features, dtype, compression)
        url = work / f"storage-{name}"
        extract(ckpt, dataroot, split, tokens, url, features=features, dtype=dtype, compression=compression,
                keypoint_grid=keypoint_grid, device=device)
        info = cache_info(str(url))
        out[name] = {"bytes_per_sample": info["bytes_per_sample"], "read_s_per_sample": read_time(str(url)),
                     "bytes_per_sample_total": info["bytes_per_sample_total"],
                     "compression_ratio": info["compression_ratio"],
                     "fidelity": _fidelity(str(url), ckpt, dataroot, preset, device, max_samples=4, seed=seed)}
        if name != "foreground-float16":
            shutil.rmtree(url, ignore_errors=True)
        bar.update(1)
    return out
