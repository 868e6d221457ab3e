"""nuScenes-format datasets through nuscenes-devkit, converted once into typed frames in the key lidar frame.

This is the only module that reads the devkit's tables for training data; it is also the project's one shim for
devkit quirks (predefined vs. custom splits, verbose loading, NaN velocities). Where the devkit cannot be imported
(a numpy-2 CUDA machine), the same tables are read by :class:`tigbev.data.tables.NuScenesTables`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from tigbev.cache.schema import DatasetFingerprint, tokens_sha256
from tigbev.data.classes import DETECTION_CLASSES, detection_name_of_category
from tigbev.data.tables import NuScenesTables, devkit_available
from tigbev.data.types import CameraView, GtBoxes, LidarSweeps, SampleFrame
from tigbev.errors import DatasetError
from tigbev.geometry import (
    boxes_from_nuscenes,
    invert_pose,
    make_pose,
    transform_points,
)

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes

__all__ = [
    "CAMERA_CHANNELS",
    "LIDAR_CHANNEL",
    "NuScenesReader",
    "find_version",
    "read_pcd_bin",
]

LIDAR_CHANNEL = "LIDAR_TOP"
CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)
_PCD_COLUMNS = 5  # nuScenes .pcd.bin rows: x, y, z, intensity, ring index, all float32
_TABLES = ("sample", "sample_data", "sample_annotation", "ego_pose", "calibrated_sensor", "scene")
# The fields of each table that shape what extraction computes from a sample (NuScenesReader.fingerprint).
_FINGERPRINT_FIELDS: dict[str, tuple[str, ...]] = {
    "sample": ("token", "timestamp", "scene_token"),
    "sample_data": ("token", "filename", "timestamp", "width", "height", "is_key_frame", "ego_pose_token",
                    "calibrated_sensor_token", "prev"),
    "calibrated_sensor": ("token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation"),
    "sample_annotation": ("token", "translation", "size", "rotation", "category_name", "attribute_tokens",
                          "num_lidar_pts", "num_radar_pts", "prev", "next"),
}


def read_pcd_bin(path: str | os.PathLike[str]) -> NDArray[np.float32]:
    """Raw nuScenes LiDAR file -> (N, 5) float32 (x, y, z, intensity, ring), with errors that name the file: a
    missing or truncated file, and one holding NaN or infinite values (refused where they enter, with their count)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"LiDAR file is missing: {p}")
    raw = p.read_bytes()
    row_bytes = 4 * _PCD_COLUMNS
    if len(raw) % row_bytes != 0:
        raise DatasetError(
            f"LiDAR file {p} is truncated or not a nuScenes .pcd.bin: {len(raw)} bytes is not a multiple of "
            f"{row_bytes} (5 float32 per point)"
        )
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, _PCD_COLUMNS)
    finite = np.isfinite(points)
    if not finite.all():
        bad_rows, n_bad = int((~finite).any(axis=1).sum()), int((~finite).sum())
        columns = ", ".join(name for name, ok in zip(("x", "y", "z", "intensity", "ring"), finite.all(axis=0))
                            if not ok)
        raise DatasetError(
            f"LiDAR file {p} holds {n_bad} non-finite value{'s' if n_bad > 1 else ''} (NaN or infinity, in {columns}) "
            f"in {bad_rows} of {len(points)} points; tigbev reads no sample from it, so nothing of that sample "
            "reaches a teacher, a cache or a student: repair or replace the file and rerun"
        )
    return points


def find_version(dataroot: Path) -> str:
    """The one table folder (``v1.0-*``) of a dataroot."""
    if not dataroot.is_dir():
        raise DatasetError(f"dataroot does not exist or is not a directory: {dataroot}")
    versions = sorted(p.name for p in dataroot.iterdir() if p.is_dir() and p.name.startswith("v1.0-"))
    if not versions:
        raise DatasetError(f"dataroot {dataroot} has no table folder named v1.0-* (e.g. v1.0-trainval)")
    if len(versions) > 1:
        raise DatasetError(f"dataroot {dataroot} has several table folders {versions}; pass the version to use")
    return versions[0]


class NuScenesReader:
    """Reads samples of one nuScenes-format dataroot into :class:`SampleFrame`.

    Args:
        dataroot: folder holding ``v1.0-*/`` tables, ``samples/``, ``sweeps/`` and ``maps/``.
        version: the table folder name; found automatically when the dataroot has exactly one.
        num_sweeps: LiDAR sweeps per sample, the key sweep included (1 = key sweep only). Missing earlier sweeps
            (scene start) are not padded, unless ``pad_empty_sweeps``: the sample simply has fewer.
        remove_close_m: earlier sweeps lose their points with both |x| and |y| below this, in the sweep's own
            sensor frame, before they are moved into the key frame (mmdet3d's ``remove_close``; 0: none).
        pad_empty_sweeps: a sample with no earlier sweep at all gets its key sweep again ``num_sweeps - 1`` times
            (``remove_close`` applied, time lag 0), as mmdet3d's ``LoadPointsFromMultiSweeps(pad_empty_sweeps=True)``.
        tables: ``'devkit'`` (nuscenes-devkit's ``NuScenes``), ``'light'`` (:class:`NuScenesTables`, no devkit) or
            ``'auto'``: the devkit where it imports, else the light tables.
    """

    def __init__(self, dataroot: str | os.PathLike[str], *, version: str | None = None, num_sweeps: int = 1,
                 remove_close_m: float = 0.0, pad_empty_sweeps: bool = False, tables: str = "auto"):
        self.dataroot = Path(dataroot).expanduser().resolve()
        if not self.dataroot.is_dir():
            raise DatasetError(f"dataroot does not exist or is not a directory: {self.dataroot}")
        self.version = version or find_version(self.dataroot)
        table_dir = self.dataroot / self.version
        if not table_dir.is_dir():
            raise DatasetError(f"dataroot {self.dataroot} has no table folder {self.version!r}")
        missing = [t for t in _TABLES if not (table_dir / f"{t}.json").is_file()]
        if missing:
            raise DatasetError(f"table folder {table_dir} lacks {', '.join(t + '.json' for t in missing)}")
        if num_sweeps < 1:
            raise ValueError(f"num_sweeps must be >= 1 (the key sweep), got {num_sweeps}")
        self.num_sweeps = num_sweeps
        if not remove_close_m >= 0:
            raise ValueError(f"remove_close_m must be >= 0, got {remove_close_m}")
        self.remove_close_m = float(remove_close_m)
        self.pad_empty_sweeps = bool(pad_empty_sweeps)
        if tables not in ("auto", "devkit", "light"):
            raise ValueError(f"tables must be 'auto', 'devkit' or 'light', got {tables!r}")
        self.tables = tables

    @cached_property
    def nusc(self) -> "NuScenes | NuScenesTables":
        """The table handle, loaded on first use (loading trainval takes tens of seconds)."""
        if self.tables == "light" or (self.tables == "auto" and not devkit_available()):
            return NuScenesTables(self.version, self.dataroot)
        from nuscenes.nuscenes import NuScenes

        try:
            # The devkit prints table statistics on load even when verbose=False for some tables.
            with contextlib.redirect_stdout(io.StringIO()):
                return NuScenes(version=self.version, dataroot=str(self.dataroot), verbose=False)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"table file {_first_bad_table(self.dataroot / self.version)} is not valid JSON: "
                               f"{exc}") from exc
        except (AssertionError, KeyError) as exc:
            raise DatasetError(f"nuscenes-devkit cannot load {self.dataroot / self.version}: {exc!r}") from exc

    # ----------------------------------------------------------------------------------------------- splits
    def split_names(self) -> list[str]:
        """Predefined devkit splits that match this version, plus the custom ones in ``splits.json``."""
        scene_names = {s["name"] for s in self.nusc.scene}
        names = [
            n for n, scenes in _predefined_splits().items()
            if n in _predefined_splits_of(self.version) and scene_names.intersection(scenes)
        ]
        custom = self.dataroot / self.version / "splits.json"
        if custom.is_file():
            names += list(_load_custom_splits(custom))
        return names

    def scene_names(self, split: str) -> list[str]:
        """Scene names of a predefined or custom split, restricted to scenes present in the dataroot."""
        predefined = _predefined_splits()
        custom_file = self.dataroot / self.version / "splits.json"
        custom = _load_custom_splits(custom_file) if custom_file.is_file() else {}
        if split in predefined:
            if split not in _predefined_splits_of(self.version):
                raise DatasetError(
                    f"split {split!r} belongs to another nuScenes version than {self.version!r}; available: "
                    f"{', '.join(self.split_names()) or 'none'}"
                )
            wanted = predefined[split]
        elif split in custom:
            wanted = custom[split]
        else:
            raise DatasetError(
                f"unknown split {split!r} for {self.dataroot / self.version}; available: "
                f"{', '.join(self.split_names()) or 'none'} (custom splits go in {custom_file}"
                + ("" if predefined else "; nuScenes' predefined splits need nuscenes-devkit, which does not import "
                   "here") + ")"
            )
        present = {s["name"] for s in self.nusc.scene}
        unknown = [s for s in wanted if s not in present]
        if split in custom and unknown:
            raise DatasetError(f"split {split!r} in {custom_file} names scenes not in the tables: {unknown[:5]}")
        scenes = [s for s in wanted if s in present]
        if not scenes:
            raise DatasetError(f"split {split!r} has no scene in {self.dataroot / self.version}")
        return scenes

    def sample_tokens(self, split: str) -> list[str]:
        """Sample tokens of a split, scene by scene in split order, each scene in time order."""
        nusc = self.nusc
        by_name = {s["name"]: s for s in nusc.scene}
        tokens: list[str] = []
        for name in self.scene_names(split):
            token = by_name[name]["first_sample_token"]
            while token:
                tokens.append(token)
                token = nusc.get("sample", token)["next"]
        return tokens

    def adjacent_key_samples(self, token: str, frames: int) -> list[dict]:
        """The ``frames - 1`` key samples before ``token``, nearest first, as BEVDet4D takes them: the sample ``k``
        key frames earlier in the same scene, or the sample itself where the scene has fewer than ``k`` before it
        (at a scene's first sample every earlier frame is the current one)."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1 (the current key frame), got {frames}")
        nusc = self.nusc
        try:
            current = nusc.get("sample", token)
        except KeyError:
            raise DatasetError(f"sample token {token!r} is not in {self.dataroot / self.version}") from None
        out, rec = [], current
        for _ in range(frames - 1):
            rec = nusc.get("sample", rec["prev"]) if rec is not None and rec["prev"] else None
            out.append(current if rec is None else rec)
        return out

    def sample_classes(self, token: str) -> frozenset[int]:
        """Detection classes (indices into ``DETECTION_CLASSES``) of the sample's valid annotations, those with at
        least one LiDAR or radar point (mmdet3d's ``use_valid_flag``): what class-balanced sampling counts. Reads
        the tables only."""
        nusc = self.nusc
        found = set()
        for ann_token in nusc.get("sample", token)["anns"]:
            a = nusc.get("sample_annotation", ann_token)
            det = detection_name_of_category(a["category_name"])
            if det is not None and a["num_lidar_pts"] + a["num_radar_pts"] > 0:
                found.add(DETECTION_CLASSES.index(det))
        return frozenset(found)

    # ----------------------------------------------------------------------------------------------- fingerprint
    def fingerprint(self, split: str, tokens: Sequence[str], *, num_sweeps: int) -> DatasetFingerprint:
        """What a cache of these samples is computed from: the tokens, the content of every table record that
        shapes a sample's cached data, and the image sizes.

        Per sample: its ``sample`` record; the ``sample_data`` of its key LiDAR sweep, the ``num_sweeps - 1``
        sweeps before it and its six camera images (file name, time, size, pose and calibration tokens); their
        ``calibrated_sensor`` (extrinsics, intrinsics) and ``ego_pose`` records; its ``sample_annotation`` records
        (pose, size, category, attributes, point counts, neighbours for the velocity). Each table's records are
        hashed in sample order, so any change to one of them changes that table's digest.
        """
        nusc = self.nusc
        digests = {t: hashlib.sha256() for t in _FINGERPRINT_FIELDS}
        sizes: dict[str, set[str]] = {}

        def add(table: str, rec: dict) -> None:
            values = [rec.get(k) for k in _FINGERPRINT_FIELDS[table]]
            digests[table].update(json.dumps(values, separators=(",", ":")).encode())

        for token in tokens:
            try:
                sample = nusc.get("sample", token)
            except KeyError:
                raise DatasetError(f"sample token {token!r} is not in {self.dataroot / self.version}") from None
            add("sample", sample)
            data = []
            sd_token = sample["data"].get(LIDAR_CHANNEL)
            for _ in range(num_sweeps):
                if not sd_token:
                    break
                sd = nusc.get("sample_data", sd_token)
                data.append(sd)
                sd_token = sd["prev"]
            for channel in CAMERA_CHANNELS:
                if channel in sample["data"]:
                    sd = nusc.get("sample_data", sample["data"][channel])
                    data.append(sd)
                    sizes.setdefault(channel, set()).add(f"{sd['width']}x{sd['height']}")
            for sd in data:
                add("sample_data", sd)
                add("calibrated_sensor", nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]))
                add("ego_pose", nusc.get("ego_pose", sd["ego_pose_token"]))
            for ann_token in sample["anns"]:
                add("sample_annotation", nusc.get("sample_annotation", ann_token))
        return DatasetFingerprint(
            version=self.version, split=split, num_samples=len(tokens), tokens_sha256=tokens_sha256(tokens),
            records_sha256={t: h.hexdigest() for t, h in digests.items()},
            image_sizes={ch: sorted(v) for ch, v in sorted(sizes.items())})

    # ----------------------------------------------------------------------------------------------- poses
    def _pose(self, table: str, token: str) -> NDArray[np.float64]:
        rec = self.nusc.get(table, token)
        return make_pose(rec["rotation"], rec["translation"])

    def global_from_sensor(self, sample_data_token: str) -> NDArray[np.float64]:
        """global_from_ego(t_sensor) @ ego_from_sensor for one sample_data record."""
        sd = self.nusc.get("sample_data", sample_data_token)
        return self._pose("ego_pose", sd["ego_pose_token"]) @ self._pose(
            "calibrated_sensor", sd["calibrated_sensor_token"]
        )

    # ----------------------------------------------------------------------------------------------- loading
    def _sensor_path(self, sd: dict) -> Path:
        path = self.dataroot / sd["filename"]
        if not path.is_file():
            raise DatasetError(f"sensor file of sample_data {sd['token']} ({sd['channel']}) is missing: {path}")
        return path

    def load_lidar(self, lidar_token: str) -> LidarSweeps:
        """Key sweep + up to ``num_sweeps - 1`` earlier sweeps, in the key lidar frame, with time lags."""
        nusc = self.nusc
        key_sd = nusc.get("sample_data", lidar_token)
        key_from_global = invert_pose(self.global_from_sensor(lidar_token))
        chunks, paths = [], []
        sd = key_sd
        for _ in range(self.num_sweeps):
            path = self._sensor_path(sd)
            raw = read_pcd_bin(path)
            if sd["token"] != lidar_token and self.remove_close_m > 0:
                raw = self._remove_close(raw)
            pts = np.empty((len(raw), 5), dtype=np.float32)
            if sd["token"] == lidar_token:
                pts[:, :3] = raw[:, :3]
            else:
                key_from_sweep = key_from_global @ self.global_from_sensor(sd["token"])
                pts[:, :3] = transform_points(key_from_sweep, raw[:, :3])
            pts[:, 3] = raw[:, 3]
            pts[:, 4] = (key_sd["timestamp"] - sd["timestamp"]) * 1e-6
            chunks.append(pts)
            paths.append(path)
            if not sd["prev"]:
                break
            sd = nusc.get("sample_data", sd["prev"])
        if self.pad_empty_sweeps and len(chunks) == 1 and self.num_sweeps > 1:
            key = chunks[0] if self.remove_close_m <= 0 else self._remove_close(chunks[0])
            chunks += [key] * (self.num_sweeps - 1)
            paths += [paths[0]] * (self.num_sweeps - 1)
        return LidarSweeps(points=np.concatenate(chunks), num_key_points=len(chunks[0]), sweep_paths=tuple(paths))

    def _remove_close(self, points: NDArray[np.float32]) -> NDArray[np.float32]:
        """The points mmdet3d's ``remove_close`` keeps: not both |x| and |y| below the radius."""
        r = self.remove_close_m
        return points[~((np.abs(points[:, 0]) < r) & (np.abs(points[:, 1]) < r))]

    def load_cameras(self, sample: dict, lidar_token: str) -> tuple[CameraView, ...]:
        nusc = self.nusc
        global_from_lidar = self.global_from_sensor(lidar_token)
        views = []
        for channel in CAMERA_CHANNELS:
            if channel not in sample["data"]:
                raise DatasetError(f"sample {sample['token']} has no {channel} image")
            sd = nusc.get("sample_data", sample["data"][channel])
            calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            intrinsics = np.asarray(calib["camera_intrinsic"], dtype=np.float64)
            if intrinsics.shape != (3, 3):
                raise DatasetError(
                    f"calibrated_sensor {calib['token']} of {channel} has no 3x3 camera_intrinsic: {intrinsics}"
                )
            cam_from_lidar = invert_pose(self.global_from_sensor(sd["token"])) @ global_from_lidar
            views.append(
                CameraView(
                    channel=channel,
                    sample_data_token=sd["token"],
                    image_path=self._sensor_path(sd),
                    width=int(sd["width"]),
                    height=int(sd["height"]),
                    timestamp_us=int(sd["timestamp"]),
                    intrinsics=intrinsics,
                    cam_from_lidar=cam_from_lidar,
                )
            )
        return tuple(views)

    def load_gt(self, sample: dict, lidar_token: str) -> GtBoxes:
        nusc = self.nusc
        lidar_from_global = invert_pose(self.global_from_sensor(lidar_token))
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        devkit_boxes = [nusc.get_box(a["token"]) for a in anns]
        velocities = np.array([nusc.box_velocity(a["token"])[:2] for a in anns], dtype=np.float64).reshape(-1, 2)
        boxes = boxes_from_nuscenes(devkit_boxes, lidar_from_global, velocities)
        labels, attributes = [], []
        for a in anns:
            det = detection_name_of_category(a["category_name"])
            labels.append(DETECTION_CLASSES.index(det) if det is not None else -1)
            if len(a["attribute_tokens"]) > 1:
                raise DatasetError(f"sample_annotation {a['token']} has more than one attribute")
            attributes.append(nusc.get("attribute", a["attribute_tokens"][0])["name"] if a["attribute_tokens"] else "")
        return GtBoxes(
            boxes=boxes,
            labels=np.asarray(labels, dtype=np.int64),
            category_names=tuple(a["category_name"] for a in anns),
            attribute_names=tuple(attributes),
            num_lidar_pts=np.asarray([a["num_lidar_pts"] for a in anns], dtype=np.int64),
            num_radar_pts=np.asarray([a["num_radar_pts"] for a in anns], dtype=np.int64),
            annotation_tokens=tuple(a["token"] for a in anns),
            instance_tokens=tuple(a["instance_token"] for a in anns),
        )

    def load_sample(self, token: str) -> SampleFrame:
        """Everything a sample holds, in the key lidar frame."""
        nusc = self.nusc
        try:
            sample = nusc.get("sample", token)
        except KeyError:
            raise DatasetError(f"sample token {token!r} is not in {self.dataroot / self.version}") from None
        if LIDAR_CHANNEL not in sample["data"]:
            raise DatasetError(f"sample {token} has no {LIDAR_CHANNEL} sweep")
        lidar_token = sample["data"][LIDAR_CHANNEL]
        lidar_sd = nusc.get("sample_data", lidar_token)
        return SampleFrame(
            token=token,
            scene_name=nusc.get("scene", sample["scene_token"])["name"],
            timestamp_us=int(sample["timestamp"]),
            lidar_sample_data_token=lidar_token,
            ego_from_lidar=self._pose("calibrated_sensor", lidar_sd["calibrated_sensor_token"]),
            global_from_ego=self._pose("ego_pose", lidar_sd["ego_pose_token"]),
            lidar=self.load_lidar(lidar_token),
            cameras=self.load_cameras(sample, lidar_token),
            gt=self.load_gt(sample, lidar_token),
        )


def _predefined_splits() -> dict[str, list[str]]:
    """nuScenes' predefined splits (scene names) from the devkit; none where it is not installed."""
    try:
        from nuscenes.utils.splits import create_splits_scenes
    except ImportError:
        return {}
    return create_splits_scenes()


def _first_bad_table(table_dir: Path) -> Path | str:
    """The first table file of a folder that does not parse (to name it in an error)."""
    for path in sorted(table_dir.glob("*.json")):
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError:
            return path
    return table_dir


def _predefined_splits_of(version: str) -> frozenset[str]:
    """The devkit's predefined splits that its evaluation accepts for a version (loaders.load_gt's rule)."""
    if version.endswith("trainval"):
        return frozenset({"train", "val", "train_detect", "train_track"})
    if version.endswith("mini"):
        return frozenset({"mini_train", "mini_val"})
    if version.endswith("test"):
        return frozenset({"test"})
    return frozenset()


def _load_custom_splits(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"custom split file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise DatasetError(f"custom split file {path} must map split names to lists of scene names")
    return data
