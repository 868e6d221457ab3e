"""Every CLI failure is one line that names the file, option or sample; --out rules; --resume that continues only
the same run, with a log that repeats no step and no temporary file left behind."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tigbev.cli import app

SPLIT = "synth_train"


class Gadget:  # a class a weights-only load refuses to rebuild
    pass


def _one_line_error(result, *needles: str) -> str:
    """The CLI failed with exit code 2 and its last words are one line, an error naming each needle (progress bars
    of the work done before the failure may come first)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in result.output and "weights_only=False" not in result.output
    return errors[0]


@contextlib.contextmanager
def _small_disk(disk: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``disk`` for the block (skips without the right to mount)."""
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _student_args(root: Path, cache: str, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--preset", "demo", "--dataroot", str(root), "--split", SPLIT, "--out", str(out),
            "--cache", cache, "--epochs", "2", "--batch-size", "1", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {"empty": d / "empty.pt", "truncated": d / "truncated.pt", "garbage": d / "garbage.pt",
             "untrusted": d / "untrusted.pt"}
    files["empty"].write_bytes(b"")
    torch.save({"format": "tigbev-student/1", "model": {"w": torch.zeros(1000)}}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:300])
    files["garbage"].write_bytes(b"not a checkpoint at all" * 10)
    torch.save({"format": "tigbev-student/1", "gadget": Gadget()}, files["untrusted"])
    return files


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "untrusted"])
def test_broken_or_untrusted_checkpoints_are_one_line_everywhere(kind: str, bad_files: dict[str, Path],
                                                                 synth_root: Path, synth_cache: str,
                                                                 tmp_path: Path) -> None:
    bad = bad_files[kind]
    runner = CliRunner()
    _one_line_error(runner.invoke(app, ["evaluate", str(bad), "--dataroot", str(synth_root), "--split", "synth_val",
                                        "--out", str(tmp_path / "eval")]), str(bad))
    _one_line_error(runner.invoke(app, ["extract-teacher", "--teacher-checkpoint", str(bad), "--dataroot",
                                        str(synth_root), "--split", SPLIT, "--out", str(tmp_path / "cache")]),
                    "teacher checkpoint", str(bad))
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, tmp_path / "bb", "--backbone-weights",
                                                     str(bad), "--max-steps", "1")), str(bad))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bad, run / "last.pt")
    line = _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, run, "--resume")),
                           "student checkpoint", str(run / "last.pt"))
    if kind == "untrusted":
        assert "never unpickles" in line and "Gadget" in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "cache").exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]  # nothing written next to it


@pytest.mark.parametrize("option,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--w-keypoint", "inf"),
                                          ("--w-depth", "nan")])
def test_non_finite_or_non_positive_numbers_are_refused_before_anything_is_written(
        option: str, value: str, synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _student_args(synth_root, synth_cache, out, option, value))
    _one_line_error(result, "finite", value if value != "0" else "> 0")
    assert not out.exists()


@pytest.mark.parametrize("value", ["192", "192x", "x528", "192x528x3", "tall"])
def test_an_input_size_that_is_not_hxw_is_refused_before_anything_is_written(
        value: str, synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _student_args(synth_root, synth_cache, out, "--input-hw", value))
    _one_line_error(result, "--input-hw", repr(value))
    assert not out.exists()


def test_out_that_is_a_file_or_a_foreign_directory_is_refused(synth_root: Path, synth_cache: str,
                                                              tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    runner = CliRunner()
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, a_file)), str(a_file), "is a file")
    _one_line_error(runner.invoke(app, ["train-teacher", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                        SPLIT, "--out", str(a_file)]), "is a file")
    _one_line_error(runner.invoke(app, ["evaluate", "--gt-as-predictions", "--dataroot", str(synth_root), "--split",
                                        "synth_val", "--out", str(a_file)]), "is a file")
    _one_line_error(runner.invoke(app, ["demo", "--out", str(a_file), "--tiny"]), "is a file")
    assert a_file.read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, foreign)), "notes.txt")
    _one_line_error(runner.invoke(app, ["evaluate", "--gt-as-predictions", "--dataroot", str(synth_root), "--split",
                                        "synth_val", "--out", str(foreign)]), "notes.txt")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # An earlier evaluation is what evaluate may replace.
    ev = tmp_path / "ev"
    args = ["evaluate", "--gt-as-predictions", "--dataroot", str(synth_root), "--split", "synth_val", "--out", str(ev)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    dump = tmp_path / "s.npz"
    dump.write_text("mine")
    _one_line_error(runner.invoke(app, ["cache", "dump", synth_cache, "--sample", "x", "--out", str(dump)]),
                    "exists")


def test_a_cache_on_another_bev_range_is_refused_by_train_student(synth_root: Path, synth_cache: str,
                                                                   tmp_path: Path) -> None:
    import zarr

    from tigbev.cache.schema import CACHE_ATTR, CHECKSUM_ATTR, manifest_digest

    other = tmp_path / "other-range"
    shutil.copytree(synth_cache, other)
    group = zarr.open_group(str(other), mode="r+")
    manifest = dict(group.attrs[CACHE_ATTR])
    manifest["grid"] = {**manifest["grid"], "x_min_m": -40.0, "x_max_m": 40.0}
    # A cache written for that range: its manifest with its own digest (an edit without it reads as damage).
    group.attrs.update({CACHE_ATTR: manifest, CHECKSUM_ATTR: manifest_digest(manifest)})
    out = tmp_path / "student"
    _one_line_error(CliRunner().invoke(app, _student_args(synth_root, str(other), out)), str(other),
                    "grid x_min_m: cache has -40.0, expected -51.2", "grid x_max_m")
    assert not out.exists()  # refused before anything was written


def test_debug_shows_the_traceback(tmp_path: Path, bad_files: dict[str, Path], synth_root: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", "evaluate", str(bad_files["garbage"]), "--dataroot", str(synth_root),
                                      "--split", "synth_val", "--out", str(tmp_path / "e")])
    assert result.exit_code != 0 and result.exception is not None
    assert "not a torch checkpoint" in str(result.exception)


def test_resume_rules_and_a_log_without_repeated_steps(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    # What a run that failed before its first checkpoint leaves behind does not block the same command.
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "epoch": 0, "total": 9.0}\n')
    first = runner.invoke(app, _student_args(synth_root, synth_cache, out, "--max-steps", "3"))
    assert first.exit_code == 0, first.output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1
    # Without --resume the finished run is not overwritten.
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, out, "--max-steps", "4")), "--resume")
    # Another variant, loss weight or cache is another run: refused, naming the field.
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, out, "--variant", "bevdet",
                                                     "--resume")),
                    "cannot resume", "variant: checkpoint has 'bevdepth', this run has 'bevdet'")
    _one_line_error(runner.invoke(app, _student_args(synth_root, synth_cache, out, "--w-channel", "5", "--resume")),
                    "weights.inter_channel: checkpoint has 10.0, this run has 5.0")
    # A cache of another teacher (same dataset) is another run too.
    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint

    torch.manual_seed(1)
    other_teacher = save_checkpoint(tmp_path / "other-teacher.pt", {
        "model": CenterPoint(teacher_preset("demo")).state_dict(), "teacher_config": teacher_preset("demo").to_dict()})
    other_cache = tmp_path / "other-cache"
    proc = subprocess.run([sys.executable, "-m", "tigbev.cli", "extract-teacher", "--teacher-checkpoint",
                           str(other_teacher), "--dataroot", str(synth_root), "--split", SPLIT, "--out",
                           str(other_cache), "--workers", "0", "--device", "cpu"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _one_line_error(runner.invoke(app, _student_args(synth_root, str(other_cache), out, "--resume")),
                    "the teacher cache")
    # A run killed mid-epoch: it had logged steps past its checkpoint and left a temporary checkpoint file.
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "step": 5, "epoch": 1, "total": 1.0}) + "\n")
    (out / ".last.pt.tmp-12345").write_bytes(b"half a checkpoint")
    resumed = runner.invoke(app, _student_args(synth_root, synth_cache, out, "--resume", "--max-steps", "6"))
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and 9.0 not in [r.get("total") for r in records]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6


def test_training_that_diverges_never_saves_non_finite_weights(synth_root: Path, synth_cache: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tigbev.stages import train_student

    real_step = train_student.training_step

    def poisoned(model, *args, **kwargs):  # a step that leaves a NaN weight behind, as a too-high rate would
        out = real_step(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.is_floating_point()).fill_(float("nan"))
        return out

    monkeypatch.setattr(train_student, "training_step", poisoned)
    out = tmp_path / "run"
    line = _one_line_error(CliRunner().invoke(app, _student_args(synth_root, synth_cache, out, "--max-steps", "1")),
                           "not finite", "left as it was")
    assert "learning rate" in line and not (out / "last.pt").exists()


def test_disk_full_during_extraction_is_one_line_and_resumable(demo_teacher_ckpt: Path, synth_root: Path,
                                                               tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "1500k") as disk:
        out = disk / "cache"
        args = ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot", str(synth_root),
                "--split", SPLIT, "--out", str(out), "--workers", "0", "--device", "cpu", "--shard-samples", "1",
                "--batch-size", "1", "--features", "dense"]
        line = _one_line_error(CliRunner().invoke(app, args), "No space left on device", str(out))
        assert "rerun the same command to resume" in line
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0 and "complete" in done.output, done.output
        from tigbev.cache.tools import verify_cache

        assert verify_cache(str(out)) == []


def test_a_disk_that_fills_before_the_first_shard_names_the_cache_and_the_file(demo_teacher_ckpt: Path,
                                                                             synth_root: Path, tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "12k") as disk:
        out = disk / "cache"
        args = ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot", str(synth_root),
                "--split", SPLIT, "--out", str(out), "--workers", "0", "--device", "cpu", "--shard-samples", "1",
                "--batch-size", "1"]
        line = _one_line_error(CliRunner().invoke(app, args), f"of cache {out}: No space left on device (", str(out))
        assert "no shard was written" in line
        assert not [p for p in disk.rglob("*.tmp")]  # no half-written lease left behind


class _Shell:  # a pickle whose loading would run a shell command: a global of a module torch blocks outright
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_refused_pickle_names_the_global_it_refused(tmp_path: Path, synth_root: Path) -> None:
    """Against the installed torch's own wording (it differs between a blocked module and an unknown class)."""
    from tigbev.checkpoint_file import CheckpointError, load_weights_only

    shell, gadget = tmp_path / "shell.pt", tmp_path / "gadget.pt"
    torch.save({"format": "tigbev-student/1", "x": _Shell()}, shell)
    torch.save({"format": "tigbev-student/1", "x": Gadget()}, gadget)
    for path, name in ((shell, f"{_Shell.__reduce__(_Shell())[0].__module__}.system"),
                       (gadget, f"{__name__}.Gadget")):
        with pytest.raises(pickle.UnpicklingError) as raw:
            torch.load(path, weights_only=True)
        assert name in str(raw.value)  # what this torch says, so the test follows its wording
        with pytest.raises(CheckpointError) as exc:
            load_weights_only(path)
        text = str(exc.value)
        assert f"(the global {name})" in text and "holds objects other than tensors" in text, text
        assert "weights_only" not in text and "\n" not in text
        line = _one_line_error(CliRunner().invoke(app, ["evaluate", str(path), "--dataroot", str(synth_root),
                                                        "--split", "synth_val", "--out", str(tmp_path / "e")]),
                               str(path), f"the global {name}")
        assert line.endswith("not one to trust")


def test_a_truncated_checkpoint_is_named_in_whole_sentences(tmp_path: Path) -> None:
    from tigbev.checkpoint_file import CheckpointError, load_weights_only

    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(10_000)}, path)
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(CheckpointError) as exc:
        load_weights_only(path)
    text = str(exc.value)
    assert text.startswith(f"checkpoint {path} is not a torch checkpoint or is damaged (") and text.endswith(")")
    assert "checkpoint was not saved properly" not in text  # torch's advice is dropped, its first sentence kept whole


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_the_errno(tmp_path: Path) -> None:
    from tigbev.checkpoint_file import CheckpointError, save_atomic

    with _small_disk(tmp_path / "disk", "256k") as disk:
        path = disk / "last.pt"
        save_atomic(path, {"w": torch.zeros(1000)})
        before = path.read_bytes()
        with pytest.raises(CheckpointError) as exc:
            save_atomic(path, {"w": torch.zeros(1_000_000)})  # 4 MB on a 256 KiB disk
        text = str(exc.value)
        assert f"cannot write checkpoint {path}: No space left on device (errno 28)" in text, text
        assert text.endswith(f"{path} is left as it was")
        assert path.read_bytes() == before and sorted(p.name for p in disk.iterdir()) == ["last.pt"]


def test_output_piped_into_a_reader_that_leaves_early_is_no_error(synth_cache: str) -> None:
    """`tigbev cache info C | head -1`: the first line reaches head, and nothing is said about the closed pipe."""
    done = subprocess.run(f"{sys.executable} -m tigbev.cli cache info {synth_cache} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.startswith(f"cache      {synth_cache}"), done.stdout
    assert done.stderr == "", done.stderr
