"""Stage: train the CenterPoint LiDAR teacher (``tigbev train-teacher``).

Run directory: ``config.json`` (resolved), ``last.pt`` (weights + config + provenance + optimiser state),
``metrics.jsonl`` (one line per logged step and per epoch), ``loss_curve.png``, and with a val split ``eval/``
(result JSON, devkit output, ``metrics.json`` with the provenance of ``last.pt``: path, sha256, step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from tigbev.config import TrainTeacherConfig
from tigbev.data.augment import BevAugmentPolicy
from tigbev.data.lidar_dataset import LidarDetectionDataset, collate_lidar
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.engine.loop import (
    adamw_one_cycle,
    backward_step,
    begin_run,
    plan_steps,
    StepLog,
    restore,
    run_epochs,
    save_training_state,
    start_run_dir,
)
from tigbev.engine.scoring import checkpoint_identity, evaluation_provenance, predict_teacher, score
from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
from tigbev.models.teacher.checkpoint import CHECKPOINT_FORMAT as TEACHER_FORMAT
from tigbev.models.teacher.checkpoint import load_checkpoint
from tigbev.utils.provenance import provenance
from tigbev.utils.training_log import TrainingLog
from tigbev.utils.workers import exit_with_parent

__all__ = ["TrainTeacherResult", "run"]

_LOG_EVERY = 10


@dataclass(frozen=True)
class TrainTeacherResult:
    checkpoint: Path
    steps: int
    seconds: float
    final_loss: float
    metrics: dict[str, Any] | None


def run(cfg: TrainTeacherConfig, *, progress: bool = True) -> TrainTeacherResult:
    start = time.perf_counter()
    # Nothing is written before every input is checked: the run directory, the dataset, the checkpoint to resume.
    started = begin_run(cfg.out_dir, resume=cfg.resume, seed=cfg.seed, device=cfg.device)
    out, ckpt_path, resuming, device = started.out, started.checkpoint, started.resuming, started.device
    model_cfg = teacher_preset(cfg.preset)

    reader = NuScenesReader(cfg.dataroot, **model_cfg.reader_options())
    tokens = reader.sample_tokens(cfg.split)
    dataset = LidarDetectionDataset(reader, tokens, model_cfg.point_range_m,
                                     augment=BevAugmentPolicy() if cfg.augment else None, seed=cfg.seed)
    model = CenterPoint(model_cfg).to(device)
    plan = plan_steps(len(dataset), cfg.batch_size, cfg.epochs, cfg.max_steps)
    optimizer, scheduler = adamw_one_cycle(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, plan=plan,
                                           pct_start=0.3)
    epoch0, step = 0, 0
    if resuming:
        epoch0, step = restore(ckpt_path, load_checkpoint(ckpt_path, map_location=device), cfg.to_dict(), model,
                               optimizer, scheduler)
    start_run_dir(out, {"train": cfg.to_dict(), "teacher": model_cfg.to_dict()})

    def loader_for(epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_lidar,
                          num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                          persistent_workers=False, worker_init_fn=exit_with_parent())

    def body(batch: Any, step: int) -> StepLog:
        batch = batch.to(device)
        output = model(batch.points)
        losses = model.head.loss(output.preds, model.head.build_targets(batch.boxes, batch.labels))
        loss = losses["heatmap"] + losses["bbox"]
        backward_step(loss, losses, model.parameters, optimizer, cfg.grad_clip,
                      what=f"teacher loss at step {step} (samples {batch.tokens})")
        return StepLog({"total": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}})

    def save(epochs_done: int, step: int) -> None:
        save_training_state(
            ckpt_path, model, epoch=epochs_done, step=step, lr=cfg.lr, optimizer=optimizer, scheduler=scheduler,
            format=TEACHER_FORMAT, teacher_config=model_cfg.to_dict(), train_config=cfg.to_dict(),
            provenance=provenance(dataroot=str(cfg.dataroot), split=cfg.split, num_samples=len(tokens)))

    model.train()
    with TrainingLog(out / "metrics.jsonl", every=_LOG_EVERY, resume_step=step if resuming else None,
                     tensorboard=out / "tensorboard" if cfg.tensorboard else None) as log:
        step, last = run_epochs(what="teacher", epochs=cfg.epochs, epoch0=epoch0, step=step, plan=plan,
                                loader_for=loader_for, body=body, scheduler=scheduler, log=log, save=save,
                                progress=progress)
    log.plot(out / "loss_curve.png", f"CenterPoint teacher ({cfg.preset})")
    metrics = None
    if cfg.val_split is not None:
        model.eval()
        eval_reader = NuScenesReader(cfg.dataroot, **model_cfg.reader_options())
        preds = predict_teacher(model, eval_reader, eval_reader.sample_tokens(cfg.val_split), device,
                                cfg.batch_size, progress)
        origin = evaluation_provenance(eval_reader, cfg.val_split, checkpoint=checkpoint_identity(
            ckpt_path, step=step, fmt=TEACHER_FORMAT))
        metrics = score(eval_reader, cfg.val_split, preds, out / "eval", use_camera=False, use_lidar=True,
                        plots=False, bev_samples=1 if cfg.tensorboard else 0, origin=origin)
        log.evaluation(step, metrics, sorted((out / "eval").glob("bev_*.png")))
    return TrainTeacherResult(checkpoint=ckpt_path, steps=step, seconds=time.perf_counter() - start,
                              final_loss=last.losses["total"] if last else float("nan"), metrics=metrics)

