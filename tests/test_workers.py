"""DataLoader workers: an error raised in one is the same one line as in the main process, the project's errors
survive pickling, and no worker outlives a run killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from torch._utils import ExceptionWrapper
from typer.testing import CliRunner

from tigbev.cache.lease import LeaseConflict
from tigbev.cache.schema import CacheFormatError
from tigbev.cache.shard_file import ShardFileError
from tigbev.cache.store import CacheError, CacheReader, SampleFault, records_key
from tigbev.checkpoint_file import CheckpointError
from tigbev.cli import app
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.errors import DatasetError, TigbevError, worker_error
from tigbev.models.student.resnet import WeightsError

SPLIT = "synth_train"


def test_the_projects_errors_survive_pickling() -> None:
    errors = [TigbevError("t"), DatasetError("LiDAR file x is truncated"), CacheError("no cache at y"),
              CheckpointError("c"), WeightsError("w"), CacheFormatError("f"), LeaseConflict("held"),
              SampleFault("/c", 4, "tok", "inner chunk 1 fails its crc32c checksum (damaged)", ["boxes", "depth"]),
              ShardFileError("inner chunk 3 lost", (3,))]
    for exc in errors:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args
    fault = pickle.loads(pickle.dumps(errors[-2]))
    assert (fault.url, fault.sample_idx, fault.token, fault.sections) == ("/c", 4, "tok", ("boxes", "depth"))
    assert pickle.loads(pickle.dumps(errors[-1])).chunks == (3,)


def _reraised(exc: BaseException) -> BaseException:
    """What the main process catches when a DataLoader worker raised ``exc`` (a cause chained to it)."""
    try:
        try:
            raise OSError("the cause")
        except OSError as cause:
            raise exc from cause
    except BaseException:  # noqa: BLE001 - what a worker does with any error
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    try:
        wrapper.reraise()
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("reraise returned")


def test_a_workers_error_is_rebuilt_from_torchs_reraise() -> None:
    fault = SampleFault("/c", 4, "tok", "inner chunk 1 fails its crc32c checksum (damaged)", ["depth"])
    caught = _reraised(fault)
    assert type(caught) is RuntimeError and "Original Traceback" in str(caught)  # five arguments: not rebuilt
    original = worker_error(caught)
    assert type(original) is SampleFault and str(original) == str(fault)
    caught = _reraised(DatasetError("camera image of CAM_FRONT is missing: /x.jpg"))
    assert type(caught) is DatasetError and len(str(caught)) > 300
    assert str(worker_error(caught)) == "camera image of CAM_FRONT is missing: /x.jpg"
    assert type(worker_error(_reraised(ValueError("bad value")))) is ValueError
    assert worker_error(DatasetError("raised here")) is None and worker_error(RuntimeError()) is None
    foreign = type("ZarrOddity", (Exception,), {"__module__": "no.such.module"})
    stand_in = worker_error(_reraised(foreign("odd")))
    assert type(stand_in).__name__ == "ZarrOddity" and str(stand_in) == "odd"


def _samples(root: Path) -> list:
    reader = NuScenesReader(root)
    return [reader.load_sample(t) for t in reader.sample_tokens(SPLIT)]


def _damage(kind: str, root: Path, cache: Path) -> None:
    """Damage every training sample (so the first batch meets it, whatever the order): one of its files, or each
    inner chunk of the cache's records."""
    if kind == "chunk":
        reader = CacheReader(str(cache))
        for shard in range(reader.manifest.num_shards):
            n_chunks = reader.open_records(shard).n_chunks
            path = cache / records_key(shard) / "c" / "0"
            data = bytearray(path.read_bytes())
            for j in range(n_chunks):  # stored one after the other, each with its 4-byte crc32c
                data[j * (reader.manifest.records_chunk_bytes + 4) + 10] ^= 0xFF
            path.write_bytes(bytes(data))
        return
    for frame in _samples(root):
        image = frame.camera("CAM_FRONT").image_path
        if kind == "pcd":
            lidar = frame.lidar.sweep_paths[0]
            lidar.write_bytes(lidar.read_bytes()[:-3])
        elif kind == "nan":  # one point's intensity, as a faulty export leaves it
            points = np.fromfile(lidar := frame.lidar.sweep_paths[0], dtype=np.float32).reshape(-1, 5)
            points[7, 3] = np.nan
            points.tofile(lidar)
        elif kind == "jpeg":
            image.write_bytes(image.read_bytes()[:100])
        elif kind == "deleted":
            image.unlink()


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output[-3000:]
    return lines[-1]


@pytest.mark.parametrize("kind,command,needle", [
    ("chunk", "train-student", "fails its crc32c checksum"),
    ("jpeg", "train-student", "cannot read camera image"),
    ("deleted", "train-student", "CAM_FRONT) is missing"),
    ("deleted", "extract-teacher", "CAM_FRONT) is missing"),
    ("pcd", "extract-teacher", "is truncated or not a nuScenes .pcd.bin"),
    ("nan", "extract-teacher", "holds 1 non-finite value (NaN or infinity, in intensity) in 1 of"),
])
def test_a_fault_met_in_a_worker_is_the_line_the_main_process_gives(
        kind: str, command: str, needle: str, synth_root: Path, synth_cache: str, demo_teacher_ckpt: Path,
        tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    shutil.copytree(synth_root, root)
    shutil.copytree(synth_cache, cache)
    _damage(kind, root, cache)
    lines = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out-{workers}"
        if command == "train-student":
            args = ["train-student", "--preset", "demo", "--dataroot", str(root), "--split", SPLIT, "--out", str(out),
                    "--cache", str(cache), "--epochs", "1", "--batch-size", "1", "--device", "cpu"]
        else:
            args = ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot", str(root),
                    "--split", SPLIT, "--out", str(out), "--shard-samples", "2", "--batch-size", "1", "--device", "cpu"]
        lines[workers] = _error_line(CliRunner().invoke(app, [*args, "--workers", workers]))
    assert lines["2"] == lines["0"]
    assert needle in lines["0"] and str(root if kind != "chunk" else cache) in lines["0"]
    assert "DataLoader" not in lines["0"] and "Traceback" not in lines["0"] and len(lines["0"]) < 600


def _session(sid: int) -> dict[int, str]:
    """Live processes of session ``sid`` (pid: state), read from /proc (zombies count as ended)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = text[text.rfind(")") + 2:].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found[int(stat.parent.name)] = state
    return found


_EXTRACT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tigbev.config import ExtractTeacherConfig
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.stages import extract_teacher

    ckpt, root, out = sys.argv[1:]
    cfg = ExtractTeacherConfig(teacher_checkpoint=Path(ckpt), dataroot=Path(root), split="synth_train", out_dir=out,
                               workers=2, device="cpu", shard_samples=2, batch_size=1)
    tokens = NuScenesReader(cfg.dataroot).sample_tokens(cfg.split)
    extract_teacher.run(cfg, progress=False, tokens=tokens * 100)  # long enough to be killed mid-run
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the mechanism is Linux's prctl")
@pytest.mark.parametrize("stage", ["extract-teacher", "train-student"])
def test_no_worker_outlives_a_run_killed_with_sigkill(stage: str, synth_root: Path, synth_cache: str,
                                                      demo_teacher_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if stage == "extract-teacher":
        cmd = [sys.executable, "-c", _EXTRACT, str(demo_teacher_ckpt), str(synth_root), str(out)]
        started = out / "index" / "000000.parquet"  # the parent took a shard's batches: the workers are busy
    else:
        cmd = [sys.executable, "-m", "tigbev.cli", "train-student", "--preset", "demo", "--dataroot", str(synth_root),
               "--split", SPLIT, "--out", str(out), "--cache", synth_cache, "--epochs", "100", "--batch-size", "1",
               "--workers", "2", "--device", "cpu"]
        started = out / "config.json"
    # A session of its own: its workers share its id, whatever their parent is after the kill.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (started.exists() and len(_session(proc.pid)) >= 3):  # the parent and its two workers
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 30
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # leave nothing behind, even when failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"workers alive 30 s after their parent's SIGKILL: {left}"
