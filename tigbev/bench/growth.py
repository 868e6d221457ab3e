"""Section ``growth``: extraction and training time at 1x, 2x, 4x samples; camera-loader throughput per worker count."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tigbev.bench.config import median
from tigbev.bench.loader import loader_rate

__all__ = ["camera_loader_rate", "train_epoch"]


def train_epoch(preset: str, dataroot: Path, split: str, tokens: Sequence[str], cache: str, *,
                device: str, seed: int, workers: int = 1) -> dict[str, float]:
    """One epoch of cache-mode training (batch 1, a DataLoader with ``workers``): seconds, and the time spent
    waiting for batches (first batch excluded: it pays for the worker's start)."""
    import torch
    from torch.utils.data import DataLoader

    from tigbev.config import TrainStudentConfig
    from tigbev.data.camera_dataset import collate_camera
    from tigbev.stages.train_student import build_distillation, training_step
    from tigbev.utils.device import pick_device

    dev = pick_device(device)
    torch.manual_seed(seed)
    tcfg = TrainStudentConfig(preset=preset, dataroot=dataroot, split=split, out_dir=Path("unused"),  # type: ignore
                              cache=cache, seed=seed, augment=True)
    built = build_distillation(tcfg, dev, tokens=tokens)
    dataset, grid = built.dataset, built.teacher_grid
    model = built.model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_camera, num_workers=workers,
                        prefetch_factor=2 if workers > 0 else None)
    wait, compute = [], []
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it).to(dev)
        except StopIteration:
            break
        t1 = time.perf_counter()
        times = training_step(model, opt, scaler, batch, online=None, teacher_hw=grid.shape_hw, device=dev,
                              use_amp=dev.type == "cuda", grad_clip=5.0).times
        wait.append(t1 - t0)
        compute.append(times.total_s)
    seconds = time.perf_counter() - start
    w, c = sum(wait[1:]), sum(compute[1:])
    return {"seconds": seconds, "steps": len(compute), "wait_s": w, "compute_s": c,
            "wait_fraction": w / (w + c) if w + c > 0 else float("nan"),
            "median_wait_s": median(wait[1:]), "median_step_s": median(compute[1:])}


def camera_loader_rate(preset: str, dataroot: Path, split: str, tokens: Sequence[str], cache: str, workers: int,
                       n_items: int) -> float:
    """Full camera samples (images, augmentation, depth maps, cached targets) per second through a DataLoader."""
    from tigbev.cache.store import CacheReader
    from tigbev.data.augment import BevAugmentPolicy
    from tigbev.data.camera_dataset import CameraDetectionDataset
    from tigbev.data.image_aug import ImageAugPolicy
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.student.student import FEATURE_STRIDE, student_preset

    scfg = student_preset(preset)  # type: ignore[arg-type]
    ds = CameraDetectionDataset(NuScenesReader(dataroot), tokens, cache=CacheReader(cache), split=split,
                                input_hw=scfg.input_hw, feature_stride=FEATURE_STRIDE,
                                image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=BevAugmentPolicy())

    class _Repeat:
        def __len__(self) -> int:
            return n_items

        def __getitem__(self, i: int) -> Any:
            return ds[i % len(ds)]

    return loader_rate(_Repeat(), workers)
