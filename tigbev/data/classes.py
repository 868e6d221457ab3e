"""The nuScenes detection taxonomy: 10 classes, their attributes, and the categories they come from."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ATTRIBUTES",
    "CATEGORY_TO_DETECTION",
    "CLASS_ATTRIBUTES",
    "DEFAULT_ATTRIBUTE",
    "DETECTION_CLASSES",
    "attribute_from_velocity",
    "detection_name_of_category",
]

# Order of the nuScenes detection benchmark and of mmdetection3d's CenterPoint heads.
DETECTION_CLASSES: Final[tuple[str, ...]] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)

ATTRIBUTES: Final[tuple[str, ...]] = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)

# Which attributes the devkit accepts for each class (an empty tuple: the class has none).
CLASS_ATTRIBUTES: Final[dict[str, tuple[str, ...]]] = {
    **{c: ("vehicle.moving", "vehicle.stopped", "vehicle.parked")
       for c in ("car", "truck", "construction_vehicle", "bus", "trailer")},
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "pedestrian": ("pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving"),
    "barrier": (),
    "traffic_cone": (),
}

# The attribute a detector reports for a class when it predicts none (the most frequent one in nuScenes).
DEFAULT_ATTRIBUTE: Final[dict[str, str]] = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving",
    "trailer": "vehicle.parked",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "pedestrian": "pedestrian.moving",
    "barrier": "",
    "traffic_cone": "",
}


def detection_name_of_category(category_name: str) -> str | None:
    """The detection class of a nuScenes category (e.g. 'vehicle.bus.rigid' -> 'bus'), or None if it has none.

    Delegates to the devkit so the mapping is the benchmark's own; where the devkit does not import (numpy 2),
    :data:`CATEGORY_TO_DETECTION` holds the same mapping (a test compares the two).
    """
    try:
        from nuscenes.eval.detection.utils import category_to_detection_name
    except ImportError:
        return CATEGORY_TO_DETECTION.get(category_name)
    return category_to_detection_name(category_name)


# The nuScenes detection benchmark's category mapping (pedestrian leaves out personal mobility, strollers and
# wheelchairs; animals, debris and the like have no detection class).
CATEGORY_TO_DETECTION: dict[str, str] = {
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.barrier": "barrier",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}


def attribute_from_velocity(name: str, speed_mps: float, moving_above_mps: float = 0.2) -> str:
    """The attribute a detector without an attribute branch reports: motion decides (as mmdetection3d does)."""
    if name in ("car", "truck", "construction_vehicle", "bus", "trailer"):
        return "vehicle.moving" if speed_mps > moving_above_mps else DEFAULT_ATTRIBUTE[name]
    if name in ("motorcycle", "bicycle"):
        return "cycle.with_rider" if speed_mps > moving_above_mps else DEFAULT_ATTRIBUTE[name]
    if name == "pedestrian":
        return "pedestrian.moving" if speed_mps > moving_above_mps else "pedestrian.standing"
    return ""
