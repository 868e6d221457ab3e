"""``tigbev ablate``: the component table from scratch, with a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.config import LossWeights
from tigbev.pipeline.ablate import ABLATION_ROWS, AblateConfig


def test_rows_add_one_component_at_a_time() -> None:
    names = ("depth", "inner_depth", "inter_channel", "inter_keypoint", "self_assessment")
    chain = [r for r in ABLATION_ROWS if r.source != "online"]
    for prev, row, added in zip(chain, chain[1:], names):
        changed = {k for k, v in vars(row.weights).items() if v != getattr(prev.weights, k)}
        assert changed == {added}, (row.key, changed)
    assert chain[0].weights == LossWeights(depth=0.0, inner_depth=0.0, inter_keypoint=0.0, inter_channel=0.0)
    online = next(r for r in ABLATION_ROWS if r.source == "online")
    assert online.weights == LossWeights()  # full TiG-BEV, the published weights
    with pytest.raises(ValueError, match="unknown"):
        AblateConfig(out_dir=Path("x"), rows=("nope",))


def test_tiny_ablation_from_scratch(tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    args = ["ablate", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0,1",
            "--rows", "baseline,self_assessment,online"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ablation.json").read_text())
    assert [r["key"] for r in table["rows"]] == ["baseline", "self_assessment", "online"]
    for r in table["rows"]:
        assert set(r["per_seed"]) == {"0", "1"}
        for k in ("mAP", "NDS", "mATE", "mAOE"):
            values = [s[k] for s in r["per_seed"].values()]
            assert r["mean"][k] == pytest.approx(sum(values) / 2)
            assert r["half_range"][k] == pytest.approx((max(values) - min(values)) / 2)
    # The self-assessment row really trained with its losses; the baseline had none.
    sa_log = (out / "student-ablate-self_assessment-s0" / "metrics.jsonl").read_text()
    assert "self_assessment_seq" in sa_log and "self_assessment_anchor" in sa_log
    assert "inter_keypoint" not in (out / "student-ablate-baseline-s0" / "metrics.jsonl").read_text()
    online_cfg = json.loads((out / "student-ablate-online-s1" / "config.json").read_text())["train"]
    assert online_cfg["teacher"] == "online" and online_cfg["seed"] == 1
    md = (out / "ablation.md").read_text()
    assert "+ self-assessment" in md and "±" in md
    assert (out / "ablation.png").stat().st_size > 0
    assert "TiG-BEV" in result.output
