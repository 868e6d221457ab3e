"""``tigbev demo``: the whole chain on synthetic data, stage by stage, through the same files a user would use.

synth -> train-teacher -> extract-teacher -> train-student (baseline: no distillation) and train-student (TiG-BEV
from the cache), same seed and budget -> official metrics of all three -> ``summary.json`` and a printed table.
A rerun with the same directory reuses every stage whose output is already complete.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tigbev.utils.provenance import write_json_atomic
from tigbev.utils.run_dir import check_output_dir

if TYPE_CHECKING:
    from tigbev.config import LossWeights

__all__ = ["DEMO_KEYPOINT_GRID", "WORLD_PIN", "CacheChoice", "DemoConfig", "DemoWorld", "demo_distillation_weights",
           "demo_output", "pin_world", "prepare_world", "run", "summary_reading", "summary_table", "train_demo_student",
           "world_cache", "world_preset"]

# 12 x 12 keypoints per box instead of the published 24 x 24: the same formulas at a demo size. On 2 CPU cores the
# 576 x 576 Gram matrices of ~30 boxes per sample cost more than the student itself (16x less at 144 keypoints).
DEMO_KEYPOINT_GRID = 12


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out_dir: Path
    seed: int = 0
    teacher_epochs: int = 10
    student_epochs: float = 8
    student_lr: float = 2e-3
    student_augment: bool = False
    """Both students train on 100 samples for 400 steps from the pretrained backbone: at this budget augmentation
    only slows them down (the published schedule augments over 24 epochs of 28k samples), and 2e-3 learns faster
    than 1e-3."""
    student_warmup_steps: int = 30
    student_frames: int = 1
    """Key frames per sample of every student (2: BEVDet4D / BEVDepth4D); the cache is the same for any count."""
    student_sampler: str = "uniform"
    """'uniform' or 'cbgs' (class-balanced grouping and sampling) for every student."""
    student_input_hw: tuple[int, int] | None = None
    """Network input (H, W) of every student; None: the demo preset's 128 x 352."""
    pretrain_epochs: int = 2
    """Epochs of ``tigbev pretrain-backbone`` on the world's train split (0: students start from random weights).
    The stage is shared by every student of the world, as the cache is, and is what lifts a small student most for
    its cost (no ImageNet weights can be fetched at run time)."""
    synth: dict[str, Any] = field(default_factory=dict)
    """Overrides of the synthetic world's SynthConfig (scenes, val_scenes, ...); empty: the demo's 100 + 20."""
    workers: int = 1
    tiny: bool = False
    """A seconds-long configuration (a few samples, a few steps) that exercises every stage: for tests."""


def world_preset(name: str) -> dict[str, Any]:
    """DemoConfig fields of a named world and budget: ``demo`` (tigbev demo's) or ``study`` (the ablation's)."""
    match name:
        case "demo":
            return {}
        case "study":
            # 1000 train samples seen about once each, 200 val samples; a backbone pretrained on the renderer's
            # depth and classes; the teacher sees each train sample twice.
            return {"synth": {"scenes": 120, "val_scenes": 20}, "teacher_epochs": 2, "pretrain_epochs": 1,
                    "student_epochs": 1, "student_lr": 2e-3, "student_augment": False}
    raise ValueError(f"unknown world preset {name!r}; choose 'demo' or 'study'")


def demo_output(name: str) -> bool:
    """Whether a name in a demo (or ablation) directory is one that demo or ablate writes there."""
    return (name in ("synth", "teacher", "cache-train", "pretrain", "stages.json", "summary.json", WORLD_PIN,
                     "levers.json", "levers.md", "loss_scale.json", "loss_scale.md")
            or re.fullmatch(r"ablation(-[a-z0-9]+)*\.(json|md|png)", name) is not None
            or name.startswith(("student-", ".synth.partial-", "cache-train-"))
            or (name.startswith(".") and ".json.tmp" in name))


def _timed(stages: dict[str, float], name: str, done: Callable[[], bool], work: Callable[[], Any],
           record: Path) -> None:
    """Run one stage unless its output is complete; remember its wall time across reruns."""
    if done() and name in stages:
        return
    start = time.perf_counter()
    work()
    stages[name] = time.perf_counter() - start
    write_json_atomic(record, stages)


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class CacheChoice:
    """Which teacher cache of the world a student reads: its map variants and storage (``extract-teacher``
    ``--variants``, ``--draws``, ``--feature-dtype``). The default is the world's own cache (``cache-train``)."""

    variants: Literal["canonical", "flips", "draws"] = "canonical"
    feature_dtype: Literal["float16", "int8"] = "float16"
    draws: int = 4

    @property
    def dirname(self) -> str:
        if self.variants == "canonical" and self.feature_dtype == "float16":
            return "cache-train"
        kind = f"draws{self.draws}" if self.variants == "draws" else self.variants
        return f"cache-train-{kind}" + ("" if self.feature_dtype == "float16" else f"-{self.feature_dtype}")


@dataclass(frozen=True)
class DemoWorld:
    """What the student runs share: the synthetic dataroot, the trained teacher and its cache of synth_train."""

    data: Path
    teacher_dir: Path
    cache: Path
    backbone: Path | None
    """The pretrained student backbone (``pretrain/backbone.pth``), or None without pretraining."""
    stages: dict[str, float]
    """Stage name -> seconds (kept across reruns in ``out_dir/stages.json``)."""
    record: Path
    pin: dict[str, str] | None = None
    """What identifies this world (``out_dir/world.json``): the sha256 of its teacher checkpoint and pretrained
    backbone and the commit that built it. Every student trained here records it; a table refuses a student trained
    against another world."""


def prepare_world(cfg: DemoConfig, *, progress: bool = True) -> DemoWorld:
    """synth -> train-teacher -> extract-teacher in ``cfg.out_dir``, each stage skipped when already complete."""
    from tigbev.config import (
        SynthConfig,
        TrainTeacherConfig,
        train_teacher_defaults,
    )
    from tigbev.data.synth.writer import write_synthetic_dataset
    from tigbev.stages import train_teacher

    out = cfg.out_dir
    check_output_dir(out, owns=demo_output, what="tigbev demo / ablate")
    out.mkdir(parents=True, exist_ok=True)
    record = out / "stages.json"
    stages: dict[str, float] = json.loads(record.read_text()) if record.exists() else {}
    data = out / "synth"
    tiny_synth = {"scenes": 2, "samples_per_scene": 3, "val_scenes": 1, "image_width": 192, "image_height": 108,
                  "lidar_azimuth_steps": 360, "sweeps_per_sample": 1, "workers": 1}
    _timed(stages, "synth", lambda: (data / "synth_config.json").exists(),
           lambda: write_synthetic_dataset(SynthConfig(out_dir=data, seed=cfg.seed,
                                                       **(tiny_synth if cfg.tiny else cfg.synth)),
                                           progress=progress), record)

    teacher_dir = out / "teacher"
    teacher_defaults = train_teacher_defaults("demo")
    _timed(stages, "train-teacher", lambda: (teacher_dir / "eval" / "metrics.json").exists(),
           lambda: train_teacher.run(TrainTeacherConfig(
               preset="demo", dataroot=data, split="synth_train", out_dir=teacher_dir, val_split="synth_val",
               epochs=cfg.teacher_epochs, batch_size=teacher_defaults["batch_size"], lr=teacher_defaults["lr"],
               workers=cfg.workers, seed=cfg.seed, max_steps=2 if cfg.tiny else None,
               resume=(teacher_dir / "last.pt").exists()), progress=progress), record)

    cache = out / "cache-train"
    _extract_cache(cfg, data, teacher_dir, cache, CacheChoice(), stages, record, progress)
    backbone = None
    if cfg.pretrain_epochs > 0:
        from tigbev.config import PretrainBackboneConfig
        from tigbev.stages import pretrain_backbone

        pretrain_dir = out / "pretrain"
        backbone = pretrain_dir / "backbone.pth"
        _timed(stages, "pretrain-backbone", lambda: (pretrain_dir / "eval.json").exists(),
               lambda: pretrain_backbone.run(PretrainBackboneConfig(
                   preset="demo", dataroot=data, split="synth_train", out_dir=pretrain_dir, val_split="synth_val",
                   epochs=cfg.pretrain_epochs, workers=cfg.workers, seed=cfg.seed,
                   max_steps=2 if cfg.tiny else None, resume=(pretrain_dir / "last.pt").exists()),
                   progress=progress), record)
    return DemoWorld(data=data, teacher_dir=teacher_dir, cache=cache, backbone=backbone, stages=stages,
                     record=record, pin=pin_world(out, teacher_dir / "last.pt", backbone))


WORLD_PIN = "world.json"


def pin_world(out: Path, teacher: Path, backbone: Path | None, *, commit: str | None = None) -> dict[str, str]:
    """The world's pin (``out/world.json``), written once when the world is first complete and checked after:
    a teacher or backbone whose sha256 is not the pinned one means the world was rebuilt or replaced, and every
    student trained against the old one would be compared with students of another world, so it is refused."""
    from tigbev.errors import TigbevError
    from tigbev.utils.provenance import file_sha256, git_commit

    now = {"teacher_sha256": file_sha256(teacher),
           "backbone_sha256": file_sha256(backbone) if backbone is not None else "none"}
    path = out / WORLD_PIN
    if path.exists():
        pinned = json.loads(path.read_text())
        changed = [k for k in now if pinned.get(k) != now[k]]
        if changed:
            raise TigbevError(f"{path}: the world's {', '.join(k.removesuffix('_sha256') for k in changed)} is not "
                              f"the pinned one ({'; '.join(f'{k} {pinned.get(k)} != {now[k]}' for k in changed)}): "
                              "it was rebuilt or replaced; choose another --out for a new world")
        return pinned
    pin = {**now, "commit": commit or git_commit(), "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(path, pin)
    return pin


def _same_world(a: dict[str, str], b: dict[str, str]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("teacher_sha256", "backbone_sha256", "commit"))


def _extract_cache(cfg: DemoConfig, data: Path, teacher_dir: Path, cache: Path, choice: CacheChoice,
                   stages: dict[str, float], record: Path, progress: bool) -> None:
    from tigbev.cache.store import CacheError, CacheReader
    from tigbev.config import ExtractTeacherConfig
    from tigbev.stages import extract_teacher

    def cache_complete() -> bool:
        try:
            CacheReader(str(cache))
            return True
        except CacheError:
            return False

    name = "extract-teacher" + ("" if choice == CacheChoice() else f"-{choice.dirname.removeprefix('cache-train-')}")
    _timed(stages, name, cache_complete,
           lambda: extract_teacher.run(ExtractTeacherConfig(
               teacher_checkpoint=teacher_dir / "last.pt", dataroot=data, split="synth_train", out_dir=str(cache),
               workers=cfg.workers, shard_samples=2 if cfg.tiny else 8, batch_size=2,
               keypoint_grid=DEMO_KEYPOINT_GRID, variants=choice.variants, draws=choice.draws,
               feature_dtype=choice.feature_dtype), progress=progress), record)


def world_cache(cfg: DemoConfig, world: DemoWorld, choice: CacheChoice, *, progress: bool = True) -> Path:
    """The world's teacher cache of ``choice`` (``out_dir/cache-train[-<kind>]``), extracted on first use."""
    if choice == CacheChoice():
        return world.cache
    cache = cfg.out_dir / choice.dirname
    _extract_cache(cfg, world.data, world.teacher_dir, cache, choice, world.stages, world.record, progress)
    return cache


def train_demo_student(cfg: DemoConfig, world: DemoWorld, name: str, weights: LossWeights,
                       source: Literal["none", "cache", "online"], *, seed: int | None = None,
                       cache: CacheChoice = CacheChoice(), progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) one demo student in ``out_dir/student-<name>`` with the demo's budget; evaluate it on
    synth_val. ``cache``: which of the world's caches a ``source='cache'`` student reads. Returns its metrics.json
    plus ``step_s`` (mean train step, seconds)."""
    from tigbev.config import TrainStudentConfig
    from tigbev.stages import train_student

    run_dir = cfg.out_dir / f"student-{name}"

    def settings(cache_dir: Path | None) -> TrainStudentConfig:
        return TrainStudentConfig(
            preset="demo", dataroot=world.data, split="synth_train", out_dir=run_dir, val_split="synth_val",
            cache=None if cache_dir is None else str(cache_dir), teacher=source,
            teacher_checkpoint=world.teacher_dir / "last.pt" if source == "online" else None, weights=weights,
            keypoint_grid=DEMO_KEYPOINT_GRID, backbone_weights=world.backbone,
            epochs=cfg.student_epochs, batch_size=2, lr=cfg.student_lr, warmup_steps=cfg.student_warmup_steps,
            augment=cfg.student_augment, frames=cfg.student_frames, sampler=cfg.student_sampler,  # type: ignore
            input_hw=cfg.student_input_hw,
            workers=cfg.workers, seed=cfg.seed if seed is None else seed,
            max_steps=2 if cfg.tiny else None, resume=(run_dir / "last.pt").exists())

    def train() -> None:
        cache_dir = world_cache(cfg, world, cache, progress=progress) if source == "cache" else None
        result = train_student.run(settings(cache_dir), progress=progress)
        from tigbev.utils.provenance import git_commit

        write_json_atomic(run_dir / "timing.json", {"step_s": result.mean_step_s, "steps": result.steps,
                                                    "world": world.pin, "commit": git_commit()})

    def finished() -> bool:
        """A finished student is reused only if it was trained with these settings (never under another budget)."""
        if not (run_dir / "timing.json").exists():
            return False
        from tigbev.errors import TigbevError
        from tigbev.utils.run_dir import config_differences

        trained_in = json.loads((run_dir / "timing.json").read_text()).get("world")
        if world.pin is not None and (trained_in is None or not _same_world(trained_in, world.pin)):
            raise TigbevError(f"{run_dir} holds a student trained against another world ("
                              + ("no world pin recorded" if trained_in is None else
                                 f"teacher {trained_in.get('teacher_sha256', '?')[:12]}, backbone "
                                 f"{trained_in.get('backbone_sha256', '?')[:12]}, commit {trained_in.get('commit')}")
                              + f"; this world: teacher {world.pin['teacher_sha256'][:12]}, backbone "
                              f"{world.pin['backbone_sha256'][:12]}, commit {world.pin['commit']}); move it away "
                              "or choose another --out")
        saved = json.loads((run_dir / "config.json").read_text()).get("train", {})
        differences = config_differences(saved, settings(world.cache if source == "cache" else None).to_dict())
        if differences:
            raise TigbevError(f"{run_dir} holds a student trained with other settings ({'; '.join(differences[:3])});"
                              " move it away or choose another --out")
        return True

    _timed(world.stages, f"train-student-{name}", finished, train, world.record)
    timing = _metrics(run_dir / "timing.json")
    return {**_metrics(run_dir / "eval" / "metrics.json"), "step_s": timing["step_s"],
            "commit": timing.get("commit", "unknown")}


def demo_distillation_weights() -> LossWeights:
    """The demo's distilled student: the BEVDepth base (detection + dense depth) plus TiG-BEV's inter-keypoint
    distillation from the cache at its published weight (100), inner-depth and inter-channel off.

    The study measured this row above the full TiG-BEV loss set in the synthetic worlds: inter-keypoint alone over
    its base +7.2 ± 5.0 mAP and +3.0 ± 0.6 NDS points (3 seeds, resolved), while adding inner-depth and inter-channel
    to it cost -3.3 ± 1.7 mAP (docs/STUDY.md); on the demo's world (seed 0, 400 steps) the full set gave +0.2 mAP
    and +6.5 NDS points over the base, this one +4.3 and +3.5. The full set is the ablation's ``inter_keypoint``
    row, and ``train-student``'s default."""
    from tigbev.config import LossWeights

    return LossWeights(inner_depth=0.0, inter_channel=0.0)


def run(cfg: DemoConfig, *, progress: bool = True) -> dict[str, Any]:
    """The demo: the world, then the baseline and the TiG-BEV student; ``summary.json`` in ``cfg.out_dir``."""
    from tigbev.config import LossWeights

    wall = time.perf_counter()
    world = prepare_world(cfg, progress=progress)
    students: dict[str, dict[str, Any]] = {}
    for name, weights, source in (("baseline", LossWeights.baseline(), "none"),
                                  ("tig", demo_distillation_weights(), "cache")):
        m = train_demo_student(cfg, world, name, weights, source, progress=progress)  # type: ignore[arg-type]
        students[name] = {"mAP": m["mAP"], "NDS": m["NDS"], "step_s": m["step_s"]}
    teacher_m = _metrics(world.teacher_dir / "eval" / "metrics.json")
    summary = {
        "teacher": {"mAP": teacher_m["mAP"], "NDS": teacher_m["NDS"]},
        "students": students,
        "stages": world.stages,
        "wall_s": sum(world.stages.values()),
        "this_run_s": time.perf_counter() - wall,
    }
    write_json_atomic(cfg.out_dir / "summary.json", summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's result as a Markdown table (also what the CLI prints)."""
    teacher = summary["teacher"]
    rows = ["| model | mAP | NDS | train step (s) |", "|---|---|---|---|",
            f"| teacher (LiDAR, CenterPoint demo) | {teacher['mAP']:.4f} | {teacher['NDS']:.4f} | |"]
    for name, label in (("baseline", "student, dense depth, no distillation"),
                        ("tig", "student, + TiG-BEV inter-keypoint distillation from the cache")):
        s = summary["students"][name]
        rows.append(f"| {label} | {s['mAP']:.4f} | {s['NDS']:.4f} | {s['step_s']:.2f} |")
    rows += ["", "| stage | seconds |", "|---|---|"]
    rows += [f"| {k} | {v:.1f} |" for k, v in summary["stages"].items()]
    rows.append(f"| total | {summary['wall_s']:.1f} |")
    return "\n".join(rows) + "\n"


def summary_reading(summary: dict[str, Any], out: Path) -> str:
    """What the demo's table means and what to type next, in a few plain lines."""
    base, tig = summary["students"]["baseline"], summary["students"]["tig"]
    d_map, d_nds = 100 * (tig["mAP"] - base["mAP"]), 100 * (tig["NDS"] - base["NDS"])
    verb = "helped" if d_map > 0 and d_nds > 0 else "changed"
    data, cache, student = out / "synth", out / "cache-train", out / "student-tig"
    ratio = tig["step_s"] / base["step_s"] if base["step_s"] > 0 else float("nan")
    cost = f", at {ratio:.2f}x its training step" if math.isfinite(ratio) else ""  # unknown for a resumed student
    return "\n".join([
        f"Distillation from the cache {verb} the same student by {d_map:+.1f} mAP and {d_nds:+.1f} NDS points "
        f"(one seed; docs/STUDY.md has the paired comparisons over seeds){cost}.",
        f"Pictures: {student / 'eval'} (BEV detections, per-class curves), {student / 'loss_curve.png'}; "
        f"the teacher cache: {cache} (`tigbev cache info {cache}`).",
        "Next:",
        f"  tigbev train-student --preset demo --dataroot {data} --split synth_train --cache {cache} "
        + (f"--backbone-weights {backbone} " if (backbone := out / "pretrain" / "backbone.pth").exists() else "")
        + f"--out {out / 'student-mine'} --val-split synth_val      # every TiG-BEV loss, the same cache",
        f"  tigbev evaluate {student / 'last.pt'} --dataroot {data} --split synth_val --out {out / 'eval-tig'}",
        f"  tigbev bench --preset demo --out {out / 'bench'}      # what distillation costs, cache against online",
        f"summary: {out / 'summary.json'}",
    ]) + "\n"
