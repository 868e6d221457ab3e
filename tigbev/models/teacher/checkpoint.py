"""Teacher checkpoints: weights + resolved config + provenance, saved atomically, loaded without unpickling code.

Format ``tigbev-teacher/1`` (a dict of plain types and tensors, so ``torch.load(weights_only=True)`` reads it):
``format``, ``model`` (state dict), ``teacher_config`` (TeacherConfig.to_dict()), ``train_config``, ``provenance``,
``epoch``, ``step``, ``optimizer``, ``scheduler`` (the last three only for resuming).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tigbev.checkpoint_file import CheckpointError, load_weights_only, save_atomic
from tigbev.models.teacher.centerpoint import CenterPoint, TeacherConfig

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "load_teacher", "save_checkpoint"]

CHECKPOINT_FORMAT = "tigbev-teacher/1"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write to a temporary sibling, then rename: a crash never leaves a truncated checkpoint behind."""
    return save_atomic(path, {"format": CHECKPOINT_FORMAT, **payload})


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    ckpt = load_weights_only(p, what="teacher checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{p} is not a tigbev teacher checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}); for mmdetection3d weights use "
                              f"tigbev.models.teacher.mmdet3d_weights")
    return ckpt


def load_teacher(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> tuple[CenterPoint, TeacherConfig, dict[str, Any]]:
    """(model on ``device`` in eval mode, its config, the checkpoint dict) of a teacher checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = TeacherConfig.from_dict(ckpt["teacher_config"])
    model = CenterPoint(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the recorded config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), cfg, ckpt
