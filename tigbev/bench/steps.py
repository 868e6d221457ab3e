"""Section ``step``: one training step per mode (none / cache / online), each mode in its own child process."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tigbev.bench.config import median
from tigbev.errors import TigbevError

__all__ = ["ModeSpec", "bench_steps"]


@dataclass(frozen=True)
class ModeSpec:
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
    frames: int = 1


def _mode_worker(conn: Any, spec: ModeSpec) -> None:
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

    def __init__(self, spec: ModeSpec):
        import resource

        import torch
        from torch.utils.data import DataLoader

        from tigbev.config import LossWeights, TrainStudentConfig
        from tigbev.data.camera_dataset import collate_camera
        from tigbev.stages.train_student import build_distillation
        from tigbev.utils.device import pick_device

        self.spec = spec
        self.device = pick_device(spec.device)
        torch.manual_seed(spec.seed)
        weights = LossWeights.baseline() if spec.mode == "none" else LossWeights()
        tcfg = TrainStudentConfig(preset=spec.preset, dataroot=Path(spec.dataroot), split=spec.split,  # type: ignore
                                  out_dir=Path("unused"), cache=spec.cache, teacher=spec.mode,  # type: ignore
                                  teacher_checkpoint=spec.teacher_checkpoint, weights=weights, seed=spec.seed,
                                  augment=True, keypoint_grid=spec.keypoint_grid, frames=spec.frames)
        built = build_distillation(tcfg, self.device, tokens=spec.tokens)
        self.online, dataset = built.online, built.dataset
        self.teacher_hw = built.teacher_grid.shape_hw if built.teacher_grid is not None else (0, 0)
        self.model = built.model.to(self.device)
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
        self.info = {"sample_load_s": median(load_s),
                     "setup_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
                     if self.device.type == "cpu" else 0}

    def step(self, i: int) -> dict[str, float]:
        from tigbev.stages.train_student import training_step

        batch = self.batches[i % len(self.batches)]  # training_step leaves the batch as it is
        times = training_step(self.model, self.optimizer, self.scaler, batch, online=self.online,
                              teacher_hw=self.teacher_hw, device=self.device, use_amp=self.use_amp,
                              grad_clip=5.0).times
        return {"total_s": times.total_s, "targets_s": times.targets_s}


def bench_steps(specs: dict[str, ModeSpec], *, repeats: int, steps: int, progress: bool) -> dict[str, Any]:
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
            "median_step_s": median(total), "step_s": total,
            "median_targets_s": median([t["targets_s"] for t in times[mode]]),
            "ratio_to_none": median(ratios[mode]), "ratio_of_medians": median(total) / median(
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
