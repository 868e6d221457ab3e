"""The default install resolves on Python 3.11 and 3.12: every dependency of pyproject.toml has a Linux wheel for
both that meets its constraints (pip's own resolver, ``--dry-run``, wheels only). torch is left out (its build is the
user's choice, installed first: README) and so is the project itself (pure Python). Skipped without a package index."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_the_default_dependencies_resolve_to_wheels(python: str, tmp_path: Path) -> None:
    if not _index_reachable():
        pytest.skip("no package index reachable")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d for d in deps if not d.startswith("torch")]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report",
           str(report), "--python-version", python, "--only-binary=:all:", "--target", str(tmp_path / "t"),
           *[f"--platform={p}" for p in PLATFORMS], *wanted]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert got["nuscenes-devkit"] == "1.2.0" and got["numpy"].startswith("1.")
    assert "spconv-cu121" in got and got["spconv-cu121"] >= "2.3.8"
    tags = {f"cp{python.replace('.', '')}" in i["download_info"]["url"] or "py3-none" in i["download_info"]["url"]
            or "abi3" in i["download_info"]["url"] for i in json.loads(report.read_text())["install"]}
    assert tags == {True}  # every wheel is for this Python (or pure / stable-ABI)
