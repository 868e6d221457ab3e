"""``tigbev bench`` in its tiny configuration: every section runs and writes sane numbers, the table and the plot.

Timings are never asserted (they live in the bench output only); the checks are on structure and sanity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.bench import GOALS, MODES, STORAGE_OPTIONS, BenchConfig
from tigbev.bench.config import storage_name
from tigbev.cli import app


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_bench_writes_json_table_and_plot(synth_root: Path, demo_teacher_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "--preset", "demo", "--tiny", "--out", str(out), "--dataroot",
                                   str(synth_root), "--teacher-checkpoint", str(demo_teacher_ckpt), "--device", "cpu",
                                   "--frames", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "bench.json").read_text())
    assert {"step", "loader", "extraction", "storage", "growth", "goals", "peak_memory_method", "teacher"} <= set(report)
    assert report["teacher"]["random_weights"] is False  # a checkpoint was given

    assert set(report["step"]) == {*MODES, "cache_2f"}  # --frames 2: the temporal student timed beside the rest
    for mode, s in report["step"].items():
        assert _positive(s["median_step_s"]) and _positive(s["ratio_to_none"]), mode
        assert _positive(s["peak_memory_bytes"]) and s["peak_memory_bytes"] >= s["setup_peak_bytes"], mode
    assert report["step"]["none"]["ratio_to_none"] == 1.0
    assert report["step"]["none"]["median_targets_s"] < report["step"]["online"]["median_targets_s"]
    assert "2 key frames" in (out / "bench.md").read_text()

    ld = report["loader"]
    assert _positive(ld["cache_read_s_per_sample"]) and _positive(ld["memmap_read_s_per_sample"])
    assert _positive(ld["bytes_per_sample_raw"]) and 0 <= ld["wait_fraction"] < 1
    assert set(ld["workers"]) == {"1", "2"} and all(_positive(v["cache_samples_per_s"]) for v in ld["workers"].values())

    ex = report["extraction"]
    for key in ("forward_only_samples_per_s", "teacher_compute_samples_per_s", "map_forward_only_samples_per_s",
                "map_compute_samples_per_s", "extraction_samples_per_s", "extraction_over_forward",
                "extraction_over_map_forward"):
        assert _positive(ex[key]), key

    assert set(report["storage"]) == {storage_name(*o) for o in STORAGE_OPTIONS}
    for name, s in report["storage"].items():
        assert _positive(s["bytes_per_sample_total"]) and _positive(s["compression_ratio"]), name
        assert all(v >= 0 for v in s["bytes_per_sample"].values()) and s["bytes_per_sample"]["depth"] > 0
        fid = s["fidelity"]
        assert fid["samples"] >= 1 and math.isfinite(fid["max_loss_rel_error"]) and fid["max_loss_rel_error"] >= 0
    # float16 cells are the teacher's values rounded once; int8 is coarser still, but both stay close.
    assert report["storage"]["foreground-float16"]["fidelity"]["max_loss_rel_error"] < 0.01
    # Dense records hold the whole map (no cells); foreground ones its cells; neither stores keypoints.
    dense, fg = report["storage"]["dense-float16"]["bytes_per_sample"], report["storage"]["foreground-int8"][
        "bytes_per_sample"]
    assert "cells" not in dense and fg["cells"] > 0 and dense["features"] > fg["features"]
    assert "keypoints" not in dense and "keypoints" not in fg

    # Under BDA: every mode against the online teacher on the same augmented samples; draws are exact (rounding
    # only), flips exact under flips alone; each mode's bytes beside the canonical cache's.
    bda = report["bda"]
    assert set(bda["fidelity"]) == {"rotation", "scale", "flips", "full"}
    for kind, row in bda["fidelity"].items():
        assert set(row) == {"canonical", "flips", "draws"}, kind
        for mode, f in row.items():
            assert f["boxes"] > 0 and 0 <= f["inter_keypoint_target_rel_error"] < 2, (kind, mode)
            assert -1 <= f["keypoint_cosine"] <= 1 + 1e-6, (kind, mode)
        # (The inter-channel target's rows of near-zero channels amplify the float16 rounding: not asserted.)
        assert row["draws"]["keypoint_cosine"] > 0.999 and row["draws"]["inter_keypoint_target_rel_error"] < 1e-3
    flips = bda["fidelity"]["flips"]
    assert flips["flips"]["keypoint_cosine"] > 0.999 and flips["flips"]["inter_keypoint_target_rel_error"] < 1e-3
    assert bda["sizes"]["canonical"]["over_canonical"] == 1.0 and bda["sizes"]["flips"]["maps"] == 4
    assert bda["sizes"]["flips"]["over_canonical"] > 2 and bda["sizes"]["draws"]["maps"] == 2

    g = report["growth"]
    assert g["factors"] == [1, 2] and g["samples"] == [1, 2]
    assert all(_positive(v) for v in g["extraction_s"] + g["training_s"])
    assert [t["steps"] for t in g["training"]] == g["samples"]
    assert set(g["camera_loader_samples_per_s"]) == {"1", "2"}

    assert set(report["goals"]) == set(GOALS)
    for goal in report["goals"].values():
        assert isinstance(goal["holds"], bool) and goal["value"] is not None

    table = (out / "bench.md").read_text()
    for header in ("| training step |", "| loader |", "| extraction (", "| storage |", "| BDA |", "| growth |",
                   "| goal |"):
        assert header in table
    assert "TiG-BEV from the cache" in table and "foreground-int8" in table
    assert (out / "bench.png").stat().st_size > 0


def test_bench_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nuscenes preset needs --dataroot"):
        BenchConfig(preset="nuscenes", out_dir=tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(preset="demo", out_dir=tmp_path, repeats=0)
    res = CliRunner().invoke(app, ["bench", "--preset", "nuscenes", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs --dataroot" in res.output
