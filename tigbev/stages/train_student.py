"""Stage two: train a camera student from images plus the teacher cache (``tigbev train-student``).

The loop is the whole story (DETR-style): batch -> student forward -> named losses -> weighted sum -> stop on a
non-finite loss -> backward -> clip -> step. Distillation targets come from the cache (no teacher, no spconv
imported: tests prove it), or with ``teacher='online'`` from the frozen LiDAR teacher run on every batch, the
published way, kept as the baseline the benchmarks compare against. Under ``torchrun`` it trains with DDP (gloo on
CPU, nccl on CUDA) and a distributed sampler.

Run directory: ``config.json``, ``last.pt`` (student weights + config + the cache's fingerprint + provenance +
optimiser state), ``metrics.jsonl``, ``loss_curve.png``, and with a val split ``eval/metrics.json`` (with the
provenance of ``last.pt``: path, sha256, step).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tigbev.cache.store import CacheReader
from tigbev.config import TrainStudentConfig
from tigbev.data.augment import BevAugmentPolicy
from tigbev.data.camera_batch import CameraBatch
from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.classes import DETECTION_CLASSES
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.sampling import ClassBalancedDataset
from tigbev.engine.loop import (
    StepLog,
    backward_step,
    plan_steps,
    restore,
    run_epochs,
    save_training_state,
    start_run_dir,
)
from tigbev.engine.online_teacher import OnlineTeacher
from tigbev.errors import TigbevError
from tigbev.geometry import (
    KEYPOINT_ENLARGE_M,
    NUSCENES_POINT_RANGE_M,
    BevGrid,
)
from tigbev.geometry.bev_sampling import sample_bev
from tigbev.models.losses import (
    DenseDepthLoss,
    DenseFeatureMSE,
    InnerDepthLoss,
    InnerFeatureDistillation,
)
from tigbev.models.self_assessment import SelfAssessmentDistill
from tigbev.models.student.checkpoint import CHECKPOINT_FORMAT, load_student_checkpoint
from tigbev.models.student.student import (
    FEATURE_STRIDE,
    CameraStudent,
    StudentConfig,
    student_preset,
)
from tigbev.utils.device import pick_device
from tigbev.utils.provenance import provenance
from tigbev.utils.run_dir import check_run_dir
from tigbev.utils.training_log import TrainingLog

__all__ = ["Distillation", "DistillationModel", "StepResult", "StepTimes", "TrainStudentResult", "run", "training_step",
           "build_distillation", "weighted_losses"]

_LOG_EVERY = 5
# The teacher's box filter when there is no cache (teacher point range); the nuScenes range of both presets.
_POINT_RANGE = NUSCENES_POINT_RANGE_M


@dataclass(frozen=True)
class TrainStudentResult:
    checkpoint: Path
    steps: int
    seconds: float
    mean_step_s: float
    final_losses: dict[str, float]
    metrics: dict[str, Any] | None
    epoch_size: int = 0
    """Samples per epoch (all ranks together): the split's size, or the class-balanced epoch's with CBGS."""


class DistillationModel(nn.Module):
    """The student and every trainable piece of its losses (the inter-channel adapter, the dense-MSE adapter), so
    one optimiser and one DDP wrapper hold them all.

    The criterion the DETR way: ``forward`` returns the named, *unweighted* losses of the terms whose weight is
    positive, and :attr:`weight_dict` holds each name's weight; :func:`weighted_losses` applies them (the only place
    that does), so a log can show both."""

    def __init__(self, student_cfg: StudentConfig, cfg: TrainStudentConfig, teacher_grid: BevGrid | None,
                 teacher_channels: int | None):
        super().__init__()
        self.student = CameraStudent(student_cfg)
        self.weights = cfg.weights
        w = cfg.weights
        self.weight_dict: dict[str, float] = {
            "heatmap": 1.0, "bbox": 1.0, "depth": w.depth, "inner_depth": w.inner_depth,
            "inter_keypoint": w.inter_keypoint, "inter_channel": w.inter_channel, "dense_feature": w.dense_feature,
            "self_assessment_seq": w.self_assessment, "self_assessment_anchor": w.self_assessment}
        self.dense_depth = DenseDepthLoss(student_cfg.depth_bins)
        self.inner_depth = InnerDepthLoss()
        self.teacher_grid = teacher_grid
        self.distill = None
        self.dense_mse = None
        self.self_assessment: SelfAssessmentDistill | None = None
        if teacher_grid is not None and teacher_channels is not None:
            self.distill = InnerFeatureDistillation(
                student_cfg.bev_channels, teacher_channels, student_grid=student_cfg.bev_grid,
                teacher_grid=teacher_grid, weight_keypoint=1.0, weight_channel=1.0)  # weighted by weight_dict
            if cfg.weights.dense_feature > 0:
                self.dense_mse = DenseFeatureMSE(student_cfg.bev_channels, teacher_channels,
                                                 student_grid=student_cfg.bev_grid, teacher_grid=student_cfg.bev_grid)
            if cfg.weights.self_assessment > 0:
                self.self_assessment = SelfAssessmentDistill(cfg.self_assessment, student_cfg.bev_channels,
                                                             teacher_channels)

    def forward(self, batch: CameraBatch, teacher_map: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = self.student(batch)
        head = self.student.head
        losses = head.loss(out.preds, head.build_targets(batch.gt_boxes, batch.gt_labels))  # heatmap, bbox
        depth_m = batch.depth_m.flatten(0, 1)  # (B*N, h, w)
        w = self.weights
        if w.depth > 0:
            losses["depth"] = self.dense_depth(out.depth_logits, depth_m)
        if w.inner_depth > 0:
            centers = self.student.depth_bins.centers_m(out.depth_logits.device)
            losses["inner_depth"] = self.inner_depth(out.depth_logits, centers, depth_m, batch.depth_box.flatten(0, 1))
        if self.distill is not None and teacher_map is not None and batch.teacher is not None:
            t = batch.teacher
            feature = self.distill(out.bev_features, t.kp_student_xy, t.box_mask, teacher_bev=teacher_map,
                                   teacher_keypoints_xy=t.kp_teacher_xy)
            losses.update({k: v for k, v in feature.items() if self.weight_dict[k] > 0})
            if self.dense_mse is not None or self.self_assessment is not None:
                warped = _teacher_in_student_frame(teacher_map, batch.aug_from_lidar, t.map_from_lidar,
                                                   self.teacher_grid, self.student.cfg.bev_grid)
            if self.dense_mse is not None:
                losses["dense_feature"] = self.dense_mse(out.bev_features, warped)
            if self.self_assessment is not None:
                # A foreground cache holds the teacher map only around boxes: the loss counts the student cells
                # whose teacher value was stored (whole cells after the BDA warp), never the zeros elsewhere.
                stored = None
                if t.map_cells is not None:
                    th, tw = self.teacher_grid.shape_hw
                    stored = _teacher_in_student_frame(t.stored_mask(th, tw), batch.aug_from_lidar, t.map_from_lidar,
                                                       self.teacher_grid, self.student.cfg.bev_grid) > 0.999
                losses.update(self.self_assessment(out.bev_features, warped, stored))
        return losses


def weighted_losses(losses: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each named loss times its weight (the step's total is their sum)."""
    return {k: weight_dict[k] * v for k, v in losses.items()}


def _teacher_in_student_frame(teacher_map: torch.Tensor, aug_from_lidar: torch.Tensor,
                              map_from_lidar: torch.Tensor | None, teacher_grid: BevGrid,
                              student_grid: BevGrid) -> torch.Tensor:
    """The teacher map resampled at the student's cell centres: student (augmented) frame -> lidar frame via
    inv(aug_from_lidar) -> the map's frame via ``map_from_lidar`` (None: identity, a canonical map)."""
    b = teacher_map.shape[0]
    centers = torch.from_numpy(student_grid.cell_centers_xy()).to(teacher_map).reshape(1, -1, 2).expand(b, -1, -1)
    # BDA and the map frames are linear (rotation, scale, flips) about the origin.
    to_map = torch.linalg.inv(aug_from_lidar.float())[:, :2, :2]
    if map_from_lidar is not None:
        to_map = map_from_lidar.float()[:, :2, :2] @ to_map
    xy = torch.einsum("bij,bnj->bni", to_map, centers)
    feats, _ = sample_bev(teacher_map.float(), xy, teacher_grid)  # (B, H*W, C)
    h, w = student_grid.shape_hw
    return feats.transpose(1, 2).reshape(b, -1, h, w)


@dataclass(frozen=True)
class StepResult:
    """What one training step gives back: the total, the weighted and the unweighted named losses, and timings."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    """Weighted: what the total sums."""
    unweighted: dict[str, torch.Tensor]
    times: "StepTimes"


@dataclass
class StepTimes:
    """Wall-clock seconds of one training step's parts (CUDA synchronised at each boundary when on a GPU)."""

    targets_s: float
    """Teacher targets: the dense teacher map from the cache cells, or the online teacher's forward + keypoints."""
    total_s: float
    """The whole step: targets, forward, losses, backward, clipping and the optimiser update."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  batch: CameraBatch, *, online: OnlineTeacher | None, teacher_hw: tuple[int, int],
                  device: torch.device, use_amp: bool, grad_clip: float) -> StepResult:
    """One optimisation step on a batch already on ``device``: teacher targets (online teacher or the cached
    cells), forward, named losses, finite check, backward, gradient clipping, optimiser and scaler update.

    ``model`` is the :class:`DistillationModel` (or its DDP wrapper); ``teacher_hw`` the teacher map's (H, W)
    cells. The batch is not modified (the online teacher's targets go into a copy). The learning-rate schedule is
    the caller's.
    """
    t0 = time.perf_counter()
    teacher_map = None
    if online is not None:
        targets, teacher_map = online.targets(batch)
        batch = dataclasses.replace(batch, teacher=targets)
    elif batch.teacher is not None:
        teacher_map = batch.teacher.dense_map(*teacher_hw)
    _sync(device)
    t1 = time.perf_counter()
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        unweighted = model(batch, teacher_map)
    losses = weighted_losses(unweighted, (model.module if hasattr(model, "module") else model).weight_dict)
    loss = sum(losses.values())
    backward_step(loss, losses, (model.module if hasattr(model, "module") else model).parameters, optimizer,
                  grad_clip, what=f"student loss (samples {batch.tokens})", scaler=scaler)
    _sync(device)
    return StepResult(loss=loss, losses=losses, unweighted=unweighted,
                      times=StepTimes(targets_s=t1 - t0, total_s=time.perf_counter() - t0))


@dataclass(frozen=True)
class Distillation:
    """What :func:`build_distillation` wires together for one training configuration."""

    student_config: StudentConfig
    reader: NuScenesReader
    dataset: CameraDetectionDataset
    model: DistillationModel
    """The student plus the trainable parts of its criterion; ``model.weight_dict`` weighs its named losses."""
    cache: CacheReader | None
    online: OnlineTeacher | None
    teacher_grid: BevGrid | None
    cache_fingerprint: dict[str, Any] | None
    """What ``last.pt`` records of the teacher source: the cache's teacher sha, dataset fingerprint and URL, or the
    online teacher's fingerprint; a resume must match it."""


def build_distillation(cfg: TrainStudentConfig, device: torch.device, *, tokens: Sequence[str] | None = None,
                       load_backbone: bool = True) -> Distillation:
    """The DETR-style ``build``: from a configuration, the student's dataset (images plus the teacher targets of the
    cache, or the keypoints and LiDAR for the online teacher), the teacher source, and the model with its criterion
    (on CPU; the caller moves it). ``tokens``: a subset of the split (default: all of it; with a cache, exactly the
    tokens it was extracted from). Every input is checked here, before anything is written."""
    scfg = student_preset(cfg.preset, variant=cfg.variant, frames=cfg.frames)
    if cfg.input_hw is not None:
        scfg = dataclasses.replace(scfg, input_hw=cfg.input_hw)
    reader = NuScenesReader(cfg.dataroot)
    tokens = reader.sample_tokens(cfg.split) if tokens is None else list(tokens)
    cache = None
    teacher_grid: BevGrid | None = None
    teacher_channels: int | None = None
    online: OnlineTeacher | None = None
    cache_fingerprint: dict[str, Any] | None = None
    if cfg.teacher == "cache" and cfg.cache is not None:
        cache = CacheReader(cfg.cache)
        teacher_grid = cache.manifest.grid
        teacher_channels = cache.manifest.features.channels
        cache_fingerprint = {"teacher": cache.manifest.teacher.checkpoint_sha256,
                             "dataset": cache.manifest.to_dict()["dataset"], "url": cache.url}
    elif cfg.teacher == "online":
        online = OnlineTeacher(cfg.teacher_checkpoint, reader, device, cfg.teacher_factory)
        teacher_grid, teacher_channels = online.grid, online.channels
        cache_fingerprint = {"teacher": online.teacher.fingerprint()}  # a resume must find the same weights

    dataset = CameraDetectionDataset(
        reader, tokens, cache=cache, split=cfg.split, input_hw=scfg.input_hw, feature_stride=FEATURE_STRIDE,
        image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=BevAugmentPolicy() if cfg.augment else None,
        cache_grid=scfg.bev_grid, seed=cfg.seed, train=cfg.augment,
        # Without a cache the GT boxes are filtered as extraction filters them: by the teacher's own point range.
        point_range_m=tuple(online.teacher.point_range_m) if online is not None else _POINT_RANGE,
        min_depth_m=cache.manifest.depth.min_depth_m if cache is not None else 0.5,
        lidar_reader=online.reader if online is not None else None,  # the teacher's LiDAR is read in the workers
        online_keypoints=(cfg.keypoint_grid, KEYPOINT_ENLARGE_M) if online is not None else None,
        frames=cfg.frames,
    )
    # The student's initial weights depend on the seed alone: loading an online teacher (or not) before this point
    # draws from the global generator too, and must not give the two teacher sources different students.
    torch.manual_seed(cfg.seed)
    model = DistillationModel(scfg, cfg, teacher_grid, teacher_channels)
    if cfg.backbone_weights is not None and load_backbone:
        from tigbev.models.student.resnet import load_torchvision_weights

        load_torchvision_weights(model.student.backbone, cfg.backbone_weights)
    return Distillation(student_config=scfg, reader=reader, dataset=dataset, model=model, cache=cache,
                        online=online, teacher_grid=teacher_grid, cache_fingerprint=cache_fingerprint)


def _training_set(cfg: TrainStudentConfig, reader: NuScenesReader, dataset: CameraDetectionDataset
                  ) -> tuple[Any, dict[str, Any]]:
    """What an epoch draws from: the dataset itself, or its class-balanced (CBGS) epoch, and a record of it for
    the run's ``config.json``."""
    if cfg.sampler == "uniform":
        return dataset, {"sampler": "uniform", "epoch_size": len(dataset), "dataset_size": len(dataset)}
    classes = [reader.sample_classes(t) for t in dataset.tokens]
    balanced = ClassBalancedDataset(dataset, classes, len(DETECTION_CLASSES), cfg.seed)
    counts = np.bincount(np.concatenate([np.fromiter(classes[i], np.int64) for i in balanced.indices]),
                         minlength=len(DETECTION_CLASSES))
    return balanced, {"sampler": "cbgs", "epoch_size": len(balanced), "dataset_size": len(dataset),
                      "seed": cfg.seed,
                      "samples_with_class": dict(zip(DETECTION_CLASSES, map(int, counts)))}


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def run(cfg: TrainStudentConfig, *, progress: bool = True) -> TrainStudentResult:
    start = time.perf_counter()
    rank, world, local_rank = _distributed()
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = cfg.out_dir
    ckpt_path = out / "last.pt"
    # Nothing is written before every input is checked: the run directory, dataset, cache, teacher, checkpoint.
    resuming = check_run_dir(out, resume=cfg.resume)
    torch.manual_seed(cfg.seed)
    built = build_distillation(cfg, device, load_backbone=not resuming)
    scfg, reader, dataset, model, online = built.student_config, built.reader, built.dataset, built.model, built.online
    teacher_grid, cache_fingerprint = built.teacher_grid, built.cache_fingerprint
    if built.cache is not None:  # a cache with a lost file or a damaged shard index is refused before any step
        from tigbev.cache.tools import refuse_damaged

        refuse_damaged(built.cache)
    model = model.to(device)
    train_set, sampling = _training_set(cfg, reader, dataset)
    if rank == 0 and progress and cfg.sampler != "uniform":
        from tqdm import tqdm

        tqdm.write(f"sampler {cfg.sampler}: {sampling['epoch_size']} samples per epoch from {len(dataset)}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    plan = plan_steps(math.ceil(len(train_set) / world), cfg.batch_size, cfg.epochs, cfg.max_steps)
    schedule_steps = plan.schedule_steps
    # Linear warm-up, then the published step decay at 19/24 and 23/24 of training (x0.1 each).
    milestones = (round(schedule_steps * 19 / 24), round(schedule_steps * 23 / 24))

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        return warm * (0.1 ** sum(step >= m for m in milestones))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    epoch0, step = 0, 0
    if resuming:
        ckpt = load_student_checkpoint(ckpt_path, map_location=device)
        saved_cache, this_cache = ({k: v for k, v in (c or {}).items() if k != "url"}
                                   for c in (ckpt.get("cache"), cache_fingerprint))
        if online is not None and ckpt.get("cache") is None:
            saved_cache = this_cache  # an online run saved before the teacher's fingerprint was recorded
        what = "the online teacher's weights (their fingerprint)" if online is not None \
            else "the teacher cache (its teacher or dataset fingerprint)"
        epoch0, step = restore(ckpt_path, ckpt, cfg.to_dict(), model, optimizer, scheduler,
                               [] if saved_cache == this_cache else [what])
    if rank == 0:
        start_run_dir(out, {"train": cfg.to_dict(), "student": scfg.to_dict(), "cache": cache_fingerprint,
                            "sampling": sampling})
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step_times: list[float] = []
    th, tw = (teacher_grid.shape_hw if teacher_grid is not None else (0, 0))

    def loader_for(epoch: int) -> DataLoader:
        train_set.set_epoch(epoch)
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed) \
            if world > 1 else None
        if sampler is not None:
            sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                          collate_fn=collate_camera, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed + epoch))

    def body(batch: CameraBatch, step: int) -> StepLog:
        t0 = time.perf_counter()
        try:
            result = training_step(train_model, optimizer, scaler, batch.to(device), online=online,
                                   teacher_hw=(th, tw), device=device, use_amp=use_amp, grad_clip=cfg.grad_clip)
        except TigbevError as exc:
            raise TigbevError(f"at step {step}: {exc}") from None
        step_times.append(time.perf_counter() - t0)
        losses = {"total": float(result.loss.detach()), **{k: float(v.detach()) for k, v in result.losses.items()}}
        return StepLog(losses, unweighted={k: float(v.detach()) for k, v in result.unweighted.items()},
                       extra={"step_s": step_times[-1]})

    def save(epochs_done: int, step: int) -> None:
        if rank == 0:
            save_training_state(
                ckpt_path, model, epoch=epochs_done, step=step, lr=cfg.lr, optimizer=optimizer, scheduler=scheduler,
                format=CHECKPOINT_FORMAT, student_config=scfg.to_dict(), train_config=cfg.to_dict(),
                cache=cache_fingerprint, provenance=provenance(dataroot=str(cfg.dataroot), split=cfg.split,
                                                               cache=cfg.cache))

    model.train()
    with TrainingLog(out / "metrics.jsonl", every=_LOG_EVERY, enabled=rank == 0,
                     resume_step=step if resuming else None,
                     tensorboard=out / "tensorboard" if cfg.tensorboard else None) as log:
        step, last_log = run_epochs(what="student", epochs=math.ceil(cfg.epochs), epoch0=epoch0, step=step, plan=plan,
                                    loader_for=loader_for, body=body, scheduler=scheduler, log=log, save=save,
                                    progress=progress and rank == 0)
    last = last_log.losses if last_log else {}
    metrics = None
    log.plot(out / "loss_curve.png", f"camera student ({cfg.preset})")
    if rank == 0:
        if cfg.val_split is not None:
            from tigbev.engine.scoring import checkpoint_identity, evaluation_provenance, predict_student, score

            preds = predict_student(model.student, reader, reader.sample_tokens(cfg.val_split), device,
                                    cfg.batch_size, progress)
            origin = evaluation_provenance(reader, cfg.val_split, checkpoint=checkpoint_identity(
                ckpt_path, step=step, fmt=CHECKPOINT_FORMAT))
            metrics = score(reader, cfg.val_split, preds, out / "eval", use_camera=True, use_lidar=False, plots=False,
                            bev_samples=1 if cfg.tensorboard else 0, origin=origin)
            log.evaluation(step, metrics, sorted((out / "eval").glob("bev_*.png")))
    # The first steps pay for allocation and worker start-up: the mean step time skips them when it can.
    timed = step_times[2:] if len(step_times) > 4 else step_times
    return TrainStudentResult(checkpoint=ckpt_path, steps=step, seconds=time.perf_counter() - start,
                              mean_step_s=float(np.mean(timed)) if timed else float("nan"), final_losses=last,
                              metrics=metrics, epoch_size=len(train_set))
