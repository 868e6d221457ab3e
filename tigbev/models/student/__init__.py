"""The camera student (BEVDet / BEVDepth): ResNet backbone, stride-16 neck, LSS view transform, BEV encoder, head."""

from tigbev.models.student.resnet import ResNet, WeightsError, load_torchvision_weights
from tigbev.models.student.student import (
    FEATURE_STRIDE,
    CameraStudent,
    StudentConfig,
    StudentOutput,
    student_preset,
)

__all__ = [
    "FEATURE_STRIDE",
    "CameraStudent",
    "ResNet",
    "StudentConfig",
    "StudentOutput",
    "WeightsError",
    "load_torchvision_weights",
    "student_preset",
]
