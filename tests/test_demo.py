"""tigbev demo end to end in a tiny configuration, and stage reuse on rerun."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tigbev.cli import app


def test_tiny_demo_end_to_end_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"teacher", "students", "stages", "wall_s"}
    assert set(summary["students"]) == {"baseline", "tig"}
    for s in summary["students"].values():
        assert 0.0 <= s["mAP"] <= 1.0 and s["step_s"] > 0
    assert list(summary["stages"]) == ["synth", "train-teacher", "extract-teacher", "pretrain-backbone",
                                       "train-student-baseline", "train-student-tig"]
    assert "TiG-BEV inter-keypoint distillation from the cache" in result.output
    weights = json.loads((out / "student-tig" / "config.json").read_text())["train"]["weights"]
    assert (weights["inter_keypoint"], weights["inner_depth"], weights["inter_channel"]) == (100.0, 0.0, 0.0)
    assert json.loads((out / "student-baseline" / "config.json").read_text())["train"]["weights"]["inter_keypoint"] == 0
    # The closing lines: what the table means, where the results are, and the next commands.
    assert "Distillation from the cache" in result.output and "tigbev train-student" in result.output
    assert f"--cache {out / 'cache-train'}" in result.output and "tigbev evaluate" in result.output
    for key in ("baseline", "tig"):
        cfg = json.loads((out / f"student-{key}" / "config.json").read_text())["train"]
        assert cfg["backbone_weights"] == str(out / "pretrain" / "backbone.pth")  # both from the shared stage
    # A rerun reuses every finished stage: same stage times, nothing retrained.
    mtime = (out / "teacher" / "last.pt").stat().st_mtime
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--tiny", "--workers", "0"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["stages"] == summary["stages"]
    assert (out / "teacher" / "last.pt").stat().st_mtime == mtime


def test_tiny_demo_is_deterministic_bit_for_bit(tmp_path: Path) -> None:
    """Two demos from scratch with the same seed give the same numbers and the same student weights."""
    import torch

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tiny", "--workers", "0"])
        assert result.exit_code == 0, result.output
        runs.append(out)
    a, b = (json.loads((out / "summary.json").read_text()) for out in runs)
    assert a["teacher"] == b["teacher"]
    for key in ("baseline", "tig"):
        assert {k: a["students"][key][k] for k in ("mAP", "NDS")} == {k: b["students"][key][k] for k in ("mAP", "NDS")}
        wa, wb = (torch.load(out / f"student-{key}" / "last.pt", weights_only=True)["model"] for out in runs)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), key
