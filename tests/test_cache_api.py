"""The cache from your own code: ``tigbev.data.teacher_cache`` (numpy, no torch) and the docs example that trains a
plain PyTorch model from a cache with the standalone TiG loss."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tigbev.cache.store import CacheError, CacheReader
from tigbev.data.teacher_cache import open_cache, sample_map_at
from tigbev.geometry import BevGrid
from tigbev.geometry.bev_sampling import sample_bev

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "train_from_cache.py"


def test_numpy_map_reading_equals_the_training_sampler() -> None:
    grid = BevGrid(x_min_m=-8.0, x_max_m=8.0, y_min_m=-4.0, y_max_m=4.0, cell_m=1.0)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 8, 16)).astype(np.float32)
    xy = rng.uniform([-9.0, -5.0], [9.0, 5.0], size=(3, 40, 2)).astype(np.float32)  # some outside the map
    got, valid = sample_map_at(m, xy, grid)
    ref, ref_valid = sample_bev(torch.from_numpy(m)[None], torch.from_numpy(xy.reshape(1, -1, 2)), grid)
    np.testing.assert_allclose(got.reshape(-1, 5), ref[0].numpy(), atol=1e-5)
    assert np.array_equal(valid.reshape(-1), ref_valid[0].numpy()) and got.shape == (3, 40, 5)
    assert not valid.all() and valid.any()


def test_a_cache_reads_as_numpy_arrays_without_torch(synth_root: Path, synth_cache: str) -> None:
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from tigbev.data.teacher_cache import open_cache
        cache = open_cache({synth_cache!r})
        s = cache[cache.tokens[1]]
        assert s.index == 1 and s.keypoint_features.shape == (*s.keypoints_xy.shape[:2], cache.channels)
        assert s.keypoint_valid.any() and s.teacher_map.shape == (cache.channels, *cache.grid.shape_hw)
        assert len(list(cache)) == len(cache) and cache[-1].index == len(cache) - 1
        cache.check({str(synth_root)!r}, "synth_train")
        assert "torch" not in sys.modules
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_sample_arrays_are_the_cached_ones(synth_root: Path, synth_cache: str) -> None:
    cache = open_cache(synth_cache)
    reader = CacheReader(synth_cache)
    s, raw = cache[0], reader.read(0)
    assert s.token == raw.token and np.array_equal(s.boxes, raw.boxes) and np.array_equal(s.depth, raw.depth)
    np.testing.assert_array_equal(s.teacher_map, reader.dense_map(raw))
    # The features at the keypoints are the map read where the training reads it.
    ref, _ = sample_bev(torch.from_numpy(s.teacher_map)[None], torch.from_numpy(s.keypoints_xy.reshape(1, -1, 2)),
                        cache.grid)
    np.testing.assert_allclose(s.keypoint_features.reshape(-1, cache.channels), ref[0].numpy(), atol=1e-5)
    assert np.abs(s.keypoint_features).max() > 0


def test_a_cache_of_another_split_or_token_is_refused(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    cache = open_cache(synth_cache)
    with pytest.raises(CacheError, match="split: cache has 'synth_train', dataset has 'synth_val'"):
        cache.check(synth_root, "synth_val")
    with pytest.raises(CacheError, match="sample nope is not in cache"):
        cache["nope"]
    with pytest.raises(CacheError, match="no variant 3"):
        cache.sample(0, variant=3)
    with pytest.raises(CacheError, match="no cache at"):
        open_cache(tmp_path / "missing")


def test_the_docs_example_trains_a_plain_pytorch_model_from_a_cache(synth_cache: str) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), synth_cache, "--steps", "30"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # it learns the teacher's relations
