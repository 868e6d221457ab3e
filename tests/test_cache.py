"""Stage one and the cache: content, fidelity to the online teacher, resume after SIGKILL, parallel parts,
corruption detection, compatibility checks, fsspec URLs, and the cache CLI."""

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
import torch
from typer.testing import CliRunner

from tigbev.cache.schema import CACHE_ATTR
from tigbev.cache.store import CacheError, CacheReader, read_parquet_rows, records_key
from tigbev.cache.tools import (
    cache_info,
    dump_sample,
    keypoint_features,
    verify_cache,
)
from tigbev.cli import app
from tigbev.config import ExtractTeacherConfig
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.targets import training_boxes
from tigbev.geometry import BevGrid, points_in_boxes
from tigbev.geometry.bev_sampling import sample_bev
from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
from tigbev.models.teacher.checkpoint import load_teacher, save_checkpoint
from tigbev.stages import extract_teacher

SPLIT = "synth_train"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-preset teacher with random weights and BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model = CenterPoint(teacher_preset("demo"))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("teacher") / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "teacher_config": teacher_preset("demo").to_dict()})
    return path


def _cfg(ckpt: Path, root: Path, out: Path | str, **kw) -> ExtractTeacherConfig:
    base = {"teacher_checkpoint": ckpt, "dataroot": root, "split": SPLIT, "out_dir": str(out), "shard_samples": 2,
            "batch_size": 1, "workers": 0, "device": "cpu"}
    return ExtractTeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(teacher_ckpt: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "ref"
    # One DataLoader worker here, none in the runs compared against it: results must not depend on that.
    result = extract_teacher.run(_cfg(teacher_ckpt, synth_root, out, workers=1), progress=False)
    assert result.complete and result.samples_written == 3
    return out


def _arrays(url: Path | str) -> dict[str, np.ndarray]:
    """Every array of a cache by path (read by zarr-python), plus the consolidated index (provenance times aside,
    all content)."""
    reader = CacheReader(str(url))
    m = reader.manifest
    out = {"done": np.asarray(reader.group["done"][:])}
    for shard in range(m.num_shards):
        out[f"{shard}/records"] = np.asarray(reader.group[records_key(shard)][...])
    for k, v in read_parquet_rows(f"{reader.url}/index.parquet").items():
        out[f"index/{k}"] = np.asarray(v, dtype=object)
    return out


def _assert_same_cache(a: Path | str, b: Path | str) -> None:
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].shape == xb[k].shape, k
        assert (xa[k] == xb[k]).all(), k


def test_content_matches_the_dataset(reference: Path, synth_root: Path) -> None:
    reader = CacheReader(str(reference))
    data = NuScenesReader(synth_root, num_sweeps=3)
    tokens = data.sample_tokens(SPLIT)
    assert reader.tokens == tokens and len(reader) == 3
    reader.check_compatible(data.fingerprint(SPLIT, tokens, num_sweeps=3))
    for i, token in enumerate(tokens):
        frame = data.load_sample(token)
        s = reader.read(i)
        boxes, labels = training_boxes(frame, teacher_preset("demo").point_range_m)
        np.testing.assert_allclose(s.boxes, boxes, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(s.labels, labels)
        assert s.keypoints.shape == (len(boxes), 576, 2)
        assert sum(s.depth_per_camera) == len(s.depth) and len(s.depth) > 1000
        cam_idx = s.depth[:, 4].astype(int)
        assert (np.diff(cam_idx) >= 0).all()  # sorted by camera
        for ci, cam in enumerate(frame.cameras):
            d = s.depth[cam_idx == ci]
            assert (d[:, 0] >= -0.5).all() and (d[:, 0] < cam.width - 0.5).all() and (d[:, 2] >= 0.5).all()
        # Depth points inside a box carry that box's index: re-derive it from 3D.
        key = frame.lidar.key_points
        inside = points_in_boxes(key, boxes)
        with_box = s.depth[s.depth[:, 3] >= 0]
        assert len(with_box) > 20
        assert set(np.unique(with_box[:, 3]).astype(int)) <= set(np.flatnonzero(inside.any(axis=0)))


@pytest.mark.parametrize("mode,dtype,rtol", [("foreground", "float16", 2e-3), ("dense", "float16", 2e-3),
                                             ("foreground", "int8", 2e-2)])
def test_cached_keypoint_features_equal_the_online_teacher(teacher_ckpt: Path, synth_root: Path, tmp_path: Path,
                                                           mode: str, dtype: str, rtol: float) -> None:
    out = tmp_path / f"{mode}-{dtype}"
    extract_teacher.run(_cfg(teacher_ckpt, synth_root, out, features=mode, feature_dtype=dtype), progress=False)
    reader = CacheReader(str(out))
    model, tcfg, _ = load_teacher(teacher_ckpt)
    data = NuScenesReader(synth_root, num_sweeps=tcfg.num_sweeps)
    frame = data.load_sample(reader.tokens[1])
    with torch.inference_mode():
        online = model([torch.from_numpy(frame.lidar.points)]).bev_features
    s = reader.read(1)
    m, k = s.keypoints.shape[:2]
    want, valid = sample_bev(online, torch.from_numpy(s.keypoints.reshape(1, -1, 2)), tcfg.bev_grid)
    want = want[0].reshape(m, k, -1).numpy()
    got, got_valid = keypoint_features(reader, s)
    np.testing.assert_array_equal(got_valid, valid[0].reshape(m, k).numpy())
    scale = np.abs(want).max()
    assert scale > 0
    err = np.abs(got - want)[got_valid]
    assert err.max() <= rtol * scale, (err.max(), scale)


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from tigbev.cache.store import CacheWriter
    original = CacheWriter.write_shard
    def slow(self, shard, records):
        time.sleep(0.8)  # widen the window in which the test kills the process
        original(self, shard, records)
    CacheWriter.write_shard = slow
    from tigbev.cli import app
    sys.argv = ["tigbev", *sys.argv[1:]]
    app()
""")


def _cli_args(ckpt: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract-teacher", "--teacher-checkpoint", str(ckpt), "--dataroot", str(root), "--split", SPLIT, "--out",
            str(out), "--shard-samples", "1", "--batch-size", "1", "--workers", "0", "--device", "cpu", *extra]


def test_sigkill_then_resume_equals_an_uninterrupted_run(teacher_ckpt: Path, synth_root: Path, tmp_path: Path
                                                         ) -> None:
    ref = tmp_path / "ref"
    extract_teacher.run(_cfg(teacher_ckpt, synth_root, ref, shard_samples=1), progress=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *_cli_args(teacher_ckpt, synth_root, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "done").exists():
            try:
                done = int(np.asarray(CacheReader(str(out), require_complete=False).group["done"][:]).sum())
            except Exception:  # noqa: BLE001 - a half-created store: nothing done yet
                done = 0
            if done >= 1:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    partial = int(np.asarray(CacheReader(str(out), require_complete=False).group["done"][:]).sum())
    assert 1 <= partial < 3, "the kill must land part-way through"
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(str(out))
    result = extract_teacher.run(_cfg(teacher_ckpt, synth_root, out, shard_samples=1), progress=False)
    assert result.complete and result.samples_skipped == partial and result.samples_written == 3 - partial
    _assert_same_cache(out, ref)


def test_two_parts_in_parallel_equal_one_process(teacher_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    extract_teacher.run(_cfg(teacher_ckpt, synth_root, ref, shard_samples=1), progress=False)
    out = tmp_path / "parts"
    # Create the store first (as a launcher would), then run both parts at once.
    procs = [subprocess.Popen([sys.executable, "-m", "tigbev.cli", *_cli_args(teacher_ckpt, synth_root, out,
                                                                                "--shard", f"{i}/2")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    # Whichever part finished last consolidated the index and marked the cache complete.
    _assert_same_cache(out, ref)
    # Each part left its resolved configuration (every default filled in) beside the cache.
    parts = sorted(p.name for p in (out / "configs").iterdir())
    assert parts == ["part-0-of-2.json", "part-1-of-2.json"]
    resolved = json.loads((out / "configs" / "part-1-of-2.json").read_text())
    assert resolved["extract"]["shard_index"] == 1 and resolved["extract"]["num_parts"] == 2
    assert resolved["extract"]["keypoint_grid"] == CacheReader(str(out)).manifest.keypoints.grid_size
    assert tuple(resolved["teacher"]["point_range_m"]) == teacher_preset("demo").point_range_m


def test_flipped_byte_is_found_and_named(reference: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    shard_file = bad / records_key(1) / "c" / "0"  # shard 1 holds sample 2 alone
    raw = bytearray(shard_file.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # inside the data, before the shard index at the end
    shard_file.write_bytes(bytes(raw))
    faults = verify_cache(str(bad))
    token = CacheReader(str(bad)).tokens[2]
    assert [(f.sample_idx, f.array) for f in faults] == [(2, "records")]
    assert token in str(faults[0]) and "crc32c" in str(faults[0]) and "sections " in str(faults[0])
    result = CliRunner().invoke(app, ["cache", "verify", str(bad)])
    assert result.exit_code == 1 and "records" in result.output and token in result.output
    with pytest.raises(CacheError, match=rf"sample 2 \({token}\), array records \(sections .*\): inner chunk \d+ "):
        CacheReader(str(bad)).read(2)
    assert verify_cache(str(reference)) == []
    ok = CliRunner().invoke(app, ["cache", "verify", str(reference)])
    assert ok.exit_code == 0, ok.output


def test_mismatches_are_refused_with_what_differs(reference: Path, synth_root: Path, teacher_ckpt: Path,
                                                  tmp_path: Path) -> None:
    reader = CacheReader(str(reference))
    data = NuScenesReader(synth_root)
    with pytest.raises(CacheError, match="split: cache has 'synth_train', dataset has 'synth_val'"):
        reader.check_compatible(data.fingerprint("synth_val", data.sample_tokens("synth_val"), num_sweeps=3))
    with pytest.raises(CacheError, match="grid cell_m"):
        reader.check_compatible(data.fingerprint(SPLIT, data.sample_tokens(SPLIT), num_sweeps=3),
                                grid=BevGrid.square(51.2, 0.8).to_dict())
    # Another format version.
    future = tmp_path / "future"
    shutil.copytree(reference, future)
    import zarr

    g = zarr.open_group(str(future), mode="r+")
    manifest = dict(g.attrs[CACHE_ATTR])
    manifest["format_version"] = 99
    g.attrs[CACHE_ATTR] = manifest
    with pytest.raises(CacheError, match="format version 99"):
        CacheReader(str(future))
    # Resuming into a cache made with other settings.
    with pytest.raises(CacheError, match="features differs"):
        extract_teacher.run(_cfg(teacher_ckpt, synth_root, reference, features="dense"), progress=False)
    with pytest.raises(CacheError, match="no cache"):
        CacheReader(str(tmp_path / "nothing"))


def test_fsspec_url(teacher_ckpt: Path, synth_root: Path, reference: Path) -> None:
    url = f"memory://tigbev-test-{os.getpid()}/cache"
    result = extract_teacher.run(_cfg(teacher_ckpt, synth_root, url), progress=False)
    assert result.complete
    _assert_same_cache(url, reference)


def test_info_and_dump(reference: Path, tmp_path: Path) -> None:
    info = cache_info(str(reference))
    assert info["complete"] and info["samples"] == 3 and info["done"] == 3
    # Keypoints are not stored (derived from the boxes); foreground records are not compressed.
    assert set(info["bytes_per_sample"]) == {"boxes", "depth", "aug_from_lidar", "scale", "cells", "features"}
    assert info["bytes_per_sample_total"] >= sum(info["bytes_per_sample"].values())
    assert 0 < info["compression_ratio"] <= 1.0
    cli = CliRunner().invoke(app, ["cache", "info", str(reference)])
    assert cli.exit_code == 0 and "KiB/sample" in cli.output
    reader = CacheReader(str(reference))
    token = reader.tokens[0]
    path = dump_sample(str(reference), token, tmp_path / "s.npz")
    with np.load(path) as d:
        s = reader.read(0)
        np.testing.assert_array_equal(d["boxes"], s.boxes)
        assert d["keypoint_features"].shape == (len(s.boxes), 576, 256)
        assert d["depth"].shape == s.depth.shape
    bad = CliRunner().invoke(app, ["cache", "dump", str(reference), "--sample", "nope", "--out",
                                   str(tmp_path / "x.npz")])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_real_slice_with_the_nuscenes_preset(real_slice_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = teacher_preset("nuscenes")
    ckpt = tmp_path / "nus.pt"
    save_checkpoint(ckpt, {"model": CenterPoint(cfg).state_dict(), "teacher_config": cfg.to_dict()})
    out = tmp_path / "real"
    result = extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=real_slice_root,
                                                      split="real_slice", out_dir=str(out), workers=0, device="cpu",
                                                      shard_samples=1, batch_size=1), progress=False)
    assert result.complete
    reader = CacheReader(str(out))
    assert reader.manifest.features.channels == 512 and reader.manifest.grid.cell_m == pytest.approx(0.8)
    s = reader.read(0)
    frame = NuScenesReader(real_slice_root).load_sample(reader.tokens[0])
    # 68 boxes of detection classes, minus those without LiDAR points or outside +-51.2 m.
    expected = (frame.gt.labels >= 0) & (frame.gt.num_lidar_pts > 0)
    expected &= (np.abs(frame.gt.boxes[:, :2]) < 51.2).all(axis=1)
    assert len(s.boxes) == int(expected.sum()) > 40
    assert len(s.depth_per_camera) == 6 and min(s.depth_per_camera) > 500
    feats, valid = keypoint_features(reader, s)
    assert feats.shape == (len(s.boxes), 576, 512) and valid.mean() > 0.9


def test_samples_without_boxes(teacher_ckpt: Path, synth_root: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Real key frames can have no usable box: extraction writes them, readers and tools handle them."""
    def no_boxes(frame, point_range_m):
        return np.zeros((0, 9)), np.zeros(0, dtype=np.int64)

    monkeypatch.setattr(extract_teacher, "training_boxes", no_boxes)
    out = tmp_path / "empty"
    assert extract_teacher.run(_cfg(teacher_ckpt, synth_root, out), progress=False).complete
    reader = CacheReader(str(out))
    s = reader.read(0)
    assert s.boxes.shape == (0, 9) and s.keypoints.shape == (0, 576, 2) and len(s.map_cells) == 0
    assert len(s.depth) > 1000 and (s.depth[:, 3] == -1).all()
    feats, valid = keypoint_features(reader, s)
    assert feats.shape[0] == 0 and valid.shape == (0, 576)
    assert verify_cache(str(out)) == []


def test_extraction_of_a_given_token_list_with_repeats(teacher_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    """Benchmarks grow a dataset by repeating tokens: the cache holds exactly that list, in order, and verifies."""
    tokens = NuScenesReader(synth_root).sample_tokens(SPLIT)
    grown = tokens + tokens[:1]
    out = tmp_path / "grown"
    result = extract_teacher.run(_cfg(teacher_ckpt, synth_root, out, shard_samples=2, batch_size=2),
                                 progress=False, tokens=grown)
    assert result.complete and result.samples_written == len(grown)
    assert 0 < result.loop_seconds <= result.seconds
    reader = CacheReader(str(out))
    assert reader.tokens == grown and len(reader) == len(grown)
    first, again = reader.read(0), reader.read(len(grown) - 1)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    np.testing.assert_array_equal(first.map_features, again.map_features)
    assert verify_cache(str(out)) == []


def test_the_keypoint_lattice_is_an_extract_teacher_option(teacher_ckpt: Path, synth_root: Path,
                                                            tmp_path: Path) -> None:
    """The demo's 12 x 12 caches (here 6 x 6, enlarged by 1 m) can be made from the command line."""
    out = tmp_path / "kp6"
    result = CliRunner().invoke(app, _cli_args(teacher_ckpt, synth_root, out, "--keypoint-grid", "6",
                                               "--keypoint-enlarge-m", "1.0"))
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    assert (reader.manifest.keypoints.enlarge_m, reader.manifest.keypoints.grid_size) == (1.0, 6)
    sample = reader.read(0)
    assert sample.keypoints.shape == (len(sample.boxes), 36, 2)
    resolved = json.loads((out / "configs" / "part-0-of-1.json").read_text())["extract"]
    assert (resolved["keypoint_grid"], resolved["keypoint_enlarge_m"], resolved["shard_samples"]) == (6, 1.0, 1)


def test_zstd_records_read_back_the_same_samples_in_fewer_bytes(teacher_ckpt: Path, synth_root: Path,
                                                               reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "zstd"
    extract_teacher.run(_cfg(teacher_ckpt, synth_root, out, compression="zstd"), progress=False)
    packed, plain = CacheReader(str(out)), CacheReader(str(reference))
    assert packed.manifest.codecs["records_compressor"] == "zstd"
    assert plain.manifest.codecs["records_compressor"] == "none"
    for i in range(len(plain)):
        a, b = packed.read(i), plain.read(i)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_array_equal(a.map_cells, b.map_cells)
        np.testing.assert_array_equal(a.maps[0].stored, b.maps[0].stored)
    assert verify_cache(str(out)) == []
    assert cache_info(str(out))["bytes_per_sample_total"] < cache_info(str(reference))["bytes_per_sample_total"]
    # Resuming into it with another compression is refused (the codecs are part of what a cache is).
    with pytest.raises(CacheError, match="codecs differs"):
        extract_teacher.run(_cfg(teacher_ckpt, synth_root, out), progress=False)
