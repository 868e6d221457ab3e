"""Ray casting of the synthetic world: a spinning LiDAR and pinhole cameras see the same upright boxes.

Both sensors shoot rays laid out on a 2D grid (LiDAR: beam x azimuth step; camera: pixel row x column) from one
origin. Each part box is tested only against the rays of its own angular window on that grid (the box's corners
bound it), so the cost grows with the area objects cover, not with rays x parts. A depth buffer keeps the nearest
hit per ray, which handles occlusion for both sensors alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from tigbev.data.synth.world import ROAD_EDGES, SIDEWALK_FROM, Scene
from tigbev.geometry import box_corners, invert_pose, transform_points

__all__ = ["LABEL_GROUND", "LABEL_OBJECT0", "LABEL_SKY", "CameraModel", "CameraRender", "Hits", "LidarModel",
           "cast_lidar", "render_camera"]

_NO_HIT = -1


def hit_box(origin: NDArray[np.float64], dirs: NDArray[np.float64], box: NDArray[np.float64]
            ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Entry distance along each ray (R,) into one upright box (inf where missed) and the entry face's axis.

    Slab test in the box frame. ``dirs`` (R, 3) need not be unit length: distances are in units of |dir|.
    """
    cos, sin = math.cos(box[6]), math.sin(box[6])
    ox, oy, oz = origin - box[:3]
    o_local = (cos * ox + sin * oy, -sin * ox + cos * oy, oz)
    d_local = (cos * dirs[:, 0] + sin * dirs[:, 1], -sin * dirs[:, 0] + cos * dirs[:, 1], dirs[:, 2])
    near, far = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            half = 0.5 * box[3 + k]
            inv = 1.0 / d_local[k]
            ta, tb = (-half - o_local[k]) * inv, (half - o_local[k]) * inv
            near.append(np.minimum(ta, tb))
            far.append(np.maximum(ta, tb))
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    hit = (t_near <= t_far) & (t_near > 1e-6)  # NaN (a ray inside a slab's plane) compares False: a miss
    axis = np.where(near[0] == t_near, 0, np.where(near[1] == t_near, 1, 2))
    return np.where(hit, t_near, np.inf), axis


@dataclass
class Hits:
    """Nearest hit per ray of a (rows, cols) grid."""

    t: NDArray[np.float64]  # (rows, cols) distance, inf where nothing was hit
    part: NDArray[np.int64]  # (rows, cols) part index, -1 for ground or nothing
    axis: NDArray[np.int64]  # (rows, cols) box axis of the hit face (0, 1, 2), for normals
    ground: NDArray[np.bool_]  # (rows, cols) the ray ends on the ground plane
    rays_on_object: NDArray[np.int64] | None  # (num_objects,) rays that would reach each object unoccluded


# A window of the ray grid that may see a part: rows and columns as slices (a view) or index arrays.
Window = tuple[slice, slice | NDArray[np.int64]]


def _cast(origin: NDArray[np.float64], dirs: NDArray[np.float64], parts: NDArray[np.float64],
          owners: NDArray[np.int64], num_objects: int, windows: list[Window | None], max_range: float,
          count_unoccluded: bool) -> Hits:
    rows, cols = dirs.shape[:2]
    # The ground plane z = 0 of the global frame first; parts then overwrite where they are nearer.
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dirs[..., 2] < -1e-9, -origin[2] / dirs[..., 2], np.inf)
    t[t >= max_range] = np.inf
    ground = np.isfinite(t)
    part = np.full((rows, cols), _NO_HIT, dtype=np.int64)
    axis = np.zeros((rows, cols), dtype=np.int64)
    touched: list[list[NDArray[np.int64]]] = [[] for _ in range(num_objects)]
    for k, window in enumerate(windows):
        if window is None:
            continue
        rs, cs = window
        index = (rs, cs) if isinstance(cs, slice) else np.ix_(np.arange(rows)[rs], cs)
        sub_dirs = dirs[index]
        shape = sub_dirs.shape[:2]
        t_box, ax = hit_box(origin, sub_dirs.reshape(-1, 3), parts[k])
        t_box, ax = t_box.reshape(shape), ax.reshape(shape)
        if count_unoccluded:
            flat = (np.arange(rows)[rs][:, None] * cols + np.arange(cols)[cs][None, :])
            touched[owners[k]].append(flat[np.isfinite(t_box)])
        closer = t_box < t[index]
        if not closer.any():
            continue
        for buf, val in ((t, t_box), (part, k), (axis, ax), (ground, False)):
            sub = buf[index]
            sub[closer] = val[closer] if isinstance(val, np.ndarray) else val
            buf[index] = sub
    t[t > max_range] = np.inf
    rays_on_object = None
    if count_unoccluded:
        rays_on_object = np.array([len(np.unique(np.concatenate(f))) if f else 0 for f in touched], dtype=np.int64)
    return Hits(t=t, part=part, axis=axis, ground=ground & np.isfinite(t), rays_on_object=rays_on_object)


# --------------------------------------------------------------------------------------------------- LiDAR
@dataclass(frozen=True)
class LidarModel:
    """A spinning multi-beam LiDAR (defaults: a 32-beam unit like nuScenes' HDL-32E at 20 Hz)."""

    beams: int = 32
    azimuth_steps: int = 1084  # 0.33 deg: the HDL-32E's resolution at 20 Hz
    elevation_min_deg: float = -30.67
    elevation_max_deg: float = 10.67
    max_range_m: float = 80.0
    range_noise_m: float = 0.015
    dropout: float = 0.02

    def directions(self) -> NDArray[np.float64]:
        """Unit ray directions (beams, azimuth_steps, 3) in the lidar frame, rows in ring order."""
        el = np.deg2rad(np.linspace(self.elevation_min_deg, self.elevation_max_deg, self.beams))
        az = np.arange(self.azimuth_steps) * (2 * math.pi / self.azimuth_steps)
        return np.stack([
            np.cos(el)[:, None] * np.cos(az)[None], np.cos(el)[:, None] * np.sin(az)[None],
            np.broadcast_to(np.sin(el)[:, None], (self.beams, self.azimuth_steps)),
        ], axis=-1)


def _lidar_windows(model: LidarModel, lidar_from_global: NDArray[np.float64], parts: NDArray[np.float64]
                   ) -> list[Window | None]:
    """Beam and azimuth indices that can see each part (a conservative angular bound)."""
    el_beams = np.linspace(model.elevation_min_deg, model.elevation_max_deg, model.beams)
    beam_step = (model.elevation_max_deg - model.elevation_min_deg) / max(model.beams - 1, 1)
    az_step = 2 * math.pi / model.azimuth_steps
    corners = box_corners(parts)  # (P, 8, 3) global
    windows: list[Window | None] = []
    for k in range(len(parts)):
        c = transform_points(lidar_from_global, corners[k])
        center = c.mean(axis=0)
        dist = math.hypot(center[0], center[1])
        half_diag = 0.5 * math.hypot(parts[k, 3], parts[k, 4])
        if dist - half_diag > model.max_range_m:
            windows.append(None)
            continue
        # Elevation bounds from the nearest and farthest horizontal distances the box can have.
        r_min, r_max = max(dist - half_diag, 0.05), dist + half_diag
        z_lo, z_hi = c[:, 2].min(), c[:, 2].max()
        el_hi = math.degrees(math.atan2(z_hi, r_min if z_hi > 0 else r_max))
        el_lo = math.degrees(math.atan2(z_lo, r_min if z_lo < 0 else r_max))
        beams = np.flatnonzero((el_beams >= el_lo - beam_step) & (el_beams <= el_hi + beam_step))
        if len(beams) == 0:
            windows.append(None)
            continue
        rows = slice(int(beams[0]), int(beams[-1]) + 1)  # beams are sorted by elevation: a contiguous range
        if dist <= half_diag + 0.1:
            windows.append((rows, slice(None)))
        else:
            # The angular extent of a convex footprint not containing the sensor is bounded by its corners.
            az_center = math.atan2(center[1], center[0])
            delta = np.angle(np.exp(1j * (np.arctan2(c[:, 1], c[:, 0]) - az_center)))
            lo = math.floor((az_center + delta.min()) / az_step) - 1
            hi = math.ceil((az_center + delta.max()) / az_step) + 1
            if 0 <= lo and hi < model.azimuth_steps:
                windows.append((rows, slice(lo, hi + 1)))
            else:  # the window wraps around azimuth 0
                windows.append((rows, np.arange(lo, hi + 1) % model.azimuth_steps))
    return windows


def cast_lidar(scene: Scene, t_s: float, global_from_lidar: NDArray[np.float64], model: LidarModel,
               rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """One sweep at time t: points (N, 5) float32 (x, y, z in the lidar frame, intensity 0..255, ring index),
    and per object (num_objects,) the rays that reach it and the rays that would reach it without occluders.
    """
    parts, owners = scene.parts_at(t_s)
    lidar_from_global = invert_pose(global_from_lidar)
    dirs_lidar = model.directions()
    dirs = dirs_lidar @ global_from_lidar[:3, :3].T
    origin = global_from_lidar[:3, 3]
    windows = _lidar_windows(model, lidar_from_global, parts)
    hits = _cast(origin, dirs, parts, owners, len(scene.objects), windows, model.max_range_m, True)
    keep = np.isfinite(hits.t) & (rng.random(hits.t.shape) >= model.dropout)
    ring, _ = np.nonzero(keep)
    t_keep, d_keep, part_keep = hits.t[keep], dirs[keep], hits.part[keep]
    t_noisy = t_keep + rng.normal(0.0, model.range_noise_m, size=t_keep.shape)
    xyz_lidar = dirs_lidar[keep] * t_noisy[:, None]  # the sensor sits at the lidar frame's origin
    # Intensity: material reflectivity times (mostly) the cosine of the incidence angle.
    cos_inc = np.abs(np.einsum("nk,nk->n", _hit_normals(dirs, hits, parts)[keep], d_keep))
    xy_global = origin[:2] + d_keep[:, :2] * t_keep[:, None]
    refl = np.where(part_keep >= 0, scene.part_reflectivity()[np.maximum(part_keep, 0)],
                    ground_reflectivity(scene, xy_global))
    intensity = np.clip(255.0 * refl * (0.25 + 0.75 * cos_inc) + rng.normal(0.0, 2.0, t_keep.shape), 0.0, 255.0)
    pts = np.concatenate([xyz_lidar, np.round(intensity)[:, None], ring[:, None]], axis=1)
    visible = np.bincount(owners[hits.part[hits.part >= 0]], minlength=len(scene.objects))
    return pts.astype(np.float32), visible, hits.rays_on_object


def _hit_normals(dirs: NDArray[np.float64], hits: Hits, parts: NDArray[np.float64]) -> NDArray[np.float64]:
    """World-frame unit normals (rows, cols, 3) of the hit surfaces, facing the ray (ground: +z)."""
    normals = np.zeros(dirs.shape)
    normals[..., 2] = 1.0
    obj = hits.part >= 0
    if obj.any():
        yaw = parts[hits.part[obj], 6]
        ax = hits.axis[obj]
        n = np.zeros((len(ax), 3))
        n[ax == 0, 0], n[ax == 0, 1] = np.cos(yaw[ax == 0]), np.sin(yaw[ax == 0])
        n[ax == 1, 0], n[ax == 1, 1] = -np.sin(yaw[ax == 1]), np.cos(yaw[ax == 1])
        n[ax == 2, 2] = 1.0
        flip = np.einsum("nk,nk->n", n, dirs[obj]) > 0
        n[flip] *= -1
        normals[obj] = n
    return normals


# --------------------------------------------------------------------------------------------------- cameras
@dataclass(frozen=True)
class CameraModel:
    """A pinhole camera: image size and intrinsics (pixel centres at integer coordinates)."""

    width: int
    height: int
    intrinsics: NDArray[np.float64]

    def directions(self) -> NDArray[np.float64]:
        """Unit ray directions (H, W, 3) in the camera frame (x right, y down, z forward)."""
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        pix = np.stack([u, v, np.ones_like(u)], axis=-1)
        d = pix @ np.linalg.inv(self.intrinsics).T
        return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _camera_windows(cam: CameraModel, cam_from_global: NDArray[np.float64], parts: NDArray[np.float64]
                    ) -> list[Window | None]:
    corners = box_corners(parts)
    windows: list[Window | None] = []
    for k in range(len(parts)):
        c = transform_points(cam_from_global, corners[k])
        if (c[:, 2] <= 0.05).all():
            windows.append(None)
            continue
        if (c[:, 2] <= 0.05).any():
            windows.append((slice(None), slice(None)))  # straddles the image plane: test every pixel
            continue
        uv = (c @ cam.intrinsics.T)[:, :2] / c[:, 2:3]
        u0, v0 = max(math.floor(uv[:, 0].min()), 0), max(math.floor(uv[:, 1].min()), 0)
        u1, v1 = min(math.ceil(uv[:, 0].max()), cam.width - 1), min(math.ceil(uv[:, 1].max()), cam.height - 1)
        if u0 > u1 or v0 > v1:
            windows.append(None)
            continue
        windows.append((slice(v0, v1 + 1), slice(u0, u1 + 1)))
    return windows


LABEL_SKY = 0
LABEL_GROUND = 1
LABEL_OBJECT0 = 2
"""Per-pixel classes of a render: 0 nothing (sky), 1 the ground, 2 + k an object of DETECTION_CLASSES[k]."""


@dataclass(frozen=True)
class CameraRender:
    """What the renderer knows of one camera image, pixel by pixel."""

    rgb: NDArray[np.uint8]  # (H, W, 3)
    depth_m: NDArray[np.float32]  # (H, W) along the optical axis (camera z), inf where nothing was hit
    label: NDArray[np.uint8]  # (H, W) LABEL_SKY, LABEL_GROUND, or LABEL_OBJECT0 + detection class index


def render_camera(scene: Scene, t_s: float, global_from_cam: NDArray[np.float64], cam: CameraModel,
                  rng: np.random.Generator) -> CameraRender:
    """The camera's image of the scene at time t, with its per-pixel depth and class."""
    from tigbev.data.classes import DETECTION_CLASSES

    parts, owners = scene.parts_at(t_s)
    dirs = cam.directions() @ global_from_cam[:3, :3].T
    origin = global_from_cam[:3, 3]
    windows = _camera_windows(cam, invert_pose(global_from_cam), parts)
    hits = _cast(origin, dirs, parts, owners, len(scene.objects), windows, 250.0, False)
    # Sky: a vertical gradient from the horizon's haze to a deeper blue overhead.
    up = np.clip(dirs[..., 2], 0.0, 1.0)[..., None]
    img = (1 - up) * np.array([0.80, 0.85, 0.90]) + up * np.array([0.35, 0.55, 0.85])
    hit_xyz = origin + dirs * np.where(np.isfinite(hits.t), hits.t, 0.0)[..., None]
    if hits.ground.any():
        img[hits.ground] = ground_colour(scene, hit_xyz[hits.ground][:, :2])
    obj = hits.part >= 0
    if obj.any():
        normals = _hit_normals(dirs, hits, parts)[obj]
        lambert = np.clip(normals @ scene.sun_dir, 0.0, 1.0)
        shade = 0.40 + 0.60 * lambert
        img[obj] = scene.part_colours()[hits.part[obj]] * shade[:, None]
    # Aerial perspective: distant surfaces fade towards the haze colour.
    seen = np.isfinite(hits.t)
    fade = np.where(seen, 1.0 - np.exp(-np.where(seen, hits.t, 0.0) / 220.0), 0.0)[..., None]
    img = (1 - fade) * img + fade * np.array([0.80, 0.85, 0.90])
    img += rng.normal(0.0, 0.012, img.shape)  # sensor noise
    rgb = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    z_axis = cam.directions()[..., 2]  # the ray's component along the optical axis (camera frame)
    depth = np.where(seen, np.where(seen, hits.t, 0.0) * z_axis, np.inf).astype(np.float32)
    label = np.full(seen.shape, LABEL_SKY, dtype=np.uint8)
    label[hits.ground] = LABEL_GROUND
    if obj.any():
        class_of_object = np.array([LABEL_OBJECT0 + DETECTION_CLASSES.index(o.cls) for o in scene.objects], np.uint8)
        label[obj] = class_of_object[owners[hits.part[obj]]]
    return CameraRender(rgb=rgb, depth_m=depth, label=label)


# --------------------------------------------------------------------------------------------------- ground
def _cell_noise(ix: NDArray[np.int64], iy: NDArray[np.int64]) -> NDArray[np.float64]:
    """A deterministic value in [0, 1) per integer cell (a small integer hash; repeatable across runs)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float64) / 65536.0


def _markings(scene: Scene, xy: NDArray[np.float64]) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray]:
    """(painted white, painted yellow, lateral offset d) of ground points (N, 2)."""
    s, d = scene.road_coords(xy)
    dashed = (np.abs(d + 1.75) < 0.08) | (np.abs(d - 5.25) < 0.08)
    dashed &= np.mod(s, 9.0) < 3.0
    edges = (np.abs(d - ROAD_EDGES[0]) < 0.1) | (np.abs(d - ROAD_EDGES[1]) < 0.1)
    yellow = (np.abs(d - 1.62) < 0.06) | (np.abs(d - 1.88) < 0.06)
    return dashed | edges, yellow, d


def ground_colour(scene: Scene, xy: NDArray[np.float64]) -> NDArray[np.float64]:
    """RGB (N, 3) of ground points: asphalt with lane markings, kerbside strips, paved sidewalks."""
    white, yellow, d = _markings(scene, xy)
    fine = _cell_noise(np.floor(xy[:, 0] / 0.35).astype(np.int64), np.floor(xy[:, 1] / 0.35).astype(np.int64))
    coarse = _cell_noise(np.floor(xy[:, 0] / 3.0).astype(np.int64), np.floor(xy[:, 1] / 3.0).astype(np.int64))
    base = 0.30 + 0.05 * fine + 0.04 * coarse
    rgb = np.stack([base, base, base * 1.04], axis=1)
    off_road = (d < ROAD_EDGES[0]) | (d > ROAD_EDGES[1])
    rgb[off_road] *= 0.85
    sidewalk = np.abs(d) > SIDEWALK_FROM
    if sidewalk.any():
        s, _ = scene.road_coords(xy[sidewalk])
        tile = np.mod(np.floor(s / 1.5) + np.floor(d[sidewalk] / 1.5), 2.0)
        v = 0.60 + 0.05 * tile + 0.05 * fine[sidewalk]
        rgb[sidewalk] = np.stack([v, v * 0.97, v * 0.92], axis=1)
    rgb[white] = 0.90
    rgb[yellow] = (0.90, 0.75, 0.15)
    return rgb


def ground_reflectivity(scene: Scene, xy: NDArray[np.float64]) -> NDArray[np.float64]:
    """LiDAR reflectivity of ground points (..., 2): paint reflects far more than asphalt."""
    flat = xy.reshape(-1, 2)
    white, yellow, d = _markings(scene, flat)
    refl = np.where(np.abs(d) > SIDEWALK_FROM, 0.14, 0.07)
    refl = np.where(white | yellow, 0.55, refl)
    return refl.reshape(xy.shape[:-1])
