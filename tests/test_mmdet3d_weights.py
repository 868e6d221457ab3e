"""mmdetection3d CenterPoint checkpoints -> our CenterPoint: key list, sparse layout, strict errors, reading, boxes.

The fake checkpoint has the published key names and shapes (``mmdet3d_centerpoint_keys``, written from mmdetection3d's
construction code) with deterministic random values in mmdetection3d's layouts.
"""

from __future__ import annotations

import math
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tigbev.geometry.boxes import box_corners
from tigbev.models.spconv_compat import SparseConvTensor, set_conv_algo, spconv, to_dense
from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
from tigbev.models.teacher.checkpoint import CheckpointError, save_checkpoint
from tigbev.models.teacher.mmdet3d_weights import (
    MMDET3D_KEYS_WITHOUT_COUNTERPART,
    KeySpec,
    boxes_from_mmdet3d,
    convert_mmdet3d_state_dict,
    load_mmdet3d_centerpoint,
    mmdet3d_centerpoint_keys,
    mmdet3d_key_to_ours,
    read_mmdet3d_checkpoint,
    sparse_weight_from_mmcv,
)


def sparse_weight_to_mmcv(weight: torch.Tensor) -> torch.Tensor:
    """spconv 2.x ``[out, *kernel, in]`` -> mmcv ``[*kernel, in, out]``: the inverse of ``sparse_weight_from_mmcv``,
    to write checkpoints in mmcv's layout."""
    n = weight.dim()
    return weight.permute(*range(1, n), 0).contiguous()


def _fake_tensor(spec: KeySpec, gen: torch.Generator) -> torch.Tensor:
    """Deterministic values of a plausible scale, so a forward pass stays finite through ~40 layers."""
    name, shape = spec.theirs, spec.shape
    if name.endswith("num_batches_tracked"):
        return torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if name.endswith(("running_mean", "bias")):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) == 1:  # BatchNorm weight
        return torch.rand(shape, generator=gen) + 0.5
    if spec.sparse:  # mmcv layout [kD, kH, kW, in, out]: fan-in is everything but the last axis
        fan_in = math.prod(shape[:-1])
    elif ".deblocks." in name and shape[2] > 1:  # ConvTranspose2d weight (in, out, k, k)
        fan_in = shape[0]
    else:  # Conv2d weight (out, in, k, k)
        fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """The nuscenes forward takes ~1.5 s on one thread; on a 2-core machine shared with other jobs, two intra-op
    threads made it 5-8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def specs() -> list[KeySpec]:
    return mmdet3d_centerpoint_keys(teacher_preset("nuscenes"))


@pytest.fixture(scope="module")
def fake_state(specs: list[KeySpec]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {s.theirs: _fake_tensor(s, gen) for s in specs}


@pytest.fixture(scope="module")
def loaded(fake_state: dict[str, torch.Tensor]) -> CenterPoint:
    return load_mmdet3d_centerpoint(fake_state)


# ------------------------------------------------------------------------------------------------- key list
def test_key_list_matches_our_model_one_to_one(specs: list[KeySpec]) -> None:
    ours = CenterPoint(teacher_preset("nuscenes")).state_dict()
    assert len(specs) == len(ours) == 504
    assert {s.ours for s in specs} == set(ours)
    assert len({s.theirs for s in specs}) == len(specs)
    for s in specs:  # our parameter has their tensor's shape, sparse weights in spconv 2.x layout
        assert tuple(ours[s.ours].shape) == s.spconv2_shape, s.theirs
    assert Counter(s.theirs.split(".")[0] for s in specs) == {
        "pts_middle_encoder": 126, "pts_backbone": 72, "pts_neck": 12, "pts_bbox_head": 294}
    assert sum(s.sparse for s in specs) == 21 and not MMDET3D_KEYS_WITHOUT_COUNTERPART
    by_name = {s.theirs: s for s in specs}
    # A few names and shapes as in the published config (mmcv layout for sparse weights).
    for theirs, ours_key, shape in [
        ("pts_middle_encoder.conv_input.0.weight", "middle_encoder.conv_input.0.weight", (3, 3, 3, 5, 16)),
        ("pts_middle_encoder.encoder_layers.encoder_layer1.0.conv1.weight",
         "middle_encoder.encoder_layers.0.0.conv1.weight", (3, 3, 3, 16, 16)),
        ("pts_middle_encoder.encoder_layers.encoder_layer3.2.0.weight",
         "middle_encoder.encoder_layers.2.2.0.weight", (3, 3, 3, 64, 128)),
        ("pts_middle_encoder.encoder_layers.encoder_layer4.1.bn2.num_batches_tracked",
         "middle_encoder.encoder_layers.3.1.bn2.num_batches_tracked", ()),
        ("pts_middle_encoder.conv_out.0.weight", "middle_encoder.conv_out.0.weight", (3, 1, 1, 128, 128)),
        ("pts_backbone.blocks.0.0.weight", "backbone.blocks.0.0.weight", (128, 256, 3, 3)),
        ("pts_backbone.blocks.1.16.running_var", "backbone.blocks.1.16.running_var", (256,)),
        ("pts_neck.deblocks.0.0.weight", "neck.deblocks.0.0.weight", (256, 128, 1, 1)),
        ("pts_neck.deblocks.1.0.weight", "neck.deblocks.1.0.weight", (256, 256, 2, 2)),
        ("pts_bbox_head.shared_conv.conv.weight", "head.shared_conv.conv.weight", (64, 512, 3, 3)),
        ("pts_bbox_head.task_heads.0.reg.0.bn.running_mean", "head.task_heads.0.reg.0.bn.running_mean", (64,)),
        ("pts_bbox_head.task_heads.5.heatmap.1.bias", "head.task_heads.5.heatmap.1.bias", (2,)),
        ("pts_bbox_head.task_heads.2.dim.1.weight", "head.task_heads.2.dim.1.weight", (3, 64, 3, 3)),
    ]:
        assert by_name[theirs].ours == ours_key and by_name[theirs].shape == shape, theirs
    assert "pts_bbox_head.shared_conv.conv.bias" not in by_name  # ConvModule(bias="auto") before a BN
    assert mmdet3d_key_to_ours("module.pts_neck.deblocks.0.1.weight") == "neck.deblocks.0.1.weight"
    assert mmdet3d_key_to_ours("img_backbone.conv1.weight") is None


# ------------------------------------------------------------------------------------------------- layout
def test_sparse_permutation_moves_every_entry() -> None:
    kd, kh, kw, c_in, c_out = 2, 3, 4, 5, 6  # all different, so a wrong permutation cannot pass
    theirs = torch.empty(kd, kh, kw, c_in, c_out)
    for idx in np.ndindex(*theirs.shape):
        theirs[idx] = float(np.ravel_multi_index(idx, theirs.shape))
    ours = sparse_weight_from_mmcv(theirs)
    assert ours.shape == (c_out, kd, kh, kw, c_in)
    for a, b, c, i, o in np.ndindex(*theirs.shape):
        assert ours[o, a, b, c, i] == theirs[a, b, c, i, o]
    assert torch.equal(sparse_weight_to_mmcv(ours), theirs)


@pytest.mark.parametrize("subm", [True, False])
def test_converted_weight_computes_the_dense_convolution(subm: bool) -> None:
    """On a fully occupied grid a sparse conv is a dense conv: with weight[o, i, kd, kh, kw] = theirs[kd, kh, kw, i, o]
    (the meaning of mmcv's layout) our spconv 2.x layer reproduces F.conv3d."""
    gen = torch.Generator().manual_seed(3)
    c_in, c_out, shape = 3, 4, (5, 6, 7)
    theirs = torch.randn(3, 3, 3, c_in, c_out, generator=gen)
    dense_in = torch.randn(1, c_in, *shape, generator=gen)
    conv = (spconv.SubMConv3d(c_in, c_out, 3, padding=1, bias=False) if subm
            else spconv.SparseConv3d(c_in, c_out, 3, stride=2, padding=1, bias=False))
    set_conv_algo(conv, "cpu")
    with torch.no_grad():
        conv.weight.copy_(sparse_weight_from_mmcv(theirs))
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    feats = dense_in[0].permute(1, 2, 3, 0).reshape(-1, c_in)
    with torch.no_grad():
        out = to_dense(conv(SparseConvTensor(feats, coords, list(shape), 1)))
    want = F.conv3d(dense_in, theirs.permute(4, 3, 0, 1, 2), padding=1, stride=1 if subm else 2)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- loading
def test_every_tensor_set_from_its_source(specs: list[KeySpec], fake_state: dict[str, torch.Tensor],
                                          loaded: CenterPoint) -> None:
    ours = loaded.state_dict()
    seen = set()
    for s in specs:
        src = fake_state[s.theirs]
        want = src.permute(4, 0, 1, 2, 3) if s.sparse else src  # [kd,kh,kw,i,o] -> [o,kd,kh,kw,i]
        assert ours[s.ours].dtype == want.dtype and torch.equal(ours[s.ours], want), s.theirs
        seen.add(s.ours)
    assert seen == set(ours)
    assert not loaded.training


def test_forward_on_random_points(loaded: CenterPoint) -> None:
    gen = torch.Generator().manual_seed(5)
    n = 2000
    lo, hi = torch.tensor([-51.2, -51.2, -5.0]), torch.tensor([51.2, 51.2, 3.0])
    xyz = lo + (hi - lo) * torch.rand(n, 3, generator=gen)
    points = torch.cat([xyz, torch.rand(n, 1, generator=gen) * 255, torch.rand(n, 1, generator=gen) * 0.5], 1)
    with torch.inference_mode():
        out = loaded([points])
    assert out.bev_features.shape == (1, 512, 128, 128)
    assert torch.isfinite(out.bev_features).all() and out.bev_features.abs().sum() > 0
    assert len(out.preds) == 6 and out.preds[0]["heatmap"].shape == (1, 1, 128, 128)
    assert all(torch.isfinite(v).all() for p in out.preds for v in p.values())


def test_strict_errors_name_the_key(fake_state: dict[str, torch.Tensor]) -> None:
    def fails(state: dict[str, torch.Tensor], key: str, what: str) -> None:
        with pytest.raises(CheckpointError, match=re.escape(key)) as info:
            convert_mmdet3d_state_dict(state)
        assert what in str(info.value)

    missing = "pts_neck.deblocks.1.1.running_var"
    fails({k: v for k, v in fake_state.items() if k != missing}, missing, "1 missing")
    extra = "pts_bbox_head.task_heads.0.iou.1.weight"
    fails({**fake_state, extra: torch.zeros(1, 64, 3, 3)}, extra, "1 unexpected")
    fails({**fake_state, "img_backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, "img_backbone.conv1.weight",
          "unexpected")
    dense = "pts_backbone.blocks.0.3.weight"
    fails({**fake_state, dense: torch.zeros(128, 128, 1, 1)}, dense, "mis-shaped")
    sparse = "pts_middle_encoder.conv_input.0.weight"
    fails({**fake_state, sparse: torch.zeros(3, 3, 3, 4, 16)}, sparse, "mis-shaped")
    fails({**fake_state, "pts_bbox_head.shared_conv.bn.num_batches_tracked": 3},  # type: ignore[dict-item]
          "pts_bbox_head.shared_conv.bn.num_batches_tracked", "non-tensor")
    # One training run saves one sparse layout: a mix is refused, naming the odd ones out.
    odd = "pts_middle_encoder.conv_out.0.weight"
    with pytest.raises(CheckpointError, match=re.escape(odd)):
        convert_mmdet3d_state_dict({**fake_state, odd: sparse_weight_from_mmcv(fake_state[odd])})
    with pytest.raises(CheckpointError, match="mis-shaped"):  # a wrong explicit layout is a shape error
        convert_mmdet3d_state_dict(fake_state, sparse_layout="spconv2")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_mmdet3d_centerpoint({"meta": {}, "model": {}})


def test_spconv2_layout_checkpoint_gives_the_same_weights(specs: list[KeySpec],
                                                          fake_state: dict[str, torch.Tensor]) -> None:
    """mmdetection3d >= 1.0.0rc2 with spconv 2.x installed saves [out, kD, kH, kW, in]; auto-detected."""
    from_mmcv = convert_mmdet3d_state_dict(fake_state)
    spconv2_state = {k: (sparse_weight_from_mmcv(v) if s.sparse else v)
                     for (k, v), s in zip(fake_state.items(), specs, strict=True)}
    converted = convert_mmdet3d_state_dict({f"module.{k}": v for k, v in spconv2_state.items()})
    assert converted.keys() == from_mmcv.keys()
    assert all(torch.equal(converted[k], from_mmcv[k]) for k in from_mmcv)


def test_path_api_with_plain_meta(tmp_path: Path, fake_state: dict[str, torch.Tensor],
                                  loaded: CenterPoint) -> None:
    path = tmp_path / "centerpoint_01voxel.pth"
    meta = {"mmdet3d_version": "1.0.0rc0", "CLASSES": ["car", "truck"], "epoch": 20, "config": "model = dict()"}
    torch.save({"meta": meta, "state_dict": fake_state}, path)
    model = load_mmdet3d_centerpoint(path)
    want = loaded.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="not found"):
        load_mmdet3d_centerpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pth is not a torch checkpoint or is damaged"):
        load_mmdet3d_centerpoint(tmp_path / "junk.pth")
    save_checkpoint(tmp_path / "ours.pt", {"model": {}, "teacher_config": {}})
    with pytest.raises(CheckpointError, match="tigbev teacher checkpoint"):
        load_mmdet3d_centerpoint(tmp_path / "ours.pt")


# Pickled into a checkpoint's meta by the next test; the restricted reader must never call it.
TRIPWIRE_CALLS: list[str] = []


def _tripwire(tag: str) -> str:
    TRIPWIRE_CALLS.append(tag)
    return tag


class _MetaObject:
    """Stands for a foreign object in mmcv's meta (a ConfigDict, a hook's state): unpickling it runs ``_tripwire``."""

    def __reduce__(self) -> tuple:
        return (_tripwire, ("foreign code ran",))


class _MetaDict(dict):
    """A foreign dict subclass (like mmcv's ConfigDict)."""


def test_restricted_reader_extracts_tensors_and_runs_nothing(tmp_path: Path) -> None:
    state = {"pts_neck.deblocks.0.1.weight": torch.arange(4.0), "pts_neck.deblocks.0.1.num_batches_tracked":
             torch.tensor(7)}
    meta = {"best_score": np.float64(0.56), "palette": np.arange(3), "cfg": _MetaObject()}
    path = tmp_path / "with_foreign_meta.pth"
    torch.save({"meta": meta, "state_dict": state}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the plain weights-only read refuses this file
    obj = read_mmdet3d_checkpoint(path)
    assert TRIPWIRE_CALLS == []
    assert obj["state_dict"].keys() == state.keys()
    assert all(torch.equal(obj["state_dict"][k], v) for k, v in state.items())
    assert "dropped" in repr(obj["meta"]["cfg"])  # an inert stand-in, not the result of _tripwire
    # The legacy (non-zip) format learns the refused globals one at a time.
    torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_mmdet3d_checkpoint(path)["state_dict"]["pts_neck.deblocks.0.1.weight"], torch.arange(4.0))
    # A foreign dict subclass cannot be stood in for (items go to plain dicts only): refused, nothing run.
    torch.save({"meta": {"cfg": _MetaDict(a=_MetaObject())}, "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_mmdet3d_checkpoint(path)
    # A refused object inside the state dict itself is not a tensor: named and refused.
    torch.save({"state_dict": {**state, "pts_neck.deblocks.0.1.bias": _MetaObject()}}, path)
    with pytest.raises(CheckpointError, match=re.escape("pts_neck.deblocks.0.1.bias")):
        convert_mmdet3d_state_dict(read_mmdet3d_checkpoint(path)["state_dict"])
    assert TRIPWIRE_CALLS == []


# ------------------------------------------------------------------------------------------------- conventions
def test_v0_head_rewrite_predicts_our_convention(fake_state: dict[str, torch.Tensor]) -> None:
    v1 = convert_mmdet3d_state_dict(fake_state, box_convention="mmdet3d-v1")
    v0 = convert_mmdet3d_state_dict(fake_state, box_convention="mmdet3d-v0")
    changed = {k for k in v1 if not torch.equal(v1[k], v0[k])}
    assert changed == {f"head.task_heads.{t}.{b}.1.{p}" for t in range(6) for b in ("dim", "rot")
                       for p in ("weight", "bias")}
    x = torch.randn(1, 64, 6, 6, generator=torch.Generator().manual_seed(9))

    def branch(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return F.conv2d(x, sd[f"head.task_heads.3.{name}.1.weight"], sd[f"head.task_heads.3.{name}.1.bias"],
                        padding=1)

    theirs_dim, ours_dim = branch(v1, "dim"), branch(v0, "dim")  # v1 dict = their raw outputs
    torch.testing.assert_close(ours_dim, theirs_dim[:, [1, 0, 2]])  # log(w, l, h) -> log(l, w, h)
    theirs_rot, ours_rot = branch(v1, "rot"), branch(v0, "rot")
    yaw_v0 = torch.atan2(theirs_rot[:, 0], theirs_rot[:, 1])
    yaw = torch.atan2(ours_rot[:, 0], ours_rot[:, 1])
    diff = torch.remainder(yaw - (-yaw_v0 - math.pi / 2) + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < 1e-5


def test_boxes_from_mmdet3d() -> None:
    # v1: (l, w, h) and yaw as ours; bottom-face z -> centre.
    v1 = np.array([[10.0, -5.0, -1.8, 4.5, 1.9, 1.6, 0.3, 1.0, -2.0]])
    np.testing.assert_allclose(boxes_from_mmdet3d(v1), [[10.0, -5.0, -1.0, 4.5, 1.9, 1.6, 0.3, 1.0, -2.0]])
    np.testing.assert_allclose(boxes_from_mmdet3d(v1, z_origin="center")[0, 2], -1.8)
    # v0 documented headings: yaw -pi/2 -> +x, 0 -> -y, -pi -> +y; dims (w, l, h).
    v0 = np.array([[0.0, 0.0, 0.0, 1.9, 4.5, 1.6, a, 0.0, 0.0] for a in (-math.pi / 2, 0.0, -math.pi)])
    conv = boxes_from_mmdet3d(v0, convention="mmdet3d-v0")
    np.testing.assert_allclose(conv[:, 3:6], [[4.5, 1.9, 1.6]] * 3)
    np.testing.assert_allclose(conv[:, 6], [0.0, -math.pi / 2, math.pi / 2], atol=1e-12)
    # Same footprint as mmdetection3d 0.x draws it: local (x_size, y_size) rotated clockwise by yaw_v0.
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-20, 20, (8, 3)), rng.uniform(0.5, 5, (8, 3)),
                            rng.uniform(-4, 4, (8, 1))], 1)
    ours = boxes_from_mmdet3d(boxes, convention="mmdet3d-v0")
    for b, o in zip(boxes, ours, strict=True):
        c, s = math.cos(b[6]), math.sin(b[6])
        local = np.array([[sx * b[3] / 2, sy * b[4] / 2] for sx in (-1, 1) for sy in (-1, 1)])
        theirs_xy = np.stack([local[:, 0] * c + local[:, 1] * s, -local[:, 0] * s + local[:, 1] * c], 1) + b[:2]
        ours_xy = box_corners(o[None])[0, :4, :2]
        dist = np.linalg.norm(theirs_xy[:, None] - ours_xy[None], axis=-1).min(axis=1)
        assert dist.max() < 1e-9
    assert -math.pi < ours[:, 6].min() and ours[:, 6].max() <= math.pi
    t = boxes_from_mmdet3d(torch.tensor(v0, dtype=torch.float32), convention="mmdet3d-v0")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor(conv, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        boxes_from_mmdet3d(np.zeros((2, 8)))


def test_cli_import_teacher_writes_a_loadable_tigbev_checkpoint(tmp_path: Path, fake_state: dict[str, torch.Tensor],
                                                                loaded: CenterPoint) -> None:
    from typer.testing import CliRunner

    from tigbev.cli import app
    from tigbev.models.teacher.checkpoint import load_teacher

    src = tmp_path / "centerpoint.pth"
    torch.save({"meta": {"epoch": 20}, "state_dict": fake_state}, src)
    out = tmp_path / "teacher" / "last.pt"
    result = CliRunner().invoke(app, ["import-teacher", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, cfg, ckpt = load_teacher(out)
    assert cfg.bev_channels == 512 and ckpt["train_config"]["imported_from"] == str(src)
    want = loaded.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    again = CliRunner().invoke(app, ["import-teacher", str(src), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output
