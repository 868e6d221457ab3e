"""Any LiDAR teacher: the small protocol extraction and the online teacher need, and its CenterPoint implementation.

A teacher is an object with

- ``bev_map(points) -> Tensor``: a list of B point clouds ``(P_i, 5)`` (x, y, z in metres in the sample's key lidar
  frame, intensity, time lag in seconds: ``tigbev.data.types.POINT_FEATURES``) -> the BEV map ``(B, C, H, W)``
  on ``grid`` (row ``iy`` along y, column ``ix`` along x, docs/COORDINATES.md), computed without gradients;
- ``grid`` (:class:`~tigbev.geometry.BevGrid`), ``channels`` (C), ``num_sweeps`` (LiDAR sweeps per sample it reads,
  the key sweep included), ``point_range_m`` (x0, y0, z0, x1, y1, z1: the boxes cached are those with their centre
  inside it); optionally ``sweeps_remove_close_m`` and ``pad_empty_sweeps`` (how earlier sweeps are read:
  :class:`~tigbev.data.nuscenes_reader.NuScenesReader`; default 0 and False);
- ``fingerprint() -> str``: what identifies its weights (a SHA-256), recorded in the cache and compared on resume;
- ``describe() -> dict``: its configuration as JSON, recorded in the cache's manifest.

``tigbev extract-teacher --teacher-factory pkg.module:make`` (and ``train-student --teacher online
--teacher-factory ...``) imports ``make`` and calls ``make(checkpoint, device)`` (``checkpoint``: the
``--teacher-checkpoint`` path or None) to build one; without a factory the checkpoint is a tigbev CenterPoint.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from tigbev.errors import TigbevError
from tigbev.geometry import BevGrid

__all__ = ["BevTeacher", "CenterPointTeacher", "check_bev_map", "load_bev_teacher", "manifest_config",
           "reader_options"]

_ATTRIBUTES = ("grid", "channels", "num_sweeps", "point_range_m", "bev_map", "fingerprint", "describe")


@runtime_checkable
class BevTeacher(Protocol):
    grid: BevGrid
    channels: int
    num_sweeps: int
    point_range_m: tuple[float, ...]

    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class CenterPointTeacher:
    """tigbev's CenterPoint, frozen (BatchNorm in eval mode for good, no gradients), from a tigbev checkpoint."""

    def __init__(self, checkpoint: Path, device: torch.device):
        from tigbev.models.teacher.checkpoint import load_teacher
        from tigbev.models.teacher.frozen import FrozenTeacher
        from tigbev.utils.provenance import file_sha256

        model, self.cfg, self.checkpoint = load_teacher(checkpoint, device)
        self.frozen = FrozenTeacher(model)
        self.path = Path(checkpoint)
        self._sha = file_sha256(self.path)
        self.grid, self.channels = self.cfg.bev_grid, self.cfg.bev_channels
        self.num_sweeps, self.point_range_m = self.cfg.num_sweeps, tuple(self.cfg.point_range_m)
        self.sweeps_remove_close_m, self.pad_empty_sweeps = self.cfg.sweeps_remove_close_m, self.cfg.pad_empty_sweeps

    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor:
        return self.frozen.bev_map(points)

    def fingerprint(self) -> str:
        return self._sha

    def describe(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def load_bev_teacher(checkpoint: Path | None, device: torch.device, factory: str | None = None) -> BevTeacher:
    """The teacher of ``--teacher-checkpoint`` / ``--teacher-factory`` (see the module docstring), checked against
    the protocol: an object that lacks a part, or gives a part of the wrong kind, is refused naming it."""
    if factory is None:
        if checkpoint is None:
            raise TigbevError("a teacher needs --teacher-checkpoint (a tigbev CenterPoint) or --teacher-factory")
        return CenterPointTeacher(checkpoint, device)
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise TigbevError(f"--teacher-factory {factory!r}: expected 'package.module:callable'")
    try:
        make = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise TigbevError(f"--teacher-factory {factory!r}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise TigbevError(f"--teacher-factory {factory!r}: {module_name} has no {attr}") from None
    teacher = make(checkpoint, device)
    missing = [a for a in _ATTRIBUTES if not hasattr(teacher, a)]
    if missing:
        raise TigbevError(f"--teacher-factory {factory!r} returned a {type(teacher).__name__} without "
                          f"{', '.join(missing)} (see tigbev.models.teacher.protocol.BevTeacher)")
    if not isinstance(teacher.grid, BevGrid):
        raise TigbevError(f"--teacher-factory {factory!r}: grid must be a tigbev.geometry.BevGrid, got "
                          f"{type(teacher.grid).__name__}")
    for name in ("channels", "num_sweeps"):
        if not isinstance(getattr(teacher, name), int) or getattr(teacher, name) < 1:
            raise TigbevError(f"--teacher-factory {factory!r}: {name} must be an int >= 1, got "
                              f"{getattr(teacher, name)!r}")
    if len(tuple(teacher.point_range_m)) != 6:
        raise TigbevError(f"--teacher-factory {factory!r}: point_range_m must be (x0, y0, z0, x1, y1, z1)")
    if not isinstance(teacher.fingerprint(), str) or not teacher.fingerprint():
        raise TigbevError(f"--teacher-factory {factory!r}: fingerprint() must return a non-empty string")
    return teacher


def reader_options(teacher: BevTeacher) -> dict[str, Any]:
    """How the teacher's points are read: ``NuScenesReader(dataroot, **reader_options(teacher))``."""
    return {"num_sweeps": teacher.num_sweeps,
            "remove_close_m": float(getattr(teacher, "sweeps_remove_close_m", 0.0)),
            "pad_empty_sweeps": bool(getattr(teacher, "pad_empty_sweeps", False))}


def check_bev_map(teacher: BevTeacher, bev: torch.Tensor, batch: int, what: str) -> None:
    """Refuse a map that is not ``(batch, channels, ny, nx)`` on the teacher's grid, naming ``what``."""
    want = (batch, teacher.channels, *teacher.grid.shape_hw)
    if tuple(bev.shape) != want:
        raise TigbevError(f"the teacher's bev_map gave {tuple(bev.shape)} for {what}, its grid and channels say "
                          f"{want}")


def manifest_config(teacher: BevTeacher, factory: str | None) -> dict[str, Any]:
    """What the cache records of the teacher: its own description plus what readers rely on."""
    config = dict(teacher.describe())
    config.setdefault("num_sweeps", teacher.num_sweeps)
    config.setdefault("point_range_m", list(teacher.point_range_m))
    config.setdefault("bev_channels", teacher.channels)
    if factory is not None:
        config["factory"] = factory
    return config
