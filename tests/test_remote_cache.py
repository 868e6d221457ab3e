"""A cache on a real S3 server (moto's, on 127.0.0.1, started and stopped here): extract, verify, info, and
training with two forked DataLoader workers; an unreachable endpoint is one line that names the URL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tigbev.cache.store import CacheError, CacheReader
from tigbev.cache.tools import cache_info, verify_cache
from tigbev.cli import app
from tigbev.config import ExtractTeacherConfig, TrainStudentConfig
from tigbev.stages import extract_teacher, train_student

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

SPLIT = "synth_train"
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free local port, with a bucket ``tigbev``; the endpoint is exported as
    AWS_ENDPOINT_URL (which botocore, and so s3fs, read) for this module's tests."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("moto's S3 server did not start")
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("tigbev")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_an_s3_cache_extracts_verifies_and_trains_with_two_workers(s3_endpoint: str, synth_root: Path,
                                                                    demo_teacher_ckpt: Path, tmp_path: Path) -> None:
    url = "s3://tigbev/cache"
    result = extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=demo_teacher_ckpt, dataroot=synth_root,
                                                      split=SPLIT, out_dir=url, shard_samples=2, batch_size=1,
                                                      workers=0, device="cpu"), progress=False)
    assert result.complete
    assert verify_cache(url) == []
    assert cache_info(url)["done"] == 3
    assert CacheReader(url).read(2).keypoints.shape[1] == 576
    run = train_student.run(TrainStudentConfig(preset="demo", dataroot=synth_root, split=SPLIT,
                                               out_dir=tmp_path / "student", cache=url, epochs=1, batch_size=1,
                                               workers=2, device="cpu", max_steps=2), progress=False)
    assert run.steps == 2 and {"inter_keypoint", "inter_channel"} <= set(run.final_losses)


def test_an_unreachable_endpoint_is_one_line(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances remember their endpoint
    try:
        with pytest.raises(CacheError, match=r"^cannot reach s3://tigbev/cache: "):
            CacheReader("s3://tigbev/cache")
        cli = CliRunner().invoke(app, ["cache", "info", "s3://tigbev/cache"])
        assert cli.exit_code == 2
        lines = cli.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach s3://tigbev/cache: "), cli.output
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("command", ["cache info", "cache verify", "cache dump", "train-student", "extract-teacher"])
def test_an_unreachable_endpoint_is_one_line_and_nothing_else_on_every_command(command: str, synth_root: Path,
                                                                                 demo_teacher_ckpt: Path,
                                                                                 tmp_path: Path) -> None:
    """The whole output of a separate process (where the clean-up of an asyncio session would print its warnings
    on exit) is the error line."""
    url = "s3://tigbev/cache"
    args = {"cache info": ["cache", "info", url], "cache verify": ["cache", "verify", url],
            "cache dump": ["cache", "dump", url, "--sample", "x", "--out", str(tmp_path / "x.npz")],
            "train-student": ["train-student", "--preset", "demo", "--dataroot", str(synth_root), "--split", SPLIT,
                              "--out", str(tmp_path / "run"), "--cache", url, "--epochs", "1", "--device", "cpu"],
            "extract-teacher": ["extract-teacher", "--teacher-checkpoint", str(demo_teacher_ckpt), "--dataroot",
                                str(synth_root), "--split", SPLIT, "--out", url, "--device", "cpu"]}[command]
    env = {**os.environ, **_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    done = subprocess.run([sys.executable, "-m", "tigbev.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(output) == 1, done.stdout + done.stderr
    assert output[0].startswith(f"error: cannot reach {url}"), output[0]
