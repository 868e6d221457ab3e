"""Evaluation outputs: file names that are safe whatever the dataset's tokens hold, pictures that never fail an
evaluation, and a metrics.json that records the checkpoint, dataset and code it came from (and guards its --out)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.data import results as devkit_results
from tigbev.config import LossWeights, TrainStudentConfig
from tigbev.data.nuscenes_reader import NuScenesReader, find_version
from tigbev.engine.scoring import bev_picture_name
from tigbev.stages import train_student
from tigbev.utils.names import safe_name, shown
from tigbev.utils.provenance import git_commit

# Tokens a dataset could hold: each one once broke a file name built from its first characters.
HOSTILE_TOKENS = ["../../escape", "/tmp/x", "dir/name", "new\nline", "nul\x00byte", "t" * 5000]
SAFE = re.compile(r"[A-Za-z0-9_-]+")


@pytest.fixture(autouse=True)
def _no_devkit_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The devkit's precision-recall plots (most of an evaluation's time here) are not what these tests check."""
    monkeypatch.setattr(devkit_results, "_render_curves", lambda *args, **kwargs: None)


# ------------------------------------------------------------------------------------------------ safe names
@pytest.mark.parametrize("token", [*HOSTILE_TOKENS, "../", "", ".", "..", "a" * 32, "é\u202e\ud800"])
def test_a_safe_name_is_one_short_path_component(token: str) -> None:
    name = safe_name(token)
    assert SAFE.fullmatch(name), name
    assert "/" not in name and "\x00" not in name and name not in (".", "..")
    assert len(name) <= 8 + 1 + 12
    assert Path(name).name == name and not Path(name).is_absolute()
    assert safe_name(token) == name  # the same string, the same name
    picture = bev_picture_name(token)
    assert picture == f"bev_{name}.png" and Path(picture).name == picture


def test_distinct_strings_get_distinct_names_even_with_one_prefix() -> None:
    tokens = [*HOSTILE_TOKENS, "../", "..", "/", "//", "\n", "\x00", "_", "t" * 4999, "t" * 5001,
              "abcdefgh1", "abcdefgh2", "abcdefgh"]
    names = [safe_name(t) for t in tokens]
    assert len(set(names)) == len(tokens)
    assert safe_name("abcdefgh1").startswith("abcdefgh-")  # the prefix keeps a nuScenes token recognisable


def test_a_shown_string_is_one_bounded_line() -> None:
    assert shown("new\nline") == repr("new\nline")
    long = shown("t" * 5000)
    assert "\n" not in shown("a\nb\x00c") and len(long) < 80 and "5000 characters" in long


# ------------------------------------------------------------------------------------------------ hostile dataroot
@pytest.fixture(scope="module")
def hostile_root(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataroot with its six sample tokens replaced by HOSTILE_TOKENS in every table that names a
    sample (sample, scene, sample_data, sample_annotation), and a split ``hostile`` of both scenes. Sensor files
    are links to the synthetic ones (read only)."""
    root = tmp_path_factory.mktemp("hostile") / "dataroot"
    root.mkdir()
    version = find_version(synth_root)
    for entry in synth_root.iterdir():
        if entry.name != version:
            (root / entry.name).symlink_to(entry)
    shutil.copytree(synth_root / version, root / version)
    tables = root / version

    def load(name: str) -> list[dict]:
        return json.loads((tables / f"{name}.json").read_text())

    samples = load("sample")
    assert len(samples) == len(HOSTILE_TOKENS)
    new = {s["token"]: t for s, t in zip(samples, HOSTILE_TOKENS)}
    new[""] = ""
    for s in samples:
        s["token"], s["prev"], s["next"] = new[s["token"]], new[s["prev"]], new[s["next"]]
    scenes = load("scene")
    for sc in scenes:
        sc["first_sample_token"], sc["last_sample_token"] = new[sc["first_sample_token"]], new[sc["last_sample_token"]]
    rewritten = {"sample": samples, "scene": scenes}
    for name in ("sample_data", "sample_annotation"):
        recs = load(name)
        for r in recs:
            r["sample_token"] = new[r["sample_token"]]
        rewritten[name] = recs
    for name, recs in rewritten.items():
        (tables / f"{name}.json").write_text(json.dumps(recs))
    splits = json.loads((tables / "splits.json").read_text())
    splits["hostile"] = [sc["name"] for sc in scenes]
    (tables / "splits.json").write_text(json.dumps(splits))
    return root


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


def test_evaluate_writes_only_inside_out_whatever_the_tokens_hold(hostile_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert NuScenesReader(hostile_root).sample_tokens("hostile") == HOSTILE_TOKENS
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative path that escaped --out would land here
    out = tmp_path / "work" / "eval"
    tmp_x_existed = os.path.lexists("/tmp/x")
    before = _files(tmp_path) | _files(hostile_root.parent)
    result = CliRunner().invoke(app, ["evaluate", "--gt-as-predictions", "--dataroot", str(hostile_root), "--split",
                                      "hostile", "--out", str(out), "--bev-samples", str(len(HOSTILE_TOKENS))])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    written = (_files(tmp_path) | _files(hostile_root.parent)) - before
    assert written and all(out in p.parents for p in written), sorted(map(str, written - set(out.rglob("*"))))
    assert os.path.lexists("/tmp/x") == tmp_x_existed
    pictures = sorted(p.name for p in out.glob("bev_*.png"))
    assert pictures == sorted(bev_picture_name(t) for t in HOSTILE_TOKENS)
    assert all(p.parent == out for p in out.rglob("bev_*"))
    assert set(json.loads((out / "results_nusc.json").read_text())["results"]) == set(HOSTILE_TOKENS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["provenance"]["inputs"]["dataset"]["num_samples"] == len(HOSTILE_TOKENS)


def test_a_picture_that_cannot_be_written_is_a_warning_not_a_failure(hostile_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    blocked = out / bev_picture_name("new\nline")
    blocked.mkdir()  # a directory where the picture goes: savefig fails
    result = CliRunner().invoke(app, ["evaluate", "--gt-as-predictions", "--dataroot", str(hostile_root), "--split",
                                      "hostile", "--out", str(out), "--bev-samples", str(len(HOSTILE_TOKENS))])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: no top-view picture of sample ")
    assert repr("new\nline") in warnings[0] and "skipped" in warnings[0], result.stderr
    assert (out / "metrics.json").is_file() and (out / "metrics.md").is_file()
    assert len([p for p in out.glob("bev_*.png") if p.is_file()]) == len(HOSTILE_TOKENS) - 1


# ------------------------------------------------------------------------------------------------ provenance
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _provenance(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["provenance"]


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def stepped_teacher(demo_teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another teacher checkpoint (other bytes: the same weights saved at training step 7)."""
    ckpt = torch.load(demo_teacher_ckpt, map_location="cpu", weights_only=True)
    path = tmp_path_factory.mktemp("stepped-teacher") / "last.pt"
    torch.save({**ckpt, "step": 7}, path)
    return path


def test_metrics_record_the_ground_truth_dataset_and_code(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "gt"
    args = ["evaluate", "--gt-as-predictions", "--dataroot", str(synth_root), "--split", "synth_val", "--out",
            str(out), "--bev-samples", "0"]
    assert CliRunner().invoke(app, args).exit_code == 0
    prov = _provenance(out)
    inputs = prov["inputs"]
    assert inputs["predictions"] == "ground truth" and inputs["checkpoint"] is None
    assert inputs["dataroot"] == str(synth_root.resolve()) and inputs["split"] == "synth_val"
    reader = NuScenesReader(synth_root)
    expected = reader.fingerprint("synth_val", reader.sample_tokens("synth_val"), num_sweeps=reader.num_sweeps)
    assert inputs["dataset"] == json.loads(json.dumps(dataclasses.asdict(expected)))
    assert prov["versions"]["tigbev"] == metadata.version("tigbev") and prov["git_commit"] == git_commit()
    # Scoring the ground truth again is a rerun of the same evaluation.
    assert CliRunner().invoke(app, args).exit_code == 0


def test_out_holding_another_checkpoints_results_needs_overwrite(synth_root: Path, demo_teacher_ckpt: Path,
                                                                 stepped_teacher: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "eval"

    def evaluate(checkpoint: Path | None, *extra: str):
        source = [str(checkpoint)] if checkpoint is not None else ["--gt-as-predictions"]
        return runner.invoke(app, ["evaluate", *source, "--dataroot", str(synth_root), "--split", "synth_val",
                                   "--out", str(out), "--device", "cpu", "--bev-samples", "1", *extra])

    first = evaluate(demo_teacher_ckpt)
    assert first.exit_code == 0, first.output
    ckpt = _provenance(out)["inputs"]["checkpoint"]
    assert ckpt == {"path": str(demo_teacher_ckpt.resolve()), "sha256": _sha256(demo_teacher_ckpt), "step": None,
                    "format": "tigbev-teacher/1"}
    assert _provenance(out)["inputs"]["predictions"] == "checkpoint"
    before = (out / "metrics.json").read_bytes()

    line = _one_line_error(evaluate(stepped_teacher), f"--out {out} holds the results of checkpoint "
                           f"{demo_teacher_ckpt.resolve()} (sha256 {_sha256(demo_teacher_ckpt)[:12]})",
                           "pass --overwrite", "choose another --out")
    assert str(stepped_teacher) not in line
    _one_line_error(evaluate(None), str(out), "--overwrite")  # the ground truth is another source too
    assert (out / "metrics.json").read_bytes() == before  # refused before anything was written

    replaced = evaluate(stepped_teacher, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    ckpt = _provenance(out)["inputs"]["checkpoint"]
    assert ckpt["sha256"] == _sha256(stepped_teacher) and ckpt["step"] == 7
    assert ckpt["path"] == str(stepped_teacher.resolve())
    assert len(list(out.glob("bev_*.png"))) == 1

    again = evaluate(stepped_teacher)  # the same checkpoint into the same --out: a rerun, no --overwrite needed
    assert again.exit_code == 0, again.output
    assert _provenance(out)["inputs"]["checkpoint"]["sha256"] == _sha256(stepped_teacher)


def test_results_without_provenance_are_not_taken_for_this_checkpoints(synth_root: Path, demo_teacher_ckpt: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"split": "synth_val", "mAP": 0.5}))
    result = CliRunner().invoke(app, ["evaluate", str(demo_teacher_ckpt), "--dataroot", str(synth_root), "--split",
                                      "synth_val", "--out", str(out)])
    _one_line_error(result, f"--out {out} holds the results of an unrecorded checkpoint", "--overwrite")


def test_train_students_final_evaluation_records_its_checkpoint(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    # The smallest run that ends in an evaluation: one step of the plain student on small images.
    result = train_student.run(TrainStudentConfig(preset="demo", dataroot=synth_root, split="synth_train",
                                                  out_dir=out, teacher="none", weights=LossWeights.baseline(),
                                                  input_hw=(64, 176), epochs=1, batch_size=1, workers=0,
                                                  device="cpu", max_steps=1, val_split="synth_val"), progress=False)
    assert result.metrics is not None
    inputs = _provenance(out / "eval")["inputs"]
    assert inputs["predictions"] == "checkpoint" and inputs["split"] == "synth_val"
    assert inputs["checkpoint"] == {"path": str(result.checkpoint.resolve()), "sha256": _sha256(result.checkpoint),
                                    "step": result.steps, "format": "tigbev-student/1"}
    assert inputs["dataset"]["split"] == "synth_val" and inputs["dataroot"] == str(synth_root.resolve())
