"""Writes a synthetic world as a nuScenes-format dataroot that nuscenes-devkit loads and evaluates.

Layout written (``VERSION = v1.0-synth``)::

    OUT/v1.0-synth/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,
                    sample_annotation,sample_data,scene,sensor,visibility}.json, splits.json
    OUT/samples/LIDAR_TOP/*.pcd.bin   OUT/sweeps/LIDAR_TOP/*.pcd.bin   OUT/samples/CAM_*/*.jpg
    OUT/maps/<token>.png              OUT/synth_config.json

Splits (custom, in ``splits.json``): ``synth_train`` and ``synth_val``. Everything is written into a sibling
temporary folder and moved into place at the end, so an interrupted run never leaves a half-written dataroot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tigbev.config import SynthConfig
from tigbev.data.classes import ATTRIBUTES
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, LIDAR_CHANNEL
from tigbev.data.synth.raycast import (
    CameraModel,
    CameraRender,
    LidarModel,
    cast_lidar,
    render_camera,
)
from tigbev.data.synth.world import Scene, make_scene
from tigbev.errors import DatasetError
from tigbev.geometry import (
    invert_pose,
    make_pose,
    nuscenes_wlh_from_lwh,
    points_in_boxes,
    quat_wxyz_from_matrix,
    quat_wxyz_from_yaw,
    transform_boxes,
)

__all__ = ["SYNTH_VERSION", "SynthResult", "render_label_path", "write_synthetic_dataset"]

SYNTH_VERSION = "v1.0-synth"
SAMPLE_PERIOD_US = 500_000  # nuScenes key frames are annotated at 2 Hz
_EPOCH_US = 1_700_000_000_000_000  # start of the synthetic log timeline (2023-11-14), microseconds

# The nuScenes sensor rig, approximately (metres, degrees; intrinsics for 1600 x 900 images).
# LIDAR_TOP: x right, y forward relative to the ego, i.e. rotated by -90 deg about z.
_LIDAR_TRANSLATION = (0.943, 0.0, 1.840)
_LIDAR_YAW_DEG = -90.0
# channel: (translation, yaw of the optical axis in the ego frame, focal length px, (cx, cy) px)
_CAMERA_RIG: dict[str, tuple[tuple[float, float, float], float, float, tuple[float, float]]] = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.0, (816.0, 491.0)),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.49), -55.0, 1260.0, (807.0, 495.0)),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 1257.0, (828.0, 502.0)),
    "CAM_BACK": ((0.03, 0.0, 1.56), 180.0, 809.0, (829.0, 481.0)),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0, 1256.0, (817.0, 451.0)),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0, 1259.0, (807.0, 501.0)),
}
_NUSCENES_IMAGE_WH = (1600, 900)
_SCENE_ATTEMPTS = 10  # redraws of a scene until every class is observable (practically always within 3)

_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("human.pedestrian.adult", "Adult walking, standing or sitting."),
    ("human.pedestrian.child", "Child walking, standing or sitting."),
    ("human.pedestrian.wheelchair", "Person in a wheelchair."),
    ("human.pedestrian.stroller", "Stroller or pram."),
    ("human.pedestrian.personal_mobility", "Scooter, skateboard or similar small vehicle."),
    ("human.pedestrian.police_officer", "Police officer on foot."),
    ("human.pedestrian.construction_worker", "Worker in a construction zone."),
    ("animal", "Any animal."),
    ("vehicle.car", "Passenger car, van or SUV."),
    ("vehicle.motorcycle", "Motorcycle or scooter with an engine."),
    ("vehicle.bicycle", "Bicycle, with or without a rider."),
    ("vehicle.bus.bendy", "Articulated bus."),
    ("vehicle.bus.rigid", "Rigid bus."),
    ("vehicle.truck", "Truck for goods."),
    ("vehicle.construction", "Vehicle for construction work."),
    ("vehicle.emergency.ambulance", "Ambulance."),
    ("vehicle.emergency.police", "Police vehicle."),
    ("vehicle.trailer", "Trailer, with or without a tractor."),
    ("movable_object.barrier", "Temporary road barrier."),
    ("movable_object.trafficcone", "Traffic cone."),
    ("movable_object.pushable_pullable", "Cart, bin or dolly moved by hand."),
    ("movable_object.debris", "Debris on the road."),
    ("static_object.bicycle_rack", "Area where bicycles are parked."),
)
_VISIBILITY_LEVELS = (("v0-40", 0.0), ("v40-60", 0.4), ("v60-80", 0.6), ("v80-100", 0.8))


def _token(seed: int, *parts: object) -> str:
    """A deterministic 32-hex token, like nuScenes' (content-free: a hash of what the record is)."""
    return hashlib.md5("/".join(str(p) for p in (seed, *parts)).encode()).hexdigest()


@dataclass(frozen=True)
class SynthResult:
    """What ``tigbev synth`` made."""

    dataroot: Path
    version: str
    train_split: str
    val_split: str
    num_samples: int
    num_annotations: int
    seconds: float


def _static_tables(seed: int) -> dict[str, list[dict[str, Any]]]:
    sensors = [{"token": _token(seed, "sensor", c), "channel": c, "modality": "lidar" if c == LIDAR_CHANNEL else
                "camera"} for c in (LIDAR_CHANNEL, *CAMERA_CHANNELS)]
    return {
        "category": [{"token": _token(seed, "category", n), "name": n, "description": d} for n, d in _CATEGORIES],
        "attribute": [{"token": _token(seed, "attribute", n), "name": n, "description": n.replace(".", ": ")}
                      for n in ATTRIBUTES],
        "visibility": [{"token": str(i + 1), "level": lvl, "description": f"visible fraction {lvl[1:]} %"}
                       for i, (lvl, _) in enumerate(_VISIBILITY_LEVELS)],
        "sensor": sensors,
    }


def _camera_pose_and_intrinsics(channel: str, rng: np.random.Generator, width: int, height: int
                                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ego_from_cam (4, 4) and intrinsics (3, 3) for one scene's rig: the nominal rig, slightly perturbed."""
    translation, yaw_deg, focal, (cx, cy) = _CAMERA_RIG[channel]
    yaw = math.radians(yaw_deg + rng.normal(0.0, 0.3))
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    ego_from_cam_nominal = np.stack([right, down, forward], axis=1)  # columns: camera x, y, z in the ego frame
    pitch, roll = math.radians(rng.normal(0.0, 0.5)), math.radians(rng.normal(0.0, 0.2))
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    rz = np.array([[math.cos(roll), -math.sin(roll), 0], [math.sin(roll), math.cos(roll), 0], [0, 0, 1]])
    t = np.asarray(translation) + rng.normal(0.0, 0.01, 3)
    ego_from_cam = make_pose(ego_from_cam_nominal @ rx @ rz, t)
    # Scale the 1600 x 900 intrinsics; pixel centres sit at integer coordinates, hence the half-pixel shifts.
    sx, sy = width / _NUSCENES_IMAGE_WH[0], height / _NUSCENES_IMAGE_WH[1]
    f = focal * (1.0 + rng.normal(0.0, 0.004))
    intrinsics = np.array([[f * sx, 0.0, (cx + 0.5) * sx - 0.5], [0.0, f * sy, (cy + 0.5) * sy - 0.5], [0, 0, 1]])
    return ego_from_cam, intrinsics


def _pose_record(token: str, timestamp: int, pose: NDArray[np.float64]) -> dict[str, Any]:
    return {"token": token, "timestamp": timestamp, "rotation": quat_wxyz_from_matrix(pose[:3, :3]).tolist(),
            "translation": pose[:3, 3].tolist()}


def render_label_path(image_filename: str) -> str:
    """Where the renderer's labels of a camera image (``samples/<channel>/<name>.jpg``) are written, relative to the
    dataroot: ``renderer/<channel>/<name>.npz``. Outside the nuScenes tables: devkit and readers ignore it."""
    channel, name = image_filename.split("/")[-2:]
    return f"renderer/{channel}/{name.rsplit('.', 1)[0]}.npz"


def _write_labels(path: Path, render: CameraRender, stride: int) -> None:
    """Per-pixel depth (float16 m, inf: sky) and class (uint8, raycast.LABEL_*) at pixels (offset + stride * i):
    a pixel grid every ``stride`` pixels, starting at ``stride // 2``, in original image pixels."""
    offset = stride // 2
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, depth_m=render.depth_m[offset::stride, offset::stride].astype(np.float16),
                        label=render.label[offset::stride, offset::stride], stride=np.int64(stride),
                        offset=np.int64(offset))


def _write_jpeg(path: Path, rgb: NDArray[np.uint8], quality: int) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="JPEG", quality=quality)


def _render_scene(cfg: SynthConfig, scene_idx: int, root: Path) -> dict[str, list[dict[str, Any]]]:
    """All sensor files and table rows of one scene (independent of every other scene, so it can run anywhere)."""
    seed = cfg.seed
    rng = np.random.default_rng([seed, scene_idx])
    def tok(*parts: object) -> str:
        return _token(seed, scene_idx, *parts)

    log_name = f"synth-s{seed}-{scene_idx:04d}"
    start_us = _EPOCH_US + scene_idx * 3_600_000_000
    n = cfg.samples_per_scene
    key_times_s = np.arange(n) * SAMPLE_PERIOD_US * 1e-6
    ego_from_lidar = make_pose(quat_wxyz_from_yaw(math.radians(_LIDAR_YAW_DEG)), _LIDAR_TRANSLATION)
    lidar = LidarModel(azimuth_steps=cfg.lidar_azimuth_steps)
    origin = np.array([300.0 + 97.0 * scene_idx, 900.0 + 53.0 * scene_idx])
    for _ in range(_SCENE_ATTEMPTS):
        scene = make_scene(rng, times_s=key_times_s, scene_origin_xy=origin, density=cfg.object_density)
        if _every_class_observable(scene, key_times_s[n // 2], ego_from_lidar, lidar, rng):
            break
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation", "instance")}
    log_token = tok("log")
    rows["log"].append({"token": log_token, "logfile": log_name, "vehicle": "synth-ego", "location": "synth-city",
                        "date_captured": "2023-11-14"})
    # One calibration per sensor per scene (as nuScenes has per log).
    calib = {LIDAR_CHANNEL: (ego_from_lidar, None)}
    for channel in CAMERA_CHANNELS:
        calib[channel] = _camera_pose_and_intrinsics(channel, rng, cfg.image_width, cfg.image_height)
    for channel, (pose, k) in calib.items():
        rows["calibrated_sensor"].append({
            "token": tok("calib", channel), "sensor_token": _token(seed, "sensor", channel),
            "translation": pose[:3, 3].tolist(), "rotation": quat_wxyz_from_matrix(pose[:3, :3]).tolist(),
            "camera_intrinsic": [] if k is None else k.tolist(),
        })
    sample_tokens = [tok("sample", i) for i in range(n)]
    key_us = [start_us + i * SAMPLE_PERIOD_US for i in range(n)]

    # LiDAR: key sweeps and the sweeps before each of them, one time-ordered chain of sample_data.
    lidar_records: list[dict[str, Any]] = []
    key_visibility: dict[int, NDArray[np.float64]] = {}
    key_points: dict[int, NDArray[np.float32]] = {}
    for i in range(n):
        for j in range(cfg.sweeps_per_sample, -1, -1):  # earlier sweeps first, then the key sweep (j = 0)
            ts = key_us[i] - round(j * SAMPLE_PERIOD_US / (cfg.sweeps_per_sample + 1))
            t_s = (ts - start_us) * 1e-6
            global_from_lidar = scene.ego_pose_at(t_s) @ ego_from_lidar
            pts, visible, unoccluded = cast_lidar(scene, t_s, global_from_lidar, lidar, rng)
            is_key = j == 0
            folder = "samples" if is_key else "sweeps"
            filename = f"{folder}/{LIDAR_CHANNEL}/{log_name}__{LIDAR_CHANNEL}__{ts}.pcd.bin"
            (root / filename).write_bytes(pts.tobytes())
            token = tok("sd", LIDAR_CHANNEL, ts)
            rows["ego_pose"].append(_pose_record(token, ts, scene.ego_pose_at(t_s)))
            lidar_records.append({
                "token": token, "sample_token": sample_tokens[i], "ego_pose_token": token,
                "calibrated_sensor_token": tok("calib", LIDAR_CHANNEL), "timestamp": ts, "fileformat": "pcd",
                "is_key_frame": is_key, "height": 0, "width": 0, "filename": filename, "channel": LIDAR_CHANNEL,
            })
            if is_key:
                key_visibility[i] = visible / np.maximum(unoccluded, 1)
                key_points[i] = pts
    _link(lidar_records)

    # Cameras fire as the spinning LiDAR sweeps past them: a per-camera offset within the 50 ms revolution.
    camera_records: dict[str, list[dict[str, Any]]] = {c: [] for c in CAMERA_CHANNELS}
    for i in range(n):
        for channel in CAMERA_CHANNELS:
            ts = key_us[i] + round(_CAMERA_RIG[channel][1] / 360.0 * 50_000)
            t_s = (ts - start_us) * 1e-6
            ego_from_cam, k = calib[channel]
            global_from_cam = scene.ego_pose_at(t_s) @ ego_from_cam
            render = render_camera(scene, t_s, global_from_cam, CameraModel(cfg.image_width, cfg.image_height, k),
                                   rng)
            filename = f"samples/{channel}/{log_name}__{channel}__{ts}.jpg"
            _write_jpeg(root / filename, render.rgb, cfg.jpeg_quality)
            if cfg.render_labels:
                _write_labels(root / render_label_path(filename), render, cfg.label_stride)
            token = tok("sd", channel, ts)
            rows["ego_pose"].append(_pose_record(token, ts, scene.ego_pose_at(t_s)))
            camera_records[channel].append({
                "token": token, "sample_token": sample_tokens[i], "ego_pose_token": token,
                "calibrated_sensor_token": tok("calib", channel), "timestamp": ts, "fileformat": "jpg",
                "is_key_frame": True, "height": cfg.image_height, "width": cfg.image_width, "filename": filename,
                "channel": channel,
            })
    for records in camera_records.values():
        _link(records)
    rows["sample_data"] = lidar_records + [r for c in CAMERA_CHANNELS for r in camera_records[c]]
    for r in rows["sample_data"]:
        del r["channel"]  # only used while linking; not a nuScenes field

    # Annotations: every object in every key frame, linked prev/next through its instance.
    ann_tokens = [[tok("ann", o, i) for i in range(n)] for o in range(len(scene.objects))]
    for o, obj in enumerate(scene.objects):
        rows["instance"].append({
            "token": tok("instance", o), "category_token": _token(seed, "category", obj.category),
            "nbr_annotations": n, "first_annotation_token": ann_tokens[o][0], "last_annotation_token": ann_tokens[o][-1],
        })
    for i in range(n):
        t_s = key_times_s[i]
        boxes_global = np.stack([obj.box_at(t_s) for obj in scene.objects]) if scene.objects else np.zeros((0, 7))
        lidar_from_global = invert_pose(scene.ego_pose_at(t_s) @ ego_from_lidar)
        counts = points_in_boxes(key_points[i][:, :3], transform_boxes(lidar_from_global, boxes_global)).sum(0)
        for o, obj in enumerate(scene.objects):
            box = boxes_global[o]
            level = sum(key_visibility[i][o] >= lo for _, lo in _VISIBILITY_LEVELS)
            rows["sample_annotation"].append({
                "token": ann_tokens[o][i], "sample_token": sample_tokens[i], "instance_token": tok("instance", o),
                "visibility_token": str(max(level, 1)),
                "attribute_tokens": [_token(seed, "attribute", obj.attribute)] if obj.attribute else [],
                "translation": box[:3].tolist(), "size": nuscenes_wlh_from_lwh(box[3:6]).tolist(),
                "rotation": quat_wxyz_from_yaw(box[6]).tolist(),
                "prev": ann_tokens[o][i - 1] if i > 0 else "", "next": ann_tokens[o][i + 1] if i + 1 < n else "",
                "num_lidar_pts": int(counts[o]), "num_radar_pts": 0,
            })
    for i in range(n):
        rows["sample"].append({
            "token": sample_tokens[i], "timestamp": key_us[i], "scene_token": tok("scene"),
            "prev": sample_tokens[i - 1] if i > 0 else "", "next": sample_tokens[i + 1] if i + 1 < n else "",
        })
    rows["scene"].append({
        "token": tok("scene"), "log_token": log_token, "nbr_samples": n, "first_sample_token": sample_tokens[0],
        "last_sample_token": sample_tokens[-1], "name": f"scene-{scene_idx:04d}",
        "description": f"synthetic road, ego {scene.ego_speed_mps:.1f} m/s, {len(scene.objects)} objects",
    })
    return rows


def _every_class_observable(scene: Scene, t_s: float, ego_from_lidar: NDArray[np.float64], lidar: LidarModel,
                            rng: np.random.Generator) -> bool:
    """Whether each detection class has an object within its evaluation range that the LiDAR hits at time t.

    Scenes are redrawn until this holds, so that every split can score all 10 classes (DetectionEval ranges and
    drops boxes without points).
    """
    from nuscenes.eval.detection.config import config_factory

    class_range = config_factory("detection_cvpr_2019").class_range
    global_from_ego = scene.ego_pose_at(t_s)
    _, visible, _ = cast_lidar(scene, t_s, global_from_ego @ ego_from_lidar, lidar, rng)
    seen: set[str] = set()
    for obj, rays in zip(scene.objects, visible):
        dist = float(np.linalg.norm(obj.center_at(t_s)[:2] - global_from_ego[:2, 3]))
        if rays >= 3 and dist < class_range[obj.cls] - 2.0:
            seen.add(obj.cls)
    return seen == set(class_range)


def _link(records: list[dict[str, Any]]) -> None:
    """Set prev/next along a time-ordered list of sample_data records."""
    for i, r in enumerate(records):
        r["prev"] = records[i - 1]["token"] if i > 0 else ""
        r["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


def _write_map(root: Path, seed: int, log_tokens: list[str]) -> dict[str, Any]:
    """A small all-drivable semantic prior: the devkit requires every log to be covered by a map image."""
    from PIL import Image

    token = _token(seed, "map")
    filename = f"maps/{token}.png"
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(root / filename)
    return {"token": token, "category": "semantic_prior", "filename": filename, "log_tokens": log_tokens}


def write_synthetic_dataset(cfg: SynthConfig, *, progress: bool = True) -> SynthResult:
    """Render ``cfg.scenes`` scenes and write them as a nuScenes-format dataroot at ``cfg.out_dir``."""
    import time

    from tqdm import tqdm

    start = time.perf_counter()
    out = cfg.out_dir.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"output {out} already exists and is not an empty directory; choose a new path")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for sub in ("maps", f"samples/{LIDAR_CHANNEL}", f"sweeps/{LIDAR_CHANNEL}", SYNTH_VERSION,
                    *(f"samples/{c}" for c in CAMERA_CHANNELS)):
            (staging / sub).mkdir(parents=True, exist_ok=True)
        tables = _static_tables(cfg.seed)
        for name in ("log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation",
                     "instance"):
            tables[name] = []
        bar = tqdm(total=cfg.scenes, desc="synth scenes", unit="scene", disable=not progress)
        workers = min(cfg.workers, cfg.scenes)
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = [pool.submit(_render_scene, cfg, i, staging) for i in range(cfg.scenes)]
                per_scene = []
                for fut in results:  # in scene order, so the tables are the same for any worker count
                    per_scene.append(fut.result())
                    bar.update()
        else:
            per_scene = []
            for i in range(cfg.scenes):
                per_scene.append(_render_scene(cfg, i, staging))
                bar.update()
        bar.close()
        for rows in per_scene:
            for name, recs in rows.items():
                tables[name].extend(recs)
        tables["map"] = [_write_map(staging, cfg.seed, [r["token"] for r in tables["log"]])]
        for name, recs in tables.items():
            (staging / SYNTH_VERSION / f"{name}.json").write_text(json.dumps(recs, indent=0))
        names = [s["name"] for s in tables["scene"]]
        n_train = cfg.scenes - cfg.val_scenes
        splits = {cfg.train_split: names[:n_train], cfg.val_split: names[n_train:]}
        (staging / SYNTH_VERSION / "splits.json").write_text(json.dumps(splits, indent=1))
        (staging / "synth_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if out.exists():
            out.rmdir()  # it is empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SynthResult(
        dataroot=out, version=SYNTH_VERSION, train_split=cfg.train_split, val_split=cfg.val_split,
        num_samples=len(tables["sample"]), num_annotations=len(tables["sample_annotation"]),
        seconds=time.perf_counter() - start,
    )
