"""``scripts/gpu_check.sh`` refuses clearly where it cannot run (the check itself runs on a GPU: tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "PYTHON": sys.executable, **env})


def test_missing_modules_are_named(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc = _run(tmp_path, PYTHON=str(bare / "bin" / "python"))
    assert proc.returncode == 2
    assert "lacks: torch numpy zarr" in proc.stderr and "TIGBEV_WHEELHOUSE" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_no_cuda_device_is_refused_with_the_rehearsal_named(tmp_path: Path) -> None:
    proc = _run(tmp_path, TIGBEV_GPU_CHECK_DEVICE="cuda")
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr and "TIGBEV_GPU_CHECK_DEVICE=cpu" in proc.stderr


def test_a_fixture_that_cannot_be_made_is_explained(tmp_path: Path) -> None:
    """Without spconv (a module on PYTHONPATH that fails to import stands in for it) the script asks for a fixture
    made elsewhere."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "spconv.py").write_text("raise ImportError('spconv is not installed here')\n")
    proc = _run(tmp_path, TIGBEV_GPU_CHECK_DEVICE="cpu", TIGBEV_GPU_FIXTURE=str(tmp_path / "none"),
                PYTHONPATH=str(site))
    assert proc.returncode == 2
    assert "no fixture at" in proc.stderr and "scripts/gpu_fixture.py" in proc.stderr
    assert not (tmp_path / "none").exists()
