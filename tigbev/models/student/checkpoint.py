"""Student checkpoints (``tigbev train-student``'s ``last.pt``): format ``tigbev-student/1``, read weights-only.

A dict of plain types and tensors: ``format``, ``model`` (the DistillationModel's state dict: ``student.*`` plus the
loss adapters), ``student_config`` (StudentConfig.to_dict()), ``train_config``, ``cache`` (the teacher cache's
fingerprint, or None), ``provenance``, ``epoch``, ``step``, ``optimizer``, ``scheduler``.
"""

from __future__ import annotations

import os
from typing import Any

from tigbev.checkpoint_file import CheckpointError, load_weights_only

__all__ = ["CHECKPOINT_FORMAT", "load_student_checkpoint"]

CHECKPOINT_FORMAT = "tigbev-student/1"


def load_student_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """A train-student checkpoint, or a CheckpointError that names the file and what is wrong with it."""
    ckpt = load_weights_only(path, what="student checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a tigbev student checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    return ckpt
