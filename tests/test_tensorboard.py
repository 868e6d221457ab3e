"""``--tensorboard``: the scalars of metrics.jsonl in TensorBoard event files (read back with TensorBoard's own
reader), a resume that logs no step twice, and the final metrics with a BEV picture of the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.utils.training_log import TrainingLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(folder: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_the_tensorboard_scalars_are_the_jsonl_ones_and_a_resume_logs_no_step_twice(tmp_path: Path) -> None:
    path, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    with TrainingLog(path, every=1, tensorboard=tb) as log:
        for step in (1, 2, 3):
            log.step(step, 0, {"total": 10.0 - step, "heatmap": 5.0 - step}, unweighted={"heatmap": 1.0 * step},
                     lr=0.1, step_s=0.2)
        log.end_epoch(0, 3)
    # Resumed from a checkpoint at step 2: step 3 is logged again, with another value.
    with TrainingLog(path, every=1, resume_step=2, tensorboard=tb) as log:
        log.step(3, 1, {"total": 0.5, "heatmap": 0.25}, lr=0.05, step_s=0.2)
    acc = _events(tb)
    assert _scalars(acc, "loss/total") == {1: 9.0, 2: 8.0, 3: 0.5}
    assert _scalars(acc, "unweighted/heatmap") == {1: 1.0, 2: 2.0}
    assert _scalars(acc, "lr")[3] == pytest.approx(0.05)
    assert _scalars(acc, "epoch/total") == {}  # the epoch record after step 2 was purged with it
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["kind"], r["step"], r["total"]) for r in lines] == [("step", 1, 9.0), ("step", 2, 8.0),
                                                                  ("step", 3, 0.5)]


def test_train_student_and_teacher_log_to_tensorboard_with_the_bev_picture(synth_root: Path, synth_cache: str,
                                                                           tmp_path: Path) -> None:
    student = tmp_path / "student"
    res = CliRunner().invoke(app, ["train-student", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                   "synth_train", "--cache", synth_cache, "--out", str(student), "--val-split",
                                   "synth_val", "--max-steps", "2", "--epochs", "1", "--workers", "0", "--device",
                                   "cpu", "--tensorboard"])
    assert res.exit_code == 0, res.output
    acc = _events(student / "tensorboard")
    jsonl = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in reversed(jsonl) if r["kind"] == "step")
    for name in ("total", "inter_keypoint", "inter_channel", "inner_depth", "heatmap"):
        assert _scalars(acc, f"loss/{name}")[last["step"]] == pytest.approx(last[name], rel=1e-6), name
    metrics = json.loads((student / "eval" / "metrics.json").read_text())
    assert _scalars(acc, "eval/NDS")[2] == pytest.approx(metrics["NDS"])
    (image,) = [t for t in acc.Tags()["images"] if t.startswith("eval/bev_")]
    assert acc.Images(image)[0].width > 100

    teacher = tmp_path / "teacher"
    res = CliRunner().invoke(app, ["train-teacher", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                   "synth_train", "--out", str(teacher), "--val-split", "synth_val", "--max-steps",
                                   "2", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--tensorboard"])
    assert res.exit_code == 0, res.output
    acc = _events(teacher / "tensorboard")
    assert set(_scalars(acc, "loss/total")) == {r["step"] for r in map(json.loads, (
        teacher / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"}
    assert "eval/mAP" in acc.Tags()["scalars"] and any(t.startswith("eval/bev_") for t in acc.Tags()["images"])
