"""Trust in the cache: a lost chunk or array is a named fault (never zeros), one writer per shard, a content-based
dataset fingerprint, and outputs that are never mixed with foreign files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tigbev.cache.lease import Lease, WriterLease
from tigbev.cache.schema import LEASE_DIR, shard_path
from tigbev.cache.store import (
    CacheError,
    CacheReader,
    CacheWriter,
    SampleRecord,
    fs_and_path,
)
from tigbev.cache.tools import verify_cache
from tigbev.cli import app
from tigbev.config import ExtractTeacherConfig, SynthConfig
from tigbev.data.camera_dataset import CameraDetectionDataset
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.synth.writer import write_synthetic_dataset
from tigbev.stages import extract_teacher

SPLIT = "synth_train"


def _cfg(ckpt: Path, root: Path, out: Path | str, **kw) -> ExtractTeacherConfig:
    base = {"teacher_checkpoint": ckpt, "dataroot": root, "split": SPLIT, "out_dir": str(out), "shard_samples": 2,
            "batch_size": 1, "workers": 0, "device": "cpu"}
    return ExtractTeacherConfig(**{**base, **kw})


@pytest.fixture()
def damaged(synth_cache: str, tmp_path: Path) -> Path:
    """A private copy of the session's cache (3 samples, shards of 2: samples 0-1 and 2) to damage."""
    out = tmp_path / "cache"
    shutil.copytree(synth_cache, out)
    return out


def _chunk_file(cache: Path, shard: int, name: str) -> Path:
    files = sorted(p for p in (cache / shard_path(shard) / name / "c").rglob("*") if p.is_file())
    assert len(files) == 1, files  # one zarr shard file per array and sample shard
    return files[0]


@pytest.mark.parametrize("name", ["boxes", "keypoints", "depth", "fg_cells", "fg_features"])
def test_a_lost_chunk_file_is_a_named_fault_and_never_reads_as_zeros(damaged: Path, name: str) -> None:
    _chunk_file(damaged, 1, name).unlink()
    token = CacheReader(str(damaged)).tokens[2]
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(2, name)]
    assert "missing" in faults[0].message and token in str(faults[0])
    cli = CliRunner().invoke(app, ["cache", "verify", str(damaged)])
    assert cli.exit_code == 1 and name in cli.output and "OK" not in cli.output
    reader = CacheReader(str(damaged))
    reader.read(0)  # the other shard is intact
    with pytest.raises(CacheError, match=rf"sample 2 \({token}\), array {name}: chunk file .* is missing"):
        reader.read(2)


def test_a_lost_array_metadata_file_is_a_fault(damaged: Path) -> None:
    (damaged / shard_path(0) / "depth" / "zarr.json").unlink()
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(0, "depth"), (1, "depth")]
    assert all("zarr.json is missing" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 0 .* array depth: array metadata .*zarr.json is missing"):
        CacheReader(str(damaged)).read(0)


def test_a_short_feature_array_is_a_fault_not_a_broadcast_error(damaged: Path) -> None:
    arr = zarr.open_array(str(damaged / shard_path(0) / "fg_features"), mode="r+")
    rows = arr.shape[0]
    arr.resize((rows - 100, arr.shape[1]))
    faults = verify_cache(str(damaged))
    assert faults and {f.array for f in faults} == {"fg_features"}
    assert any(f"stores {rows - 100} rows, the shard index lists {rows}" in f.message for f in faults)
    reader = CacheReader(str(damaged))
    with pytest.raises(CacheError, match=r"sample 1 .* array fg_features: rows .* lie past the array's end"):
        reader.read(1)


def test_a_lost_chunk_inside_a_shard_file_reads_as_a_fault(damaged: Path) -> None:
    """Every inner chunk is stored, and the fill value is one no sample holds: a chunk dropped from the zarr
    shard's index (the file rewritten without it) shows as fill values, which verify reports."""
    path = damaged / shard_path(0) / "depth"
    arr = zarr.open_array(str(path), mode="r+", config={"write_empty_chunks": False})
    assert arr.shards is not None and arr.chunks[0] < arr.shape[0]  # several inner chunks in one file
    before = _chunk_file(damaged, 0, "depth").stat().st_size
    arr[: arr.chunks[0]] = np.nan  # the fill value: zarr drops the inner chunk from the shard file
    assert _chunk_file(damaged, 0, "depth").stat().st_size < before
    index = CacheReader(str(damaged)).index
    hit = [i for i in (0, 1) if index["depth_offset"][i] < arr.chunks[0]]
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(i, "depth") for i in hit]
    assert all("hold the fill value: a chunk is missing" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 0 .* array depth: holds the fill value: a chunk is missing"):
        CacheReader(str(damaged)).read(0)


def test_dense_mode_lost_map_chunk(demo_teacher_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, out, features="dense"), progress=False)
    assert verify_cache(str(out)) == []
    (out / "bev" / "c" / "1" / "0" / "0" / "0").unlink()  # the zarr shard of samples 2..3
    faults = verify_cache(str(out))
    assert [(f.sample_idx, f.array) for f in faults] == [(2, "bev")]
    with pytest.raises(CacheError, match=r"sample 2 .* array bev: chunk file bev/c/1/0/0/0 is missing"):
        CacheReader(str(out)).read(2)
    CacheReader(str(out)).read(1)


HELD_WRITER = textwrap.dedent("""
    import sys, time
    from tigbev.cache.store import CacheWriter
    original = CacheWriter.write_shard
    def slow(self, shard, records):
        time.sleep(120)  # hold the lease until the test kills this process
        original(self, shard, records)
    CacheWriter.write_shard = slow
    from tigbev.cli import app
    sys.argv = ["tigbev", *sys.argv[1:]]
    app()
""")


def test_a_second_writer_is_refused_until_the_first_is_dead(demo_teacher_ckpt: Path, synth_root: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot", str(synth_root),
            "--split", SPLIT, "--out", str(out), "--shard-samples", "2", "--batch-size", "1", "--workers", "0",
            "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", HELD_WRITER, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / LEASE_DIR).glob("*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        (lease_file,) = list((out / LEASE_DIR).glob("*.json"))
        assert Lease.parse(lease_file.read_text()).pid == proc.pid
        with pytest.raises(CacheError, match=rf"being written by pid {proc.pid} on "):
            extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, out), progress=False)
        cli = CliRunner().invoke(app, args)
        assert cli.exit_code == 2 and f"pid {proc.pid}" in cli.output and "Traceback" not in cli.output
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # The killed writer's lease is left behind, but its process is gone: the next writer takes over at once.
    assert lease_file.exists()
    result = extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, out), progress=False)
    assert result.complete and result.samples_written == 3
    assert list((out / LEASE_DIR).glob("*.json")) == []  # its own lease is gone too
    assert verify_cache(str(out)) == []


def test_lease_rules(tmp_path: Path) -> None:
    fs, root = fs_and_path(str(tmp_path / "c"))
    url = str(tmp_path / "c")
    first = WriterLease(fs, root, url, [0, 1]).acquire()
    with pytest.raises(Exception, match=rf"pid {os.getpid()}"):
        WriterLease(fs, root, url, [1, 2]).acquire()
    disjoint = WriterLease(fs, root, url, [2, 3]).acquire()  # other shards: parallel parts
    first.release()
    disjoint.release()
    assert fs.ls(f"{root}/{LEASE_DIR}", detail=False) == []
    # A lease of another host whose heartbeat stopped long ago is stale: ignored and removed.
    dead = Lease(writer_id="elsewhere-1-abc", host="some-other-host", pid=1, started_unix=time.time() - 600,
                 heartbeat_unix=time.time() - 600, shards=(0,), command="tigbev extract-teacher")
    (tmp_path / "c" / LEASE_DIR / "elsewhere-1-abc.json").write_text(dead.to_json())
    again = WriterLease(fs, root, url, [0]).acquire()
    assert not (tmp_path / "c" / LEASE_DIR / "elsewhere-1-abc.json").exists()
    again.release()
    # Two writers that start together: each sees the other after writing its own lease; the later one withdraws.
    rival = Lease(writer_id="rival-2-def", host="some-other-host", pid=2, started_unix=time.time() - 1,
                  heartbeat_unix=time.time(), shards=(0,), command="tigbev extract-teacher")
    late = WriterLease(fs, root, url, [0])
    real_others = late.others
    calls = []

    def others_then_rival():  # the rival's lease lands between our first look and our own write
        calls.append(1)
        if len(calls) == 2:
            (tmp_path / "c" / LEASE_DIR / "rival-2-def.json").write_text(rival.to_json())
        return real_others()

    late.others = others_then_rival  # type: ignore[method-assign]
    with pytest.raises(Exception, match="pid 2 on some-other-host"):
        late.acquire()
    assert not Path(late.path).exists()


def test_a_finished_shard_is_never_rewritten(synth_cache: str, damaged: Path) -> None:
    reader = CacheReader(str(damaged))
    writer = CacheWriter(str(damaged), reader.manifest)
    c = reader.manifest.features.channels
    records = [SampleRecord(sample_idx=i, token=reader.tokens[i], scene="", timestamp_us=0,
                            boxes=np.zeros((0, 10), np.float32), keypoints=np.zeros((0, 576, 2), np.float32),
                            depth=np.zeros((0, 5), np.float32), depth_per_camera=[0] * 6,
                            fg_cells=np.zeros(0, np.int32), fg_features=np.zeros((0, c), np.float16), fg_scale=None,
                            bev=None) for i in (0, 1)]
    with pytest.raises(CacheError, match="shard 0 is already complete"):
        writer.write_shard(0, records)
    assert verify_cache(str(damaged)) == []
    np.testing.assert_array_equal(CacheReader(str(damaged)).read(0).boxes, CacheReader(synth_cache).read(0).boxes)


def test_output_must_be_new_empty_or_the_same_cache(demo_teacher_ckpt: Path, synth_root: Path,
                                                    tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"non-empty directory that is not a tigbev cache \(holds notes.txt\)"):
        extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, foreign), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cli = CliRunner().invoke(app, ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot",
                                   str(synth_root), "--split", SPLIT, "--out", str(a_file), "--device", "cpu"])
    assert cli.exit_code == 2 and "is a file" in cli.output and a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, empty), progress=False).complete


def test_another_world_with_the_same_tokens_is_refused(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    """Same seed and sample count, other image size and content: the tokens agree, the records do not."""
    other = tmp_path / "other"
    write_synthetic_dataset(SynthConfig(out_dir=other, scenes=2, samples_per_scene=3, val_scenes=1, seed=7,
                                        image_width=160, image_height=90, lidar_azimuth_steps=720,
                                        sweeps_per_sample=1, workers=1, object_density=0.5), progress=False)
    same, changed = NuScenesReader(synth_root), NuScenesReader(other)
    assert changed.sample_tokens(SPLIT) == same.sample_tokens(SPLIT)
    cache = CacheReader(synth_cache)
    with pytest.raises(CacheError) as info:
        CameraDetectionDataset(changed, changed.sample_tokens(SPLIT), cache=cache, split=SPLIT, input_hw=(96, 160),
                               feature_stride=16, image_policy=ImageAugPolicy(input_hw=(96, 160)), bda_policy=None)
    message = str(info.value)
    assert "image sizes (px): CAM_BACK cache 192x108 vs dataset 160x90" in message
    assert "sample_annotation" in message and "sample_data" in message and "tokens" not in message
    # One calibration record edited by hand: named as such, and nothing else.
    edited = tmp_path / "edited"
    shutil.copytree(synth_root, edited)
    path = edited / "v1.0-synth" / "calibrated_sensor.json"
    records = json.loads(path.read_text())
    records[0]["translation"][0] += 0.01
    path.write_text(json.dumps(records))
    with pytest.raises(CacheError, match=r"content of the calibrated_sensor records differs") as info:
        reader = NuScenesReader(edited)
        CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=cache, split=SPLIT, input_hw=(96, 160),
                               feature_stride=16, image_policy=ImageAugPolicy(input_hw=(96, 160)), bda_policy=None)
    assert "sample_annotation" not in str(info.value)
