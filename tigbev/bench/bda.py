"""Section ``bda``: how faithful each cache mode is to the published online teacher under BEV augmentation.

For every cache mode (``canonical``, ``flips``, ``draws``) and every kind of BDA (rotation alone, scale alone, flips
alone, the full published policy) the loader builds the same augmented samples it trains on; the reference is the
online teacher run on that sample's points moved by that sample's BDA (the published way), at the same keypoints.
Per box it measures the relative error of the two TiG targets, the row-normalised Gram matrices of the teacher's
keypoint features (inter-keypoint K x K, inter-channel C x C: ``sqrt`` of the loss between the mode's features and
the reference's, since every non-zero normalised row has unit norm), and the mean cosine of the keypoint features.
A ``draws`` cache replaces the sample's BDA by one of its stored draws (the training rule), so it is exact by
construction up to the storage rounding; its BDA kind does not change what it replays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tigbev.bench.world import extract

__all__ = ["AUG_KINDS", "CACHE_MODES", "bench_bda"]

CACHE_MODES: tuple[str, ...] = ("canonical", "flips", "draws")
AUG_KINDS: tuple[str, ...] = ("rotation", "scale", "flips", "full")


def _policy(kind: str) -> Any:
    from tigbev.data.augment import BevAugmentPolicy

    full = BevAugmentPolicy()
    return {"rotation": BevAugmentPolicy(rotation_deg=full.rotation_deg, scale_range=(1.0, 1.0), p_flip=0.0),
            "scale": BevAugmentPolicy(rotation_deg=0.0, scale_range=full.scale_range, p_flip=0.0),
            "flips": BevAugmentPolicy(rotation_deg=0.0, scale_range=(1.0, 1.0), p_flip=full.p_flip),
            "full": full}[kind]


def _box_metrics(f_mode: Any, f_ref: Any, valid: Any) -> dict[str, list[float]]:
    """Per box (boxes with >= 2 valid keypoints): target relative errors and the mean keypoint cosine."""
    import torch

    from tigbev.models.losses import inter_channel_loss, inter_keypoint_loss

    keep = valid.sum(dim=-1) >= 2
    f_mode, f_ref, valid = f_mode[keep], f_ref[keep], valid[keep]
    if not len(f_mode):
        return {"inter_keypoint": [], "inter_channel": [], "cosine": []}
    kp = inter_keypoint_loss(f_mode, f_ref, valid).clamp(min=0).sqrt()
    ch = inter_channel_loss(f_mode, f_ref, valid).clamp(min=0).sqrt()
    cos = torch.nn.functional.cosine_similarity(f_mode, f_ref, dim=-1, eps=1e-12)  # (Nb, K)
    cos = (cos * valid).sum(dim=-1) / valid.sum(dim=-1)
    return {"inter_keypoint": kp.tolist(), "inter_channel": ch.tolist(), "cosine": cos.tolist()}


def bench_bda(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], work: Path, *, preset: str,
              keypoint_grid: int, device: str, seed: int, views: int, draws: int, bar: Any) -> dict[str, Any]:
    """Fidelity of every cache mode under every BDA kind against the online teacher on the same augmented samples
    (``views`` augmented views of each sample), and the bytes each mode costs."""
    import statistics

    import torch

    from tigbev.cache.store import CacheReader
    from tigbev.cache.tools import cache_info
    from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
    from tigbev.data.image_aug import ImageAugPolicy
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.engine.online_teacher import OnlineTeacher
    from tigbev.geometry.bev_sampling import sample_bev
    from tigbev.models.student.student import FEATURE_STRIDE, student_preset
    from tigbev.utils.device import pick_device

    dev = pick_device(device)
    reader = NuScenesReader(dataroot)
    online = OnlineTeacher(ckpt, reader, dev)
    grid = online.grid
    hw = student_preset(preset).input_hw  # type: ignore[arg-type]
    urls, sizes = {}, {}
    for mode in CACHE_MODES:
        urls[mode] = work / f"bda-{mode}"
        extract(ckpt, dataroot, split, tokens, urls[mode], keypoint_grid=keypoint_grid, device=device,
                variants=mode, draws=draws)
        info = cache_info(str(urls[mode]))
        sizes[mode] = {"bytes_per_sample": info["bytes_per_sample_total"], "maps": info["variants"]["count"]}
    for mode in CACHE_MODES:
        sizes[mode]["over_canonical"] = sizes[mode]["bytes_per_sample"] / sizes["canonical"]["bytes_per_sample"]
    bar.update(1)

    # canonical and flips train on the BDA the loader draws, so they share each reference forward; draws has its own.
    references: dict[tuple[str, bytes], Any] = {}

    def reference(batch: Any) -> Any:
        """The published reference: the teacher on the points moved by this sample's BDA."""
        key = (batch.tokens[0], batch.aug_from_lidar.numpy().tobytes())
        if key not in references:
            t = batch.teacher
            ref = dataclasses.replace(t, kp_teacher_xy=t.kp_student_xy, map_from_lidar=batch.aug_from_lidar,
                                      map_cells=None, map_features=None)
            with torch.no_grad():
                references[key] = online.targets(dataclasses.replace(batch, teacher=ref))[1].float()
        return references[key]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    caches = {mode: CacheReader(str(urls[mode])) for mode in CACHE_MODES}
    table: dict[str, dict[str, Any]] = {}
    for kind in AUG_KINDS:
        per_box = {mode: {"inter_keypoint": [], "inter_channel": [], "cosine": []} for mode in CACHE_MODES}
        for view in range(views):
            references.clear()  # a reference is shared only within one view (the same BDA draws)
            for mode in CACHE_MODES:
                ds = CameraDetectionDataset(reader, list(tokens), cache=caches[mode], split=split, input_hw=hw,
                                            feature_stride=FEATURE_STRIDE, image_policy=ImageAugPolicy(input_hw=hw),
                                            bda_policy=_policy(kind), seed=seed + view, train=True)
                for i in range(len(ds)):
                    batch = collate_camera([ds[i]])
                    t = batch.teacher
                    b, m, k = t.kp_teacher_xy.shape[:3]
                    f_mode, v_mode = sample_bev(t.dense_map(*grid.shape_hw).to(dev),
                                                t.kp_teacher_xy.reshape(b, -1, 2).to(dev), grid)
                    f_ref, v_ref = sample_bev(reference(batch), t.kp_student_xy.reshape(b, -1, 2).to(dev), grid)
                    valid = (v_mode & v_ref).reshape(b, m, k) & t.box_mask.to(dev)[:, :, None]
                    for key, vals in _box_metrics(f_mode.reshape(b, m, k, -1)[0], f_ref.reshape(b, m, k, -1)[0],
                                                  valid[0]).items():
                        per_box[mode][key].extend(vals)
        table[kind] = {mode: {"boxes": len(v["cosine"]), "inter_keypoint_target_rel_error": mean(v["inter_keypoint"]),
                              "inter_channel_target_rel_error": mean(v["inter_channel"]),
                              "keypoint_cosine": mean(v["cosine"])} for mode, v in per_box.items()}
        bar.update(1)
    return {"views_per_sample": views, "samples": len(tokens), "draws": draws, "sizes": sizes, "fidelity": table,
            "reference": "the online teacher on the sample's points moved by its BDA (the published way)"}
