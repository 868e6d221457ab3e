"""The synthetic world: a straight road, objects of the 10 detection classes built from coloured boxes, motion.

Everything lives in the global frame of one scene: a flat ground at z = 0, an ego vehicle driving along the road's
axis at constant speed, and objects that are static or move at constant velocity along their heading. A scene is
fully described by :class:`Scene`; :meth:`Scene.parts_at` gives the world-frame geometry at any time, which both the
LiDAR and the cameras ray-cast, so the two modalities always see the same scene.

Object sizes follow the nuScenes class means (metres, l x w x h); each class has its own silhouette (a few upright
boxes) and colour family, so a detector can tell classes apart by shape, size and colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["CLASS_CATEGORY", "MATERIALS", "Part", "Scene", "SceneObject", "make_scene"]

# The nuScenes category each synthetic class is written as (pedestrians may also be children).
CLASS_CATEGORY: dict[str, str] = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
}

# Mean size (l, w, h) in metres and relative spread, per class (nuScenes statistics, rounded).
_SIZE_LWH: dict[str, tuple[float, float, float]] = {
    "car": (4.63, 1.96, 1.74),
    "truck": (6.93, 2.51, 2.84),
    "construction_vehicle": (6.37, 2.85, 3.19),
    "bus": (11.0, 2.94, 3.47),
    "trailer": (12.0, 2.90, 3.87),
    "barrier": (0.50, 2.53, 0.98),
    "motorcycle": (2.11, 0.77, 1.47),
    "bicycle": (1.70, 0.60, 1.28),
    "pedestrian": (0.73, 0.67, 1.77),
    "traffic_cone": (0.41, 0.41, 1.07),
}
_SIZE_SPREAD = 0.06

# Annotation boxes start this far above the ground so that ground returns never sit on a box face, and the parts
# stay 1 % inside the box in x and y: every LiDAR return is unambiguously inside or outside its box.
GROUND_GAP_M = 0.02
_INSET = 0.49


@dataclass(frozen=True)
class Material:
    """Base colour (RGB in [0, 1]) and LiDAR reflectivity in [0, 1]."""

    rgb: tuple[float, float, float]
    reflectivity: float


# Fixed materials; per-object body colours are drawn from each class's colour family in _body_colour.
MATERIALS: dict[str, Material] = {
    "tyre": Material((0.06, 0.06, 0.07), 0.05),
    "glass": Material((0.10, 0.13, 0.17), 0.08),
    "skin": Material((0.80, 0.62, 0.50), 0.25),
    "white": Material((0.92, 0.92, 0.90), 0.75),
    "red": Material((0.80, 0.10, 0.08), 0.55),
    "orange": Material((0.98, 0.45, 0.05), 0.85),
    "black": Material((0.09, 0.09, 0.10), 0.10),
    "steel": Material((0.55, 0.57, 0.60), 0.40),
}

# Hue families (HSV hue in [0, 1), saturation, value ranges) for the main body of each class.
_BODY_FAMILY: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "car": ((0.55, 0.68), (0.45, 0.85), (0.35, 0.85)),  # blues
    "truck": ((0.0, 1.0), (0.0, 0.12), (0.75, 0.95)),  # whites and light greys
    "construction_vehicle": ((0.10, 0.14), (0.80, 1.0), (0.80, 1.0)),  # safety yellow-orange
    "bus": ((0.14, 0.18), (0.70, 0.95), (0.75, 1.0)),  # yellow
    "trailer": ((0.05, 0.09), (0.45, 0.70), (0.30, 0.50)),  # browns
    "barrier": ((0.0, 1.0), (0.0, 0.05), (0.85, 0.95)),  # white
    "motorcycle": ((0.97, 1.0), (0.75, 0.95), (0.45, 0.75)),  # deep reds
    "bicycle": ((0.30, 0.40), (0.60, 0.90), (0.40, 0.75)),  # greens
    "pedestrian": ((0.72, 0.85), (0.30, 0.60), (0.25, 0.55)),  # purple clothing
    "traffic_cone": ((0.06, 0.08), (0.9, 1.0), (0.95, 1.0)),  # orange
}
# Reflectivity of the body paint per class.
_BODY_REFLECTIVITY: dict[str, float] = {
    "car": 0.35, "truck": 0.45, "construction_vehicle": 0.55, "bus": 0.40, "trailer": 0.30, "barrier": 0.75,
    "motorcycle": 0.30, "bicycle": 0.25, "pedestrian": 0.18, "traffic_cone": 0.85,
}


@dataclass(frozen=True)
class Part:
    """An upright box of an object's silhouette, in the object frame (x forward, y left, z up from the ground)."""

    x: tuple[float, float]
    y: tuple[float, float]
    z: tuple[float, float]
    material: str  # a key of MATERIALS, or "body" for the object's own colour


def _parts_for(cls: str, lwh: NDArray[np.float64], rider: bool) -> list[Part]:
    """The silhouette of one object of class ``cls`` and size ``lwh`` (metres)."""
    l, w, h = (float(v) for v in lwh)
    hx, hy = _INSET * l, _INSET * w  # half extents of the usable footprint

    def box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, mat: str) -> Part:
        # Fractions of the footprint (x, y in [-1, 1]) and of the height (z in [0, 1]).
        return Part((x0 * hx, x1 * hx), (y0 * hy, y1 * hy), (z0 * h, z1 * h), mat)

    def wheels(xs: tuple[float, ...], z1: float, y_in: float = 0.78) -> list[Part]:
        # A tyre on each side at each axle position, from the side's edge inwards to |y| = y_in.
        return [box(xc - 0.12, xc + 0.12, lo, hi, 0.0, z1, "tyre")
                for xc in xs for lo, hi in ((y_in, 1.0), (-1.0, -y_in))]

    match cls:
        case "car":
            return [
                box(-1, 1, -1, 1, 0.16, 0.55, "body"),
                box(-0.62, 0.38, -0.92, 0.92, 0.55, 1.0, "glass"),
                box(-0.62, 0.38, -0.70, 0.70, 0.95, 1.0, "body"),  # roof
                *wheels((-0.62, 0.62), 0.24),
            ]
        case "truck":
            return [
                box(0.50, 1, -1, 1, 0.09, 0.78, "body"),  # cab
                box(0.70, 1, -0.9, 0.9, 0.45, 0.72, "glass"),  # windscreen band over the cab front
                box(-1, 0.46, -1, 1, 0.16, 1.0, "steel"),  # cargo box
                *wheels((-0.7, 0.75), 0.16),
            ]
        case "construction_vehicle":
            return [
                box(-1, 0.35, -1, 1, 0.0, 0.22, "black"),  # tracks
                box(-0.95, 0.3, -0.9, 0.9, 0.22, 0.55, "body"),
                box(-0.5, 0.1, -0.8, 0.1, 0.55, 0.90, "glass"),  # operator cab
                box(0.30, 1, -0.12, 0.12, 0.35, 1.0, "body"),  # boom
                box(0.85, 1, -0.6, 0.6, 0.0, 0.35, "steel"),  # bucket
            ]
        case "bus":
            return [
                box(-1, 1, -0.98, 0.98, 0.09, 1.0, "body"),
                box(-0.96, 0.99, -1, 1, 0.52, 0.84, "glass"),  # window band, proud of the body
                *wheels((-0.65, 0.7), 0.12, y_in=0.8),
            ]
        case "trailer":
            return [
                box(-1, 0.82, -1, 1, 0.30, 1.0, "body"),
                box(0.82, 1, -0.08, 0.08, 0.25, 0.33, "steel"),  # draw bar
                *wheels((-0.8, -0.6), 0.30),
            ]
        case "barrier":
            # Length is the short axis (nuScenes barriers are ~0.5 m deep and ~2.5 m wide).
            return [
                box(-1, 1, -1, 1, 0.0, 0.15, "steel"),
                box(-0.5, 0.5, -1, 1, 0.15, 0.55, "red"),
                box(-0.5, 0.5, -1, 1, 0.55, 1.0, "body"),
            ]
        case "traffic_cone":
            return [
                box(-1, 1, -1, 1, 0.0, 0.08, "black"),
                box(-0.72, 0.72, -0.72, 0.72, 0.08, 0.52, "body"),
                box(-0.52, 0.52, -0.52, 0.52, 0.52, 0.76, "white"),
                box(-0.32, 0.32, -0.32, 0.32, 0.76, 1.0, "body"),
            ]
        case "pedestrian":
            return [
                box(-0.45, 0.45, -0.6, 0.6, 0.0, 0.47, "black"),  # legs
                box(-0.75, 0.75, -1, 1, 0.47, 0.83, "body"),  # torso
                box(-0.40, 0.40, -0.35, 0.35, 0.85, 1.0, "skin"),  # head
            ]
        case "motorcycle" | "bicycle":
            # With a rider the box is taller; the vehicle keeps its own height below the rider.
            hv = (0.62 if rider else 1.0) * h
            frac = hv / h
            frame = "body"
            parts = [
                box(0.55, 1, -0.25, 0.25, 0.0, 0.55 * frac, "tyre"),
                box(-1, -0.55, -0.25, 0.25, 0.0, 0.55 * frac, "tyre"),
                box(-0.6, 0.6, -0.35 if cls == "motorcycle" else -0.2, 0.35 if cls == "motorcycle" else 0.2,
                    0.30 * frac, 0.72 * frac, frame),
                box(0.45, 0.6, -1, 1, 0.78 * frac, 0.88 * frac, "steel"),  # handlebar
            ]
            if rider:
                parts += [
                    box(-0.45, 0.15, -0.8, 0.8, 0.62, 0.88, "black"),  # rider torso
                    box(-0.30, 0.05, -0.45, 0.45, 0.88, 1.0, "skin"),  # rider head
                ]
            return parts
    raise ValueError(f"no silhouette for class {cls!r}")


def _body_colour(cls: str, rng: np.random.Generator) -> tuple[float, float, float]:
    import colorsys

    (h0, h1), (s0, s1), (v0, v1) = _BODY_FAMILY[cls]
    return colorsys.hsv_to_rgb(rng.uniform(h0, h1) % 1.0, rng.uniform(s0, s1), rng.uniform(v0, v1))


@dataclass(frozen=True)
class SceneObject:
    """One annotated object: class, size, colour, attribute and its constant-velocity motion in the global frame."""

    cls: str
    category: str
    lwh: NDArray[np.float64]
    xy0: NDArray[np.float64]  # global position (m) at the scene's time origin
    yaw_rad: float
    speed_mps: float  # along the heading
    attribute: str  # '' for classes without attributes
    body_rgb: tuple[float, float, float]
    parts: tuple[Part, ...]

    def center_at(self, t_s: float) -> NDArray[np.float64]:
        """Global box centre (3,) at time t (seconds from the scene origin)."""
        heading = np.array([math.cos(self.yaw_rad), math.sin(self.yaw_rad)])
        xy = self.xy0 + self.speed_mps * t_s * heading
        return np.array([xy[0], xy[1], GROUND_GAP_M + 0.5 * self.lwh[2]])

    def box_at(self, t_s: float) -> NDArray[np.float64]:
        """Annotation box (7,) x, y, z, l, w, h, yaw in the global frame at time t."""
        return np.concatenate([self.center_at(t_s), self.lwh, [self.yaw_rad]])


@dataclass(frozen=True)
class Scene:
    """One synthetic scene: the road, the ego's motion and the objects, in one global frame."""

    origin_xy: NDArray[np.float64]  # where the road axis passes at s = 0
    heading_rad: float  # direction of the road and of the ego's motion
    ego_speed_mps: float
    sun_dir: NDArray[np.float64]  # unit vector towards the sun
    objects: tuple[SceneObject, ...]

    @property
    def road_dir(self) -> NDArray[np.float64]:
        return np.array([math.cos(self.heading_rad), math.sin(self.heading_rad)])

    @property
    def road_left(self) -> NDArray[np.float64]:
        return np.array([-math.sin(self.heading_rad), math.cos(self.heading_rad)])

    def ego_pose_at(self, t_s: float) -> NDArray[np.float64]:
        """global_from_ego (4, 4) at time t: the ego drives along the road axis on flat ground (z = 0)."""
        xy = self.origin_xy + self.ego_speed_mps * t_s * self.road_dir
        c, s = math.cos(self.heading_rad), math.sin(self.heading_rad)
        pose = np.eye(4)
        pose[:2, :2] = [[c, -s], [s, c]]
        pose[:2, 3] = xy
        return pose

    def road_coords(self, xy: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(s along the road, d to its left) of global points (..., 2)."""
        rel = xy - self.origin_xy
        return rel @ self.road_dir, rel @ self.road_left

    def parts_at(self, t_s: float) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """All parts as global upright boxes (P, 7) at time t, and the object index of each part (P,)."""
        boxes, owners = [], []
        for i, obj in enumerate(self.objects):
            c = obj.center_at(t_s)
            cos, sin = math.cos(obj.yaw_rad), math.sin(obj.yaw_rad)
            bottom = c[2] - 0.5 * obj.lwh[2]
            for p in obj.parts:
                lx, ly = 0.5 * (p.x[0] + p.x[1]), 0.5 * (p.y[0] + p.y[1])
                boxes.append([
                    c[0] + cos * lx - sin * ly, c[1] + sin * lx + cos * ly, bottom + 0.5 * (p.z[0] + p.z[1]),
                    p.x[1] - p.x[0], p.y[1] - p.y[0], p.z[1] - p.z[0], obj.yaw_rad,
                ])
                owners.append(i)
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 7), np.asarray(owners, dtype=np.int64)

    def part_colours(self) -> NDArray[np.float64]:
        """RGB (P, 3) of every part, in parts_at order."""
        return np.asarray(
            [o.body_rgb if p.material == "body" else MATERIALS[p.material].rgb for o in self.objects for p in o.parts],
            dtype=np.float64,
        ).reshape(-1, 3)

    def part_reflectivity(self) -> NDArray[np.float64]:
        return np.asarray(
            [_BODY_REFLECTIVITY[o.cls] if p.material == "body" else MATERIALS[p.material].reflectivity
             for o in self.objects for p in o.parts],
            dtype=np.float64,
        )


# ---------------------------------------------------------------------------------------------- scene layout
# Lateral road layout (d, metres to the left of the road axis): the ego drives at d = 0.
_LANES_SAME = (0.0, -3.5)  # same direction as the ego
_LANES_ONCOMING = (3.5, 7.0)
_PARKING = ((-11.0, -8.5), (9.5, 11.5))
_WALKWAYS = ((-17.0, -12.5), (12.5, 17.0))
_LOTS = ((-30.0, -19.0), (19.0, 30.0))
ROAD_EDGES = (-5.25, 8.75)  # kerbs: the drivable surface is between them
SIDEWALK_FROM = 12.0  # |d| beyond which the ground is pavement


@dataclass
class _Placer:
    """Places non-overlapping objects; overlap is checked at every annotated time with bounding circles."""

    times_s: NDArray[np.float64]
    scene_origin: NDArray[np.float64]
    road_dir: NDArray[np.float64]
    road_left: NDArray[np.float64]
    placed: list[tuple[NDArray[np.float64], float]] = field(default_factory=list)  # (centres (T, 2), radius)

    def try_place(self, s: float, d: float, yaw: float, speed: float, lwh: NDArray[np.float64]) -> NDArray | None:
        xy0 = self.scene_origin + s * self.road_dir + d * self.road_left
        heading = np.array([math.cos(yaw), math.sin(yaw)])
        track = xy0[None] + speed * self.times_s[:, None] * heading[None]
        radius = 0.5 * math.hypot(lwh[0], lwh[1]) + 0.3
        for other, r in self.placed:
            if np.min(np.linalg.norm(track - other, axis=1)) < radius + r:
                return None
        self.placed.append((track, radius))
        return xy0


def make_scene(rng: np.random.Generator, *, times_s: NDArray[np.float64], scene_origin_xy: NDArray[np.float64],
               density: float = 1.0) -> Scene:
    """A random scene whose objects surround the ego's path during ``times_s``.

    Every class appears at least once within 25 m of the ego's mid-scene position, so each scene can score all 10
    classes; ``density`` scales the number of additional objects.
    """
    heading = float(rng.uniform(-math.pi, math.pi))
    ego_speed = float(rng.choice([0.0, rng.uniform(2.0, 9.0)], p=[0.2, 0.8]))
    road_dir = np.array([math.cos(heading), math.sin(heading)])
    road_left = np.array([-math.sin(heading), math.cos(heading)])
    s_mid = ego_speed * float(np.mean(times_s))
    placer = _Placer(times_s=times_s, scene_origin=scene_origin_xy, road_dir=road_dir, road_left=road_left)
    # The ego itself occupies its lane.
    placer.placed.append((scene_origin_xy[None] + ego_speed * times_s[:, None] * road_dir[None], 2.8))
    lane_speed = {
        d: float(rng.choice([0.0, rng.uniform(3.0, 11.0)], p=[0.25, 0.75])) for d in _LANES_SAME + _LANES_ONCOMING
    }
    lane_speed[0.0] = ego_speed  # traffic in the ego's lane keeps its distance
    objects: list[SceneObject] = []

    def spawn(cls: str, near: bool) -> None:
        for _ in range(40):  # rejection sampling; a crowded scene simply gets fewer objects
            spec = _sample_pose(cls, rng, lane_speed, heading)
            if spec is None:
                return
            d, yaw, speed, attribute, rider = spec
            s = s_mid + (rng.uniform(-25.0, 25.0) if near else rng.uniform(-48.0, 48.0))
            lwh = np.asarray(_SIZE_LWH[cls]) * rng.uniform(1 - _SIZE_SPREAD, 1 + _SIZE_SPREAD, size=3)
            if cls in ("bicycle", "motorcycle") and rider:
                lwh[2] = rng.uniform(1.65, 1.85)
            if cls == "pedestrian" and rng.random() < 0.15:
                lwh = np.array([0.5, 0.5, rng.uniform(1.1, 1.4)])  # a child
            xy0 = placer.try_place(s, d, yaw, speed, lwh)
            if xy0 is None:
                continue
            category = CLASS_CATEGORY[cls]
            if cls == "pedestrian" and lwh[2] < 1.45:
                category = "human.pedestrian.child"
            objects.append(
                SceneObject(
                    cls=cls, category=category, lwh=lwh, xy0=xy0, yaw_rad=float(yaw), speed_mps=float(speed),
                    attribute=attribute, body_rgb=_body_colour(cls, rng),
                    parts=tuple(_parts_for(cls, lwh, rider)),
                )
            )
            return

    extra = {"car": 7, "truck": 1.5, "construction_vehicle": 0.7, "bus": 0.7, "trailer": 0.7, "barrier": 3,
             "motorcycle": 1.2, "bicycle": 1.2, "pedestrian": 5, "traffic_cone": 3}
    for cls, mean in extra.items():
        spawn(cls, near=True)
        for _ in range(int(rng.poisson(mean * density))):
            spawn(cls, near=False)
    azimuth, elevation = rng.uniform(-math.pi, math.pi), rng.uniform(0.5, 1.1)
    sun = np.array([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                    math.sin(elevation)])
    return Scene(origin_xy=scene_origin_xy, heading_rad=heading, ego_speed_mps=ego_speed, sun_dir=sun,
                 objects=tuple(objects))


def _sample_pose(cls: str, rng: np.random.Generator, lane_speed: dict[float, float], road_heading: float
                 ) -> tuple[float, float, float, str, bool] | None:
    """(lateral offset d, yaw, speed, attribute, has_rider) for one object of a class."""

    def side(ranges: tuple[tuple[float, float], ...]) -> float:
        lo, hi = ranges[rng.integers(len(ranges))]
        return float(rng.uniform(lo, hi))

    def along(d: float) -> float:
        # Heading along the road; the oncoming side (d > 0) faces the other way.
        return road_heading + (math.pi if d > 1.0 else 0.0)

    noise = float(rng.normal(0.0, 0.05))
    match cls:
        case "car" | "truck" | "bus":
            if rng.random() < 0.55:
                d = float(rng.choice(_LANES_SAME + _LANES_ONCOMING))
                speed = lane_speed[d]
                if cls == "bus" and d == 0.0:
                    d = -3.5
                    speed = lane_speed[d]
                attribute = "vehicle.moving" if speed > 0.5 else "vehicle.stopped"
                return d, along(d), speed, attribute, False
            d = side(_PARKING)
            perpendicular = cls == "car" and rng.random() < 0.25
            yaw = along(d) + (math.pi / 2 if perpendicular else 0.0) + noise
            return d, yaw, 0.0, "vehicle.parked", False
        case "construction_vehicle" | "trailer":
            d = side(_LOTS + _PARKING)
            if cls == "construction_vehicle" and rng.random() < 0.3:
                return d, along(d) + noise, float(rng.uniform(1.0, 3.0)), "vehicle.moving", False
            return d, float(rng.uniform(-math.pi, math.pi)), 0.0, "vehicle.parked", False
        case "pedestrian":
            d = side(_WALKWAYS)
            u = rng.random()
            if u < 0.6:
                yaw = road_heading + (0.0 if rng.random() < 0.5 else math.pi) + noise
                return d, yaw, float(rng.uniform(0.9, 1.7)), "pedestrian.moving", False
            attribute = "pedestrian.standing" if u < 0.92 else "pedestrian.sitting_lying_down"
            return d, float(rng.uniform(-math.pi, math.pi)), 0.0, attribute, False
        case "bicycle" | "motorcycle":
            if rng.random() < 0.6:
                d = side(_WALKWAYS) if cls == "bicycle" else float(rng.choice(_LANES_SAME + _LANES_ONCOMING))
                if cls == "bicycle":
                    yaw = road_heading + (0.0 if rng.random() < 0.5 else math.pi) + noise
                    return d, yaw, float(rng.uniform(2.5, 6.0)), "cycle.with_rider", True
                speed = lane_speed[d]
                return d, along(d), speed, "cycle.with_rider", True
            d = side(_PARKING)
            return d, along(d) + math.pi / 2 + noise, 0.0, "cycle.without_rider", False
        case "barrier":
            d = side(((-8.0, -6.0), (-11.5, -8.5), (9.5, 11.5)))
            # Barriers line the road: their long (width) axis runs along it.
            return d, road_heading + math.pi / 2 + noise, 0.0, "", False
        case "traffic_cone":
            d = side(((-8.2, -5.6), (9.0, 11.5)))
            return d, float(rng.uniform(-math.pi, math.pi)), 0.0, "", False
    return None
