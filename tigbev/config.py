"""Stage configurations: frozen keyword-only dataclasses, validated when built, with named presets.

Each field has a docstring-style comment; ``__post_init__`` names the field at fault. The resolved configuration is
written beside every output (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tigbev.geometry.keypoints import KEYPOINT_ENLARGE_M, KEYPOINT_GRID

__all__ = ["EvaluateConfig", "ExtractTeacherConfig", "LossWeights", "Preset", "PretrainBackboneConfig", "SelfAssessmentConfig",
           "SynthConfig", "TrainStudentConfig",
           "TrainTeacherConfig", "train_teacher_defaults"]

Preset = Literal["demo", "nuscenes"]


def _require(condition: bool, cls: str, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{cls}.{field}: {message}")


def _finite(value: float, cls: str, field: str, *, positive: bool = False) -> None:
    """A finite number (NaN and infinity refused), > 0 when ``positive``, else >= 0."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    _require(ok, cls, field, f"must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """A synthetic nuScenes-format dataset (``tigbev synth``)."""

    out_dir: Path
    """Dataroot to create; must not exist or be empty."""
    scenes: int = 12
    """Number of scenes (each its own road, traffic and ego speed)."""
    samples_per_scene: int = 10
    """Annotated key frames per scene, 0.5 s apart (nuScenes' 2 Hz)."""
    val_scenes: int | None = None
    """How many of the last scenes form the ``synth_val`` split, the others ``synth_train``; by default a sixth
    of the scenes, at least one (with one scene, that scene is the val split and synth_train is empty)."""
    seed: int = 0
    """Everything written is a deterministic function of the configuration and this seed."""
    image_width: int = 480
    """Camera image width in pixels; intrinsics are the nuScenes rig's (1600 x 900) scaled to this size."""
    image_height: int = 270
    """Camera image height in pixels."""
    sweeps_per_sample: int = 2
    """Non-key LiDAR sweeps between consecutive key frames, evenly spaced in time."""
    lidar_azimuth_steps: int = 1084
    """Horizontal resolution of the 32-beam LiDAR (1084 = 0.33 deg, nuScenes' HDL-32E at 20 Hz)."""
    object_density: float = 1.0
    """Scales the number of objects beyond one of each class per scene."""
    jpeg_quality: int = 92
    """JPEG quality of the camera images."""
    workers: int = 2
    """Processes that render scenes in parallel (scenes are independent)."""
    render_labels: bool = True
    """Also write what the renderer knows of each camera image (per-pixel depth and class) under ``renderer/``:
    the targets of ``tigbev pretrain-backbone``."""
    label_stride: int = 4
    """Pixels between the label samples kept (every ``label_stride``-th pixel in both directions)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        _require(self.label_stride >= 1, name, "label_stride", f"must be >= 1, got {self.label_stride}")
        _require(self.scenes >= 1, name, "scenes", f"must be >= 1, got {self.scenes}")
        _require(self.samples_per_scene >= 2, name, "samples_per_scene",
                 f"must be >= 2 so that every annotation has a linked neighbour (velocity), got "
                 f"{self.samples_per_scene}")
        if self.val_scenes is None:
            object.__setattr__(self, "val_scenes", max(1, round(self.scenes / 6)) if self.scenes > 1 else 1)
        _require(0 <= self.val_scenes <= self.scenes, name, "val_scenes",
                 f"must be in [0, scenes], got {self.val_scenes} for {self.scenes} scenes")
        _require(self.image_width >= 32 and self.image_height >= 18, name, "image_width/image_height",
                 f"must be at least 32 x 18, got {self.image_width} x {self.image_height}")
        _require(self.sweeps_per_sample >= 0, name, "sweeps_per_sample", f"must be >= 0, got {self.sweeps_per_sample}")
        _require(self.lidar_azimuth_steps >= 90, name, "lidar_azimuth_steps",
                 f"must be >= 90, got {self.lidar_azimuth_steps}")
        _finite(self.object_density, name, "object_density")
        _require(1 <= self.jpeg_quality <= 100, name, "jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        _require(self.workers >= 1, name, "workers", f"must be >= 1, got {self.workers}")

    @property
    def train_split(self) -> str:
        return "synth_train"

    @property
    def val_split(self) -> str:
        return "synth_val"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


@dataclass(frozen=True, kw_only=True)
class _TrainLoopConfig:
    """Settings every training stage shares: data, run directory, optimiser loop, device, resuming."""

    preset: Preset
    """Model and default hyper-parameters: ``demo`` (CPU-sized) or ``nuscenes`` (METHOD.md)."""
    dataroot: Path
    """nuScenes-format dataroot."""
    split: str
    """Training split (predefined, or custom in splits.json)."""
    out_dir: Path
    """Run directory: checkpoints, config, metrics log, loss curve, evaluation."""
    val_split: str | None = None
    """When set, the final model is evaluated on this split with the official metrics."""
    epochs: int
    batch_size: int
    lr: float
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    grad_clip: float
    """Gradient-norm clip."""
    workers: int = 1
    """DataLoader worker processes."""
    seed: int = 0
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', or 'cuda[:N]'."""
    resume: bool = False
    """Continue from ``out_dir/last.pt``."""
    augment: bool = True
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (smoke tests)."""
    tensorboard: bool = False
    """Also log to TensorBoard in ``out_dir/tensorboard``: the scalars of metrics.jsonl, the final metrics and a BEV
    picture of the evaluation (needs ``pip install "tigbev[tensorboard]"``)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("dataroot", "out_dir"):
            object.__setattr__(self, f, Path(getattr(self, f)))
        _require(self.preset in ("demo", "nuscenes"), name, "preset", f"must be 'demo' or 'nuscenes', got "
                                                                     f"{self.preset!r}")
        _require(self.epochs >= 1, name, "epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, name, "batch_size", f"must be >= 1, got {self.batch_size}")
        _finite(self.lr, name, "lr", positive=True)
        _finite(self.weight_decay, name, "weight_decay")
        _finite(self.grad_clip, name, "grad_clip", positive=True)
        _require(self.workers >= 0, name, "workers", f"must be >= 0, got {self.workers}")
        _require(self.max_steps is None or self.max_steps >= 1, name, "max_steps", "must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d


@dataclass(frozen=True, kw_only=True)
class TrainTeacherConfig(_TrainLoopConfig):
    """Training of the CenterPoint LiDAR teacher (``tigbev train-teacher``): one-cycle AdamW, CenterPoint's clip 35;
    ``augment``: global rotation +-22.5 deg, scale 0.95..1.05 and x/y flips on points and boxes."""

    epochs: int = 20
    batch_size: int = 4
    lr: float = 2e-3
    grad_clip: float = 35.0


def train_teacher_defaults(preset: Preset) -> dict[str, Any]:
    """Hyper-parameters of a preset: nuscenes follows mmdetection3d's CenterPoint (AdamW 1e-4 peak, 20 epochs)."""
    match preset:
        case "demo":
            return {"epochs": 12, "batch_size": 4, "lr": 2e-3}
        case "nuscenes":
            return {"epochs": 20, "batch_size": 4, "lr": 1e-4}
    raise ValueError(f"unknown preset {preset!r}")


@dataclass(frozen=True, kw_only=True)
class PretrainBackboneConfig(_TrainLoopConfig):
    """Pretraining of the student's image backbone on the synthetic renderer's per-pixel depth and class
    (``tigbev pretrain-backbone``): one-cycle AdamW; ``augment``: the student's image augmentation.
    ``batch_size`` counts camera images (6 per sample)."""

    epochs: int = 4
    batch_size: int = 12
    lr: float = 2e-3
    grad_clip: float = 5.0


@dataclass(frozen=True, kw_only=True)
class ExtractTeacherConfig:
    """Stage one (``tigbev extract-teacher``): run the frozen teacher once over a split and write the cache."""

    teacher_checkpoint: Path | None
    """A tigbev teacher checkpoint (train-teacher's last.pt), or the file given to ``teacher_factory``."""
    dataroot: Path
    split: str
    out_dir: str
    """Cache location: a local directory or an fsspec URL (s3://, gs://, memory://)."""
    teacher_factory: str | None = None
    """Any LiDAR teacher: ``package.module:callable``, called as ``callable(teacher_checkpoint, device)``, returning
    a :class:`~tigbev.models.teacher.protocol.BevTeacher`; None: the checkpoint is a tigbev CenterPoint."""
    features: Literal["dense", "foreground"] = "foreground"
    """Store the whole teacher map, or only the cells around each enlarged GT box (what the losses read)."""
    feature_dtype: Literal["float16", "int8"] = "float16"
    """int8: per-sample, per-channel symmetric quantisation (foreground mode only)."""
    compression: Literal["auto", "none", "zstd"] = "auto"
    """Compression of the records' inner chunks: ``none`` reads fastest (a ranged read and a checksum), ``zstd``
    stores fewer bytes and decodes each read; ``auto``: zstd in dense mode, none in foreground mode."""
    variants: Literal["canonical", "flips", "draws"] = "canonical"
    """Which teacher maps each sample stores (docs/CACHE.md): ``canonical`` (the un-augmented points; BEV
    augmentation replayed on the map), ``flips`` (the four x / y flipped clouds: flips exact, 4x the map bytes) or
    ``draws`` (the canonical map plus ``draws`` stored BDA draws, each exact; 1 + draws times the map bytes)."""
    draws: int = 4
    """``variants='draws'``: BDA draws stored per sample (the default policy: +-22.5 deg, scale 0.95-1.05, flips)."""
    draw_seed: int = 0
    """``variants='draws'``: the draws of sample ``i`` come from ``(draw_seed, i)``."""
    shard_samples: int = 8
    """Samples per shard: the unit of writing, resuming and parallel work."""
    batch_size: int = 2
    """Teacher batch size; must divide shard_samples so that batches never straddle shards."""
    workers: int = 1
    """DataLoader processes reading and projecting LiDAR while the teacher runs."""
    device: str = "auto"
    shard_index: int = 0
    """This process's part of the work (``--shard I/N``): a contiguous block of shards."""
    num_parts: int = 1
    keypoint_enlarge_m: float = KEYPOINT_ENLARGE_M
    keypoint_grid: int = KEYPOINT_GRID
    min_depth_m: float = 0.5
    """LiDAR points nearer to a camera than this are not stored as depth."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("teacher_checkpoint", "dataroot"):
            if getattr(self, f) is not None:
                object.__setattr__(self, f, Path(getattr(self, f)))
        object.__setattr__(self, "out_dir", str(self.out_dir))
        _require(self.teacher_checkpoint is not None or self.teacher_factory is not None, name,
                 "teacher_checkpoint", "give a tigbev teacher checkpoint or a teacher_factory")
        _require(self.features in ("dense", "foreground"), name, "features", f"got {self.features!r}")
        _require(self.feature_dtype in ("float16", "int8"), name, "feature_dtype", f"got {self.feature_dtype!r}")
        _require(self.compression in ("auto", "none", "zstd"), name, "compression", f"got {self.compression!r}")
        _require(not (self.features == "dense" and self.feature_dtype == "int8"), name, "feature_dtype",
                 "int8 needs features='foreground'")
        _require(self.variants in ("canonical", "flips", "draws"), name, "variants",
                 f"must be 'canonical', 'flips' or 'draws', got {self.variants!r}")
        _require(self.draws >= 1, name, "draws", f"must be >= 1, got {self.draws}")
        _require(self.shard_samples >= 1, name, "shard_samples", "must be >= 1")
        _require(self.batch_size >= 1 and self.shard_samples % self.batch_size == 0, name, "batch_size",
                 f"must divide shard_samples ({self.shard_samples}), got {self.batch_size}")
        _require(0 <= self.shard_index < self.num_parts, name, "shard_index/num_parts",
                 f"need 0 <= I < N, got {self.shard_index}/{self.num_parts}")
        _require(self.keypoint_grid >= 2, name, "keypoint_grid", "must be >= 2")
        _finite(self.keypoint_enlarge_m, name, "keypoint_enlarge_m")
        _finite(self.min_depth_m, name, "min_depth_m")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(teacher_checkpoint=None if self.teacher_checkpoint is None else str(self.teacher_checkpoint),
                 dataroot=str(self.dataroot))
        return d


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """Weights of the student's losses (METHOD.md section 6): every distillation weight 0 gives the baseline."""

    depth: float = 3.0
    """Dense depth supervision (BEVDepth's weight with its per-valid-cell BCE)."""
    inner_depth: float = 1.0
    inter_keypoint: float = 100.0
    inter_channel: float = 10.0
    dense_feature: float = 0.0
    """Optional dense BEV feature-mimicking baseline (not part of TiG-BEV)."""
    self_assessment: float = 0.0
    """Self-assessment cross-attention distillation on the BEV maps (METHOD.md section 7; TaT uses 0.1)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _finite(getattr(self, f.name), type(self).__name__, f.name)

    @property
    def distills(self) -> bool:
        return (self.inter_keypoint > 0 or self.inter_channel > 0 or self.dense_feature > 0
                or self.self_assessment > 0)

    @classmethod
    def baseline(cls) -> LossWeights:
        """Detection + dense depth only: the plain BEVDepth-style student."""
        return cls(inner_depth=0.0, inter_keypoint=0.0, inter_channel=0.0, dense_feature=0.0, self_assessment=0.0)


@dataclass(frozen=True, kw_only=True)
class SelfAssessmentConfig:
    """Shapes and level weights of the self-assessment cross-attention losses (METHOD.md section 7; the family
    weight is ``LossWeights.self_assessment``). TaT (segmentation): 0.1 * (1.0 * seq + 0.4 * anchor), 16 x 16
    patches, 32 x 32 anchors; on a 128 x 128 BEV map 4 x 4-cell anchor regions give 32 x 32 anchors."""

    sequence_weight: float = 1.0
    anchor_weight: float = 0.4
    heads: int = 4
    temperature: float = 1.0
    """Logits are Q K^T / temperature (TaT uses no 1/sqrt(d) scaling, i.e. temperature 1)."""
    patch_hw: tuple[int, int] = (16, 16)
    patch_group: int = 1
    """Neighbouring patches (in raster order) stacked along channels into one attention group."""
    anchor_cells: int = 4
    """Anchor-point pooling region (kernel = stride), in BEV cells."""
    teacher_projection: bool = False
    """Keys through a 1x1 conv + BatchNorm instead of the raw teacher map."""

    def __post_init__(self) -> None:
        for name in ("sequence_weight", "anchor_weight"):
            _finite(getattr(self, name), "SelfAssessmentConfig", name)
        for name in ("heads", "patch_group", "anchor_cells"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelfAssessmentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.patch_hw) < 1:
            raise ValueError(f"SelfAssessmentConfig.patch_hw must be positive, got {self.patch_hw}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SelfAssessmentConfig.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True, kw_only=True)
class TrainStudentConfig(_TrainLoopConfig):
    """Stage two (``tigbev train-student``): a camera student from images plus the teacher cache. AdamW with linear
    warm-up and the published step decay, clip 5; ``augment``: image resize/crop/flip/rotation and BEV augmentation."""

    cache: str | None = None
    """Teacher cache of the same split (from extract-teacher); required when any distillation weight is > 0 and
    ``teacher`` is 'cache'."""
    teacher: Literal["cache", "online", "none"] = "cache"
    """Where distillation targets come from: the cache (the point of this project), the live teacher every step
    (the published way, kept as the baseline), or nowhere (weights must then be 0)."""
    teacher_checkpoint: Path | None = None
    """Needed with teacher='online' (a tigbev CenterPoint, or the file given to ``teacher_factory``)."""
    teacher_factory: str | None = None
    """With teacher='online': any LiDAR teacher, ``package.module:callable`` (see ExtractTeacherConfig)."""
    variant: Literal["bevdet", "bevdepth"] = "bevdepth"
    backbone_weights: Path | None = None
    """torchvision-format ImageNet weights for the image backbone (a local .pth; nothing is downloaded)."""
    weights: LossWeights = dataclasses.field(default_factory=LossWeights)
    keypoint_grid: int = KEYPOINT_GRID
    """Keypoints per box side with the online teacher (METHOD.md: 24 x 24); a cache carries its own grid."""
    self_assessment: SelfAssessmentConfig = dataclasses.field(default_factory=SelfAssessmentConfig)
    """Shapes of the self-assessment losses (used when ``weights.self_assessment`` > 0)."""
    epochs: float = 12
    """Epochs of the schedule; a fraction is allowed (4.5: the schedule spans round(4.5 x steps per epoch) steps and
    the last epoch stops there), for budgets set in steps, such as a cache student given an online one's compute."""
    batch_size: int = 2
    lr: float = 2e-4
    grad_clip: float = 5.0
    warmup_steps: int = 50
    frames: int = 1
    """Key frames per sample, the current one included (BEVDet4D / BEVDepth4D: 2); the teacher targets and the
    depth supervision stay the current frame's, so one cache serves any count."""
    sampler: Literal["uniform", "cbgs"] = "uniform"
    """'uniform': each sample once per epoch; 'cbgs': class-balanced grouping and sampling (mmdet3d's CBGSDataset),
    samples repeated by class frequency, the repeat list fixed by the seed."""
    input_hw: tuple[int, int] | None = None
    """The network's input (H, W) in pixels, overriding the preset's (demo 128 x 352, nuscenes 256 x 704); each
    camera image is resized to cover it and its bottom rows kept. Depth targets and cached teacher targets do not
    depend on it (they are points in the original image and maps in the BEV grid), so one cache serves any size."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.input_hw is not None:
            hw = tuple(self.input_hw)
            _require(len(hw) == 2 and all(isinstance(v, int) and v >= 16 for v in hw), name, "input_hw",
                     f"must be (H, W) of at least 16 px each (the image backbone's stride), got {self.input_hw!r}")
            object.__setattr__(self, "input_hw", hw)
        for f in ("teacher_checkpoint", "backbone_weights"):
            if getattr(self, f) is not None:
                object.__setattr__(self, f, Path(getattr(self, f)))
        if isinstance(self.weights, dict):
            object.__setattr__(self, "weights", LossWeights(**self.weights))
        if isinstance(self.self_assessment, dict):
            sa = {k: tuple(v) if isinstance(v, list) else v for k, v in self.self_assessment.items()}
            object.__setattr__(self, "self_assessment", SelfAssessmentConfig(**sa))
        _require(self.teacher in ("cache", "online", "none"), name, "teacher", f"got {self.teacher!r}")
        _require(self.variant in ("bevdet", "bevdepth"), name, "variant", f"got {self.variant!r}")
        distills = self.weights.distills
        _require(not (distills and self.teacher == "none"), name, "teacher",
                 "distillation weights are > 0 but teacher='none'")
        _require(not (self.teacher == "cache" and distills and self.cache is None), name, "cache",
                 "teacher='cache' with distillation needs --cache")
        _require(not (self.teacher == "online" and self.teacher_checkpoint is None and self.teacher_factory is None),
                 name, "teacher_checkpoint", "teacher='online' needs --teacher-checkpoint or --teacher-factory")
        _require(self.keypoint_grid >= 2, name, "keypoint_grid", f"must be >= 2, got {self.keypoint_grid}")
        _require(self.warmup_steps >= 0, name, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.epochs > 0, name, "epochs", f"must be > 0, got {self.epochs}")
        _require(self.frames >= 1, name, "frames", f"must be >= 1 (the current key frame), got {self.frames}")
        _require(self.sampler in ("uniform", "cbgs"), name, "sampler", f"'uniform' or 'cbgs', got {self.sampler!r}")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    checkpoint: Path | None
    """A tigbev teacher or student checkpoint; None with gt_as_predictions."""
    dataroot: Path
    split: str
    out_dir: Path
    gt_as_predictions: bool = False
    batch_size: int = 2
    device: str = "auto"
    bev_samples: int = 3
    """How many samples get a top-view picture of predictions against the ground truth."""
    overwrite: bool = False
    """Replace the results of another checkpoint (or of the ground truth) that ``out_dir`` holds; without it such
    an ``out_dir`` is refused. Results of the same checkpoint (same sha256) are always replaced."""

    def __post_init__(self) -> None:
        if self.checkpoint is None and not self.gt_as_predictions:
            raise ValueError("EvaluateConfig.checkpoint: needed unless gt_as_predictions is set")
        if self.bev_samples < 0:
            raise ValueError(f"EvaluateConfig.bev_samples: must be >= 0, got {self.bev_samples}")
