"""Any LiDAR teacher: a pillar teacher written here (not tigbev's CenterPoint) goes through ``--teacher-factory``
into extraction, a cache whose maps are its own, a student trained from that cache and the online mode."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tigbev.cache.store import CacheReader
from tigbev.cli import app
from tigbev.config import ExtractTeacherConfig, TrainStudentConfig
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.teacher_cache import open_cache
from tigbev.errors import TigbevError
from tigbev.geometry import BevGrid
from tigbev.stages import extract_teacher, train_student

FACTORY = "test_teacher_protocol:make_pillar_teacher"
GRID = BevGrid(x_min_m=-51.2, x_max_m=51.2, y_min_m=-51.2, y_max_m=51.2, cell_m=1.6)


class PillarTeacher(nn.Module):
    """A PointPillars-style BEV encoder: a shared linear layer on every point, max over each pillar (BEV cell),
    scattered onto the grid, then one 3x3 convolution."""

    num_sweeps = 1
    point_range_m = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)

    def __init__(self, channels: int = 24):
        super().__init__()
        self.grid, self.channels = GRID, channels
        self.point_net = nn.Linear(5, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    @torch.no_grad()
    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor:
        ny, nx = self.grid.shape_hw
        maps = []
        for p in points:
            ix = torch.floor((p[:, 0] - self.grid.x_min_m) / self.grid.cell_m).long()
            iy = torch.floor((p[:, 1] - self.grid.y_min_m) / self.grid.cell_m).long()
            keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
            f = torch.relu(self.point_net(p[keep, :5]))  # (P, C)
            cell = (iy[keep] * nx + ix[keep])[:, None].expand_as(f)
            pillars = f.new_zeros((ny * nx, self.channels)).scatter_reduce(0, cell, f, "amax", include_self=True)
            maps.append(pillars.T.reshape(self.channels, ny, nx))
        return self.conv(torch.stack(maps))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode() + v.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": "pillars", "channels": self.channels}


def make_pillar_teacher(checkpoint: Path | None, device: torch.device) -> PillarTeacher:
    torch.manual_seed(0)
    teacher = PillarTeacher()
    if checkpoint is not None:
        teacher.load_state_dict(torch.load(checkpoint, weights_only=True))
    return teacher.eval().to(device)


def make_broken_teacher(checkpoint: Path | None, device: torch.device) -> object:
    class Broken:
        grid, channels = GRID, 8

        def bev_map(self, points):  # the wrong channel count
            return torch.zeros(len(points), 3, *GRID.shape_hw)

    return Broken()


class _FewerChannels(PillarTeacher):
    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor:
        return super().bev_map(points)[:, :5]  # says 24 channels, gives 5


def make_wrong_shape_teacher(checkpoint: Path | None, device: torch.device) -> PillarTeacher:
    return _FewerChannels()


@pytest.fixture(scope="module")
def pillar_cache(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("pillar") / "cache"
    res = CliRunner().invoke(app, ["extract-teacher", "--teacher-factory", FACTORY, "--dataroot", str(synth_root),
                                   "--split", "synth_train", "--out", str(out), "--workers", "0", "--device", "cpu",
                                   "--keypoint-grid", "6"])
    assert res.exit_code == 0, res.output
    return str(out)


def test_a_foreign_teacher_fills_the_cache_with_its_own_maps(synth_root: Path, pillar_cache: str) -> None:
    m = CacheReader(pillar_cache).manifest
    teacher = make_pillar_teacher(None, torch.device("cpu"))
    assert m.features.channels == 24 and m.grid == GRID
    assert m.teacher.checkpoint_sha256 == teacher.fingerprint()
    assert m.teacher.config["factory"] == FACTORY and m.teacher.config["kind"] == "pillars"
    cache = open_cache(pillar_cache)
    s = cache[1]
    points = torch.from_numpy(NuScenesReader(synth_root).load_sample(s.token).lidar.points)
    ref = teacher.bev_map([points])[0].numpy()
    cells = CacheReader(pillar_cache).read(1).map_cells
    stored = s.teacher_map.reshape(24, -1)[:, cells]
    np.testing.assert_allclose(stored, ref.reshape(24, -1)[:, cells], rtol=2e-3, atol=1e-3)
    assert np.abs(stored).max() > 0
    # Resuming with another teacher is refused: its fingerprint differs.
    torch.manual_seed(1)
    other = Path(pillar_cache).parent / "other.pt"
    torch.save(PillarTeacher().state_dict(), other)
    with pytest.raises(TigbevError, match="teacher"):
        extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=other, teacher_factory=FACTORY,
                                                 dataroot=synth_root, split="synth_train", out_dir=pillar_cache,
                                                 workers=0, device="cpu", keypoint_grid=6), progress=False)


def test_students_learn_from_a_foreign_teacher_cached_and_online(synth_root: Path, pillar_cache: str,
                                                                 tmp_path: Path) -> None:
    base = {"preset": "demo", "dataroot": synth_root, "split": "synth_train", "epochs": 1, "batch_size": 2,
            "workers": 0, "device": "cpu", "max_steps": 1}
    cached = train_student.run(TrainStudentConfig(out_dir=tmp_path / "cached", cache=pillar_cache, **base),
                               progress=False)
    online = train_student.run(TrainStudentConfig(out_dir=tmp_path / "online", teacher="online",
                                                  teacher_factory=FACTORY, keypoint_grid=6, **base), progress=False)
    for r in (cached, online):
        assert r.steps == 1 and r.final_losses["inter_keypoint"] > 0 and np.isfinite(r.final_losses["total"])


def test_a_teacher_that_breaks_the_protocol_is_named(synth_root: Path, tmp_path: Path) -> None:
    for factory, message in (("test_teacher_protocol:make_broken_teacher", "without num_sweeps, point_range_m"),
                             ("test_teacher_protocol:make_wrong_shape_teacher",
                              r"gave \(2, 5, 64, 64\) for samples .* its grid and channels say \(2, 24, 64, 64\)"),
                             ("test_teacher_protocol:nothing", "has no nothing"),
                             ("no_such_module_xyz:make", "cannot import no_such_module_xyz"),
                             ("missing-colon", "expected 'package.module:callable'")):
        res = CliRunner().invoke(app, ["extract-teacher", "--teacher-factory", factory, "--dataroot",
                                       str(synth_root), "--split", "synth_train", "--out",
                                       str(tmp_path / factory.replace(":", "_")), "--workers", "0", "--device",
                                       "cpu"])
        assert res.exit_code == 2 and re.search(message, " ".join(res.output.split())), (factory, res.output)
