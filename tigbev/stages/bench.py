"""``tigbev bench``: what distillation costs, with and without the teacher cache, measured side by side.

Every comparison is a ratio of measurements taken in the same run, interleaved (mode A, mode B, mode C, then again
in a rotated order), repeated ``repeats`` times, and summarised by medians, because the machines this runs on are
shared and noisy. Five sections (bench.json keys):

- ``step``: one student training step (forward + backward + optimiser, batch 1) with no distillation, TiG-BEV from
  the cache and TiG-BEV with the online teacher, on the same batches. Each mode lives in its own child process
  (spawned, so CUDA works), driven one step at a time by this process; its peak memory is the child's peak RSS on
  the CPU (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, model and data included) or
  ``torch.cuda.max_memory_allocated`` on a GPU. Batches are loaded before timing (in the child, no workers), so a
  step is pure training work; the online mode's LiDAR is loaded with the batch, as the DataLoader workers do.
- ``loader``: the cache's read time per sample against reading the same bytes, uncompressed, from a numpy memmap
  (the physical limit), in this process and through a DataLoader with 1..n workers; and the fraction of a real
  training step (cache mode, DataLoader with one worker) spent waiting for the next batch.
- ``extraction``: extraction samples/s (the steady loop of ``extract-teacher``) against the teacher's
  forward-only samples/s (read the sample's sweeps + frozen forward, sequentially, teacher already loaded) and its
  pure forward rate (points already in memory).
- ``storage``: bytes per sample per array, compression ratio and fidelity (relative error of the two TiG feature
  losses computed from the cache against the online teacher, same keypoints, a fixed random student map) of each
  storage option.
- ``growth``: extraction and training (cache mode, one epoch of batch-1 steps with one loader worker) time at 1x,
  2x and 4x samples, and camera-loader throughput with 1, 2 and 4 workers.

Outputs in ``out_dir``: ``bench.json``, ``bench.md`` (the tables), ``bench.png`` (step bars, growth lines, loader
throughput); intermediate data (synthetic dataset, random teacher, caches) in ``out_dir/work``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import multiprocessing as mp
import shutil
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tigbev.errors import TigbevError

__all__ = ["GOALS", "BenchConfig", "BenchResult", "markdown_tables", "render", "run"]

Preset = Literal["demo", "nuscenes"]
MODES: tuple[str, ...] = ("none", "cache", "online")
STORAGE_OPTIONS: tuple[tuple[str, str], ...] = (("dense", "float16"), ("foreground", "float16"),
                                                ("foreground", "int8"))
GOALS: dict[str, tuple[str, float, str]] = {
    # name: (description, threshold, "max" = value must be <= threshold, "min" = >=)
    "tig_cache_step_ratio": ("TiG-from-cache step / no-distillation step", 1.10, "max"),
    "loader_wait_fraction": ("fraction of a training step waiting for data (cache mode)", 0.10, "max"),
    "extraction_over_forward": ("extraction samples/s / teacher forward-only samples/s (read + distilled map)",
                                0.85, "min"),
    "cache_mib_per_sample": ("cache MiB per sample (smallest storage option within the fidelity target)", 4.0,
                             "max"),
    "fidelity_rel_error": ("max relative error of the TiG losses from that cache vs the online teacher", 0.01, "max"),
}
_POINT_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


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
            "keypoint_grid": _keypoint_grid(self.preset),
        }


@dataclass(frozen=True)
class BenchResult:
    json_path: Path
    markdown_path: Path
    plot_path: Path | None
    report: dict[str, Any]


def _keypoint_grid(preset: str) -> int:
    if preset == "demo":
        from tigbev.pipeline.demo import DEMO_KEYPOINT_GRID

        return DEMO_KEYPOINT_GRID
    return 24


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _cycle(tokens: Sequence[str], n: int) -> list[str]:
    if not tokens:
        raise TigbevError("the split has no samples")
    return list(itertools.islice(itertools.cycle(tokens), n))


# ----------------------------------------------------------------------------------------------------------------
# Data and teacher
# ----------------------------------------------------------------------------------------------------------------


def _prepare_data(cfg: BenchConfig, work: Path, need: int) -> tuple[Path, str, dict[str, Any]]:
    """(dataroot, split, description); writes a synthetic world for the demo preset unless a dataroot is given."""
    res = cfg.resolved()
    if cfg.dataroot is not None:
        return cfg.dataroot, res["split"], {"source": str(cfg.dataroot), "synthetic": False}
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    root = work / "synth"
    per_scene = 2 if cfg.tiny else 8
    scenes = max(1, math.ceil(need / per_scene))
    synth = SynthConfig(out_dir=root, scenes=scenes, samples_per_scene=per_scene, val_scenes=0, seed=cfg.seed,
                        image_width=192 if cfg.tiny else 480, image_height=108 if cfg.tiny else 270,
                        lidar_azimuth_steps=720 if cfg.tiny else 1084, sweeps_per_sample=1 if cfg.tiny else 2,
                        workers=1 if cfg.tiny else 2)
    marker = root / ".bench-complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic_dataset(synth, progress=cfg.progress)
        marker.write_text(json.dumps({"scenes": scenes, "samples_per_scene": per_scene, "tiny": cfg.tiny}))
    return root, res["split"], {"source": "synthetic (tigbev synth)", "synthetic": True, "scenes": scenes,
                                "samples_per_scene": per_scene, "image_wh": [synth.image_width, synth.image_height]}


def _prepare_teacher(cfg: BenchConfig, work: Path) -> tuple[Path, dict[str, Any]]:
    if cfg.teacher_checkpoint is not None:
        return cfg.teacher_checkpoint, {"checkpoint": str(cfg.teacher_checkpoint), "random_weights": False}
    import torch

    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint

    path = work / f"teacher-random-{cfg.preset}-seed{cfg.seed}.pt"
    if not path.exists():
        torch.manual_seed(cfg.seed)
        tcfg = teacher_preset(cfg.preset)
        save_checkpoint(path, {"model": CenterPoint(tcfg).state_dict(), "teacher_config": tcfg.to_dict()})
    return path, {"checkpoint": str(path), "random_weights": True,
                  "note": f"seeded random weights (seed {cfg.seed}): timings are real, fidelity and sizes are those "
                          f"of an untrained map"}


def _extract(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], out: Path, *, features: str = "foreground",
             dtype: str = "float16", keypoint_grid: int, device: str, shard_samples: int = 8, batch_size: int = 2,
             workers: int = 1):
    from tigbev.config import ExtractTeacherConfig
    from tigbev.stages import extract_teacher

    shutil.rmtree(out, ignore_errors=True)
    shard_samples = min(shard_samples, len(tokens))
    batch_size = math.gcd(batch_size, shard_samples)
    ecfg = ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=dataroot, split=split, out=str(out),
                                features=features, feature_dtype=dtype, workers=workers, device=device,
                                shard_samples=shard_samples, batch_size=batch_size, keypoint_grid=keypoint_grid)
    return extract_teacher.run(ecfg, progress=False, tokens=tokens)


# ----------------------------------------------------------------------------------------------------------------
# 1. Training step per mode, each mode in its own child process
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModeSpec:
    mode: str
    preset: str
    dataroot: str
    split: str
    tokens: tuple[str, ...]
    cache: str | None
    teacher_checkpoint: str | None
    keypoint_grid: int
    device: str
    seed: int
    batches: int


def _mode_worker(conn: Any, spec: _ModeSpec) -> None:
    """Child process: build one mode's model and batches, then answer 'step' / 'peak' / 'stop' messages."""
    import resource

    import torch

    try:
        state = _ModeState(spec)
        conn.send(("ready", state.info))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                conn.send(("step", state.step(msg[1])))
            elif msg[0] == "peak":
                if state.device.type == "cuda":
                    peak = int(torch.cuda.max_memory_allocated(state.device))
                else:
                    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
                conn.send(("peak", peak))
            else:
                break
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which names the mode and raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _ModeState:
    """One training mode (none / cache / online) with its model, optimiser and pre-loaded batches."""

    def __init__(self, spec: _ModeSpec):
        import resource

        import torch
        from torch.utils.data import DataLoader

        from tigbev.cache_store import CacheReader
        from tigbev.config import LossWeights, TrainStudentConfig
        from tigbev.data.augment import BevAugmentPolicy
        from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
        from tigbev.data.image_aug import ImageAugPolicy
        from tigbev.data.nuscenes_reader import NuScenesReader
        from tigbev.geometry import BevGrid
        from tigbev.models.student.student import FEATURE_STRIDE, student_preset
        from tigbev.pipeline.provenance import pick_device
        from tigbev.stages.train_student import DistillationModel, _OnlineTeacher

        self.spec = spec
        self.device = pick_device(spec.device)
        torch.manual_seed(spec.seed)
        scfg = student_preset(spec.preset)  # type: ignore[arg-type]
        reader = NuScenesReader(spec.dataroot)
        weights = LossWeights.baseline() if spec.mode == "none" else LossWeights()
        tcfg = TrainStudentConfig(preset=spec.preset, dataroot=Path(spec.dataroot), split=spec.split,  # type: ignore
                                  out_dir=Path("unused"), cache=spec.cache, teacher=spec.mode,  # type: ignore
                                  teacher_checkpoint=spec.teacher_checkpoint, weights=weights)
        cache = CacheReader(spec.cache) if spec.mode == "cache" else None
        self.online = _OnlineTeacher(Path(spec.teacher_checkpoint), reader, self.device) \
            if spec.mode == "online" else None
        grid, channels = None, None
        if cache is not None:
            grid, channels = BevGrid(**cache.manifest.grid), cache.manifest.features.channels
        elif self.online is not None:
            grid, channels = self.online.cfg.bev_grid, self.online.cfg.bev_channels
        self.teacher_hw = grid.shape_hw if grid is not None else (0, 0)
        dataset = CameraDetectionDataset(
            reader, spec.tokens, cache=cache, split=spec.split, input_hw=scfg.input_hw,
            feature_stride=FEATURE_STRIDE, image_policy=ImageAugPolicy(input_hw=scfg.input_hw),
            bda_policy=BevAugmentPolicy(), seed=spec.seed, train=True, point_range_m=_POINT_RANGE,
            lidar_reader=self.online.reader if self.online is not None else None)
        self.model = DistillationModel(scfg, tcfg, grid, channels).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        dataset[0]  # untimed: opens the devkit tables, the cache and the LiDAR reader once
        loader = DataLoader(torch.utils.data.Subset(dataset, range(min(spec.batches, len(dataset)))), batch_size=1,
                            shuffle=False, collate_fn=collate_camera, num_workers=0)
        self.batches, load_s = [], []
        t = time.perf_counter()
        for b in loader:
            self.batches.append(b.to(self.device))
            load_s.append(time.perf_counter() - t)
            t = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.info = {"sample_load_s": _median(load_s),
                     "setup_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
                     if self.device.type == "cpu" else 0}

    def step(self, i: int) -> dict[str, float]:
        from tigbev.stages.train_student import training_step

        batch = copy.copy(self.batches[i % len(self.batches)])  # the online teacher sets batch.teacher
        _, _, times = training_step(self.model, self.optimizer, self.scaler, batch, online=self.online,
                                    teacher_hw=self.teacher_hw, device=self.device, use_amp=self.use_amp,
                                    grad_clip=5.0, keypoint_grid=self.spec.keypoint_grid)
        return {"total_s": times.total_s, "targets_s": times.targets_s}


def _bench_steps(specs: dict[str, _ModeSpec], *, repeats: int, steps: int, progress: bool) -> dict[str, Any]:
    """Interleaved steps of every mode (rotated order each repeat); medians and per-round ratios."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    try:
        for mode, spec in specs.items():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_mode_worker, args=(child, spec), name=f"bench-{mode}", daemon=True)
            p.start()
            child.close()
            procs[mode], conns[mode] = p, parent
            # Start one at a time: set-up (imports, batch loading) must not overlap another mode's.
        infos = {mode: _expect(conns[mode], "ready", mode) for mode in specs}
        modes = list(specs)
        for mode in modes:  # warm-up step (allocator, lazy init), not timed
            conns[mode].send(("step", 0))
            _expect(conns[mode], "step", mode)
        times: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        ratios: dict[str, list[float]] = {m: [] for m in modes}
        bar = tqdm(total=repeats * steps * len(modes), desc="bench: training steps", unit="step",
                   disable=not progress)
        for r in range(repeats):
            for s in range(steps):
                order = modes[(r + s) % len(modes):] + modes[:(r + s) % len(modes)]
                round_t: dict[str, float] = {}
                for mode in order:
                    conns[mode].send(("step", 1 + r * steps + s))
                    t = _expect(conns[mode], "step", mode)
                    times[mode].append(t)
                    round_t[mode] = t["total_s"]
                    bar.update(1)
                for mode in modes:
                    ratios[mode].append(round_t[mode] / round_t[modes[0]])
        bar.close()
        peaks = {}
        for mode in modes:
            conns[mode].send(("peak",))
            peaks[mode] = _expect(conns[mode], "peak", mode)
            conns[mode].send(("stop",))
    finally:
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    base = modes[0]
    out: dict[str, Any] = {}
    for mode in modes:
        total = [t["total_s"] for t in times[mode]]
        out[mode] = {
            "median_step_s": _median(total), "step_s": total,
            "median_targets_s": _median([t["targets_s"] for t in times[mode]]),
            "ratio_to_none": _median(ratios[mode]), "ratio_of_medians": _median(total) / _median(
                [t["total_s"] for t in times[base]]),
            "peak_memory_bytes": peaks[mode], "setup_peak_bytes": infos[mode]["setup_peak_bytes"],
            "peak_memory_ratio_to_none": peaks[mode] / peaks[base] if peaks[base] else float("nan"),
            "sample_load_s": infos[mode]["sample_load_s"],
        }
    return out


def _expect(conn: Any, kind: str, mode: str) -> Any:
    try:
        got, payload = conn.recv()
    except EOFError:
        raise TigbevError(f"bench: the '{mode}' training process died (out of memory?)") from None
    if got == "error":
        raise TigbevError(f"bench: training mode '{mode}' failed: {payload}")
    if got != kind:
        raise TigbevError(f"bench: mode '{mode}' answered {got!r}, expected {kind!r}")
    return payload


# ----------------------------------------------------------------------------------------------------------------
# 2. Loader: cache reads against a raw memmap of the same bytes
# ----------------------------------------------------------------------------------------------------------------


class _CacheReads:
    """A dataset whose item i is the cache's sample i % n, read and decoded (what the camera loader reads)."""

    def __init__(self, url: str, n_items: int):
        from tigbev.cache_store import CacheReader

        self.reader = CacheReader(url)
        self.n_items = n_items

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> int:
        s = self.reader.read(i % len(self.reader))
        return int(s.boxes.nbytes + s.keypoints.nbytes + s.depth.nbytes + s.map_features.nbytes)


class _MemmapReads:
    """Item i: sample i % n's bytes copied out of one raw file through a numpy memmap (no decoding)."""

    def __init__(self, path: Path, offsets: list[tuple[int, int]], n_items: int):
        self.path, self.offsets, self.n_items = str(path), offsets, n_items
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return self.n_items

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}

    def __getitem__(self, i: int) -> int:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, size = self.offsets[i % len(self.offsets)]
        return int(np.array(self._mm[start:start + size]).nbytes)


def _raw_copy(url: str, path: Path) -> list[tuple[int, int]]:
    """Write every sample's stored arrays (storage dtypes, no compression) to one file; (offset, size) per sample."""
    from tigbev.cache_store import CacheReader

    reader = CacheReader(url)
    offsets = []
    with path.open("wb") as f:
        pos = 0
        for i in range(len(reader)):
            s = reader.read(i)
            feats = s.map_features.astype(np.float16 if reader.manifest.features.dtype == "float16" else np.int8)
            parts = [s.boxes, s.keypoints, s.depth, feats] + ([] if s.map_cells is None else
                                                               [s.map_cells.astype(np.int32)])
            blob = b"".join(np.ascontiguousarray(p).tobytes() for p in parts)
            f.write(blob)
            offsets.append((pos, len(blob)))
            pos += len(blob)
    return offsets


def _loader_rate(dataset: Any, workers: int) -> float:
    """Items per second through a DataLoader (batch 1, identity collate), after the first item (worker start-up)."""
    from torch.utils.data import DataLoader

    with warnings.catch_warnings():  # more workers than cores is the point of the measurement: no advice wanted
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                            prefetch_factor=2 if workers > 0 else None)
        it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / max(time.perf_counter() - t, 1e-9)


def _bench_loader(url: str, work: Path, *, repeats: int, workers: Sequence[int], n_items: int) -> dict[str, Any]:
    raw = work / "raw-memmap.bin"
    offsets = _raw_copy(url, raw)
    cache_ds, mm_ds = _CacheReads(url, n_items), _MemmapReads(raw, offsets, n_items)
    for i in range(len(offsets)):  # warm the page cache and zarr's metadata for both
        cache_ds[i], mm_ds[i]
    cache_s, mm_s, ratio = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_items):
            cache_ds[i]
        t1 = time.perf_counter()
        for i in range(n_items):
            mm_ds[i]
        t2 = time.perf_counter()
        cache_s.append((t1 - t0) / n_items)
        mm_s.append((t2 - t1) / n_items)
        ratio.append(cache_s[-1] / mm_s[-1])
    per_workers: dict[str, Any] = {}
    for w in workers:
        c, m = [], []
        for _ in range(repeats):
            c.append(_loader_rate(cache_ds, w))
            m.append(_loader_rate(mm_ds, w))
        per_workers[str(w)] = {"cache_samples_per_s": _median(c), "memmap_samples_per_s": _median(m),
                               "cache_over_memmap": _median(c) / _median(m)}
    raw.unlink(missing_ok=True)
    return {"bytes_per_sample_raw": float(np.mean([s for _, s in offsets])),
            "cache_read_s_per_sample": _median(cache_s), "memmap_read_s_per_sample": _median(mm_s),
            "cache_over_memmap_time": _median(ratio), "workers": per_workers}


# ----------------------------------------------------------------------------------------------------------------
# 3. Extraction against the teacher's forward-only rate
# ----------------------------------------------------------------------------------------------------------------


def _forward_only(ckpt: Path, dataroot: Path, tokens: Sequence[str], device: str) -> dict[str, float]:
    """Teacher rates with the teacher already loaded, samples/s: ``read_full`` (read the sweeps + the whole
    CenterPoint forward, head included), ``full`` (forward alone, points in memory), ``read_map`` (read + the
    distilled map only, what extraction computes) and ``map`` (map only, points in memory)."""
    import torch

    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.teacher.checkpoint import load_teacher
    from tigbev.models.teacher.frozen import FrozenTeacher
    from tigbev.pipeline.provenance import pick_device

    dev = pick_device(device)
    model, tcfg, _ = load_teacher(ckpt, dev)
    teacher = FrozenTeacher(model)
    reader = NuScenesReader(dataroot, num_sweeps=tcfg.num_sweeps)
    teacher([torch.from_numpy(reader.load_sample(tokens[0]).lidar.points).to(dev)])  # warm-up

    def full(p: Any) -> None:
        teacher([p]).bev_features.cpu()

    def map_only(p: Any) -> None:
        teacher.bev_map([p]).cpu()

    out: dict[str, float] = {}
    pts: list[Any] = []
    for name, fn in (("full", full), ("map", map_only)):
        start = time.perf_counter()
        for t in tokens:
            p = torch.from_numpy(reader.load_sample(t).lidar.points).to(dev)
            fn(p)
            if name == "full":
                pts.append(p)
        out[f"read_{name}"] = len(tokens) / (time.perf_counter() - start)
        start = time.perf_counter()
        for p in pts:
            fn(p)
        out[name] = len(tokens) / (time.perf_counter() - start)
    return out


def _bench_extraction(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], work: Path, *, repeats: int,
                      keypoint_grid: int, device: str, bar: Any) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"read_full": [], "full": [], "read_map": [], "map": []}
    ext, ext_total, ratio_full, ratio_map = [], [], [], []
    for _ in range(repeats):
        f = _forward_only(ckpt, dataroot, tokens, device)
        r = _extract(ckpt, dataroot, split, tokens, work / "rate-cache", keypoint_grid=keypoint_grid, device=device)
        for k, v in f.items():
            rates[k].append(v)
        ext.append(len(tokens) / r.loop_seconds)
        ext_total.append(len(tokens) / r.seconds)
        ratio_full.append(ext[-1] / f["read_full"])
        ratio_map.append(ext[-1] / f["read_map"])
        bar.update(1)
    shutil.rmtree(work / "rate-cache", ignore_errors=True)
    return {"samples": len(tokens), "forward_only_samples_per_s": _median(rates["read_full"]),
            "teacher_compute_samples_per_s": _median(rates["full"]),
            "map_forward_only_samples_per_s": _median(rates["read_map"]),
            "map_compute_samples_per_s": _median(rates["map"]),
            "extraction_samples_per_s": _median(ext), "extraction_with_setup_samples_per_s": _median(ext_total),
            "extraction_over_forward": _median(ratio_full), "extraction_over_map_forward": _median(ratio_map)}


# ----------------------------------------------------------------------------------------------------------------
# 4. Storage and fidelity
# ----------------------------------------------------------------------------------------------------------------


def _fidelity(url: str, ckpt: Path, dataroot: Path, preset: str, device: str, max_samples: int, seed: int
              ) -> dict[str, float]:
    """Relative errors of the TiG feature losses (and of the keypoint features) from the cache vs the live teacher.

    Same keypoints (the cached boxes', un-augmented frame) for both; the student side is a fixed random map on the
    student grid through a seeded adapter, so the only difference is where the teacher features come from.
    """
    import torch

    from tigbev.cache_store import CacheReader
    from tigbev.data.camera_batch import TeacherTargets
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.bev_sampling import sample_bev
    from tigbev.models.losses import InnerFeatureDistillation
    from tigbev.models.student.student import student_preset
    from tigbev.models.teacher.checkpoint import load_teacher
    from tigbev.models.teacher.frozen import FrozenTeacher
    from tigbev.pipeline.provenance import pick_device

    dev = pick_device(device)
    model, tcfg, _ = load_teacher(ckpt, dev)
    teacher = FrozenTeacher(model)
    reader = NuScenesReader(dataroot, num_sweeps=tcfg.num_sweeps)
    cache = CacheReader(url)
    scfg = student_preset(preset)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    distill = InnerFeatureDistillation(scfg.bev_channels, tcfg.bev_channels, student_grid=scfg.bev_grid,
                                       teacher_grid=tcfg.bev_grid).to(dev)
    h, w = tcfg.bev_grid.shape_hw
    errs: dict[str, list[float]] = {"inter_keypoint": [], "inter_channel": [], "keypoint_features": []}
    seen: set[str] = set()
    for i in range(len(cache)):
        s = cache.read(i)
        if s.token in seen or len(seen) >= max_samples or not len(s.boxes):
            continue
        seen.add(s.token)
        online = teacher.features_for_loss([torch.from_numpy(reader.load_sample(s.token).lidar.points).to(dev)])
        kp = torch.from_numpy(s.keypoints).to(dev)[None]  # (1, M, K, 2)
        mask = torch.ones(kp.shape[:2], dtype=torch.bool, device=dev)
        targets = TeacherTargets(kp_teacher_xy=kp, kp_student_xy=kp, box_mask=mask,
                                 map_cells=None if s.map_cells is None else torch.from_numpy(s.map_cells)[None],
                                 map_features=torch.from_numpy(s.map_features)[None]).to(dev)
        cached = targets.dense_map(h, w)
        student = torch.randn((1, scfg.bev_channels, *scfg.bev_grid.shape_hw), generator=torch.Generator().manual_seed(
            seed + i)).to(dev)
        with torch.no_grad():
            lo = distill.unweighted(student, kp, mask, teacher_bev=online, teacher_keypoints_xy=kp)
            lc = distill.unweighted(student, kp, mask, teacher_bev=cached, teacher_keypoints_xy=kp)
            fo, valid = sample_bev(online.float(), kp.reshape(1, -1, 2), tcfg.bev_grid)
            fc, _ = sample_bev(cached, kp.reshape(1, -1, 2), tcfg.bev_grid)
        for k in ("inter_keypoint", "inter_channel"):
            errs[k].append(abs(float(lc[k]) - float(lo[k])) / max(abs(float(lo[k])), 1e-12))
        v = valid[0]
        errs["keypoint_features"].append(float((fc[0][v] - fo[0][v]).norm() / fo[0][v].norm().clamp(min=1e-12)))
    out = {f"{k}_rel_error": max(v) if v else float("nan") for k, v in errs.items()}
    out["samples"] = len(seen)
    out["max_loss_rel_error"] = max(out["inter_keypoint_rel_error"], out["inter_channel_rel_error"])
    return out


def _bench_storage(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], work: Path, *, preset: str,
                   keypoint_grid: int, device: str, seed: int, bar: Any) -> dict[str, Any]:
    from tigbev.stages.cache_tools import cache_info

    out: dict[str, Any] = {}
    for features, dtype in STORAGE_OPTIONS:
        name = f"{features}-{dtype}"
        url = work / f"storage-{name}"
        _extract(ckpt, dataroot, split, tokens, url, features=features, dtype=dtype, keypoint_grid=keypoint_grid,
                 device=device)
        info = cache_info(str(url))
        out[name] = {"bytes_per_sample": info["bytes_per_sample"],
                     "bytes_per_sample_total": info["bytes_per_sample_total"],
                     "compression_ratio": info["compression_ratio"],
                     "fidelity": _fidelity(str(url), ckpt, dataroot, preset, device, max_samples=4, seed=seed)}
        if name != "foreground-float16":
            shutil.rmtree(url, ignore_errors=True)
        bar.update(1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 5. Growth: extraction and training time at 1x, 2x, 4x; camera-loader throughput per worker count
# ----------------------------------------------------------------------------------------------------------------


def _train_epoch(preset: str, dataroot: Path, split: str, tokens: Sequence[str], cache: str, *, keypoint_grid: int,
                 device: str, seed: int, workers: int = 1) -> dict[str, float]:
    """One epoch of cache-mode training (batch 1, a DataLoader with ``workers``): seconds, and the time spent
    waiting for batches (first batch excluded: it pays for the worker's start)."""
    import torch
    from torch.utils.data import DataLoader

    from tigbev.cache_store import CacheReader
    from tigbev.config import TrainStudentConfig
    from tigbev.data.augment import BevAugmentPolicy
    from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
    from tigbev.data.image_aug import ImageAugPolicy
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.geometry import BevGrid
    from tigbev.models.student.student import FEATURE_STRIDE, student_preset
    from tigbev.pipeline.provenance import pick_device
    from tigbev.stages.train_student import DistillationModel, training_step

    dev = pick_device(device)
    torch.manual_seed(seed)
    scfg = student_preset(preset)  # type: ignore[arg-type]
    reader = NuScenesReader(dataroot)
    cr = CacheReader(cache)
    grid = BevGrid(**cr.manifest.grid)
    tcfg = TrainStudentConfig(preset=preset, dataroot=dataroot, split=split, out_dir=Path("unused"),  # type: ignore
                              cache=cache)
    dataset = CameraDetectionDataset(reader, tokens, cache=cr, split=split, input_hw=scfg.input_hw,
                                     feature_stride=FEATURE_STRIDE, image_policy=ImageAugPolicy(input_hw=scfg.input_hw),
                                     bda_policy=BevAugmentPolicy(), seed=seed, train=True)
    model = DistillationModel(scfg, tcfg, grid, cr.manifest.features.channels).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_camera, num_workers=workers,
                        prefetch_factor=2 if workers > 0 else None)
    wait, compute = [], []
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it).to(dev)
        except StopIteration:
            break
        t1 = time.perf_counter()
        _, _, times = training_step(model, opt, scaler, batch, online=None, teacher_hw=grid.shape_hw, device=dev,
                                    use_amp=dev.type == "cuda", grad_clip=5.0, keypoint_grid=keypoint_grid)
        wait.append(t1 - t0)
        compute.append(times.total_s)
    seconds = time.perf_counter() - start
    w, c = sum(wait[1:]), sum(compute[1:])
    return {"seconds": seconds, "steps": len(compute), "wait_s": w, "compute_s": c,
            "wait_fraction": w / (w + c) if w + c > 0 else float("nan"),
            "median_wait_s": _median(wait[1:]), "median_step_s": _median(compute[1:])}


def _camera_loader_rate(preset: str, dataroot: Path, split: str, tokens: Sequence[str], cache: str, workers: int,
                        n_items: int) -> float:
    """Full camera samples (images, augmentation, depth maps, cached targets) per second through a DataLoader."""
    from tigbev.cache_store import CacheReader
    from tigbev.data.augment import BevAugmentPolicy
    from tigbev.data.camera_dataset import CameraDetectionDataset
    from tigbev.data.image_aug import ImageAugPolicy
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.student.student import FEATURE_STRIDE, student_preset

    scfg = student_preset(preset)  # type: ignore[arg-type]
    ds = CameraDetectionDataset(NuScenesReader(dataroot), tokens, cache=CacheReader(cache), split=split,
                                input_hw=scfg.input_hw, feature_stride=FEATURE_STRIDE,
                                image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=BevAugmentPolicy())

    class _Repeat:
        def __len__(self) -> int:
            return n_items

        def __getitem__(self, i: int) -> Any:
            return ds[i % len(ds)]

    return _loader_rate(_Repeat(), workers)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    # The storage goal is met by an option that is both small enough and faithful enough: take the smallest option
    # within the fidelity target (or, when none is, the most faithful one) and report its size and error.
    options = report["storage"]
    faithful = [n for n, o in options.items() if (o["fidelity"]["max_loss_rel_error"] or 0.0) <= GOALS[
        "fidelity_rel_error"][1]]
    pick = min(faithful, key=lambda n: options[n]["bytes_per_sample_total"]) if faithful else min(
        options, key=lambda n: options[n]["fidelity"]["max_loss_rel_error"] or float("inf"))
    fg = options[pick]
    values = {
        "tig_cache_step_ratio": report["step"]["cache"]["ratio_to_none"],
        "loader_wait_fraction": report["loader"]["wait_fraction"],
        # Against the forward extraction must pay (read the sweeps, compute the distilled map; the head is skipped).
        "extraction_over_forward": report["extraction"].get("extraction_over_map_forward",
                                                            report["extraction"]["extraction_over_forward"]),
        "cache_mib_per_sample": fg["bytes_per_sample_total"] / 2 ** 20,
        "fidelity_rel_error": fg["fidelity"]["max_loss_rel_error"],
    }
    out = {}
    for name, (text, threshold, kind) in GOALS.items():
        v = values[name]
        holds = bool(v <= threshold) if kind == "max" else bool(v >= threshold)
        out[name] = {"description": text, "value": v, "target": threshold, "kind": kind, "holds": holds}
        if name in ("cache_mib_per_sample", "fidelity_rel_error"):
            out[name]["storage_option"] = pick
    return out


def markdown_tables(report: dict[str, Any]) -> str:
    """The bench's tables in Markdown (every number with its unit)."""
    mib = 2 ** 20
    teacher = "seeded random weights" if report["teacher"]["random_weights"] else report["teacher"]["checkpoint"]
    about = (f"Data: {report['dataset']['description']}; teacher: {teacher}; batch 1; {report['config']['repeats']} "
             f"repeats x {report['config']['steps']} interleaved steps per mode, medians; peak memory: "
             f"{report['peak_memory_method']}.")
    header = ("| training step | step (s) | x no-distill | teacher targets (s) | peak memory (MiB) | x no-distill | "
              "sample load, no workers (s) |")
    lines = [f"### `{report['preset']}` preset, {report['device_name']} ({report['date']})", "", about, "",
             header, "|---|---|---|---|---|---|---|"]
    names = {"none": "no distillation", "cache": "TiG-BEV from the cache", "online": "TiG-BEV, online teacher"}
    for mode, s in report["step"].items():
        lines.append(f"| {names[mode]} | {s['median_step_s']:.3f} | {s['ratio_to_none']:.2f} | "
                     f"{s['median_targets_s']:.3f} | {s['peak_memory_bytes'] / mib:.0f} | "
                     f"{s['peak_memory_ratio_to_none']:.2f} | {s['sample_load_s']:.3f} |")
    ld = report["loader"]
    lines += ["", "| loader | cache | raw memmap | cache / memmap |", "|---|---|---|---|",
              (f"| read per sample, in process (ms) | {1e3 * ld['cache_read_s_per_sample']:.2f} | "
               f"{1e3 * ld['memmap_read_s_per_sample']:.3f} | {ld['cache_over_memmap_time']:.1f}x time |")]
    for w, r in ld["workers"].items():
        lines.append(f"| {w} worker(s) (samples/s) | {r['cache_samples_per_s']:.0f} | {r['memmap_samples_per_s']:.0f}"
                     f" | {r['cache_over_memmap']:.2f}x rate |")
    lines.append(f"| training wait for data (cache mode, 1 worker) | {100 * ld['wait_fraction']:.1f}% of the step "
                 f"time | | |")
    ex = report["extraction"]
    lines += ["", f"| extraction ({ex['samples']} samples) | samples/s | x forward-only |", "|---|---|---|",
              f"| teacher forward-only (read sweeps + forward) | {ex['forward_only_samples_per_s']:.2f} | 1.00 |",
              (f"| teacher forward alone (points in memory) | {ex['teacher_compute_samples_per_s']:.2f} | "
               f"{ex['teacher_compute_samples_per_s'] / ex['forward_only_samples_per_s']:.2f} |"),
              *([] if "map_forward_only_samples_per_s" not in ex else [
                  (f"| distilled map only, no head (read sweeps + forward) | "
                   f"{ex['map_forward_only_samples_per_s']:.2f} | "
                   f"{ex['map_forward_only_samples_per_s'] / ex['forward_only_samples_per_s']:.2f} |"),
                  (f"| extract-teacher / map-only forward-only | | {ex['extraction_over_map_forward']:.2f} |")]),
              (f"| extract-teacher, steady loop | {ex['extraction_samples_per_s']:.2f} | "
               f"{ex['extraction_over_forward']:.2f} |"),
              (f"| extract-teacher, with set-up | {ex['extraction_with_setup_samples_per_s']:.2f} | "
               f"{ex['extraction_with_setup_samples_per_s'] / ex['forward_only_samples_per_s']:.2f} |")]
    arrays = sorted({a for s in report["storage"].values() for a in s["bytes_per_sample"]})
    lines += ["", ("| storage | KiB/sample | compression | " + " | ".join(f"{a} KiB" for a in arrays)
                   + " | L_kp rel. err. | L_ch rel. err. | features rel. err. |"),
              "|---|---|---|" + "---|" * len(arrays) + "---|---|---|"]
    for name, s in report["storage"].items():
        f = s["fidelity"]
        lines.append(f"| {name} | {s['bytes_per_sample_total'] / 1024:.0f} | {s['compression_ratio']:.2f}x | "
                     + " | ".join(f"{s['bytes_per_sample'].get(a, 0) / 1024:.0f}" for a in arrays)
                     + f" | {f['inter_keypoint_rel_error']:.1e} | {f['inter_channel_rel_error']:.1e} | "
                       f"{f['keypoint_features_rel_error']:.1e} |")
    g = report["growth"]
    lines += ["", "| growth | " + " | ".join(f"{f}x ({n} samples)" for f, n in zip(g["factors"], g["samples"]))
              + " |", "|---|" + "---|" * len(g["factors"]),
              "| extraction, with set-up (s) | " + " | ".join(f"{v:.1f}" for v in g["extraction_s"]) + " |",
              "| extraction, steady loop (s) | " + " | ".join(f"{v:.1f}" for v in g["extraction_loop_s"]) + " |",
              "| extraction loop per sample (s) | " + " | ".join(
                  f"{v / n:.2f}" for v, n in zip(g["extraction_loop_s"], g["samples"])) + " |",
              "| training epoch, cache mode (s) | " + " | ".join(f"{v:.1f}" for v in g["training_s"]) + " |",
              "| training per sample (s) | " + " | ".join(
                  f"{v / n:.2f}" for v, n in zip(g["training_s"], g["samples"])) + " |"]
    lw = g["camera_loader_samples_per_s"]
    lines += ["", "| camera loader (cache mode) | " + " | ".join(f"{w} worker(s)" for w in lw) + " |",
              "|---|" + "---|" * len(lw), "| samples/s | " + " | ".join(f"{v:.2f}" for v in lw.values()) + " |"]
    lines += ["", "| goal | target | measured | holds |", "|---|---|---|---|"]
    for name, goal in report["goals"].items():
        op = "<=" if goal["kind"] == "max" else ">="
        where = f" ({goal['storage_option']})" if "storage_option" in goal else ""
        lines.append(f"| {goal['description']} | {op} {goal['target']:g} | {goal['value']:.3g}{where} | "
                     f"{'yes' if goal['holds'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    modes = list(report["step"])
    axes[0].bar(modes, [report["step"][m]["median_step_s"] for m in modes], color=["#888", "#2a7", "#c52"])
    for i, m in enumerate(modes):
        axes[0].text(i, report["step"][m]["median_step_s"], f"{report['step'][m]['ratio_to_none']:.2f}x",
                     ha="center", va="bottom")
    axes[0].set_ylabel("training step (s)")
    axes[0].set_title("step per mode (median)")
    g = report["growth"]
    axes[1].plot(g["samples"], g["extraction_loop_s"], "o-", label="extraction (steady loop)")
    axes[1].plot(g["samples"], g["training_s"], "s-", label="training epoch (cache)")
    axes[1].set_xlabel("samples")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("growth")
    axes[1].legend()
    lw = g["camera_loader_samples_per_s"]
    axes[2].plot([int(w) for w in lw], list(lw.values()), "o-", label="camera loader (cache)")
    cw = report["loader"]["workers"]
    axes[2].plot([int(w) for w in cw], [v["cache_samples_per_s"] for v in cw.values()], "s-", label="cache reads")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("workers")
    axes[2].set_ylabel("samples/s")
    axes[2].set_title("loader throughput")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"tigbev bench, {report['preset']} preset ({report['device_name']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(cfg: BenchConfig) -> BenchResult:
    """Run every section and write bench.json, bench.md and bench.png to ``cfg.out_dir``."""
    import torch
    from tqdm import tqdm

    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.pipeline.provenance import pick_device, provenance, write_json_atomic

    res = cfg.resolved()
    out = cfg.out_dir
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    n_base = res["samples"]
    need = max(n_base * max(res["growth"]), res["rate_samples"])
    dataroot, split, data_desc = _prepare_data(cfg, work, need)
    ckpt, teacher_desc = _prepare_teacher(cfg, work)
    split_tokens = NuScenesReader(dataroot).sample_tokens(split)
    repeated = len(split_tokens) < need
    base = _cycle(split_tokens, n_base)
    grid = res["keypoint_grid"]
    desc = (f"{data_desc['source']}, split {split} ({len(split_tokens)} samples"
            + (", tokens repeated to reach the sizes below)" if repeated else ")"))
    report: dict[str, Any] = {
        "preset": cfg.preset, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "peak_memory_method": "torch.cuda.max_memory_allocated per mode" if device.type == "cuda"
        else "peak RSS of each mode's own process (getrusage ru_maxrss)",
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in res.items()},
                   "dataroot": str(dataroot)},
        "dataset": {**data_desc, "split": split, "split_samples": len(split_tokens), "tokens_repeated": repeated,
                    "description": desc},
        "teacher": teacher_desc,
        "provenance": provenance(),
    }
    sections = 3 + res["repeats"] + len(STORAGE_OPTIONS) + 2 * len(res["growth"])
    bar = tqdm(total=sections, desc=f"bench {cfg.preset}", unit="part", disable=not cfg.progress)

    # The cache every later section reads (foreground float16: the default storage).
    cache_url = str(work / "cache-1x")
    _extract(ckpt, dataroot, split, base, Path(cache_url), keypoint_grid=grid, device=cfg.device)
    bar.update(1)

    # 1. Training step per mode.
    common: dict[str, Any] = {"preset": cfg.preset, "dataroot": str(dataroot), "split": split,
                              "tokens": tuple(base), "teacher_checkpoint": str(ckpt), "keypoint_grid": grid,
                              "device": cfg.device, "seed": cfg.seed, "batches": min(n_base, res["steps"] + 1)}
    specs = {m: _ModeSpec(mode=m, cache=cache_url if m == "cache" else None, **common) for m in MODES}
    report["step"] = _bench_steps(specs, repeats=res["repeats"], steps=res["steps"], progress=False)
    bar.update(1)

    # 3. Extraction vs forward-only (interleaved per repeat).
    rate_tokens = _cycle(split_tokens, res["rate_samples"])
    report["extraction"] = _bench_extraction(ckpt, dataroot, split, rate_tokens, work, repeats=res["repeats"],
                                             keypoint_grid=grid, device=cfg.device, bar=bar)

    # 4. Storage options and their fidelity.
    report["storage"] = _bench_storage(ckpt, dataroot, split, base, work, preset=cfg.preset, keypoint_grid=grid,
                                       device=cfg.device, seed=cfg.seed, bar=bar)

    # 5. Growth (and the loader wait fraction from its training epochs).
    growth: dict[str, Any] = {"factors": list(res["growth"]), "samples": [], "extraction_s": [],
                              "extraction_loop_s": [], "training_s": [], "training": []}
    for f in res["growth"]:
        toks = _cycle(split_tokens, n_base * f)
        url = work / f"growth-{f}x"
        r = _extract(ckpt, dataroot, split, toks, url, keypoint_grid=grid, device=cfg.device)
        bar.update(1)
        t = _train_epoch(cfg.preset, dataroot, split, toks, str(url), keypoint_grid=grid, device=cfg.device,
                         seed=cfg.seed)
        bar.update(1)
        growth["samples"].append(len(toks))
        growth["extraction_s"].append(r.seconds)
        growth["extraction_loop_s"].append(r.loop_seconds)
        growth["training_s"].append(t["seconds"])
        growth["training"].append(t)
        if f != max(res["growth"]):
            shutil.rmtree(url, ignore_errors=True)
    big = str(work / f"growth-{max(res['growth'])}x")
    big_tokens = _cycle(split_tokens, n_base * max(res["growth"]))
    n_items = max(8, len(big_tokens))
    growth["camera_loader_samples_per_s"] = {
        str(w): _median([_camera_loader_rate(cfg.preset, dataroot, split, big_tokens, big, w, n_items)
                         for _ in range(max(1, res["repeats"] - 1))]) for w in res["loader_workers"]}
    per_sample = [s / n for s, n in zip(growth["training_s"], growth["samples"])]
    growth["training_per_sample_over_1x"] = [p / per_sample[0] for p in per_sample]
    per_sample_x = [s / n for s, n in zip(growth["extraction_loop_s"], growth["samples"])]
    growth["extraction_per_sample_over_1x"] = [p / per_sample_x[0] for p in per_sample_x]
    report["growth"] = growth
    shutil.rmtree(big, ignore_errors=True)

    # 2. Loader: cache reads vs raw memmap; the wait fraction from the growth training epochs.
    report["loader"] = _bench_loader(cache_url, work, repeats=res["repeats"], workers=res["loader_workers"],
                                     n_items=max(16, n_base * 4))
    waits = [t["wait_s"] for t in growth["training"]]
    computes = [t["compute_s"] for t in growth["training"]]
    report["loader"]["wait_fraction"] = sum(waits) / max(sum(waits) + sum(computes), 1e-12)
    report["loader"]["wait_fraction_per_size"] = [t["wait_fraction"] for t in growth["training"]]
    bar.update(1)
    bar.close()

    report["goals"] = _goals(report)
    json_path = write_json_atomic(out / "bench.json", _finite(report))
    md_path = out / "bench.md"
    md_path.write_text(markdown_tables(report))
    plot_path = _plot(report, out / "bench.png")
    return BenchResult(json_path=json_path, markdown_path=md_path, plot_path=plot_path, report=report)


def render(out_dir: Path) -> tuple[Path, Path]:
    """Rewrite ``bench.md`` and ``bench.png`` from an existing ``bench.json`` (e.g. after a change of the tables)."""
    report = json.loads((Path(out_dir) / "bench.json").read_text())
    report["goals"] = _goals(report)
    md = Path(out_dir) / "bench.md"
    md.write_text(markdown_tables(report))
    return md, _plot(report, Path(out_dir) / "bench.png")


def _finite(obj: Any) -> Any:
    """JSON without NaN / inf (written as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

