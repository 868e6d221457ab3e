"""mmdetection3d CenterPoint checkpoints -> ``CenterPoint(teacher_preset("nuscenes"))``.

The teacher TiG-BEV distils from is mmdetection3d's ``centerpoint_01voxel_second_secfpn_circlenms_4x8_cyclic_20e_nus``
(TiG-BEV's configs ``load_from`` the file ``..._20210815_085857-9ba7f3a5.pth``, published under
``download.openmmlab.com/mmdetection3d/v1.0.0_models/``; the older 0.x release of the same config is
``..._20201001_135205-5db91e00.pth`` under ``v0.1.0_models/``). This module maps such a checkpoint onto our
modules, converts the sparse-convolution weight layout, and documents what the head's regression channels mean.

Reading (``read_mmdet3d_checkpoint``)
=====================================
Accepted: a path to a ``torch.save`` file (zip or legacy format), or an already loaded object. The object is either
mmcv's checkpoint dict (``{"meta": ..., "state_dict": ..., ["optimizer": ...]}``; only ``state_dict`` is used) or a
bare state dict (every value a tensor). Files are read with ``torch.load(weights_only=True)``. mmcv also pickles
``meta`` (config text, class names, hook messages), which may hold numpy scalars or mmcv objects that the
weights-only unpickler refuses. Only then a restricted second pass runs: it is still torch's weights-only unpickler,
but every global it refuses (``numpy.core.multiarray.scalar``, ``mmcv.utils.config.ConfigDict`` ...) is bound to
an inert stand-in class that swallows its arguments and state. No foreign class is imported and no foreign callable
is ever invoked, so the pass extracts the tensors and nothing else; a state dict that itself contains a refused
object is then rejected as non-tensor. Plain pickle is never used. (One limitation: a refused dict subclass cannot
be stood in for; see ``read_mmdet3d_checkpoint``.)

Key mapping (``mmdet3d_centerpoint_keys`` lists every key with its shape)
=========================================================================
Both mmdetection3d lines use the same keys for this model: the 0.x detector class and 1.x's ``CenterPoint``
(an ``MVXTwoStageDetector``) both name the LiDAR branch ``pts_*``. The rules, applied to their keys in order:

1. An optional leading ``module.`` (a DistributedDataParallel wrapper) is dropped.
2. Prefixes: ``pts_middle_encoder.`` -> ``middle_encoder.``, ``pts_backbone.`` -> ``backbone.``,
   ``pts_neck.`` -> ``neck.``, ``pts_bbox_head.`` -> ``head.``.
3. Sparse encoder stages: mmdetection3d adds stage ``i`` (0-based) as ``encoder_layers.encoder_layer{i+1}``;
   ours is a positional ``SparseSequential``: ``encoder_layers.encoder_layer{n}.`` -> ``encoder_layers.{n-1}.``.
4. Everything after that is identical (mmcv ``ConvModule``: ``conv``/``bn``; ``make_sparse_convmodule``:
   ``0`` conv, ``1`` BN; ``SparseBasicBlock``: ``conv1``/``bn1``/``conv2``/``bn2``; SECOND ``blocks.i.{3k, 3k+1}``;
   SECONDFPN ``deblocks.i.{0, 1}``; ``SeparateHead``: ``<name>.0.conv``/``<name>.0.bn``, ``<name>.1`` with bias).

nuscenes preset, tensors per module (theirs = ours, one to one; BatchNorm running stats and
``num_batches_tracked`` included; 72 BatchNorm layers, 21 sparse convolutions)::

    pts_middle_encoder -> middle_encoder  126  (21 sparse conv weights + 21 BN x 5)
    pts_backbone       -> backbone         72  (12 conv weights + 12 BN x 5)
    pts_neck           -> neck             12  (1x1 conv + 2x2 transposed conv weights + 2 BN x 5)
    pts_bbox_head      -> head            294  (shared conv + BN x 5 = 6; 6 tasks x 6 branches x (3x3 conv,
                                                BN x 5, final conv weight + bias) = 288)
    total                                 504

Tensors of theirs without a counterpart: none. ``MMDET3D_KEYS_WITHOUT_COUNTERPART`` is that (empty) list. The
parts of their detector without one hold no tensors: the voxel layer (``pts_voxel_layer``), ``HardSimpleVFE``
(``pts_voxel_encoder``, a mean over points), the losses and the bbox coder. Any other key (say the ``img_*``
modules of a camera or fusion detector, or a TiG-BEV student checkpoint) is an error, never skipped silently.

Layouts
=======
Dense convolutions, transposed convolutions and BatchNorm are PyTorch modules on both sides: same layout.
Sparse convolutions differ (verified in source): mmcv's ``SparseConvolution`` (mmcv/ops/sparse_conv.py, and
mmdet3d 0.x's own mmdet3d/ops/spconv/conv.py) allocates ``weight`` as ``(*kernel_size, in, out)`` =
``[kD, kH, kW, in, out]``; spconv 2.x allocates ``[out, kD, kH, kW, in]`` (``weight_shape`` "KRSC" in
spconv/pytorch/conv.py). mmdetection3d's own bridge (models/layers/spconv/overwrite_spconv/write_spconv2.py) converts
by moving the last axis to the front and nothing else, and mmdetection3d v1.0.0rc2's release notes state that
weights stay compatible between spconv 1.x in mmcv and spconv 2.x. So: ``ours = theirs.permute(4, 0, 1, 2, 3)``,
i.e. their entry ``[kd, kh, kw, i, o]`` lands at ``ours[o, kd, kh, kw, i]`` (``sparse_weight_from_mmcv``).

A checkpoint trained with mmdetection3d >= 1.0.0rc2 while spconv 2.x was installed is saved in spconv 2.x layout
already. ``sparse_layout="auto"`` (default) detects the layout from the shapes: a weight whose shape is the mmcv
shape is permuted, one whose shape is the spconv 2.x shape is kept. The two shapes coincide only if kD = kH = kW =
in = out, which no layer of the nuscenes preset has; such layers follow the verdict of the others. All
unambiguous weights must agree (one training run saves one layout), else the checkpoint is refused; with no
unambiguous weight at all, pass ``sparse_layout="mmcv"`` or ``"spconv2"``. The published checkpoints (0.x, and the
v1.0.0_models file trained in August 2021, before spconv 2 support) are in mmcv layout.

Box conventions of the head (what each regression channel means)
=================================================================
Verified from mmdetection3d source (``CenterHead.get_targets_single``, ``CenterPointBBoxCoder.decode``,
``CenterHead.get_bboxes``; identical in the 0.x and 1.x code), for one BEV cell (row = y, column = x, index
``y * W + x``; the same on our side):

- ``reg`` (2): centre offset in cells from the cell's integer corner, (x, y).
- ``height`` (1): z of the box's **gravity (geometric) centre**, metres (targets use ``gravity_center``). Only
  ``get_bboxes`` later moves z to the bottom face (``z - h / 2``) for ``LiDARInstance3DBoxes``.
- ``dim`` (3): ``log`` of the box tensor's columns 3:6 (``norm_bbox=True``).
- ``rot`` (2): (sin, cos) of the box tensor's yaw (column 6); decoded with ``atan2(sin, cos)``.
- ``vel`` (2): (vx, vy) in the lidar frame, m/s.
- heatmap channels: the task's classes in config order (our ``NUSCENES_TASKS`` order is the same).

What columns 3:7 mean depends on the LiDAR box convention of the code base that trained the checkpoint (sources:
mmdetection3d's compatibility notes for v1.0.0rc0 and the nuScenes info converters of both lines):

- ``"mmdet3d-v0"`` (0.x, e.g. ``..._20201001_135205-5db91e00.pth``): columns 3:6 are nuScenes (w, l, h) - the
  converter stores ``b.wlh``; yaw_v0 = ``-yaw_nus - pi/2`` (0 along -y, -pi/2 along +x, i.e. clockwise-positive;
  converter: ``-rots - np.pi / 2``). So ``dim`` = log(w, l, h) and ``rot`` = (sin, cos)(-yaw - pi/2).
- ``"mmdet3d-v1"`` (>= 1.0.0rc0, e.g. the ``v1.0.0_models`` file TiG-BEV loads): columns 3:6 are (l, w, h)
  (converter: ``dims[:, [1, 0, 2]]``), yaw is nuScenes' yaw, counter-clockwise from +x (converter: ``rots``).
  This is exactly our convention (tigbev.models.heads: ``dim`` = log(l, w, h), ``rot`` = (sin yaw, cos yaw),
  ``height`` = centre z), so the weights need no change.

With ``box_convention="mmdet3d-v0"`` the loader rewrites the final 3x3 convolution of every ``dim`` and ``rot``
branch so the loaded model predicts in our convention: the ``dim`` output channels are reordered (1, 0, 2), and
``rot`` becomes (sin, cos)(-yaw_v0 - pi/2) = (-cos yaw_v0, -sin yaw_v0), a signed swap of its two output channels.
Both are linear maps of a linear layer's output, so they are exact. ``boxes_from_mmdet3d`` converts decoded boxes
(``LiDARInstance3DBoxes.tensor`` rows) of either convention into the project layout.

What is *not* verified here: that the v1.0.0_models file really follows the v1 convention is taken from its URL,
mmdetection3d's v1.0.0rc1 release notes (CenterPoint checkpoints "fully updated" after the coordinate refactor)
and the 1.x configs that point at it; no detection run on real data checked it. That mmcv's sparse convolution
computes the same cross-correlation as spconv 2.x for the permuted weight is mmdetection3d's premise (above); the
tests check that our spconv 2.x layers compute the dense ``conv3d`` with ``weight[o, i, kd, kh, kw] =
theirs[kd, kh, kw, i, o]``, not mmcv itself.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tigbev.checkpoint_file import CheckpointError, load_weights_only, refused_global, unpickler_reason
from tigbev.models.teacher.centerpoint import CenterPoint, TeacherConfig, teacher_preset

__all__ = [
    "MMDET3D_KEYS_WITHOUT_COUNTERPART",
    "BoxConvention",
    "KeySpec",
    "SparseLayout",
    "boxes_from_mmdet3d",
    "convert_mmdet3d_state_dict",
    "load_mmdet3d_centerpoint",
    "mmdet3d_centerpoint_keys",
    "mmdet3d_key_to_ours",
    "read_mmdet3d_checkpoint",
    "sparse_weight_from_mmcv",
]

BoxConvention = Literal["mmdet3d-v1", "mmdet3d-v0"]
SparseLayout = Literal["auto", "mmcv", "spconv2"]

MMDET3D_KEYS_WITHOUT_COUNTERPART: Mapping[str, str] = {}
"""Their keys (exact names) that are read but deliberately not loaded, with the reason. Empty: every tensor of the
published CenterPoint checkpoints has a counterpart (see the module docstring)."""

_WRAPPER_PREFIX = "module."
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pts_middle_encoder.", "middle_encoder."),
    ("pts_backbone.", "backbone."),
    ("pts_neck.", "neck."),
    ("pts_bbox_head.", "head."),
)
_STAGE_RE = re.compile(r"^middle_encoder\.encoder_layers\.encoder_layer(\d+)\.")
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_MAX_LISTED = 12
_MAX_STAND_IN_ROUNDS = 64
# The published config's ``common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2))``:
# (name, output channels); each branch is one ConvModule then the final conv (num_conv = 2).
_COMMON_HEADS: tuple[tuple[str, int], ...] = (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))


# ------------------------------------------------------------------------------------------------- key list
@dataclass(frozen=True)
class KeySpec:
    """One tensor of their checkpoint: its name, its shape as they store it, and where it goes in ours.

    ``sparse`` marks a sparse-convolution weight: ``shape`` is then the mmcv layout ``[kD, kH, kW, in, out]`` and
    ``spconv2_shape`` the spconv 2.x layout ``[out, kD, kH, kW, in]`` (the shape of our parameter).
    """

    theirs: str
    ours: str
    shape: tuple[int, ...]
    sparse: bool = False

    @property
    def spconv2_shape(self) -> tuple[int, ...]:
        return (self.shape[-1], *self.shape[:-1]) if self.sparse else self.shape


def mmdet3d_key_to_ours(key: str) -> str | None:
    """Our state-dict key for one of their keys (rules 1-3 of the module docstring); None outside the LiDAR
    detector (e.g. ``img_backbone.*``)."""
    if key.startswith(_WRAPPER_PREFIX):
        key = key[len(_WRAPPER_PREFIX):]
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
            break
    else:
        return None
    m = _STAGE_RE.match(key)
    if m:
        stage = int(m.group(1))
        if stage < 1:
            return None
        key = f"middle_encoder.encoder_layers.{stage - 1}." + key[m.end():]
    return key


def _z_component(pad: Any) -> int:
    return int(pad[0]) if isinstance(pad, Sequence) else int(pad)


def mmdet3d_centerpoint_keys(cfg: TeacherConfig | None = None) -> list[KeySpec]:
    """Every tensor of mmdetection3d's CenterPoint built with ``cfg``'s numbers, as mmdetection3d names and stores
    it: ``SparseEncoder(block_type="basicblock")``, ``SECOND``, ``SECONDFPN(use_conv_for_no_stride=True)``,
    ``CenterHead`` with ``SeparateHead(final_kernel=3)``. Written from mmdetection3d's construction code, not from our
    modules, so comparing it with our state dict checks that the two structures agree."""
    cfg = cfg or teacher_preset("nuscenes")
    out: list[KeySpec] = []

    def add(theirs: str, shape: Sequence[int], sparse: bool = False) -> None:
        ours = mmdet3d_key_to_ours(theirs)
        assert ours is not None, theirs
        out.append(KeySpec(theirs, ours, tuple(int(s) for s in shape), sparse))

    def bn(prefix: str, channels: int) -> None:
        for suffix in _BN_SUFFIXES:
            add(f"{prefix}.{suffix}", () if suffix == "num_batches_tracked" else (channels,))

    def sparse_conv(prefix: str, c_in: int, c_out: int, kernel: Sequence[int]) -> None:
        add(f"{prefix}.weight", (*kernel, c_in, c_out), sparse=True)  # mmcv: (*kernel_size, in, out)

    # pts_middle_encoder: SparseEncoder.
    enc = "pts_middle_encoder"
    k3 = (3, 3, 3)
    sparse_conv(f"{enc}.conv_input.0", cfg.point_features, cfg.base_channels, k3)
    bn(f"{enc}.conv_input.1", cfg.base_channels)
    c_in = cfg.base_channels
    z_min, z_max = cfg.point_range_m[2], cfg.point_range_m[5]
    z_cells = round((z_max - z_min) / cfg.voxel_size_m[2]) + 1  # mmdetection3d's sparse_shape: 41 for 8 m / 0.2 m
    n_stages = len(cfg.encoder_channels)
    for i, blocks in enumerate(cfg.encoder_channels):
        stage = f"{enc}.encoder_layers.encoder_layer{i + 1}"
        for j, c_out in enumerate(blocks):
            if j == len(blocks) - 1 and i != n_stages - 1:  # make_sparse_convmodule(SparseConv3d, stride 2)
                sparse_conv(f"{stage}.{j}.0", c_in, c_out, k3)
                bn(f"{stage}.{j}.1", c_out)
                z_cells = (z_cells + 2 * _z_component(cfg.encoder_paddings[i][j]) - 3) // 2 + 1
            else:  # SparseBasicBlock(out_channels, out_channels): mmdet's BasicBlock names
                for n in (1, 2):
                    sparse_conv(f"{stage}.{j}.conv{n}", c_out, c_out, k3)
                    bn(f"{stage}.{j}.bn{n}", c_out)
            c_in = c_out
    sparse_conv(f"{enc}.conv_out.0", c_in, cfg.encoder_out_channels, (3, 1, 1))
    bn(f"{enc}.conv_out.1", cfg.encoder_out_channels)
    z_cells = (z_cells - 3) // 2 + 1

    # pts_backbone: SECOND (conv, BN, ReLU) x (1 + layer_num) per stage, conv bias False.
    c_in = cfg.encoder_out_channels * z_cells
    for i, (c_out, n_layers) in enumerate(zip(cfg.second_channels, cfg.second_layers, strict=True)):
        for k in range(1 + n_layers):
            add(f"pts_backbone.blocks.{i}.{3 * k}.weight", (c_out, c_in if k == 0 else c_out, 3, 3))
            bn(f"pts_backbone.blocks.{i}.{3 * k + 1}", c_out)
        c_in = c_out

    # pts_neck: SECONDFPN, deconv (stride > 1) or 1x1 conv (stride 1), no bias, then BN.
    for i, (c_in, c_out, s) in enumerate(zip(cfg.second_channels, cfg.fpn_channels, cfg.fpn_strides, strict=True)):
        shape = (c_in, c_out, s, s) if s > 1 else (c_out, c_in, 1, 1)  # ConvTranspose2d weight is (in, out, k, k)
        add(f"pts_neck.deblocks.{i}.0.weight", shape)
        bn(f"pts_neck.deblocks.{i}.1", c_out)

    # pts_bbox_head: CenterHead. ConvModule(bias="auto") with a norm has no conv bias; the last conv has one.
    head = "pts_bbox_head"
    share, hc = cfg.head_share_channels, cfg.head_channels
    add(f"{head}.shared_conv.conv.weight", (share, sum(cfg.fpn_channels), 3, 3))
    bn(f"{head}.shared_conv.bn", share)
    for t, classes in enumerate(cfg.tasks):
        for name, c_out in (*_COMMON_HEADS, ("heatmap", len(classes))):
            branch = f"{head}.task_heads.{t}.{name}"
            add(f"{branch}.0.conv.weight", (hc, share, 3, 3))
            bn(f"{branch}.0.bn", hc)
            add(f"{branch}.1.weight", (c_out, hc, 3, 3))
            add(f"{branch}.1.bias", (c_out,))
    return out


# ------------------------------------------------------------------------------------------------- layouts
def sparse_weight_from_mmcv(weight: torch.Tensor) -> torch.Tensor:
    """mmcv / spconv 1.x ``[*kernel, in, out]`` -> spconv 2.x ``[out, *kernel, in]`` (any number of spatial dims)."""
    n = weight.dim()
    if n < 3:
        raise ValueError(f"a sparse convolution weight has >= 3 dims, got shape {tuple(weight.shape)}")
    return weight.permute(n - 1, *range(n - 1)).contiguous()


def _sparse_layout_of(state: Mapping[str, torch.Tensor], specs: Sequence[KeySpec], requested: SparseLayout
                      ) -> Literal["mmcv", "spconv2"]:
    if requested != "auto":
        return requested
    verdicts: dict[str, list[str]] = {"mmcv": [], "spconv2": []}
    for s in specs:
        if not s.sparse or s.theirs not in state or s.shape == s.spconv2_shape:
            continue
        shape = tuple(state[s.theirs].shape)
        if shape == s.shape:
            verdicts["mmcv"].append(s.theirs)
        elif shape == s.spconv2_shape:
            verdicts["spconv2"].append(s.theirs)
    if verdicts["mmcv"] and verdicts["spconv2"]:
        raise CheckpointError(
            "sparse convolution weights in two layouts: mmcv [kD, kH, kW, in, out] for "
            f"{_listing(verdicts['mmcv'])} but spconv 2.x [out, kD, kH, kW, in] for {_listing(verdicts['spconv2'])}")
    if verdicts["mmcv"]:
        return "mmcv"
    if verdicts["spconv2"]:
        return "spconv2"
    if any(s.sparse and s.theirs in state and s.shape == s.spconv2_shape for s in specs):
        raise CheckpointError("the sparse convolution weights' layout cannot be told from their shapes; pass "
                              "sparse_layout='mmcv' or 'spconv2'")
    return "mmcv"  # no sparse weight matched either shape: the shape check names them


# ------------------------------------------------------------------------------------------------- conversion
def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _strip_wrapper(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state dict key {key!r} is not a string")
        name = key[len(_WRAPPER_PREFIX):] if key.startswith(_WRAPPER_PREFIX) else key
        if name in out:
            raise CheckpointError(f"state dict has {name!r} both with and without the {_WRAPPER_PREFIX!r} prefix")
        out[name] = value
    return out


def _v0_head_to_ours(ours: dict[str, torch.Tensor], n_tasks: int) -> None:
    """Rewrite the final conv of each ``dim`` / ``rot`` branch from the 0.x box convention to ours (in place)."""
    for t in range(n_tasks):
        for suffix in ("weight", "bias"):
            dim_key = f"head.task_heads.{t}.dim.1.{suffix}"
            ours[dim_key] = ours[dim_key][[1, 0, 2]].contiguous()  # log(w, l, h) -> log(l, w, h)
            rot_key = f"head.task_heads.{t}.rot.1.{suffix}"
            old = ours[rot_key]  # (sin a, cos a) with a = -yaw - pi/2
            ours[rot_key] = torch.stack([-old[1], -old[0]]).contiguous()  # (sin yaw, cos yaw) = (-cos a, -sin a)


def convert_mmdet3d_state_dict(state_dict: Mapping[str, Any], cfg: TeacherConfig | None = None, *,
                               sparse_layout: SparseLayout = "auto", box_convention: BoxConvention = "mmdet3d-v1",
                               source: str = "mmdetection3d checkpoint") -> dict[str, torch.Tensor]:
    """Their state dict -> a complete state dict of ``CenterPoint(cfg)``.

    Strict: every expected key must be present with its shape (either sparse layout for sparse weights), every
    key must be expected, every value a tensor; all problems are reported together in one ``CheckpointError``.
    Floating tensors become float32, ``num_batches_tracked`` int64.
    """
    cfg = cfg or teacher_preset("nuscenes")
    if box_convention not in ("mmdet3d-v1", "mmdet3d-v0"):
        raise ValueError(f"box_convention must be 'mmdet3d-v1' or 'mmdet3d-v0', got {box_convention!r}")
    if sparse_layout not in ("auto", "mmcv", "spconv2"):
        raise ValueError(f"sparse_layout must be 'auto', 'mmcv' or 'spconv2', got {sparse_layout!r}")
    specs = mmdet3d_centerpoint_keys(cfg)
    state = _strip_wrapper(state_dict)
    expected = {s.theirs: s for s in specs}

    not_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in MMDET3D_KEYS_WITHOUT_COUNTERPART]
    layout = _sparse_layout_of({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, specs, sparse_layout)
    wrong_shape = []
    for s in specs:
        value = state.get(s.theirs)
        if not isinstance(value, torch.Tensor):
            continue
        want = s.shape if (s.sparse and layout == "mmcv") else s.spconv2_shape
        if tuple(value.shape) != want:
            layout_note = f" ({'mmcv' if layout == 'mmcv' else 'spconv 2.x'} layout)" if s.sparse else ""
            wrong_shape.append(f"{s.theirs}: got {tuple(value.shape)}, expected {want}{layout_note}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} mis-shaped tensor(s) {_listing(wrong_shape)}")
    if not_tensor:
        problems.append(f"{len(not_tensor)} non-tensor value(s) {_listing(not_tensor)}")
    if problems:
        raise CheckpointError(f"{source} does not fit CenterPoint ({len(specs)} tensors expected, "
                              f"{len(state)} found): " + "; ".join(problems))

    ours: dict[str, torch.Tensor] = {}
    for s in specs:
        value = state[s.theirs].detach().to("cpu")
        if s.sparse and layout == "mmcv":
            value = sparse_weight_from_mmcv(value)
        if s.ours.endswith("num_batches_tracked"):
            value = value.to(torch.int64)
        elif value.is_floating_point():
            value = value.to(torch.float32)
        ours[s.ours] = value.contiguous()
    if box_convention == "mmdet3d-v0":
        _v0_head_to_ours(ours, len(cfg.tasks))
    return ours


# ------------------------------------------------------------------------------------------------- reading
class _InertStandIn:
    """Bound to every global the weights-only unpickler refuses (restricted pass only): takes any arguments and
    state, keeps nothing, runs nothing."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "_InertStandIn":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<object dropped by the restricted checkpoint reader>"


def _load_weights_only(path: Path, stand_ins: Sequence[str]) -> Any:
    entries = [(_InertStandIn, name) for name in stand_ins]
    with torch.serialization.safe_globals(entries):
        return torch.load(path, map_location="cpu", weights_only=True)


def _refused_global(exc: Exception) -> str | None:
    """The global named by a weights-only refusal, with its module (torch drops ``builtins.``); None for any other
    unpickling error."""
    name = refused_global(exc)
    if name is None:
        return None
    return name if "." in name else f"builtins.{name}"


def read_mmdet3d_checkpoint(path: str | os.PathLike[str]) -> Any:
    """The object stored in ``path``, read with ``torch.load(weights_only=True)``; if that refuses some pickled
    global (mmcv's ``meta``), a restricted pass binds each refused global to an inert stand-in (module docstring).

    Limitation: a refused class whose instances receive dict items while unpickling (a dict subclass such as an
    mmcv ``ConfigDict``) cannot be stood in for, because torch's weights-only unpickler sets items only on plain
    dicts; such a checkpoint is refused with a ``CheckpointError`` (re-save its ``state_dict`` alone)."""
    p = Path(path)
    try:
        return load_weights_only(p, what="mmdetection3d checkpoint")
    except CheckpointError as exc:
        first = _refused_global(exc.__context__) if isinstance(exc.__context__, pickle.UnpicklingError) else None
        if first is None:
            raise
    if not hasattr(torch.serialization, "safe_globals"):  # old torch: no way to bind stand-ins
        raise CheckpointError(f"{p} pickles {first}, which torch.load(weights_only=True) refuses; the restricted "
                              "reader needs a newer torch (tested with 2.13)")
    stand_ins = [first]
    try:  # zip checkpoints: every refused global in one static scan
        stand_ins += sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(p)) - {first})
    except Exception:  # legacy (non-zip) format: learn them one refusal at a time below
        pass
    for _ in range(_MAX_STAND_IN_ROUNDS):
        try:
            return _load_weights_only(p, stand_ins)
        except Exception as exc:
            name = _refused_global(exc) if isinstance(exc, pickle.UnpicklingError) else None
            if name is None or name in stand_ins:
                raise CheckpointError(f"cannot read mmdetection3d checkpoint {p}, even with the foreign objects "
                                      f"{_listing(stand_ins)} dropped: {unpickler_reason(exc)}. Re-save "
                                      "its state_dict alone (never load untrusted files without weights_only)"
                                      ) from exc
            stand_ins.append(name)
    raise CheckpointError(f"cannot read mmdetection3d checkpoint {p}: more than {_MAX_STAND_IN_ROUNDS} foreign "
                          "pickled globals")


def _state_dict_of(obj: Any, source: str) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):
            return inner
        looks_bare = any(str(k).startswith(("pts_", _WRAPPER_PREFIX + "pts_")) for k in obj)
        if obj and (looks_bare or all(isinstance(v, torch.Tensor) for v in obj.values())):
            return obj  # a bare state dict: the strict conversion checks every key and value
        if "format" in obj and "model" in obj:
            raise CheckpointError(f"{source} is a tigbev teacher checkpoint; load it with "
                                  "tigbev.models.teacher.checkpoint.load_teacher")
        keys = [str(k) for k in obj]
        raise CheckpointError(f"{source} has no 'state_dict' entry and is not a bare state dict "
                              f"(top-level keys {_listing(keys)})")
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict")


def load_mmdet3d_centerpoint(path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
                             cfg: TeacherConfig | None = None, *, box_convention: BoxConvention = "mmdet3d-v1",
                             sparse_layout: SparseLayout = "auto") -> CenterPoint:
    """``CenterPoint(cfg)`` (default: the nuscenes preset) with an mmdetection3d CenterPoint checkpoint's weights,
    on the CPU in eval mode.

    ``path_or_state_dict``: a checkpoint file, a loaded checkpoint dict (with ``state_dict``) or a bare state dict.
    ``box_convention``: the LiDAR box convention the checkpoint was trained in ("mmdet3d-v1" for the v1.0.0_models
    file TiG-BEV uses; "mmdet3d-v0" rewrites the head's ``dim`` / ``rot`` outputs into ours). ``sparse_layout``:
    see the module docstring. Raises ``CheckpointError`` naming every missing, unexpected or mis-shaped key.
    """
    cfg = cfg or teacher_preset("nuscenes")
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "the given mmdetection3d state dict", path_or_state_dict
    else:
        source = str(path_or_state_dict)
        obj = read_mmdet3d_checkpoint(path_or_state_dict)
    state = _state_dict_of(obj, source)
    ours = convert_mmdet3d_state_dict(state, cfg, sparse_layout=sparse_layout, box_convention=box_convention,
                                      source=source)
    model = CenterPoint(cfg)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as exc:  # our modules differ from the documented mmdetection3d structure
        raise CheckpointError(f"{source}: the converted weights do not fit CenterPoint: {exc}") from exc
    # spconv's own load hook re-permutes weights when SPCONV_SAVED_WEIGHT_LAYOUT is set: make sure nothing
    # touched the converted tensors on their way in.
    altered = [k for k, v in model.state_dict().items() if not torch.equal(v, ours[k])]
    if altered:
        raise CheckpointError(f"{source}: weights changed while loading into CenterPoint {_listing(altered)}; is "
                              "the SPCONV_SAVED_WEIGHT_LAYOUT environment variable set? Unset it.")
    return model.to("cpu").eval()


# ------------------------------------------------------------------------------------------------- boxes
def boxes_from_mmdet3d(boxes: Any, *, convention: BoxConvention = "mmdet3d-v1",
                       z_origin: Literal["bottom", "center"] = "bottom") -> Any:
    """Decoded mmdetection3d LiDAR boxes (rows ``x, y, z, d0, d1, d2, yaw[, vx, vy]``, as in
    ``LiDARInstance3DBoxes.tensor``) -> the project layout ``x, y, z, l, w, h, yaw[, vx, vy]`` (z = geometric
    centre, yaw counter-clockwise from +x in (-pi, pi]).

    ``z_origin="bottom"`` for ``LiDARInstance3DBoxes`` (what ``get_bboxes`` returns: bottom-face z),
    ``"center"`` for the bbox coder's raw output (its z is the regressed gravity centre).
    v1: (d0, d1, d2) = (l, w, h), yaw as ours. v0: (d0, d1, d2) = (w, l, h), yaw = -yaw_v0 - pi/2.
    Velocity is the same in both. numpy input gives float64 numpy, a tensor gives a tensor of its dtype.
    """
    if convention not in ("mmdet3d-v1", "mmdet3d-v0"):
        raise ValueError(f"convention must be 'mmdet3d-v1' or 'mmdet3d-v0', got {convention!r}")
    if z_origin not in ("bottom", "center"):
        raise ValueError(f"z_origin must be 'bottom' or 'center', got {z_origin!r}")
    is_tensor = isinstance(boxes, torch.Tensor)
    b = boxes.clone() if is_tensor else np.array(boxes, dtype=np.float64, copy=True)
    if b.ndim != 2 or b.shape[1] not in (7, 9):
        raise ValueError(f"boxes must have shape (N, 7) or (N, 9), got {tuple(b.shape)}")
    out = b.clone() if is_tensor else b.copy()
    if convention == "mmdet3d-v0":
        out[:, 3], out[:, 4] = b[:, 4], b[:, 3]
        yaw = -b[:, 6] - math.pi / 2
    else:
        yaw = b[:, 6]
    if z_origin == "bottom":
        out[:, 2] = b[:, 2] + out[:, 5] / 2
    wrapped = (torch.remainder if is_tensor else np.mod)(yaw + math.pi, 2 * math.pi) - math.pi
    out[:, 6] = torch.where(wrapped == -math.pi, math.pi, wrapped) if is_tensor else \
        np.where(wrapped == -math.pi, math.pi, wrapped)
    return out
