"""Shared fixtures: the real nuScenes key frame in /work/shared (referenced by path, never copied into the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.types import SampleFrame

# <project root>/../shared/data/nuscenes-real-slice; CI has the same relative layout.
REAL_SLICE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuscenes-real-slice"


@pytest.fixture(scope="session")
def real_slice_root() -> Path:
    if not (REAL_SLICE_ROOT / "v1.0-mini").is_dir():
        pytest.skip(f"real nuScenes slice not found at {REAL_SLICE_ROOT} (its licence keeps it out of the repo)")
    return REAL_SLICE_ROOT


@pytest.fixture(scope="session")
def real_reader(real_slice_root: Path) -> NuScenesReader:
    return NuScenesReader(real_slice_root)


@pytest.fixture(scope="session")
def real_frame(real_reader: NuScenesReader) -> SampleFrame:
    (token,) = real_reader.sample_tokens("real_slice")
    return real_reader.load_sample(token)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataroot (2 scenes x 3 samples, small images) shared by the tests of a session."""
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth") / "dataroot"
    cfg = SynthConfig(out_dir=out, scenes=2, samples_per_scene=3, val_scenes=1, seed=7, image_width=192,
                      image_height=108, lidar_azimuth_steps=720, sweeps_per_sample=1, workers=1)
    write_synthetic_dataset(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_reader(synth_root: Path) -> NuScenesReader:
    return NuScenesReader(synth_root, num_sweeps=3)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    # TIGBEV_GPU_CHECK_DEVICE=cpu rehearses the GPU tests on the CPU (scripts/gpu_check.sh --rehearse).
    rehearse = os.environ.get("TIGBEV_GPU_CHECK_DEVICE") == "cpu"
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not (torch.cuda.is_available() or rehearse):
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def demo_teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-preset teacher checkpoint with random weights (enough for cache and distillation plumbing)."""
    import torch

    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo-teacher") / "last.pt"
    save_checkpoint(path, {"model": CenterPoint(teacher_preset("demo")).state_dict(),
                           "teacher_config": teacher_preset("demo").to_dict()})
    return path


@pytest.fixture(scope="session")
def synth_cache(synth_root: Path, demo_teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A foreground float16 cache of synth_train, extracted with ``demo_teacher_ckpt``."""
    from tigbev.config import ExtractTeacherConfig
    from tigbev.stages import extract_teacher

    out = tmp_path_factory.mktemp("synth-cache") / "cache"
    extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=demo_teacher_ckpt, dataroot=synth_root,
                                             split="synth_train", out_dir=str(out), workers=0, device="cpu",
                                             shard_samples=2, batch_size=1), progress=False)
    return str(out)
