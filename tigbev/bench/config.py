"""The bench's configuration, result, goals and small shared helpers."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tigbev.errors import TigbevError

__all__ = ["GOALS", "MODES", "STORAGE_OPTIONS", "BenchConfig", "BenchResult", "Preset", "cycle",
           "median", "preset_keypoint_grid", "storage_name"]


Preset = Literal["demo", "nuscenes"]
MODES: tuple[str, ...] = ("none", "cache", "online")
STORAGE_OPTIONS: tuple[tuple[str, str, str], ...] = (("dense", "float16", "auto"), ("foreground", "float16", "auto"),
                                                     ("foreground", "float16", "zstd"), ("foreground", "int8", "auto"))
"""(features, feature_dtype, compression) of each storage option the bench measures; named by
:func:`storage_name`."""


def storage_name(features: str, dtype: str, compression: str) -> str:
    return f"{features}-{dtype}" + ("" if compression == "auto" else f"-{compression}")
GOALS: dict[str, tuple[str, float, str]] = {
    # name: (description, threshold, "max" = value must be <= threshold, "min" = >=)
    "tig_cache_step_ratio": ("TiG-from-cache step / no-distillation step", 1.10, "max"),
    "loader_wait_fraction": ("fraction of a training step waiting for data (cache mode)", 0.10, "max"),
    "cache_read_over_memmap": ("cache sample reads/s / raw memmap reads/s of the same bytes (DataLoader, 1 worker)",
                               0.5, "min"),
    "extraction_over_forward": ("extraction samples/s / teacher forward-only samples/s (read + distilled map)",
                                0.85, "min"),
    "cache_mib_per_sample": ("cache MiB per sample (smallest storage option within the fidelity target)", 4.0,
                             "max"),
    "fidelity_rel_error": ("max relative error of the TiG losses from that cache vs the online teacher", 0.01, "max"),
}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure and on which data. Sizes are counts of samples (batch 1 everywhere)."""

    preset: Preset
    out_dir: Path
    dataroot: Path | None = None
    """Dataset; default: a synthetic one written to out_dir/work (demo), required for the nuscenes preset."""
    split: str | None = None
    """Default: ``synth_train`` (demo) or ``real_slice`` (nuscenes)."""
    teacher_checkpoint: Path | None = None
    """A trained teacher makes storage and fidelity meaningful; default: seeded random weights (said in the output)."""
    repeats: int = 3
    steps: int | None = None
    """Timed training steps per mode and repeat (default: 2 demo, 1 nuscenes)."""
    samples: int | None = None
    """Samples of the 1x size (growth) and of the step/loader measurements; tokens repeat when the split has fewer
    (default: 4 demo, 1 nuscenes)."""
    rate_samples: int | None = None
    """Samples per extraction-rate measurement (default: 8 demo, 4 nuscenes)."""
    growth: tuple[int, ...] = (1, 2, 4)
    loader_workers: tuple[int, ...] = (1, 2, 4)
    device: str = "auto"
    seed: int = 0
    frames: int = 1
    """With > 1 the step comparison also times the cache mode with that many key frames per sample (BEVDet4D),
    side by side with the single-frame modes (mode ``cache_<N>f``)."""
    cache: str | None = None
    """The student side alone, from this cache of ``split`` (no teacher, no spconv, no extraction): the training
    step without distillation and from the cache, and the cache's read rate. What the GPU check runs."""
    tiny: bool = False
    """Seconds-long smoke configuration (tests): tiny synthetic world, 1 repeat, 1 step, growth 1x/2x."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in ("demo", "nuscenes"):
            raise ValueError(f"BenchConfig.preset must be 'demo' or 'nuscenes', got {self.preset!r}")
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.preset == "nuscenes" and self.dataroot is None:
            raise ValueError("BenchConfig.dataroot: the nuscenes preset needs --dataroot (a nuScenes-format dataroot, "
                             "e.g. ../shared/data/nuscenes-real-slice)")
        if self.cache is not None and self.dataroot is None:
            raise ValueError("BenchConfig.cache: the student-side bench needs the cache's --dataroot and --split")
        if self.frames < 1:
            raise ValueError(f"BenchConfig.frames must be >= 1, got {self.frames}")
        if self.repeats < 1:
            raise ValueError(f"BenchConfig.repeats must be >= 1, got {self.repeats}")
        for name in ("steps", "samples", "rate_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {v}")
        if not self.growth or min(self.growth) < 1 or not self.loader_workers or min(self.loader_workers) < 0:
            raise ValueError("BenchConfig.growth needs factors >= 1 and loader_workers counts >= 0")

    def resolved(self) -> dict[str, Any]:
        tiny = self.tiny
        demo = self.preset == "demo"
        return {
            "split": self.split or ("synth_train" if demo else "real_slice"),
            "steps": self.steps or (1 if tiny or not demo else 2),
            "samples": self.samples or ((1 if tiny else 4) if demo else 1),
            "rate_samples": self.rate_samples or ((2 if tiny else 8) if demo else 4),
            "repeats": 1 if tiny else self.repeats,
            "growth": (1, 2) if tiny else tuple(self.growth),
            "loader_workers": (1, 2) if tiny else tuple(self.loader_workers),
            "keypoint_grid": preset_keypoint_grid(self.preset),
            "bda_views": 1 if tiny else 4,
            "bda_draws": 1 if tiny else 4,
            "frames": self.frames,
        }


@dataclass(frozen=True)
class BenchResult:
    json_path: Path
    markdown_path: Path
    plot_path: Path | None
    report: dict[str, Any]


def preset_keypoint_grid(preset: str) -> int:
    if preset == "demo":
        from tigbev.pipeline.demo import DEMO_KEYPOINT_GRID

        return DEMO_KEYPOINT_GRID
    return 24


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def cycle(tokens: Sequence[str], n: int) -> list[str]:
    if not tokens:
        raise TigbevError("the split has no samples")
    return list(itertools.islice(itertools.cycle(tokens), n))
