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
from tigbev.cache.record import MapVariant, SampleRecord
from tigbev.cache.schema import CACHE_ATTR, LEASE_DIR
from tigbev.cache.store import (
    CacheError,
    CacheReader,
    CacheWriter,
    fs_and_path,
    records_key,
)
from tigbev.cache.tools import cache_info, verify_cache
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


def _shard_file(cache: Path, shard: int) -> Path:
    path = cache / records_key(shard) / "c" / "0"
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["0"]  # one shard file per shard
    return path


def test_a_lost_shard_file_is_a_named_fault_and_never_reads_as_zeros(damaged: Path) -> None:
    _shard_file(damaged, 1).unlink()
    token = CacheReader(str(damaged)).tokens[2]
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(2, "records")]
    assert "missing" in faults[0].message and token in str(faults[0])
    cli = CliRunner().invoke(app, ["cache", "verify", str(damaged)])
    assert cli.exit_code == 1 and "records" in cli.output and "OK" not in cli.output
    reader = CacheReader(str(damaged))
    reader.read(0)  # the other shard is intact
    with pytest.raises(CacheError, match=rf"sample 2 \({token}\), array records: chunk file "
                                         r"shards/000001/records/c/0 is missing"):
        reader.read(2)


def test_a_lost_array_metadata_file_is_a_fault(damaged: Path) -> None:
    (damaged / records_key(0) / "zarr.json").unlink()
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(0, "records"), (1, "records")]
    assert all("zarr.json is missing" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 0 .* array records: array metadata .*zarr.json is missing"):
        CacheReader(str(damaged)).read(0)


def test_a_short_records_array_is_a_fault(damaged: Path) -> None:
    arr = zarr.open_array(str(damaged / records_key(0)), mode="r+")
    size = arr.shape[0]
    arr.resize((size - 100,))
    faults = verify_cache(str(damaged))
    assert faults and {(f.sample_idx, f.array) for f in faults} >= {(1, "records")}
    assert any(f"stores {size - 100} bytes, the shard index lists {size}" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 1 .* array records: bytes .* lie past the array's end"):
        CacheReader(str(damaged)).read(1)


def test_a_chunk_dropped_from_its_shard_file_is_a_fault_naming_the_sections(damaged: Path) -> None:
    """Every inner chunk is stored; zarr drops a chunk of fill values from the shard file only when told to, and
    the shard index then marks it missing, which the reader and verify report (never zeros)."""
    arr = zarr.open_array(str(damaged / records_key(0)), mode="r+", config={"write_empty_chunks": False})
    assert arr.shards is not None and arr.chunks[0] < arr.shape[0]  # several inner chunks in one file
    before = _shard_file(damaged, 0).stat().st_size
    arr[: arr.chunks[0]] = 0  # the fill value: zarr leaves inner chunk 0 out of the shard file
    assert _shard_file(damaged, 0).stat().st_size < before
    reader = CacheReader(str(damaged))
    hit = [i for i in (0, 1) if reader.index["record_offset"][i] < arr.chunks[0]]
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(i, "records") for i in hit]
    assert all("not in its shard index (lost)" in f.message and "sections boxes" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 0 .* array records \(sections boxes, .*\): inner chunk\(s\) 0 "):
        reader.read(0)


def test_a_truncated_shard_file_is_a_fault(damaged: Path) -> None:
    path = _shard_file(damaged, 0)
    path.write_bytes(path.read_bytes()[:-1000])
    faults = verify_cache(str(damaged))
    assert [(f.sample_idx, f.array) for f in faults] == [(0, "records"), (1, "records")]
    assert all("checksum" in f.message or "truncated" in f.message for f in faults)
    with pytest.raises(CacheError, match=r"sample 1 .* array records: chunk file shards/000000/records/c/0"):
        CacheReader(str(damaged)).read(1)


_FILE_DAMAGE = {  # what each damage does to the cache, and the words of its fault
    "lost chunk file": (lambda c: _shard_file(c, 1).unlink(),
                        "shard 1, array records: chunk file shards/000001/records/c/0 is missing (sample 2)"),
    "lost array metadata": (lambda c: (c / records_key(0) / "zarr.json").unlink(),
                            "shard 0, array records: array metadata shards/000000/records/zarr.json is missing "
                            "(samples 0-1)"),
    "truncated shard file": (lambda c: _shard_file(c, 0).write_bytes(_shard_file(c, 0).read_bytes()[:-1000]),
                             "shard 0, array records: chunk file shards/000000/records/c/0: its shard index fails "
                             "its checksum (damaged or truncated) (samples 0-1)"),
    "lost done flags": (lambda c: (c / "done" / "c" / "1").unlink(),
                        "cache, array done: chunk file(s) done/c/1 missing: those shards read as not written"),
}


def test_info_says_complete_only_of_a_cache_whose_files_and_shard_indexes_are_sound(synth_cache: str) -> None:
    info = cache_info(synth_cache)
    assert info["complete"] and info["faults"] == [] and info["checked_shards"] == 2
    lines = CliRunner().invoke(app, ["cache", "info", synth_cache]).output.splitlines()
    assert "samples    3 / 3 done, complete" in lines
    assert any(line.startswith("checked ") and "not verified: the inner chunks' crc32c" in line for line in lines)


@pytest.mark.parametrize("damage", sorted(_FILE_DAMAGE))
def test_info_never_calls_a_cache_with_a_lost_file_or_a_bad_shard_index_complete(damage: str,
                                                                                   damaged: Path) -> None:
    harm, fault = _FILE_DAMAGE[damage]
    harm(damaged)
    info = cache_info(str(damaged))
    assert not info["complete"] and info["marked_complete"] and info["faults"][0] == fault
    cli = CliRunner().invoke(app, ["cache", "info", str(damaged)])
    assert cli.exit_code == 0, cli.output
    samples = next(line for line in cli.output.splitlines() if line.startswith("samples "))
    assert samples.endswith("done, DAMAGED") and "complete" not in samples
    assert f"fault      {fault}" in cli.output.splitlines()


@pytest.mark.parametrize("damage", ["lost chunk file", "lost array metadata", "truncated shard file"])
def test_train_student_refuses_a_damaged_cache_before_its_first_step(damage: str, damaged: Path, synth_root: Path,
                                                                     tmp_path: Path) -> None:
    harm, fault = _FILE_DAMAGE[damage]
    harm(damaged)
    out = tmp_path / "student"
    cli = CliRunner().invoke(app, ["train-student", "--preset", "demo", "--dataroot", str(synth_root), "--split",
                                   SPLIT, "--out", str(out), "--cache", str(damaged), "--epochs", "1",
                                   "--batch-size", "1", "--workers", "0", "--device", "cpu"])
    lines = [line for line in cli.output.splitlines() if line.strip()]
    assert cli.exit_code == 2 and lines == [f"error: cache {damaged} is damaged: {fault} (`tigbev cache verify` lists "
                                            "every fault)"], cli.output
    assert not out.exists()  # refused before anything was written, let alone a step


def test_the_fast_reader_returns_what_zarr_reads(damaged: Path) -> None:
    """The reader's ranged reads (shard index + crc32c per inner chunk) give exactly zarr-python's bytes."""
    reader = CacheReader(str(damaged))
    for shard in range(reader.manifest.num_shards):
        whole = np.asarray(reader.group[records_key(shard)][...])
        f = reader.records_file(shard)
        np.testing.assert_array_equal(f.read(0, len(whole)), whole)
        np.testing.assert_array_equal(f.read(70_000, 1000), whole[70_000:71_000])  # across no chunk edge
        np.testing.assert_array_equal(f.read(65_000, 2000), whole[65_000:67_000])  # across one


def test_a_cache_of_format_2_is_refused_with_how_to_re_extract(damaged: Path) -> None:
    g = zarr.open_group(str(damaged), mode="r+")
    g.attrs[CACHE_ATTR] = {**dict(g.attrs[CACHE_ATTR]), "format_version": 2}
    with pytest.raises(CacheError, match=r"format version 2 is not supported .* reads version 3\) \(format 2 "
                                         r"stored .*\); re-extract it with this tigbev's `tigbev extract-teacher`"):
        CacheReader(str(damaged))
    cli = CliRunner().invoke(app, ["cache", "info", str(damaged)])
    assert cli.exit_code == 2 and "re-extract" in cli.output and len(cli.output.strip().splitlines()) == 1


def test_dense_mode_lost_shard_file(demo_teacher_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    extract_teacher.run(_cfg(demo_teacher_ckpt, synth_root, out, features="dense"), progress=False)
    assert verify_cache(str(out)) == []
    assert CacheReader(str(out)).read(2).map_features.shape[0] == CacheReader(str(out)).manifest.features.channels
    _shard_file(out, 1).unlink()
    faults = verify_cache(str(out))
    assert [(f.sample_idx, f.array) for f in faults] == [(2, "records")]
    with pytest.raises(CacheError, match=r"sample 2 .* array records: chunk file shards/000001/records/c/0 is missing"):
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
    empty = MapVariant(aug_from_lidar=np.eye(4, dtype=np.float32), cells=np.zeros(0, np.int32),
                       features=np.zeros((0, c), np.float16), scale=np.ones(c, np.float32))
    records = [SampleRecord(sample_idx=i, token=reader.tokens[i], scene="", timestamp_us=0,
                            boxes=np.zeros((0, 10), np.float32), depth=np.zeros((0, 5), np.float32),
                            depth_per_camera=[0] * 6, variants=(empty,)) for i in (0, 1)]
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
