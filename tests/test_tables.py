"""The devkit-free tables (tigbev.data.tables): the same samples as nuscenes-devkit, and the student side running
with neither the devkit nor spconv importable (the GPU machine's case)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tigbev.data.classes import CATEGORY_TO_DETECTION
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.tables import NuScenesTables
from tigbev.errors import DatasetError


def _assert_same(a: object, b: object, where: str) -> None:
    """Field by field: float arrays equal to 1e-12 (NaN where NaN; pyquaternion's rotation matrix differs from ours in
    the last bit), other arrays and everything else exactly equal."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=where)
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, tuple) and a and dataclasses.is_dataclass(a[0]):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("which", ["real", "synth"])
def test_light_tables_read_what_the_devkit_reads(which: str, real_slice_root: Path, synth_root: Path) -> None:
    """Every sample of the real key frame and of a synthetic world (velocities from neighbouring annotations,
    earlier sweeps, scene starts) is the same SampleFrame through either table handle, with the same fingerprint,
    split order, earlier key frames and classes."""
    root, split = (real_slice_root, "real_slice") if which == "real" else (synth_root, "synth_train")
    devkit = NuScenesReader(root, num_sweeps=3, tables="devkit")
    light = NuScenesReader(root, num_sweeps=3, tables="light")
    assert isinstance(light.nusc, NuScenesTables) and not isinstance(devkit.nusc, NuScenesTables)
    tokens = devkit.sample_tokens(split)
    assert light.sample_tokens(split) == tokens and light.split_names() == devkit.split_names()
    assert light.fingerprint(split, tokens, num_sweeps=3) == devkit.fingerprint(split, tokens, num_sweeps=3)
    finite_velocities = 0
    for token in tokens:
        a, b = devkit.load_sample(token), light.load_sample(token)
        _assert_same(a, b, token)
        finite_velocities += int(np.isfinite(a.gt.boxes[:, 7]).sum())
        assert [s["token"] for s in light.adjacent_key_samples(token, 3)] == [
            s["token"] for s in devkit.adjacent_key_samples(token, 3)]
        assert light.sample_classes(token) == devkit.sample_classes(token)
    if which == "synth":
        assert finite_velocities > 0  # the velocity arithmetic was exercised, not only its NaN case


def test_category_mapping_is_the_benchmarks(real_slice_root: Path) -> None:
    """The fallback mapping equals the devkit's for every nuScenes category (and for names it does not know)."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    (table,) = real_slice_root.glob("v1.0-*/category.json")
    categories = [c["name"] for c in json.loads(table.read_text())]
    names = set(categories) | set(CATEGORY_TO_DETECTION) | {"animal", "vehicle.emergency.police", "nonsense"}
    assert len(categories) >= 23
    for name in names:
        assert CATEGORY_TO_DETECTION.get(name) == category_to_detection_name(name), name


def test_broken_tables_name_the_folder(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    (version,) = [p for p in root.iterdir() if p.name.startswith("v1.0-")]
    instances = json.loads((version / "instance.json").read_text())
    (version / "instance.json").write_text(json.dumps(instances[1:]))
    with pytest.raises(DatasetError, match=rf"tables in {version} do not link up: missing record"):
        NuScenesReader(root, tables="light").sample_tokens("synth_train")
    (version / "sensor.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"sensor.json is not valid JSON"):
        NuScenesReader(root, tables="light").sample_tokens("synth_train")
    with pytest.raises(ValueError, match="tables must be"):
        NuScenesReader(root, tables="mini")


def test_student_side_runs_without_the_devkit_or_spconv(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    """With nuscenes-devkit, pyquaternion, spconv and the teacher package unimportable (spawned workers included),
    a student trains from the cache, the student-side bench runs, and a predefined split is refused naming the
    missing devkit."""
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("nuscenes", "pyquaternion", "spconv", "tigbev.models.teacher")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked import: {{name}}")
                return None
        sys.meta_path.insert(0, Block())

        if __name__ == "__main__":
            from tigbev.bench import BenchConfig, run
            from tigbev.config import TrainStudentConfig
            from tigbev.data.nuscenes_reader import NuScenesReader
            from tigbev.errors import DatasetError
            from tigbev.stages import train_student
            r = train_student.run(TrainStudentConfig(preset="demo", dataroot={str(synth_root)!r}, split="synth_train",
                                  out_dir={str(tmp_path / "run")!r}, cache={synth_cache!r}, epochs=1, batch_size=2,
                                  workers=1, device="cpu", max_steps=1), progress=False)
            assert r.steps == 1
            b = run(BenchConfig(preset="demo", out_dir={str(tmp_path / "bench")!r}, dataroot={str(synth_root)!r},
                                split="synth_train", cache={synth_cache!r}, device="cpu", tiny=True, progress=False))
            assert list(b.report["step"]) == ["none", "cache"]
            try:
                NuScenesReader({str(synth_root)!r}).scene_names("v1.0-trainval")
            except DatasetError as exc:
                assert "predefined splits need nuscenes-devkit" in str(exc), exc
            else:
                raise AssertionError("a predefined split was not refused")
            assert not any(m.split(".")[0] in ("nuscenes", "spconv", "pyquaternion") for m in sys.modules)
            print("OK")
    """)
    path = tmp_path / "blocked.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
