"""tigbev evaluate: GT-as-predictions against the devkit's own ground truth, and teacher/student checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.config import TrainStudentConfig
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.results import evaluate_detection, summarize_metrics
from tigbev.stages import evaluate, train_student


def test_gt_as_predictions_equals_the_devkit_scoring_its_own_ground_truth(real_slice_root: Path,
                                                                          tmp_path: Path) -> None:
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox

    ours = evaluate.run(evaluate.EvaluateConfig(checkpoint=None, dataroot=real_slice_root, split="real_slice",
                                                out_dir=tmp_path / "ours", gt_as_predictions=True),
                        progress=False).metrics
    # The devkit's own GT, filtered as its evaluation filters GT, fed back as predictions.
    reader = NuScenesReader(real_slice_root)
    nusc = reader.nusc
    gt = load_gt_of_sample_tokens(nusc, reader.sample_tokens("real_slice"), DetectionBox)
    gt = filter_eval_boxes(nusc, add_center_dist(nusc, gt), config_factory("detection_cvpr_2019").class_range)
    results = {t: [dict(b.serialize(), detection_score=1.0) for b in gt[t]] for t in gt.sample_tokens}
    for recs in results.values():
        for r in recs:
            r.pop("ego_translation"), r.pop("num_pts")
            r["velocity"] = [0.0 if v != v else v for v in r["velocity"]]  # NaN GT velocity -> 0, as ours
    path = tmp_path / "devkit.json"
    path.write_text(json.dumps({"meta": {"use_camera": False, "use_lidar": False, "use_radar": False,
                                         "use_map": False, "use_external": False}, "results": results}))
    direct = summarize_metrics(evaluate_detection(nusc, path, "real_slice", tmp_path / "direct"))
    for key in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert ours[key] == pytest.approx(direct[key], abs=1e-9), key
    assert ours["per_class_AP"] == pytest.approx(direct["per_class_AP"], abs=1e-9)
    assert ours["per_class_AP"]["car"] == pytest.approx(1.0)
    out = tmp_path / "ours"
    for name in ("metrics.json", "metrics.md", "results_nusc.json", "devkit/plots/summary.png",
                 "devkit/plots/car_pr.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("bev_*.png"))


def test_cli_gt_as_predictions_on_synth_is_perfect(synth_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--gt-as-predictions", "--dataroot", str(synth_root), "--split",
                                      "synth_val", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["mAP"] == pytest.approx(1.0, abs=1e-6) and m["NDS"] == pytest.approx(1.0, abs=1e-6)
    assert "| mAP | NDS |" in result.output


def test_evaluate_teacher_and_student_checkpoints(synth_root: Path, synth_cache: str, demo_teacher_ckpt: Path,
                                                  tmp_path: Path) -> None:
    t = evaluate.run(evaluate.EvaluateConfig(checkpoint=demo_teacher_ckpt, dataroot=synth_root, split="synth_val",
                                             out_dir=tmp_path / "t", bev_samples=1), progress=False)
    assert 0.0 <= t.metrics["mAP"] <= 1.0 and (tmp_path / "t" / "metrics.md").is_file()
    run = train_student.run(TrainStudentConfig(preset="demo", dataroot=synth_root, split="synth_train",
                                               out_dir=tmp_path / "s-run", cache=synth_cache, epochs=1, batch_size=2,
                                               workers=0, device="cpu", max_steps=1), progress=False)
    s = CliRunner().invoke(app, ["evaluate", str(run.checkpoint), "--dataroot", str(synth_root), "--split",
                                 "synth_val", "--out", str(tmp_path / "s")])
    assert s.exit_code == 0, s.output
    assert json.loads((tmp_path / "s" / "results_nusc.json").read_text())["meta"]["use_camera"] is True
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope.pt"), "--dataroot", str(synth_root)])
    assert bad.exit_code == 2 and "not found" in bad.output
