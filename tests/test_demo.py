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
    assert list(summary["stages"]) == ["synth", "train-teacher", "extract-teacher", "train-student-baseline",
                                       "train-student-tig"]
    assert "TiG-BEV from the cache" in result.output
    # A rerun reuses every finished stage: same stage times, nothing retrained.
    mtime = (out / "teacher" / "last.pt").stat().st_mtime
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--tiny", "--workers", "0"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["stages"] == summary["stages"]
    assert (out / "teacher" / "last.pt").stat().st_mtime == mtime
