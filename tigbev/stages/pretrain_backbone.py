"""Stage: pretrain the camera student's image backbone on what the synthetic renderer knows
(``tigbev pretrain-backbone``).

A real student starts from ImageNet weights; none can be downloaded here, and ImageNet is not the synthetic world.
``tigbev synth`` stores each camera image's per-pixel depth and class (``renderer/``, see
``tigbev.data.synth.writer.render_label_path``). This stage trains the student's own ResNet and neck to predict, at
each stride-16 feature cell, the depth bin (the student's DepthBins) and the class (sky, ground, the 10 detection
classes) of the pixel under the cell's centre, through the student's image augmentation. It runs once per world
and every student row and seed starts from it (``train-student --backbone-weights OUT/backbone.pth``), the way many
students share one teacher cache.

Run directory: ``config.json``, ``last.pt`` (network + optimiser, for ``--resume``), ``backbone.pth`` (the ResNet's
state dict in torchvision layout, what ``--backbone-weights`` reads), ``metrics.jsonl``, ``loss_curve.png``, and
with a val split ``eval.json`` (depth-bin and class accuracy per cell, and the depth error in metres).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tigbev.checkpoint_file import load_weights_only, save_atomic
from tigbev.config import PretrainBackboneConfig
from tigbev.data.camera_dataset import IMAGENET_MEAN, IMAGENET_STD
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.synth.raycast import LABEL_OBJECT0
from tigbev.data.synth.writer import render_label_path
from tigbev.engine.loop import (
    adamw_one_cycle,
    backward_step,
    begin_run,
    StepLog,
    plan_steps,
    restore,
    run_epochs,
    save_training_state,
    start_run_dir,
)
from tigbev.errors import DatasetError, TigbevError
from tigbev.models.student.neck import ImageNeck
from tigbev.models.student.resnet import ResNet
from tigbev.models.student.student import FEATURE_STRIDE, StudentConfig, student_preset
from tigbev.utils.provenance import provenance, write_json_atomic
from tigbev.utils.training_log import TrainingLog
from tigbev.utils.workers import exit_with_parent

__all__ = ["NUM_CLASSES", "PretrainNet", "PretrainResult", "RenderedImages", "run"]

NUM_CLASSES = LABEL_OBJECT0 + 10
"""Sky, ground and the 10 detection classes."""
CHECKPOINT_FORMAT = "tigbev-pretrain/1"
_LOG_EVERY = 10
_IGNORE = -1


@dataclass(frozen=True)
class PretrainResult:
    backbone: Path
    steps: int
    seconds: float
    final_losses: dict[str, float]
    metrics: dict[str, float] | None


class RenderedImages(Dataset):
    """Every camera image of a split with its stride-16 targets: depth-bin index and class per feature cell
    (``-1``: the cell centre falls outside the original image, or its depth outside the bins)."""

    def __init__(self, reader: NuScenesReader, tokens: Sequence[str], scfg: StudentConfig, *, train: bool,
                 seed: int = 0):
        self.scfg, self.train, self.seed, self.epoch = scfg, train, seed, 0
        self.policy = ImageAugPolicy(input_hw=scfg.input_hw)
        self.items: list[tuple[Path, Path, tuple[int, int]]] = []
        nusc = reader.nusc
        for token in tokens:
            sample = nusc.get("sample", token)
            for channel in CAMERA_CHANNELS:
                sd = nusc.get("sample_data", sample["data"][channel])
                labels = reader.dataroot / render_label_path(sd["filename"])
                if not labels.is_file():
                    raise DatasetError(f"no renderer labels for {sd['filename']} (expected {labels}); "
                                       "pretrain-backbone needs a dataroot written by `tigbev synth`")
                self.items.append((reader.dataroot / sd["filename"], labels, (int(sd["width"]), int(sd["height"]))))
        h, w = scfg.feature_hw
        xs, ys = np.meshgrid(np.arange(w), np.arange(h))
        # Feature cell (x, y) covers input pixels [16x, 16x + 16): its centre is at 16x + 7.5 (centres at integers).
        self._centres = np.stack([xs * FEATURE_STRIDE + (FEATURE_STRIDE - 1) / 2,
                                  ys * FEATURE_STRIDE + (FEATURE_STRIDE - 1) / 2], -1).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image

        image_path, label_path, wh = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        t = self.policy.sample(rng, wh) if self.train else self.policy.eval_transform(wh)
        with Image.open(image_path) as im:
            rgb = np.asarray(im.convert("RGB"))
        x = (t.apply_image(rgb).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        with np.load(label_path) as d:
            depth, label, stride, offset = d["depth_m"], d["label"], int(d["stride"]), int(d["offset"])
        uv = t.inverse_points(self._centres)  # original pixels
        ju = np.rint((uv[:, 0] - offset) / stride).astype(np.int64)
        jv = np.rint((uv[:, 1] - offset) / stride).astype(np.int64)
        inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < wh[0] - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < wh[1] - 0.5)
        ju, jv = np.clip(ju, 0, depth.shape[1] - 1), np.clip(jv, 0, depth.shape[0] - 1)
        cls = np.where(inside, label[jv, ju].astype(np.int64), _IGNORE)
        bins = self.scfg.depth_bins
        d = depth[jv, ju].astype(np.float64)
        k = np.floor((d - bins.d_min_m) / bins.step_m)
        ok = inside & np.isfinite(d) & (k >= 0) & (k < bins.num)
        depth_bin = np.where(ok, np.nan_to_num(k, nan=0.0, posinf=0.0), _IGNORE).astype(np.int64)
        h, w = self.scfg.feature_hw
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                torch.from_numpy(depth_bin.reshape(h, w)), torch.from_numpy(cls.reshape(h, w)))


class PretrainNet(nn.Module):
    """The student's ResNet and stride-16 neck with two 1x1 heads: depth bins and classes per feature cell."""

    def __init__(self, scfg: StudentConfig):
        super().__init__()
        self.backbone = ResNet(scfg.backbone, width=scfg.backbone_width, out_layers=(3, 4))
        self.neck = ImageNeck(self.backbone.out_channels, scfg.neck_channels)
        self.depth = nn.Conv2d(scfg.neck_channels, scfg.depth_bins.num, 1)
        self.classes = nn.Conv2d(scfg.neck_channels, NUM_CLASSES, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.neck(self.backbone(images))
        return self.depth(feats), self.classes(feats)


def _losses(net: nn.Module, images: torch.Tensor, depth_bin: torch.Tensor, cls: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    depth_logits, class_logits = net(images)
    hw = depth_bin.shape[-2:]
    if depth_logits.shape[-2:] != hw:  # the neck rounds up like the student's depth grid; crop to the targets
        depth_logits, class_logits = depth_logits[..., :hw[0], :hw[1]], class_logits[..., :hw[0], :hw[1]]
    ce = nn.functional.cross_entropy
    return {"depth": ce(depth_logits, depth_bin, ignore_index=_IGNORE),
            "class": ce(class_logits, cls, ignore_index=_IGNORE)}


@torch.inference_mode()
def evaluate(net: PretrainNet, loader: DataLoader, scfg: StudentConfig, device: torch.device) -> dict[str, float]:
    """Per-cell accuracy of the depth bin and the class, the mean depth error (m) and the object cells' accuracy."""
    net.eval()
    centres = scfg.depth_bins.centers_m(device)
    tot = {"depth_n": 0, "depth_ok": 0, "depth_err": 0.0, "cls_n": 0, "cls_ok": 0, "obj_n": 0, "obj_ok": 0}
    for images, depth_bin, cls in loader:
        images, depth_bin, cls = images.to(device), depth_bin.to(device), cls.to(device)
        d, c = net(images)
        d, c = d[..., :depth_bin.shape[-2], :depth_bin.shape[-1]], c[..., :cls.shape[-2], :cls.shape[-1]]
        dv = depth_bin >= 0
        pred_bin = d.argmax(1)
        expected = (d.softmax(1) * centres[None, :, None, None]).sum(1)
        tot["depth_n"] += int(dv.sum())
        tot["depth_ok"] += int((pred_bin == depth_bin)[dv].sum())
        tot["depth_err"] += float((expected - centres[depth_bin.clamp(min=0)]).abs()[dv].sum())
        cv = cls >= 0
        pred_cls = c.argmax(1)
        tot["cls_n"] += int(cv.sum())
        tot["cls_ok"] += int((pred_cls == cls)[cv].sum())
        ov = cls >= LABEL_OBJECT0
        tot["obj_n"] += int(ov.sum())
        tot["obj_ok"] += int((pred_cls == cls)[ov].sum())
    net.train()
    return {"depth_bin_accuracy": tot["depth_ok"] / max(tot["depth_n"], 1),
            "depth_abs_error_m": tot["depth_err"] / max(tot["depth_n"], 1),
            "class_accuracy": tot["cls_ok"] / max(tot["cls_n"], 1),
            "object_class_accuracy": tot["obj_ok"] / max(tot["obj_n"], 1)}


def run(cfg: PretrainBackboneConfig, *, progress: bool = True) -> PretrainResult:
    start = time.perf_counter()
    started = begin_run(cfg.out_dir, resume=cfg.resume, seed=cfg.seed, device=cfg.device)
    out, ckpt_path, resuming, device = started.out, started.checkpoint, started.resuming, started.device
    scfg = student_preset(cfg.preset)
    reader = NuScenesReader(cfg.dataroot)
    dataset = RenderedImages(reader, reader.sample_tokens(cfg.split), scfg, train=cfg.augment, seed=cfg.seed)
    val = None
    if cfg.val_split is not None:
        val = DataLoader(RenderedImages(reader, reader.sample_tokens(cfg.val_split), scfg, train=False),
                         batch_size=cfg.batch_size, num_workers=cfg.workers, worker_init_fn=exit_with_parent())
    net = PretrainNet(scfg).to(device)
    plan = plan_steps(len(dataset), cfg.batch_size, cfg.epochs, cfg.max_steps)
    optimizer, scheduler = adamw_one_cycle(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, plan=plan,
                                           pct_start=0.2)
    epoch0, step = 0, 0
    if resuming:
        ckpt = load_weights_only(ckpt_path, what="pretrain checkpoint", map_location=device)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise TigbevError(f"{ckpt_path} is not a tigbev pretrain checkpoint")
        epoch0, step = restore(ckpt_path, ckpt, cfg.to_dict(), net, optimizer, scheduler)
    start_run_dir(out, {"train": cfg.to_dict(), "student": scfg.to_dict()})
    def loader_for(epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                          generator=torch.Generator().manual_seed(cfg.seed + epoch), drop_last=False,
                          worker_init_fn=exit_with_parent())

    def body(batch: Any, step: int) -> StepLog:
        images, depth_bin, cls = batch
        losses = _losses(net, images.to(device), depth_bin.to(device), cls.to(device))
        loss = losses["depth"] + losses["class"]
        backward_step(loss, losses, net.parameters, optimizer, cfg.grad_clip, what=f"pretraining loss at step {step}")
        return StepLog({"total": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}})

    def save(epochs_done: int, step: int) -> None:
        save_training_state(ckpt_path, net, epoch=epochs_done, step=step, lr=cfg.lr, optimizer=optimizer,
                            scheduler=scheduler, format=CHECKPOINT_FORMAT, train_config=cfg.to_dict(),
                            student_config=scfg.to_dict(),
                            provenance=provenance(dataroot=str(cfg.dataroot), split=cfg.split))

    net.train()
    with TrainingLog(out / "metrics.jsonl", every=_LOG_EVERY, resume_step=step if resuming else None) as log:
        step, last_log = run_epochs(what="pretrain", epochs=cfg.epochs, epoch0=epoch0, step=step, plan=plan,
                                    loader_for=loader_for, body=body, scheduler=scheduler, log=log, save=save,
                                    progress=progress)
    last = last_log.losses if last_log else {}
    log.plot(out / "loss_curve.png", f"backbone pretraining ({cfg.preset})")
    backbone = save_atomic(out / "backbone.pth", net.backbone.state_dict())
    metrics = None
    if val is not None:
        metrics = evaluate(net, val, scfg, device)
        write_json_atomic(out / "eval.json", {"split": cfg.val_split, **metrics})
    return PretrainResult(backbone=backbone, steps=step, seconds=time.perf_counter() - start, final_losses=last,
                          metrics=metrics)
