"""Camera-student samples (stage two): six augmented images, their geometry, GT, depth targets and teacher targets.

Per sample one :class:`~tigbev.data.image_aug.ImageTransform` per camera and one BDA
:class:`~tigbev.data.augment.BevTransform` are drawn from ``(seed, epoch, index)`` and replayed on everything:

- images: resampled by the image transform, then ImageNet-normalised;
- LiDAR depth: points ``(u, v)`` in original pixels (from the cache, or projected here from the key sweep when no
  cache is given) go through the image transform, then the nearest point per feature cell is kept
  (``nearest_depth_map``); depth along the optical axis does not change under a 2D similarity of the image;
- GT boxes and ``kp_student_xy``: through the BDA matrix; ``kp_teacher_xy`` and the teacher map cells are in the
  teacher map's own frame ``map_from_lidar``, so keypoint ``k`` of box ``m`` names the same physical point in the
  student's (augmented) map and in the teacher's map. That frame is the identity for a canonical cache, the stored
  flip for a ``flips`` cache, and the BDA itself for a stored draw (the BDA is then the draw's:
  :func:`~tigbev.data.augment.choose_variant`) and for the online teacher, which runs on the augmented points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from tigbev.cache.store import CacheError, CacheReader
from tigbev.data.augment import BevAugmentPolicy, BevTransform, choose_variant, similarity_apply_xy
from tigbev.data.camera_batch import CameraBatch, TeacherTargets
from tigbev.data.image_aug import ImageAugPolicy, ImageTransform
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, LIDAR_CHANNEL, NuScenesReader
from tigbev.data.targets import depth_points, nearest_depth_map, training_boxes
from tigbev.data.types import CameraView
from tigbev.errors import DatasetError
from tigbev.geometry import BevGrid, box_keypoints_xy

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CameraDetectionDataset", "CameraSample", "collate_camera",
           "pad_box_keypoints"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # RGB, of images scaled to [0, 1]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class CameraSample:
    """One sample as the dataset returns it; :func:`collate_camera` batches these into a :class:`CameraBatch`."""

    token: str
    images: torch.Tensor  # (N, 3, H, W) float32, normalised
    intrinsics: torch.Tensor  # (N, 3, 3) original-image intrinsics
    cam_from_lidar: torch.Tensor  # (N, 4, 4)
    aug_px_from_px: torch.Tensor  # (N, 3, 3) original pixel -> augmented pixel
    aug_from_lidar: torch.Tensor  # (4, 4)
    boxes: torch.Tensor  # (M, 9) float32, augmented BEV frame
    labels: torch.Tensor  # (M,) int64
    depth_m: torch.Tensor  # (N, h, w) float32, 0: no LiDAR point
    depth_box: torch.Tensor  # (N, h, w) int64, -1: none
    kp_teacher_xy: torch.Tensor | None = None  # (M, K, 2) float32, the teacher map's frame (map_from_lidar)
    kp_student_xy: torch.Tensor | None = None  # (M, K, 2) float32, augmented frame
    map_from_lidar: torch.Tensor | None = None  # (4, 4) the teacher map's frame (kp_teacher_xy's)
    map_cells: torch.Tensor | None = None  # (F,) int64 foreground mode; None in dense mode
    map_features: torch.Tensor | None = None  # (F, C) or (C, H, W) float16
    lidar_points: torch.Tensor | None = None  # (P, 5) float32 teacher LiDAR, un-augmented key frame (online teacher)
    prev_images: torch.Tensor | None = None  # (T-1, N, 3, H, W) earlier key frames, nearest first (frames > 1)
    prev_intrinsics: torch.Tensor | None = None  # (T-1, N, 3, 3)
    prev_cam_from_lidar: torch.Tensor | None = None  # (T-1, N, 4, 4) earlier cameras from the *current* lidar frame


class CameraDetectionDataset(Dataset):
    """Samples of one split for the camera student.

    Args:
        reader: the dataset (``num_sweeps=1`` is enough: the student uses the key sweep only, and only without cache).
        tokens: the split's sample tokens, in order (with a cache: exactly the tokens it was extracted from).
        cache: the teacher cache; GT boxes, depth points and teacher targets come from it. ``None``: GT boxes from
            ``training_boxes(frame, point_range_m)`` and depth from the key sweep; no teacher targets.
        split: the split name; the cache must have been extracted from it (checked once, here).
        online_keypoints: ``(grid_size, enlarge_m)``: without a cache, each box's keypoints for the online teacher,
            laid here on the un-augmented boxes and carried into the augmented frame like the cached ones; the
            teacher map's frame is the BDA's (the published way: the online teacher runs on the augmented points,
            :class:`~tigbev.engine.online_teacher.OnlineTeacher`), so both keypoint sets are the augmented ones.
        cache_grid: the student's BEV grid; a cache whose teacher map spans another range is refused (its cell size
            may differ: keypoint features are sampled at metric positions).
        input_hw: network input (H, W) in pixels; must equal ``image_policy.input_hw``.
        feature_stride: pixels per depth-target cell (16 for a stride-16 image backbone).
        image_policy: image augmentation; with ``train=False`` its :meth:`~ImageAugPolicy.eval_transform` is used.
        bda_policy: BEV augmentation, used when ``train``; ``None``: none.
        seed: augmentation depends on ``(seed, epoch, index)`` only (see :meth:`set_epoch`).
        train: draw random augmentation; ``False``: deterministic eval transform and no BDA.
        point_range_m: (x0, y0, z0, x1, y1, z1) box filter without a cache (the teacher's point range).
        min_depth_m: nearest depth projected without a cache (the extraction's ``min_depth_m``).
        lidar_reader: for the online teacher: a reader with the teacher's ``num_sweeps``; each sample then also
            carries the teacher's multi-sweep points (``lidar_points``, un-augmented key lidar frame, metres), so
            the LiDAR is read in the DataLoader workers and not in the training process. Without a cache the same
            frame also gives the GT boxes and the depth points (its key sweep), so nothing is read twice.
        frames: key frames per sample, the current one included (BEVDet4D: 2). Each sample then also carries the
            ``frames - 1`` earlier key frames' images (:meth:`NuScenesReader.adjacent_key_samples`: the current one
            at a scene's start) with their cameras' extrinsics from the current lidar frame. Teacher targets, depth
            and boxes stay the current frame's, so a cache serves any ``frames``.
    """

    def __init__(self, reader: NuScenesReader, tokens: Sequence[str], *, cache: CacheReader | None,
                 input_hw: tuple[int, int], feature_stride: int, image_policy: ImageAugPolicy,
                 bda_policy: BevAugmentPolicy | None, seed: int = 0, train: bool = True, split: str | None = None,
                 cache_grid: BevGrid | None = None, point_range_m: Sequence[float] | None = None,
                 min_depth_m: float = 0.5, lidar_reader: NuScenesReader | None = None,
                 online_keypoints: tuple[int, float] | None = None, frames: int = 1):
        self.reader = reader
        if frames < 1:
            raise ValueError(f"frames must be >= 1 (the current key frame), got {frames}")
        self.frames = int(frames)
        if online_keypoints is not None and cache is not None:
            raise ValueError("online_keypoints is for training without a cache (a cache gives its keypoints, derived from its boxes)")
        self.online_keypoints = online_keypoints
        self.lidar_reader = lidar_reader
        self.tokens = list(tokens)
        self.cache = cache
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        if tuple(image_policy.input_hw) != self.input_hw:
            raise ValueError(f"input_hw {self.input_hw} differs from image_policy.input_hw {image_policy.input_hw}")
        if feature_stride < 1:
            raise ValueError(f"feature_stride must be >= 1, got {feature_stride}")
        self.feature_stride = int(feature_stride)
        self.image_policy = image_policy
        self.bda_policy = bda_policy
        self.seed = seed
        self.train = train
        self.epoch = 0
        self.point_range_m = None if point_range_m is None else tuple(point_range_m)
        self.min_depth_m = min_depth_m
        if cache is None:
            if self.point_range_m is None:
                raise ValueError("without a cache, point_range_m (the GT box filter) is required")
        else:
            if split is None:
                raise ValueError("with a cache, the split name is required to check that the cache belongs to it")
            # The cache must have been computed from these samples' records: their content, not only their tokens.
            num_sweeps = int(cache.manifest.teacher.config.get("num_sweeps", 1))
            cache.check_compatible(reader.fingerprint(split, self.tokens, num_sweeps=num_sweeps),
                                   grid=None if cache_grid is None else
                                   {k: v for k, v in cache_grid.to_dict().items() if k != "cell_m"})
            cameras = list(cache.manifest.depth.cameras)
            if cameras != list(CAMERA_CHANNELS):
                raise CacheError(f"cache {cache.url} indexes cameras as {cameras}, expected {list(CAMERA_CHANNELS)}")

    def __len__(self) -> int:
        return len(self.tokens)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation depends on (seed, epoch, index): reproducible, different every epoch, same in any worker."""
        self.epoch = epoch

    def transforms(self, index: int, image_whs: Sequence[tuple[int, int]]
                   ) -> tuple[list[ImageTransform], BevTransform]:
        """The augmentation of sample ``index`` this epoch: one image transform per camera, one BDA.

        Independent random streams per camera and for the BDA, so switching BDA off leaves the image
        augmentation unchanged (clean ablations).
        """
        if not self.train:
            return [self.image_policy.eval_transform(wh) for wh in image_whs], BevTransform()
        streams = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(1 + len(image_whs))
        aug_from_lidar = BevTransform() if self.bda_policy is None \
            else self.bda_policy.sample(np.random.default_rng(streams[0]))
        img = [self.image_policy.sample(np.random.default_rng(s), wh) for s, wh in zip(streams[1:], image_whs)]
        return img, aug_from_lidar

    def __getitem__(self, index: int) -> CameraSample:
        return self.sample(index)

    def sample(self, index: int, draw: int | None = None) -> CameraSample:
        """Sample ``index`` with the augmentation of draw ``draw`` (default: ``index``): a sampler that repeats a
        sample within an epoch (class-balanced sampling) gives each repeat its own draw."""
        token = self.tokens[index]
        if self.cache is not None:
            # Boxes and depth come from the cache: read only the camera records, not LiDAR or annotations.
            record = self.reader.nusc.get("sample", token)
            lidar_token = record["data"][LIDAR_CHANNEL]
            views = {v.channel: v for v in self.reader.load_cameras(record, lidar_token)}
            frame = None
        else:
            frame = (self.lidar_reader or self.reader).load_sample(token)
            lidar_token = frame.lidar_sample_data_token
            views = {v.channel: v for v in frame.cameras}
        draw = index if draw is None else int(draw)
        lidar_points = None
        if self.lidar_reader is not None:
            lidar_frame = frame if frame is not None else self.lidar_reader.load_sample(token)
            lidar_points = torch.from_numpy(np.ascontiguousarray(lidar_frame.lidar.points, np.float32))
        cams = [views[ch] for ch in CAMERA_CHANNELS]
        img_tfs, aug_from_lidar = self.transforms(draw, [(c.width, c.height) for c in cams])

        cached = None
        map_frame = None  # the stored teacher map's frame (aug_from_lidar of its variant)
        if self.cache is not None:
            cached = self.cache.read(self.cache.sample_idx(token))
            boxes, labels, depth = cached.boxes, cached.labels, cached.depth
            # The stored map for this BDA; a stored draw replaces the drawn BDA by its own (exact teacher view).
            variant, aug_from_lidar = choose_variant(
                self.cache.manifest.variants.kind, [m.aug_from_lidar for m in cached.maps],
                aug_from_lidar if self.train and self.bda_policy is not None else None,
                np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, draw, _VARIANT_STREAM])))
            stored_map = cached.maps[variant]
            map_frame = np.asarray(stored_map.aug_from_lidar, np.float64)
        else:
            boxes, labels = training_boxes(frame, self.point_range_m)
            depth = depth_points(frame, boxes, min_depth_m=self.min_depth_m)

        images = np.stack([_normalise(t.apply_image(c.load_image())) for c, t in zip(cams, img_tfs)])  # (N, 3, H, W)
        depth_maps, box_maps = [], []
        cam_of_point = depth[:, 4].astype(np.int64)
        for ci, t in enumerate(img_tfs):
            d = depth[cam_of_point == ci]
            dm, bm = nearest_depth_map(torch.from_numpy(t.apply_points(d[:, :2])), torch.from_numpy(d[:, 2]),
                                       torch.from_numpy(d[:, 3].astype(np.int64)), self.input_hw,
                                       self.feature_stride)
            depth_maps.append(dm)
            box_maps.append(bm)

        sample = CameraSample(
            token=token,
            images=torch.from_numpy(images),
            intrinsics=torch.from_numpy(np.stack([c.intrinsics for c in cams]).astype(np.float32)),
            cam_from_lidar=torch.from_numpy(np.stack([c.cam_from_lidar for c in cams]).astype(np.float32)),
            aug_px_from_px=torch.from_numpy(np.stack([t.matrix for t in img_tfs]).astype(np.float32)),
            aug_from_lidar=torch.from_numpy(aug_from_lidar.matrix.astype(np.float32)),
            boxes=torch.from_numpy(
                aug_from_lidar.apply_boxes(np.asarray(boxes, np.float64).reshape(-1, 9)).astype(np.float32)),
            labels=torch.from_numpy(np.asarray(labels, np.int64)),
            depth_m=torch.stack(depth_maps),
            depth_box=torch.stack(box_maps),
            lidar_points=lidar_points,
        )
        if self.frames > 1:
            self._add_previous_frames(sample, lidar_token, cams, img_tfs)
        kp = None  # (M, K, 2) keypoints in the un-augmented frame: the cache's, or laid here for the online teacher
        if cached is not None:
            kp = cached.keypoints  # derived from the cached boxes, as extraction laid them
            sample.map_cells = None if stored_map.cells is None else torch.from_numpy(stored_map.cells.astype(np.int64))
            # Restored from the per-channel scale straight to fp16 (well within fp16's precision for both dtypes).
            sample.map_features = torch.from_numpy(stored_map.features(np.float16))
        elif self.online_keypoints is not None:
            grid_size, enlarge_m = self.online_keypoints
            kp = box_keypoints_xy(np.asarray(boxes, np.float64).reshape(-1, 9), enlarge_m=enlarge_m,
                                  grid_size=grid_size)
            map_frame = aug_from_lidar.matrix  # the online teacher runs on the augmented points
        if kp is not None:
            kp_student = aug_from_lidar.apply_xy(kp).astype(np.float32)
            sample.kp_student_xy = torch.from_numpy(kp_student)
            if self.cache is None:
                kp_teacher = kp_student
            elif np.array_equal(map_frame, np.eye(4)):
                kp_teacher = np.ascontiguousarray(kp, np.float32)
            else:
                kp_teacher = similarity_apply_xy(map_frame, kp).astype(np.float32)
            sample.kp_teacher_xy = torch.from_numpy(kp_teacher)
            sample.map_from_lidar = torch.from_numpy(np.asarray(map_frame, np.float32))
        return sample

    def _add_previous_frames(self, sample: CameraSample, lidar_token: str, cams: Sequence[CameraView],
                             img_tfs: Sequence[ImageTransform]) -> None:
        """The earlier key frames' images (BEVDet4D): each through the current frame's image transform of its
        camera, and each camera's extrinsics taken from the *current* key lidar frame (earlier camera <- global <-
        current lidar, the devkit poses at each sensor's own time), so the student lifts the earlier images straight
        into the current frame and the BDA applies to all frames alike."""
        images, intrinsics, extrinsics = [], [], []
        for record in self.reader.adjacent_key_samples(sample.token, self.frames):
            views = {v.channel: v for v in self.reader.load_cameras(record, lidar_token)}
            prev = [views[ch] for ch in CAMERA_CHANNELS]
            for c, p in zip(cams, prev):
                if (p.width, p.height) != (c.width, c.height):
                    raise DatasetError(f"sample {record['token']}: {p.channel} image is {p.width}x{p.height}, but "
                                       f"the same camera of the later sample {sample.token} is {c.width}x{c.height}")
            images.append(np.stack([_normalise(t.apply_image(p.load_image())) for p, t in zip(prev, img_tfs)]))
            intrinsics.append(np.stack([p.intrinsics for p in prev]))
            extrinsics.append(np.stack([p.cam_from_lidar for p in prev]))
        sample.prev_images = torch.from_numpy(np.stack(images))
        sample.prev_intrinsics = torch.from_numpy(np.stack(intrinsics).astype(np.float32))
        sample.prev_cam_from_lidar = torch.from_numpy(np.stack(extrinsics).astype(np.float32))


_VARIANT_STREAM = 1
"""Extra entropy word of the random stream that picks a stored draw (apart from the image and BDA streams)."""


def _normalise(image: NDArray[np.uint8]) -> NDArray[np.float32]:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet mean/std."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def collate_camera(items: Sequence[CameraSample]) -> CameraBatch:
    """Stack samples; boxes stay per-sample lists; teacher keypoints are padded to the largest box count
    (``box_mask`` False on padding) and foreground teacher cells to the largest cell count (index -1, zeros)."""
    if not items:
        raise ValueError("collate_camera needs at least one sample")
    with_teacher = [s.kp_teacher_xy is not None for s in items]
    if any(with_teacher) != all(with_teacher):
        raise ValueError("a batch mixes samples with and without teacher targets")
    teacher = _collate_teacher(items) if all(with_teacher) else None
    with_lidar = [s.lidar_points is not None for s in items]
    if any(with_lidar) != all(with_lidar):
        raise ValueError("a batch mixes samples with and without teacher LiDAR points")
    return CameraBatch(
        tokens=[s.token for s in items],
        images=torch.stack([s.images for s in items]),
        intrinsics=torch.stack([s.intrinsics for s in items]),
        cam_from_lidar=torch.stack([s.cam_from_lidar for s in items]),
        aug_px_from_px=torch.stack([s.aug_px_from_px for s in items]),
        aug_from_lidar=torch.stack([s.aug_from_lidar for s in items]),
        gt_boxes=[s.boxes for s in items],
        gt_labels=[s.labels for s in items],
        depth_m=torch.stack([s.depth_m for s in items]),
        depth_box=torch.stack([s.depth_box for s in items]),
        teacher=teacher,
        lidar_points=[s.lidar_points for s in items] if all(with_lidar) else None,
        **_collate_previous(items),
    )


def _collate_previous(items: Sequence[CameraSample]) -> dict[str, torch.Tensor | None]:
    with_prev = [s.prev_images is not None for s in items]
    if any(with_prev) != all(with_prev):
        raise ValueError("a batch mixes samples with and without earlier frames")
    names = ("prev_images", "prev_intrinsics", "prev_cam_from_lidar")
    if not all(with_prev):
        return dict.fromkeys(names)
    return {n: torch.stack([getattr(s, n) for s in items]) for n in names}


def pad_box_keypoints(kp_teacher: Sequence[torch.Tensor], kp_student: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample box keypoints (M_i, K, 2), teacher and student frames, padded to the batch's largest box count.

    Returns ``(kp_teacher_xy, kp_student_xy)`` (B, M, K, 2) float32, zeros on padding, and ``box_mask`` (B, M),
    ``False`` on padding. ``K`` comes from the first sample (``grid_size ** 2``, the same for every sample).
    """
    if len(kp_teacher) != len(kp_student) or not len(kp_teacher):
        raise ValueError(f"pad_box_keypoints: {len(kp_teacher)} teacher and {len(kp_student)} student keypoint sets")
    b, k = len(kp_teacher), kp_teacher[0].shape[1]
    m_max = max(len(kp) for kp in kp_teacher)
    kp_t = torch.zeros((b, m_max, k, 2), dtype=torch.float32)
    kp_s = torch.zeros((b, m_max, k, 2), dtype=torch.float32)
    box_mask = torch.zeros((b, m_max), dtype=torch.bool)
    for i, (t, s) in enumerate(zip(kp_teacher, kp_student)):
        kp_t[i, :len(t)], kp_s[i, :len(s)], box_mask[i, :len(t)] = t, s, True
    return kp_t, kp_s, box_mask


def _collate_teacher(items: Sequence[CameraSample]) -> TeacherTargets:
    b = len(items)
    kp_t, kp_s, box_mask = pad_box_keypoints([s.kp_teacher_xy for s in items], [s.kp_student_xy for s in items])
    without_map = [s.map_features is None for s in items]
    if any(without_map) != all(without_map):
        raise ValueError("a batch mixes samples with and without a teacher map")
    dense = [s.map_cells is None for s in items]
    if any(dense) != all(dense):
        raise ValueError("a batch mixes dense and foreground teacher maps")
    if all(without_map):  # keypoints for the online teacher, which computes the map
        cells, feats = None, None
    elif all(dense):
        cells, feats = None, torch.stack([s.map_features for s in items])  # (B, C, H, W)
    else:
        f_max = max(len(s.map_cells) for s in items)
        c = items[0].map_features.shape[1]
        cells = torch.full((b, f_max), -1, dtype=torch.int64)
        feats = torch.zeros((b, f_max, c), dtype=items[0].map_features.dtype)
        for i, s in enumerate(items):
            f = len(s.map_cells)
            cells[i, :f], feats[i, :f] = s.map_cells, s.map_features
    return TeacherTargets(kp_teacher_xy=kp_t, kp_student_xy=kp_s, box_mask=box_mask, map_cells=cells,
                          map_features=feats, map_from_lidar=None if all(s.map_from_lidar is None for s in items) else torch.stack(
                              [torch.eye(4) if s.map_from_lidar is None else s.map_from_lidar for s in items]))
