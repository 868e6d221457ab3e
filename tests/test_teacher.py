"""The LiDAR teacher: presets, forward passes, the frozen wrapper, training stage, checkpoints, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.config import TrainTeacherConfig
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.errors import TigbevError
from tigbev.models.spconv_compat import ConvAlgo, spconv
from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
from tigbev.models.teacher.checkpoint import CheckpointError, load_checkpoint, load_teacher, save_checkpoint
from tigbev.models.teacher.frozen import FrozenTeacher
from tigbev.stages import train_teacher


def _points(reader: NuScenesReader, split: str) -> torch.Tensor:
    frame = reader.load_sample(reader.sample_tokens(split)[0])
    return torch.from_numpy(frame.lidar.points)


def test_presets_describe_the_published_and_demo_maps() -> None:
    nus = teacher_preset("nuscenes")
    assert nus.bev_grid.shape_hw == (128, 128) and nus.bev_grid.cell_m == pytest.approx(0.8)
    assert nus.bev_channels == 512 and nus.num_sweeps == 10
    demo = teacher_preset("demo")
    assert demo.bev_grid.shape_hw == (64, 64) and demo.bev_channels == 256
    with pytest.raises(ValueError, match="preset"):
        teacher_preset("huge")
    assert type(nus).from_dict(json.loads(json.dumps(nus.to_dict()))) == nus


def test_nuscenes_forward_on_real_slice(real_reader: NuScenesReader) -> None:
    torch.manual_seed(0)
    model = CenterPoint(teacher_preset("nuscenes")).to("cpu").eval()
    convs = [m for m in model.modules() if isinstance(m, spconv.conv.SparseConvolution)]
    assert convs and all(m.algo == ConvAlgo.Native for m in convs)
    with torch.inference_mode():
        out = model([_points(real_reader, "mini_train")])
    assert out.bev_features.shape == (1, 512, 128, 128)
    assert len(out.preds) == 6 and out.preds[1]["heatmap"].shape == (1, 2, 128, 128)
    assert torch.isfinite(out.bev_features).all() and out.bev_features.abs().sum() > 0


def test_frozen_teacher_batchnorm_never_moves(synth_reader: NuScenesReader) -> None:
    torch.manual_seed(0)
    teacher = FrozenTeacher(CenterPoint(teacher_preset("demo")).to("cpu"))
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.BatchNorm1d(3)})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    parent.train()  # what every training loop does each epoch
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent["student"].training
    pts = _points(synth_reader, "synth_train")
    out = teacher([pts])
    teacher([pts * 1.5])
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in teacher.parameters())
    assert out.bev_features.is_inference()
    target = teacher.features_for_loss([pts])
    w = torch.ones(1, requires_grad=True)
    ((target * w) ** 2).mean().backward()  # usable as a loss target
    assert w.grad is not None


def test_train_resume_checkpoint_and_eval(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    cfg = TrainTeacherConfig(preset="demo", dataroot=synth_root, split="synth_train", out_dir=out, epochs=2,
                             batch_size=2, workers=0, max_steps=2, val_split="synth_val")
    result = train_teacher.run(cfg, progress=False)
    assert result.steps == 2 and result.metrics is not None and 0.0 <= result.metrics["mAP"] <= 1.0
    for name in ("config.json", "last.pt", "metrics.jsonl", "loss_curve.png", "eval/metrics.json",
                 "eval/results_nusc.json"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["train_config"]["preset"] == "demo"
    assert "git_commit" in ckpt["provenance"] and "torch" in ckpt["provenance"]["versions"]
    model, model_cfg, _ = load_teacher(out / "last.pt")
    assert model_cfg == teacher_preset("demo") and not model.training
    # A non-empty run directory is refused unless resuming; resuming continues the step count.
    with pytest.raises(TigbevError, match="resume"):
        train_teacher.run(cfg, progress=False)
    resumed = train_teacher.run(TrainTeacherConfig(**{**cfg.to_dict(), "max_steps": 3, "resume": True,
                                                      "val_split": None}), progress=False)
    assert resumed.steps == 3


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a tigbev teacher checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt is not a torch checkpoint or is damaged"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "ok.pt", {"model": {}, "teacher_config": teacher_preset("demo").to_dict()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_teacher(tmp_path / "ok.pt")


def test_cli_train_teacher(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-teacher"
    result = CliRunner().invoke(app, ["train-teacher", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                      "synth_train", "--out", str(out), "--max-steps", "1", "--batch-size", "1",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 steps" in result.output and (out / "last.pt").is_file()
    bad = CliRunner().invoke(app, ["train-teacher", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                   "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_map_only_forward_equals_the_full_forwards_map(synth_reader: NuScenesReader) -> None:
    """Extraction and the online teacher skip the CenterHead: the distilled map must be exactly the full forward's."""
    torch.manual_seed(1)
    teacher = FrozenTeacher(CenterPoint(teacher_preset("demo")).to("cpu"))
    pts = _points(synth_reader, "synth_train")
    full = teacher([pts, pts[::2]]).bev_features
    only = teacher.bev_map([pts, pts[::2]])
    assert only.shape == full.shape and float(full.abs().max()) > 0
    assert torch.equal(only, full)
