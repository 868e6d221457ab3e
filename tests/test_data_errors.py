"""Bad datasets give one DatasetError that names the file or split at fault.

Tests that break the dataset work on a copy of the real slice in tmp_path (the original stays read-only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tigbev.data.nuscenes_reader import NuScenesReader, read_pcd_bin
from tigbev.errors import DatasetError

SAMPLE_TOKEN = "ca9a282c9e77460f8360f564131a8af5"


@pytest.fixture()
def slice_copy(real_slice_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the slice (tables and sensor files; the devkit-side extras are not needed)."""
    dst = tmp_path / "nuscenes"
    shutil.copytree(real_slice_root, dst, ignore=shutil.ignore_patterns("extras"))
    return dst.resolve()  # the reader names resolved paths


def _sensor_file(root: Path, channel: str) -> Path:
    sample_data = json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
    sample = json.loads((root / "v1.0-mini" / "sample.json").read_text())
    (sample_rec,) = [s for s in sample if s["token"] == SAMPLE_TOKEN]
    files = [
        sd["filename"] for sd in sample_data
        if sd["sample_token"] == sample_rec["token"] and sd["is_key_frame"] and f"__{channel}__" in sd["filename"]
    ]
    assert len(files) == 1, files
    return root / files[0]


def test_missing_dataroot(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "dataroot"
    with pytest.raises(DatasetError, match="dataroot") as info:
        NuScenesReader(missing)
    assert str(missing.resolve()) in str(info.value)


def test_copy_loads_like_the_original(slice_copy: Path):
    # Guards the tests below: a failure there must come from the damage, not from the copy.
    frame = NuScenesReader(slice_copy).load_sample(SAMPLE_TOKEN)
    assert frame.lidar.num_key_points == 34_688 and len(frame.gt) == 69


def test_missing_camera_image(slice_copy: Path):
    image = _sensor_file(slice_copy, "CAM_BACK_LEFT")
    image.unlink()
    reader = NuScenesReader(slice_copy)
    with pytest.raises(DatasetError, match="missing") as info:
        reader.load_sample(SAMPLE_TOKEN)
    assert str(image) in str(info.value)
    assert "CAM_BACK_LEFT" in str(info.value)


def test_truncated_lidar_file(slice_copy: Path):
    lidar = _sensor_file(slice_copy, "LIDAR_TOP")
    raw = lidar.read_bytes()
    lidar.write_bytes(raw[:-3])
    reader = NuScenesReader(slice_copy)
    with pytest.raises(DatasetError, match="truncated") as info:
        reader.load_sample(SAMPLE_TOKEN)
    assert str(lidar) in str(info.value)
    assert str(len(raw) - 3) in str(info.value)  # the byte count that gave it away
    # The reader function on its own says the same.
    with pytest.raises(DatasetError, match="truncated"):
        read_pcd_bin(lidar)


def test_unknown_split(real_slice_root: Path):
    reader = NuScenesReader(real_slice_root)
    with pytest.raises(DatasetError, match="unknown split 'mini_trian'") as info:
        reader.sample_tokens("mini_trian")
    # Where custom splits go (the reader names resolved paths; shared/ may be a symlink).
    assert str(real_slice_root.resolve() / "v1.0-mini" / "splits.json") in str(info.value)


def test_invalid_custom_splits_json(slice_copy: Path):
    splits = slice_copy / "v1.0-mini" / "splits.json"
    splits.write_text('{"real_slice": ["scene-0061"],')
    reader = NuScenesReader(slice_copy)
    for call in (reader.split_names, lambda: reader.sample_tokens("real_slice")):
        with pytest.raises(DatasetError, match="not valid JSON") as info:
            call()
        assert str(splits) in str(info.value)


def test_corrupt_table_names_the_file(tmp_path: Path, real_slice_root: Path) -> None:
    root = tmp_path / "slice"
    shutil.copytree(real_slice_root, root)
    table = root / "v1.0-mini" / "sample_annotation.json"
    table.write_text(table.read_text()[:-20])
    with pytest.raises(DatasetError, match="sample_annotation.json"):
        NuScenesReader(root).sample_tokens("mini_train")


def test_unreadable_image_is_a_dataset_error(tmp_path: Path, real_slice_root: Path) -> None:
    root = tmp_path / "slice"
    shutil.copytree(real_slice_root, root)
    reader = NuScenesReader(root)
    frame = reader.load_sample(reader.sample_tokens("mini_train")[0])
    cam = frame.camera("CAM_FRONT")
    cam.image_path.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="CAM_FRONT"):
        cam.load_image()
