"""The frozen teacher used by extraction (and by the online-teacher baseline).

Frozen means: no parameter requires a gradient, every forward runs under ``torch.inference_mode``, and every
BatchNorm stays in eval mode for good, even when a parent module calls ``.train()`` (the published TiG-BEV code lets
the teacher's BatchNorm statistics drift because its runner calls ``model.train()`` every epoch).
"""

from __future__ import annotations

import torch
from torch import nn

from tigbev.models.teacher.centerpoint import CenterPoint, TeacherOutput

__all__ = ["FrozenTeacher"]


class FrozenTeacher(nn.Module):
    def __init__(self, model: CenterPoint):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Whatever a parent asks for, stay in eval mode: BatchNorm uses (and never updates) its running stats.
        return super().train(False)

    def forward(self, points: list[torch.Tensor]) -> TeacherOutput:
        """Inference-mode outputs: fast, but not usable inside autograd (see ``features_for_loss``)."""
        with torch.inference_mode():
            return self.model(points)

    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor:
        """The distilled BEV map only (inference mode): what extraction and the online teacher need. The head's
        predictions are neither cached nor distilled, and they are about a third of the demo teacher's forward."""
        with torch.inference_mode():
            return self.model.bev_map(points)

    def features_for_loss(self, points: list[torch.Tensor]) -> torch.Tensor:
        """The BEV map as an ordinary tensor (a clone outside inference mode), usable as a loss target."""
        return self.bev_map(points).clone()
