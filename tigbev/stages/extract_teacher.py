"""Stage one: run the frozen teacher once over a split and write the cache (``tigbev extract-teacher``).

Pipeline: a DataLoader (worker processes) reads LiDAR, selects the GT boxes, builds keypoints and projects the key
sweep into every camera; the main process runs the teacher on whole batches; a writer thread compresses and writes
each finished shard while the teacher computes the next. Work is split into shards of consecutive samples; each
process (``--shard I/N`` or torchrun rank) takes a contiguous block of shards; shards already marked done are
skipped, so rerunning the same command resumes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tigbev.cache.record import MapVariant, SampleRecord, box_keypoints, foreground_cells, quantise
from tigbev.cache.schema import (
    CONFIG_DIR,
    FORMAT_VERSION,
    BoxSpec,
    DatasetFingerprint,
    DepthSpec,
    FeatureStorage,
    KeypointSpec,
    Manifest,
    TeacherFingerprint,
    VariantSpec,
)
from tigbev.cache.store import (
    RECORDS_CHUNK_BYTES,
    CacheError,
    CacheWriter,
    codecs_description,
    records_compressor,
    write_json_file,
)
from tigbev.config import ExtractTeacherConfig
from tigbev.data.augment import (
    BevAugmentPolicy,
    similarity_apply_points,
    similarity_apply_xy,
    variant_transforms,
)
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.targets import depth_points, training_boxes
from tigbev.geometry import BevGrid
from tigbev.models.teacher.protocol import check_bev_map, load_bev_teacher, manifest_config, reader_options
from tigbev.utils.device import pick_device
from tigbev.utils.provenance import provenance
from tigbev.utils.workers import exit_with_parent, stopping_workers

__all__ = ["ExtractResult", "build_manifest", "run", "variant_spec"]

BOX_FILTER = "detection classes with at least one LiDAR point and the centre inside the teacher's point range"


@dataclass(frozen=True)
class ExtractResult:
    url: str
    samples_written: int
    samples_skipped: int
    seconds: float
    complete: bool
    loop_seconds: float = float("nan")
    """The steady part: from the first batch requested to the last shard written and the index finalised
    (``seconds`` also counts loading the teacher, the dataset tables and opening the cache)."""


@dataclass
class _Item:
    sample_idx: int
    token: str
    scene: str
    timestamp_us: int
    points: list[torch.Tensor]  # the teacher's input for each stored map variant (its frame's points)
    frames: list[np.ndarray]  # (4, 4) float32 aug_from_lidar of each variant
    boxes: np.ndarray  # (M, 10) float32, as stored
    depth: np.ndarray  # (P, 5)
    depth_per_camera: list[int]


class _ExtractDataset(Dataset):
    def __init__(self, reader: NuScenesReader, tokens: Sequence[str], point_range_m: Sequence[float],
                 cfg: ExtractTeacherConfig, variants: VariantSpec):
        self.reader, self.tokens, self.point_range_m, self.cfg = reader, list(tokens), tuple(point_range_m), cfg
        self.variants = variants

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> _Item:
        frame = self.reader.load_sample(self.tokens[i])
        boxes, labels = training_boxes(frame, self.point_range_m)
        # Every camera's LiDAR depth, in the cache's row layout (shared with the camera dataset's no-cache path).
        depth = depth_points(frame, boxes, min_depth_m=self.cfg.min_depth_m)
        counts = np.bincount(depth[:, 4].astype(np.int64), minlength=len(CAMERA_CHANNELS)).tolist()
        # The teacher runs on each variant's points (the published BDA moves the points, the teacher sees them).
        transforms = variant_transforms(self.variants.kind, self.variants.count, policy=_draw_policy(self.cfg),
                                        seed=self.cfg.draw_seed, sample_idx=i)
        points = frame.lidar.points
        # The points move by the matrix as stored (float32), so a reader that replays a stored frame on the points
        # (the online teacher, a bench) computes exactly the teacher's input.
        frames = [t.matrix.astype(np.float32) for t in transforms]
        return _Item(
            sample_idx=i, token=frame.token, scene=frame.scene_name, timestamp_us=frame.timestamp_us,
            points=[torch.from_numpy(points if t.is_identity else similarity_apply_points(m, points))
                    for t, m in zip(transforms, frames)],
            frames=frames,
            boxes=np.concatenate([boxes, labels[:, None]], axis=1).astype(np.float32),
            depth=depth, depth_per_camera=counts,
        )


class _ShardBatches(Sampler[list[int]]):
    """Batches of consecutive samples that never straddle a shard (resumed runs see the same batches)."""

    def __init__(self, shards: Sequence[range], batch_size: int):
        self.batches = [list(r[i:i + batch_size]) for r in shards for i in range(0, len(r), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _part_of(cfg: ExtractTeacherConfig) -> tuple[int, int]:
    """(index, count) of this process's part: torchrun's RANK/WORLD_SIZE when set, else --shard I/N."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and cfg.num_parts == 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return cfg.shard_index, cfg.num_parts


def _draw_policy(cfg: ExtractTeacherConfig) -> BevAugmentPolicy:
    """The BEV augmentation stored draws come from: the training default (the published one)."""
    return BevAugmentPolicy()


def variant_spec(cfg: ExtractTeacherConfig) -> VariantSpec:
    """The manifest's ``variants`` of an extraction configuration."""
    if cfg.variants == "canonical":
        return VariantSpec()
    if cfg.variants == "flips":
        return VariantSpec(kind="flips", count=4)
    p = _draw_policy(cfg)
    return VariantSpec(kind="draws", count=1 + cfg.draws,
                       policy={"rotation_deg": p.rotation_deg, "scale_range": list(p.scale_range),
                               "p_flip": p.p_flip, "seed": cfg.draw_seed})


def build_manifest(cfg: ExtractTeacherConfig, *, teacher_sha: str, teacher_config: dict[str, Any],
                   grid: BevGrid, channels: int, dataset: DatasetFingerprint) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        teacher=TeacherFingerprint(checkpoint_sha256=teacher_sha, config=teacher_config),
        dataset=dataset,
        grid=grid,
        features=(features := FeatureStorage(mode=cfg.features, dtype=cfg.feature_dtype, channels=channels)),
        keypoints=KeypointSpec(enlarge_m=cfg.keypoint_enlarge_m, grid_size=cfg.keypoint_grid),
        depth=DepthSpec(cameras=tuple(CAMERA_CHANNELS), min_depth_m=cfg.min_depth_m, source="key sweep",
                        pixels="original image, pixel centres at integer coordinates"),
        boxes=BoxSpec(filter=BOX_FILTER, frame="un-augmented key lidar frame"),
        variants=variant_spec(cfg),
        shard_samples=cfg.shard_samples,
        records_chunk_bytes=RECORDS_CHUNK_BYTES,
        codecs=codecs_description(records_compressor(features, cfg.compression)),
        provenance=provenance(dataroot=str(cfg.dataroot), teacher_checkpoint=str(cfg.teacher_checkpoint),
                              teacher_factory=str(cfg.teacher_factory)),
    )


def run(cfg: ExtractTeacherConfig, *, progress: bool = True, tokens: Sequence[str] | None = None) -> ExtractResult:
    """Extract (or resume) the cache of ``cfg.split``.

    ``tokens``: extract these sample tokens (in this order, repeats allowed) instead of the split's; the cache's
    dataset fingerprint then names that list under ``cfg.split`` (benchmarks use it to grow a dataset).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    device = pick_device(cfg.device)
    teacher = load_bev_teacher(cfg.teacher_checkpoint, device, cfg.teacher_factory)
    teacher_config = manifest_config(teacher, cfg.teacher_factory)
    reader = NuScenesReader(cfg.dataroot, **reader_options(teacher))
    tokens = reader.sample_tokens(cfg.split) if tokens is None else list(tokens)
    fingerprint = reader.fingerprint(cfg.split, tokens, num_sweeps=teacher.num_sweeps)
    manifest = build_manifest(cfg, teacher_sha=teacher.fingerprint(), teacher_config=teacher_config,
                              grid=teacher.grid, channels=teacher.channels, dataset=fingerprint)
    writer = CacheWriter(cfg.out_dir, manifest)
    manifest = writer.manifest
    part, parts = _part_of(cfg)
    n_shards = manifest.num_shards
    mine = range(part * n_shards // parts, (part + 1) * n_shards // parts)

    def not_done() -> list[int]:
        done = writer.done_flags()
        return [k for k in mine if not done[manifest.shard_range(k).start:manifest.shard_range(k).stop].all()]

    # One writer per shard: a lease on the shards still to do (refused while another live writer holds any of
    # them), then the to-do list again, since a writer that finished meanwhile may have done some.
    with writer.lease(not_done()):
        write_json_file(cfg.out_dir, f"{CONFIG_DIR}/part-{part}-of-{parts}.json",
                        {"extract": cfg.to_dict(), "teacher": teacher_config})
        todo = not_done()
        ranges = [manifest.shard_range(k) for k in todo]
        n_todo = sum(len(r) for r in ranges)
        skipped = sum(len(manifest.shard_range(k)) for k in mine) - n_todo

        dataset = _ExtractDataset(reader, tokens, teacher.point_range_m, cfg, manifest.variants)
        loader = DataLoader(dataset, batch_sampler=_ShardBatches(ranges, cfg.batch_size), collate_fn=_collate,
                            num_workers=cfg.workers, prefetch_factor=2 if cfg.workers > 0 else None,
                            worker_init_fn=exit_with_parent())

        # The writer thread: compression and I/O overlap the teacher's next batches.
        jobs: queue.Queue[tuple[int, list[SampleRecord]] | None] = queue.Queue(maxsize=2)
        errors: list[BaseException] = []

        def write_loop() -> None:
            while (job := jobs.get()) is not None:
                if errors:
                    continue
                try:
                    writer.write_shard(*job)
                except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                    errors.append(exc)

        thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
        thread.start()
        pending: dict[int, list[SampleRecord]] = {}
        written = 0
        loop_start = time.perf_counter()
        bar = tqdm(total=n_todo, desc=f"extract {cfg.split} [{part + 1}/{parts}]", unit="sample",
                   disable=not progress)
        try:
            with stopping_workers(loader) as batches:
                for items in batches:
                    if errors:
                        raise errors[0]
                    points = [p.to(device) for it in items for p in it.points]
                    bev_t = teacher.bev_map(points)
                    check_bev_map(teacher, bev_t, len(points), f"samples {[it.token for it in items]}")
                    bev = bev_t.float().cpu().numpy()  # (B * V, C, H, W)
                    v = manifest.variants.count
                    for j, it in enumerate(items):
                        record = _record(it, bev[j * v:(j + 1) * v], manifest)
                        shard = manifest.shard_of(it.sample_idx)
                        pending.setdefault(shard, []).append(record)
                        if len(pending[shard]) == len(manifest.shard_range(shard)):
                            jobs.put((shard, pending.pop(shard)))
                            written += len(manifest.shard_range(shard))
                    bar.update(len(items))
        finally:
            jobs.put(None)
            thread.join()
            bar.close()
        if errors:
            raise errors[0]
        complete = writer.finalize()
        end = time.perf_counter()
        return ExtractResult(url=cfg.out_dir, samples_written=written, samples_skipped=skipped, seconds=end - start,
                             complete=complete, loop_seconds=end - loop_start)


def _record(it: _Item, fmaps: np.ndarray, manifest: Manifest) -> SampleRecord:
    """One sample's record: its boxes and depth rows, and each stored teacher map (``fmaps`` (V, C, H, W), one per
    variant, in its frame; in foreground mode only the cells around the boxes carried into that frame), quantised
    with a per-channel scale."""
    if not np.isfinite(fmaps).all():
        raise CacheError(f"the teacher's BEV map of sample {it.sample_idx} ({it.token}) is not finite; nothing of its "
                         "shard is written (is the teacher checkpoint sound?)")
    f = manifest.features
    kp = box_keypoints(it.boxes, manifest.keypoints)
    variants = []
    for frame, fmap in zip(it.frames, fmaps):
        if f.mode == "dense":
            cells, stored, scale = None, *quantise(fmap, f.dtype, channel_axis=0)
        else:
            cells = foreground_cells(similarity_apply_xy(frame, kp), manifest.grid, f.margin_cells)
            stored, scale = quantise(fmap.reshape(fmap.shape[0], -1)[:, cells].T, f.dtype, channel_axis=1)
        variants.append(MapVariant(aug_from_lidar=frame, cells=cells, features=stored, scale=scale))
    return SampleRecord(sample_idx=it.sample_idx, token=it.token, scene=it.scene, timestamp_us=it.timestamp_us,
                        boxes=it.boxes, depth=it.depth, depth_per_camera=it.depth_per_camera,
                        variants=tuple(variants))
