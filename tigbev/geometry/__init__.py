"""Geometry written once: frames and poses, boxes, the BEV grid, camera projection, keypoints.

Conventions are in docs/COORDINATES.md; nothing here imports torch or the nuScenes devkit at import time.
"""

from tigbev.geometry.bev import NUSCENES_POINT_RANGE_M, BevGrid
from tigbev.geometry.boxes import (
    BOX_DIM,
    BOX_DIM_VEL,
    box_corners,
    boxes_from_nuscenes,
    boxes_to_nuscenes,
    count_points_in_boxes,
    first_box_of_points,
    lwh_from_nuscenes_wlh,
    nuscenes_wlh_from_lwh,
    points_in_boxes,
    transform_boxes,
    wrap_angle,
)
from tigbev.geometry.frames import (
    invert_pose,
    make_pose,
    matrix_from_quat_wxyz,
    quat_wxyz_from_matrix,
    quat_wxyz_from_yaw,
    rotate_vectors,
    transform_points,
    yaw_from_quat_wxyz,
    yaw_from_rotation,
    yaw_twist_of_pose,
)
from tigbev.geometry.keypoints import (
    KEYPOINT_ENLARGE_M,
    KEYPOINT_GRID,
    box_keypoints_xy,
)
from tigbev.geometry.projection import ProjectedPoints, project_points, project_to_image

__all__ = [
    "KEYPOINT_ENLARGE_M",
    "KEYPOINT_GRID",
    "NUSCENES_POINT_RANGE_M",
    "BOX_DIM",
    "BOX_DIM_VEL",
    "BevGrid",
    "ProjectedPoints",
    "box_corners",
    "box_keypoints_xy",
    "boxes_from_nuscenes",
    "boxes_to_nuscenes",
    "count_points_in_boxes",
    "first_box_of_points",
    "invert_pose",
    "lwh_from_nuscenes_wlh",
    "make_pose",
    "matrix_from_quat_wxyz",
    "nuscenes_wlh_from_lwh",
    "points_in_boxes",
    "project_points",
    "project_to_image",
    "quat_wxyz_from_matrix",
    "quat_wxyz_from_yaw",
    "rotate_vectors",
    "transform_boxes",
    "transform_points",
    "wrap_angle",
    "yaw_from_quat_wxyz",
    "yaw_from_rotation",
    "yaw_twist_of_pose",
]
