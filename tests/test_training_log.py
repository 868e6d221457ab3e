"""TrainingLog: metrics.jsonl records, epoch means, and a loss curve that survives a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tigbev.utils.training_log import TrainingLog


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steps_every_n_and_the_last_epoch_means(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with TrainingLog(path, every=2) as log:
        for step in (1, 2, 3):
            log.step(step, 0, {"total": float(step), "det": 10.0 * step}, last=step == 3, lr=0.1)
        log.end_epoch(0, 3)
        log.end_epoch(1, 3)  # an epoch without steps writes nothing
    recs = _records(path)
    assert [(r["kind"], r["step"]) for r in recs] == [("step", 2), ("step", 3), ("epoch", 3)]
    assert recs[0] == {"kind": "step", "step": 2, "epoch": 0, "total": 2.0, "det": 20.0, "lr": 0.1}
    assert recs[2]["total"] == pytest.approx(2.0) and recs[2]["det"] == pytest.approx(20.0)  # means of 1, 2, 3
    assert log.steps == [2, 3] and log.history == {"total": [2.0, 3.0], "det": [20.0, 30.0]}


def test_unweighted_losses_are_logged_beside_the_weighted_ones_and_kept_off_the_curve(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with TrainingLog(path, every=1) as log:
        log.step(1, 0, {"total": 13.0, "depth": 3.0}, unweighted={"depth": 1.0})
        log.step(2, 0, {"total": 16.0, "depth": 6.0}, unweighted={"depth": 2.0})
        log.end_epoch(0, 2)
    recs = _records(path)
    assert recs[0]["unweighted"] == {"depth": 1.0} and recs[1]["depth"] == 6.0
    assert recs[2]["unweighted"] == {"depth": pytest.approx(1.5)} and recs[2]["depth"] == pytest.approx(4.5)
    assert set(log.history) == {"total", "depth"}
    with TrainingLog(path, every=1, resume_step=2) as resumed:  # a resumed log reads them back off the curve too
        assert set(resumed.history) == {"total", "depth"} and resumed.history["depth"] == [3.0, 6.0]


def test_a_resumed_log_keeps_the_earlier_curve(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with TrainingLog(path, every=1) as log:
        log.step(1, 0, {"total": 4.0}, lr=0.1, step_s=0.5)
        log.end_epoch(0, 1)
    with TrainingLog(path, every=1, resume_step=1) as resumed:
        assert resumed.steps == [1] and resumed.history == {"total": [4.0]}  # lr / step_s are not losses
        resumed.step(2, 1, {"total": 3.0})
    assert resumed.steps == [1, 2] and resumed.history["total"] == [4.0, 3.0]
    assert len(_records(path)) == 3  # appended, nothing lost
    png = resumed.plot(tmp_path / "curve.png", "test")
    assert png is not None and png.stat().st_size > 0
    with TrainingLog(path, every=1):  # a fresh run (not resumed) starts the file anew
        pass
    assert _records(path) == []


def test_a_run_killed_mid_epoch_logs_no_step_twice(tmp_path: Path) -> None:
    """Checkpoint at step 2; the killed run logged steps 3-4 (and half a line) before dying; the resumed run
    redoes steps 3-4: each step is in the file once, in order."""
    path = tmp_path / "metrics.jsonl"
    with TrainingLog(path, every=1) as log:
        for step in (1, 2):
            log.step(step, 0, {"total": float(step)})
        log.end_epoch(0, 2)
        for step in (3, 4):
            log.step(step, 1, {"total": 10.0 + step})
    with path.open("a") as f:
        f.write('{"kind": "step", "st')
    with TrainingLog(path, every=1, resume_step=2) as resumed:
        for step in (3, 4):
            resumed.step(step, 1, {"total": float(step)})
        resumed.end_epoch(1, 4)
    steps = [r["step"] for r in _records(path) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]
    assert resumed.history["total"] == [1.0, 2.0, 3.0, 4.0]


def test_disabled_log_writes_nothing_and_bad_input_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with TrainingLog(path, every=1, enabled=False) as log:
        log.step(1, 0, {"total": 1.0}, last=True)
        log.end_epoch(0, 1)
    assert not path.exists() and log.plot(tmp_path / "c.png", "t") is None
    path.write_text('{"kind": "st\n{"kind": "step", "step": 1, "total": 1.0}\n')  # damaged, not cut short
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON line"):
        TrainingLog(path, every=1, resume_step=5)
    with pytest.raises(ValueError, match="every"):
        TrainingLog(tmp_path / "x.jsonl", every=0)
    with pytest.raises(RuntimeError, match="with"):
        TrainingLog(tmp_path / "y.jsonl", every=1).step(1, 0, {"total": 1.0})
