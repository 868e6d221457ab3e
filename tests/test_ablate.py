"""``tigbev ablate``: the component table from scratch, with a tiny configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.config import LossWeights
from tigbev.pipeline.ablate import ABLATION_ROWS, AblateConfig, ablation_table, headline_deltas


def test_rows_add_one_component_at_a_time() -> None:
    names = ("depth", "inner_depth", "inter_channel", "inter_keypoint", "self_assessment")
    chain = [r for r in ABLATION_ROWS if r.in_chain]
    for prev, row, added in zip(chain, chain[1:], names):
        changed = {k for k, v in vars(row.weights).items() if v != getattr(prev.weights, k)}
        assert changed == {added}, (row.key, changed)
    assert chain[0].weights == LossWeights(depth=0.0, inner_depth=0.0, inter_keypoint=0.0, inter_channel=0.0)
    online = next(r for r in ABLATION_ROWS if r.source == "online")
    assert online.weights == LossWeights()  # full TiG-BEV, the published weights
    side = {r.key: r for r in ABLATION_ROWS if not r.in_chain}
    assert set(side) == {"online", "keypoint_only", "tig_flips", "tig_flips_int8", "tig_draws", "tig_equal_compute"}
    # The equal-compute row: the canonical cache's TiG-BEV at 1.5x the table's steps.
    equal = side["tig_equal_compute"]
    assert equal.weights == LossWeights() and equal.cache.variants == "canonical"
    assert equal.epochs(2) == 3 and equal.epochs(3) == 4.5
    for key in ("tig_flips", "tig_flips_int8", "tig_draws"):  # the full method, from another cache mode
        assert side[key].weights == LossWeights() and side[key].source == "cache" and side[key].cache.variants != \
            "canonical"
    # Cache modes differ only under BDA: the plain table leaves them out, the augmented one compares them.
    assert "tig_flips" not in AblateConfig(out_dir=Path("x")).rows
    assert AblateConfig(out_dir=Path("x"), augment=True).rows == ("online", "inter_keypoint", "tig_draws", "depth",
                                                                  "tig_flips", "tig_flips_int8")
    assert AblateConfig(out_dir=Path("x"), preset="study").seeds == (0, 1, 2, 3, 4)
    assert AblateConfig(out_dir=Path("x")).seeds == (0, 1)
    alone = side["keypoint_only"].weights  # the full set less inner-depth and inter-channel
    assert (alone.inner_depth, alone.inter_channel) == (0.0, 0.0)
    assert dataclasses.replace(alone, inner_depth=1.0, inter_channel=10.0) == LossWeights()
    with pytest.raises(ValueError, match="unknown"):
        AblateConfig(out_dir=Path("x"), rows=("nope",))


def _row(key: str, per_seed: dict[str, tuple[float, float]]) -> dict:
    seeds = {s: {"mAP": m, "NDS": n, "mATE": 1.0, "mAOE": 1.0, "step_s": 0.5} for s, (m, n) in per_seed.items()}
    mean = {k: sum(v[k] for v in seeds.values()) / len(seeds) for k in ("mAP", "NDS", "mATE", "mAOE", "step_s")}
    return {"key": key, "label": key, "mean": mean, "half_range": {k: 0.0 for k in mean}, "per_seed": seeds,
            "published": ""}


def test_headline_deltas_pair_seeds_and_skip_missing_rows() -> None:
    result = {"seeds": [0, 1], "student_epochs": 6, "rows": [
        _row("baseline", {"0": (0.10, 0.20), "1": (0.30, 0.20)}),
        _row("depth", {"0": (0.12, 0.25), "1": (0.20, 0.25)}),
        _row("inter_keypoint", {"0": (0.15, 0.30), "1": (0.21, 0.40)}),
    ]}
    heads = {(h["row"], h["reference"]): h for h in headline_deltas(result)}
    assert set(heads) == {("inter_keypoint", "depth"), ("inter_keypoint", "baseline"), ("depth", "baseline")}
    over_depth = heads[("inter_keypoint", "depth")]
    # Paired: seed 0 +3 points, seed 1 +1 point (not the difference of the seed means).
    assert over_depth["mAP"]["per_seed_points"] == pytest.approx({"0": 3.0, "1": 1.0})
    assert over_depth["mAP"]["mean_points"] == pytest.approx(2.0)
    # Two seeds: sd sqrt(2), standard error 1, t(0.975, 1 dof) = 12.706.
    assert over_depth["mAP"]["ci95_half_points"] == pytest.approx(12.706, abs=1e-3)
    assert over_depth["mAP"]["verdict"] == "inside the noise" and over_depth["mAP"]["signs"] == "2 of 2 up"
    assert over_depth["NDS"]["mean_points"] == pytest.approx(10.0)  # +5 and +15: standard error 5
    assert over_depth["NDS"]["ci95_half_points"] == pytest.approx(5 * 12.706, abs=1e-2)
    assert over_depth["published_points"] == {"mAP": 2.4, "NDS": 2.3}
    assert heads[("inter_keypoint", "baseline")]["mAP"]["mean_points"] == pytest.approx(-2.0)
    md = ablation_table(result)
    assert ("| 2 | +2.0 ± 12.7 | +10.0 ± 63.5 | +2.4 / +2.3 | inside the noise / inside the noise | "
            "2 of 2 up / 2 of 2 up |") in md
    assert "95 %" in md and "every seed" not in md
    one_seed = {**result, "rows": [_row("depth", {"0": (0.1, 0.1)}), _row("inter_keypoint", {"1": (0.2, 0.2)})]}
    assert headline_deltas(one_seed) == []  # no seed in common: nothing to pair


def test_a_comparison_resolves_only_where_its_interval_excludes_zero() -> None:
    five = {str(s): (0.10 + 0.01 * s, 0.30) for s in range(5)}
    shifted = {str(s): (m + d / 100, n + e / 100) for (s, (m, n)), d, e in
               zip(five.items(), (1, 2, 3, 4, 5), (0.1, 0.2, 5.0, -0.1, 0.3))}
    result = {"seeds": list(range(5)), "student_epochs": 2,
              "rows": [_row("depth", five), _row("inter_keypoint", shifted)]}
    (h,) = headline_deltas(result)
    # mAP: +1..+5 points: mean 3, sd 1.581, se 0.707, t(0.975, 4 dof) = 2.776 -> 3 ± 1.963: resolved.
    assert h["mAP"]["mean_points"] == pytest.approx(3.0)
    assert h["mAP"]["ci95_half_points"] == pytest.approx(1.963, abs=1e-3)
    assert h["mAP"]["ci95_points"] == pytest.approx([3.0 - 1.963, 3.0 + 1.963], abs=1e-3)
    assert h["mAP"]["verdict"] == "resolved up"
    # NDS: four of five seeds up, one large: the interval spans 0, so the sign count is not the reading.
    assert h["NDS"]["signs"] == "4 of 5 up" and h["NDS"]["verdict"] == "inside the noise"
    down = {**result, "rows": [_row("depth", shifted), _row("inter_keypoint", five)]}
    assert headline_deltas(down)[0]["mAP"]["verdict"] == "resolved down"


def test_tiny_ablation_from_scratch(tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    args = ["ablate", "--preset", "demo", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0,1",
            "--rows", "baseline,inter_keypoint,self_assessment,online"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ablation.json").read_text())
    assert [r["key"] for r in table["rows"]] == ["baseline", "inter_keypoint", "self_assessment", "online"]
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
    pairs = [(h["row"], h["reference"]) for h in table["headlines"]]
    assert pairs == [("inter_keypoint", "baseline"), ("online", "inter_keypoint"),
                     ("self_assessment", "inter_keypoint")]
    rows_by_key = {r["key"]: r for r in table["rows"]}
    for h in table["headlines"]:
        want = [100 * (rows_by_key[h["row"]]["per_seed"][s]["NDS"] - rows_by_key[h["reference"]]["per_seed"][s]["NDS"])
                for s in ("0", "1")]
        assert h["NDS"]["mean_points"] == pytest.approx(sum(want) / 2)
    md = (out / "ablation.md").read_text()
    assert "+ self-assessment" in md and "±" in md
    assert (out / "ablation.png").stat().st_size > 0
    assert "TiG-BEV" in result.output


def test_ablate_refuses_presets_other_than_the_synthetic_worlds(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ablate", "--preset", "nuscenes", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "synthetic worlds only" in result.output
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_tiny_study_world_pretrains_one_backbone_that_every_row_starts_from(tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["ablate", "--preset", "study", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0",
            "--rows", "depth,inter_keypoint"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    backbone = out / "pretrain" / "backbone.pth"
    assert backbone.is_file() and (out / "pretrain" / "eval.json").is_file()
    for key in ("depth", "inter_keypoint"):
        cfg = json.loads((out / f"student-ablate-{key}-s0" / "config.json").read_text())["train"]
        assert cfg["backbone_weights"] == str(backbone)
    table = json.loads((out / "ablation.json").read_text())
    assert table["preset"] == "study" and "pretrain-backbone" in table["stages"]
    stamp = backbone.stat().st_mtime_ns
    timing = out / "student-ablate-depth-s0" / "timing.json"
    trained = timing.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)  # every stage and row is reused
    assert again.exit_code == 0, again.output
    assert backbone.stat().st_mtime_ns == stamp and timing.stat().st_mtime_ns == trained
    # Another student budget is another table with its own students, never the one-epoch students reused.
    longer = CliRunner().invoke(app, [*args, "--student-epochs", "2"])
    assert longer.exit_code == 0, longer.output
    cfg = json.loads((out / "student-ablate-e2-depth-s0" / "config.json").read_text())["train"]
    assert cfg["epochs"] == 2 and json.loads((out / "ablation-e2.json").read_text())["student_epochs"] == 2
    # A finished student whose settings differ from the table's is refused by name, not reused.
    config = out / "student-ablate-depth-s0" / "config.json"
    saved = json.loads(config.read_text())
    saved["train"]["lr"] = 1e-4
    config.write_text(json.dumps(saved))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "student-ablate-depth-s0" in refused.output and "lr" in refused.output
    assert timing.stat().st_mtime_ns == trained


def test_a_study_table_refuses_students_of_another_world_by_name(tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["ablate", "--preset", "study", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0",
            "--rows", "depth"]
    assert CliRunner().invoke(app, args).exit_code == 0
    pin = json.loads((out / "world.json").read_text())
    from tigbev.utils.provenance import file_sha256

    assert pin["teacher_sha256"] == file_sha256(out / "teacher" / "last.pt")
    assert pin["backbone_sha256"] == file_sha256(out / "pretrain" / "backbone.pth") and pin["commit"]
    table = json.loads((out / "ablation.json").read_text())
    assert table["world"] == pin and table["student_commits"]
    # A student whose recorded world is another one (here: another teacher) is refused, naming the student.
    timing = out / "student-ablate-depth-s0" / "timing.json"
    record = json.loads(timing.read_text())
    timing.write_text(json.dumps({**record, "world": {**pin, "teacher_sha256": "0" * 64}}))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "student-ablate-depth-s0" in refused.output and "another world" in refused.output
    timing.write_text(json.dumps(record))
    # A world whose teacher was replaced after pinning is refused before any student is read.
    (out / "world.json").write_text(json.dumps({**pin, "teacher_sha256": "1" * 64}))
    replaced = CliRunner().invoke(app, args)
    assert replaced.exit_code == 2 and "world.json" in replaced.output and "teacher" in replaced.output


def test_tiny_bda_comparison_trains_every_row_augmented_from_its_own_cache(tmp_path: Path) -> None:
    out = tmp_path / "bda"
    args = ["ablate", "--preset", "demo", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0", "--augment",
            "--rows", "online,inter_keypoint,tig_flips,tig_draws,tig_equal_compute"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ablation-aug.json").read_text())
    equal = json.loads((out / "student-ablate-aug-tig_equal_compute-s0" / "config.json").read_text())["train"]
    online = json.loads((out / "student-ablate-aug-online-s0" / "config.json").read_text())["train"]
    assert equal["epochs"] == 1.5 * online["epochs"] and equal["cache"] == str(out / "cache-train")
    assert table["augment"] is True and not (out / "ablation.json").exists()
    assert [r["key"] for r in table["rows"]] == ["inter_keypoint", "online", "tig_flips", "tig_draws",
                                                 "tig_equal_compute"]
    caches = {"inter_keypoint": "cache-train", "tig_flips": "cache-train-flips", "tig_draws": "cache-train-draws4"}
    for key, cache in caches.items():
        cfg = json.loads((out / f"student-ablate-aug-{key}-s0" / "config.json").read_text())["train"]
        assert cfg["augment"] is True and cfg["cache"] == str(out / cache), key
    assert json.loads((out / "student-ablate-aug-online-s0" / "config.json").read_text())["train"]["augment"]
    from tigbev.cache.store import CacheReader

    assert CacheReader(str(out / "cache-train-flips")).manifest.variants.count == 4
    assert CacheReader(str(out / "cache-train-draws4")).manifest.variants.count == 5
    assert {"extract-teacher-flips", "extract-teacher-draws4"} <= set(table["stages"])
    pairs = {(h["row"], h["reference"]) for h in table["headlines"]}
    assert {("inter_keypoint", "online"), ("tig_flips", "online"), ("tig_draws", "online")} <= pairs
    assert "flip-variant cache over the online teacher" in (out / "ablation-aug.md").read_text()


def test_tiny_temporal_ablation_with_cbgs_keeps_its_own_students_and_table(tmp_path: Path) -> None:
    out = tmp_path / "temporal"
    args = ["ablate", "--preset", "demo", "--out", str(out), "--tiny", "--workers", "0", "--seeds", "0",
            "--rows", "depth,inter_keypoint", "--frames", "2", "--sampler", "cbgs"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ablation-f2-cbgs.json").read_text())
    assert table["frames"] == 2 and table["sampler"] == "cbgs" and not (out / "ablation.json").exists()
    for key in ("depth", "inter_keypoint"):
        run = json.loads((out / f"student-ablate-f2-cbgs-{key}-s0" / "config.json").read_text())
        assert run["train"]["frames"] == 2 and run["student"]["frames"] == 2
        assert run["sampling"]["sampler"] == "cbgs" and run["sampling"]["epoch_size"] > 0
    assert "2 key frames, CBGS" in (out / "ablation-f2-cbgs.md").read_text()
    # The single-frame table of the same world is another set of students: nothing above is reused by it.
    assert not (out / "student-ablate-depth-s0").exists()
