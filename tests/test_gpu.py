"""The CUDA path of the student and cache side (``pytest -m gpu``; what ``scripts/gpu_check.sh`` runs).

Skipped without CUDA. Nothing here needs spconv or nuscenes-devkit: the data come from ``$TIGBEV_GPU_FIXTURE``
(``scripts/gpu_fixture.py``: a tiny world and its cache), or from the session's own synthetic world and cache where
the full install is. ``TIGBEV_GPU_CHECK_DEVICE=cpu`` rehearses the same tests on the CPU (the check's numpy-2,
devkit-free install is rehearsed that way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("TIGBEV_GPU_CHECK_DEVICE", "cuda")


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> tuple[Path, str]:
    """(dataroot, cache URL) of synth_train."""
    given = os.environ.get("TIGBEV_GPU_FIXTURE")
    if given:
        root = Path(given)
        meta = json.loads((root / "fixture.json").read_text())
        return root / meta["dataroot"], str(root / meta["cache"])
    return request.getfixturevalue("synth_root"), request.getfixturevalue("synth_cache")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 off, so the device and the CPU compute the same float32 products."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cfg(dataroot: Path, cache: str, out: Path, **kw):
    from tigbev.config import TrainStudentConfig

    base = {"preset": "demo", "dataroot": dataroot, "split": "synth_train", "out_dir": out, "cache": cache,
            "epochs": 1, "batch_size": 2, "workers": 0, "device": DEVICE, "max_steps": 1, "augment": False}
    return TrainStudentConfig(**{**base, **kw})


def test_student_trains_from_the_cache_on_the_device(world: tuple[Path, str], tmp_path: Path) -> None:
    """Three steps with DataLoader workers and (on CUDA) mixed precision; the checkpoint holds device-free
    weights that load on the CPU, and every logged loss is finite."""
    from tigbev.stages import train_student

    dataroot, cache = world
    out = tmp_path / "run"
    r = train_student.run(_cfg(dataroot, cache, out, epochs=3, max_steps=3, workers=2, augment=True),
                          progress=False)
    assert r.steps == 3
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    params = [v for v in state["model"].values() if isinstance(v, torch.Tensor)]
    assert params and all(v.device.type == "cpu" and torch.isfinite(v.float()).all() for v in params)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if row["kind"] == "step"]
    assert [row["step"] for row in steps][-1] == 3
    assert all(math.isfinite(row[k]) for row in steps for k in ("total", "heatmap", "inter_keypoint", "inter_channel"))
    if DEVICE.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0


def test_pinned_batches_reach_the_device(world: tuple[Path, str], tmp_path: Path) -> None:
    """``DataLoader(pin_memory=True)`` pins every tensor of a CameraBatch (``CameraBatch.pin_memory``), and the
    asynchronous copy gives the same values on the device."""
    from torch.utils.data import DataLoader

    from tigbev.data.camera_dataset import collate_camera
    from tigbev.stages.train_student import build_distillation

    dataroot, cache = world
    built = build_distillation(_cfg(dataroot, cache, tmp_path / "unused", device="cpu"), torch.device("cpu"))
    pin = DEVICE.startswith("cuda")
    (batch,) = list(DataLoader(torch.utils.data.Subset(built.dataset, [0, 1]), batch_size=2, num_workers=1,
                               collate_fn=collate_camera, pin_memory=pin))
    if pin:
        assert batch.images.is_pinned() and batch.teacher.map_features.is_pinned() and batch.gt_boxes[0].is_pinned()
    moved = batch.to(torch.device(DEVICE))
    assert moved.images.device.type == DEVICE.split(":")[0]
    assert torch.equal(moved.images.cpu(), batch.images) and torch.equal(moved.teacher.map_cells.cpu(),
                                                                          batch.teacher.map_cells)


def test_device_losses_match_the_cpu(world: tuple[Path, str], tmp_path: Path) -> None:
    """The same student, batch and cached targets give the same named losses on the device and on the CPU
    (float32, TF32 off): the distillation terms' gathers and Gram matrices do not depend on the device."""
    from tigbev.data.camera_dataset import collate_camera
    from tigbev.stages.train_student import build_distillation

    dataroot, cache = world
    torch.manual_seed(0)
    cfg = _cfg(dataroot, cache, tmp_path / "unused", device="cpu")
    built = build_distillation(cfg, torch.device("cpu"))
    batch = collate_camera([built.dataset[0], built.dataset[1]])
    hw = built.teacher_grid.shape_hw
    model = built.model.eval()
    with torch.no_grad():
        on_cpu = model(batch, batch.teacher.dense_map(*hw))
        dev = torch.device(DEVICE)
        model_d = model.to(dev)
        batch_d = batch.to(dev)
        on_dev = model_d(batch_d, batch_d.teacher.dense_map(*hw))
    assert set(on_cpu) == set(on_dev) and {"inter_keypoint", "inter_channel"} <= set(on_cpu)
    for name, v in on_cpu.items():
        d = on_dev[name].detach().cpu()
        assert torch.allclose(d, v, rtol=2e-3, atol=1e-5), (name, float(v), float(d))


def test_student_side_bench_on_the_device(world: tuple[Path, str], tmp_path: Path) -> None:
    """``tigbev bench --cache``: the no-distillation, cache and 2-frame steps and the cache's read rate, timed on
    the device with each mode's peak memory."""
    from tigbev.bench import BenchConfig, run

    dataroot, cache = world
    res = run(BenchConfig(preset="demo", out_dir=tmp_path / "bench", dataroot=dataroot, split="synth_train",
                          cache=cache, device=DEVICE, frames=2, tiny=True, progress=False))
    step = res.report["step"]
    assert list(step) == ["none", "cache", "cache_2f"]
    assert res.report["device"].startswith(DEVICE.split(":")[0])
    for mode in step.values():
        assert mode["median_step_s"] > 0 and mode["peak_memory_bytes"] > 0
    assert res.report["loader"]["cache_read_s_per_sample"] > 0
    assert "student side only" in res.markdown_path.read_text() and res.plot_path.stat().st_size > 0


def test_cuda_checkpoint_resumes_on_the_cpu(world: tuple[Path, str], tmp_path: Path) -> None:
    """A run begun on the device goes on from its checkpoint on the CPU (and is refused nothing)."""
    from tigbev.stages import train_student

    dataroot, cache = world
    out = tmp_path / "run"
    train_student.run(_cfg(dataroot, cache, out, epochs=2, max_steps=1), progress=False)
    r = train_student.run(dataclasses.replace(_cfg(dataroot, cache, out, epochs=2, max_steps=3), device="cpu",
                                              resume=True), progress=False)
    assert r.steps == 3
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3
