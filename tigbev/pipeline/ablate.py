"""``tigbev ablate``: the paper's ablation in miniature on the demo world.

One world (synthetic data, demo teacher, its cache of synth_train; shared with ``tigbev demo`` when given the same
directory), then the camera student trained with each loss component added in turn, same seed(s) and budget:

    baseline (detection only) -> + dense depth -> + inner-depth -> + inter-channel -> + inter-keypoint (= TiG-BEV)
    -> + self-assessment; and two side rows: TiG-BEV with the online teacher instead of the cache, and inter-keypoint
    alone on the depth-supervised base (what inner-depth and inter-channel add once inter-keypoint is on).

Every row is evaluated on synth_val with the official metrics; the table (mean and spread over seeds) goes to
``ablation.json`` / ``ablation.md`` and a bar chart to ``ablation.png``. Finished rows are reused on rerun.

With ``augment`` every student trains with the published image augmentation and BDA, and the
rows compare the published online teacher (the teacher on the augmented points) with each cache mode: canonical
(BDA replayed on the stored map), the four flipped maps, and stored BDA draws; the table goes to
``ablation-aug.*``.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tigbev.config import LossWeights
from tigbev.pipeline.demo import (
    CacheChoice,
    DemoConfig,
    DemoWorld,
    prepare_world,
    train_demo_student,
    world_preset,
)
from tigbev.utils.paired import mean_interval, paired_difference
from tigbev.utils.provenance import write_json_atomic

__all__ = ["ABLATION_ROWS", "BDA_ROWS", "HEADLINES", "PUBLISHED", "STUDY_SEEDS", "AblateConfig", "AblationRow",
           "ablation_table", "headline_deltas", "paired_entry", "paired_verdict", "plot_ablation", "plot_paired", "run"]


@dataclass(frozen=True)
class AblationRow:
    key: str
    label: str
    weights: LossWeights
    source: Literal["none", "cache", "online"]
    in_chain: bool = True
    """Part of the chain that adds one component per row; ``False``: a side row (another teacher, or a leave-out)."""
    cache: CacheChoice = CacheChoice()
    """Which of the world's caches the row reads (``source='cache'``)."""
    steps_factor: float = 1.0
    """The row's steps over the table's budget: 1.5 gives a cache student the compute of an online one when the
    teacher takes a third of each online step."""

    def epochs(self, budget: float) -> float:
        """The row's epochs (possibly fractional) at a table budget of ``budget`` epochs."""
        epochs = budget * self.steps_factor
        return int(epochs) if float(epochs).is_integer() else epochs


_OFF = LossWeights(depth=0.0, inner_depth=0.0, inter_keypoint=0.0, inter_channel=0.0, dense_feature=0.0,
                   self_assessment=0.0)
_DEPTH = dataclasses.replace(_OFF, depth=3.0)
_INNER = dataclasses.replace(_DEPTH, inner_depth=1.0)
_CHANNEL = dataclasses.replace(_INNER, inter_channel=10.0)
_TIG = dataclasses.replace(_CHANNEL, inter_keypoint=100.0)
_SELF = dataclasses.replace(_TIG, self_assessment=0.1)

ABLATION_ROWS: tuple[AblationRow, ...] = (
    AblationRow("baseline", "baseline (detection only)", _OFF, "none"),
    AblationRow("depth", "+ dense depth", _DEPTH, "none"),
    AblationRow("inner_depth", "+ inner-depth", _INNER, "none"),
    AblationRow("inter_channel", "+ inter-channel", _CHANNEL, "cache"),
    AblationRow("inter_keypoint", "+ inter-keypoint (TiG-BEV)", _TIG, "cache"),
    AblationRow("self_assessment", "+ self-assessment", _SELF, "cache"),
    AblationRow("online", "TiG-BEV, online teacher", _TIG, "online", in_chain=False),
    AblationRow("keypoint_only", "inter-keypoint alone (+ dense depth)",
                dataclasses.replace(_DEPTH, inter_keypoint=100.0), "cache", in_chain=False),
    AblationRow("tig_flips", "TiG-BEV, flip-variant cache", _TIG, "cache", in_chain=False,
                cache=CacheChoice(variants="flips")),
    AblationRow("tig_flips_int8", "TiG-BEV, flip-variant cache, int8", _TIG, "cache", in_chain=False,
                cache=CacheChoice(variants="flips", feature_dtype="int8")),
    AblationRow("tig_draws", "TiG-BEV, 4 stored BDA draws", _TIG, "cache", in_chain=False,
                cache=CacheChoice(variants="draws", draws=4)),
    AblationRow("tig_equal_compute", "TiG-BEV from the cache, 1.5x the steps", _TIG, "cache", in_chain=False,
                steps_factor=1.5),
)
_VARIANT_ROWS = ("tig_flips", "tig_flips_int8", "tig_draws", "tig_equal_compute")
"""Rows of the cache-against-online comparison: the cache modes differ from ``inter_keypoint`` only under BDA
(without it every cache mode trains on its canonical map); trained by default only with ``augment``."""
BDA_ROWS: tuple[str, ...] = ("online", "inter_keypoint", "tig_draws", "depth", "tig_flips", "tig_flips_int8")
"""The default rows with ``augment``, in their training order (each seed across all rows before the next seed):
the published online teacher, each cache mode (canonical, stored draws, flips in float16 and int8) and the base."""

PUBLISHED: dict[str, str] = {
    "depth": "BEVDepth's depth supervision (the paper's base)",
    "inter_keypoint": "the paper's whole-method deltas: the comparisons below",
    "online": "the published way (same losses)",
}
"""METHOD.md section 6: the paper reports the whole of TiG-BEV over its bases; no per-component numbers are given."""

HEADLINES: tuple[tuple[str, str, str, tuple[float, float] | None], ...] = (
    ("inter_keypoint", "depth", "TiG-BEV over its base (+ dense depth, as BEVDepth)", (2.4, 2.3)),
    ("inter_keypoint", "baseline", "TiG-BEV over detection only (no depth supervision, as BEVDet)", (10.3, 9.1)),
    ("online", "inter_keypoint", "online teacher over the cache (same losses)", None),
    ("self_assessment", "inter_keypoint", "self-assessment over TiG-BEV", None),
    ("keypoint_only", "depth", "inter-keypoint alone over its base (+ dense depth)", None),
    ("inter_keypoint", "keypoint_only", "inner-depth + inter-channel, with inter-keypoint on", None),
    ("depth", "baseline", "chain: + dense depth (over detection only)", None),
    ("inner_depth", "depth", "chain: + inner-depth (over + dense depth)", None),
    ("inter_channel", "inner_depth", "chain: + inter-channel (over + inner-depth)", None),
    ("inter_keypoint", "inter_channel", "chain: + inter-keypoint (over + inter-channel)", None),
    ("inter_keypoint", "online", "canonical cache over the online teacher (BDA replayed on the map)", None),
    ("tig_flips", "online", "flip-variant cache over the online teacher", None),
    ("tig_flips_int8", "online", "flip-variant cache (int8) over the online teacher", None),
    ("tig_draws", "online", "stored BDA draws over the online teacher", None),
    ("online", "depth", "TiG-BEV (online teacher) over its base", None),
    ("tig_flips", "inter_keypoint", "flip-variant cache over the canonical cache", None),
    ("tig_flips_int8", "inter_keypoint", "flip-variant cache (int8) over the canonical cache", None),
    ("tig_draws", "inter_keypoint", "stored BDA draws over the canonical cache", None),
    ("tig_flips_int8", "tig_flips", "int8 over float16 storage (flip-variant caches)", None),
    ("tig_equal_compute", "online", "the cache at 1.5x the steps over the online teacher (equal compute at a "
                                    "teacher share of 1/3)", None),
)
"""(row, reference row, reading, published (mAP, NDS) points or None): the comparisons METHOD.md section 6 reports,
two the paper does not, and each step of the chain (what every component adds to the rows before it)."""

_METRICS = ("mAP", "NDS", "mATE", "mAOE")
STUDY_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""The study preset's default seeds: five, so each paired comparison has a t interval with 4 degrees of freedom."""
_DEMO_STUDENTS = {"depth": "baseline", "keypoint_only": "tig"}
"""Rows that ``tigbev demo`` trains (its directory names), for the demo's seed."""


@dataclass(frozen=True, kw_only=True)
class AblateConfig:
    out_dir: Path
    preset: str = "demo"
    """World and budget (:func:`tigbev.pipeline.demo.world_preset`): ``demo`` (tigbev demo's world, shared with it)
    or ``study`` (1000 train / 200 val samples, a pretrained backbone)."""
    seeds: tuple[int, ...] | None = None
    """Default: :data:`STUDY_SEEDS` for the study preset (the >= 5 seeds an interval needs), (0, 1) for the demo."""
    teacher_epochs: int | None = None
    """Default: the preset's."""
    student_epochs: int | None = None
    """Default: the preset's."""
    workers: int = 1
    rows: tuple[str, ...] | None = None
    """Row keys to train (default: every row, or :data:`BDA_ROWS` with ``augment``); the table keeps
    ABLATION_ROWS' order."""
    augment: bool = False
    """Train every row with the published image augmentation and BDA (the cache modes against the online teacher)."""
    frames: int = 1
    """Key frames per student sample (2: BEVDet4D / BEVDepth4D)."""
    sampler: str = "uniform"
    """'uniform' or 'cbgs' (class-balanced grouping and sampling)."""
    tiny: bool = False

    @property
    def tag(self) -> str:
        """What sets this table's students apart from the plain ones, in their names and the table's: ``-e<epochs>``
        (a student budget other than the preset's), ``-aug``, ``-f<frames>``, ``-cbgs`` (empty for the plain
        ablation)."""
        preset_epochs = world_preset(self.preset).get("student_epochs", DemoConfig.student_epochs)
        epochs = self.student_epochs if self.student_epochs not in (None, preset_epochs) else None
        return (f"-e{epochs}" if epochs else "") + ("-aug" if self.augment else "") + \
            (f"-f{self.frames}" if self.frames > 1 else "") + (f"-{self.sampler}" if self.sampler != "uniform" else "")

    def __post_init__(self) -> None:
        if self.rows is None:
            object.__setattr__(self, "rows", BDA_ROWS if self.augment else tuple(
                r.key for r in ABLATION_ROWS if r.key not in _VARIANT_ROWS))
        world_preset(self.preset)  # names an unknown preset
        known = {r.key for r in ABLATION_ROWS}
        unknown = [r for r in self.rows if r not in known]
        if unknown:
            raise ValueError(f"AblateConfig.rows: unknown {unknown}; choose from {sorted(known)}")
        if self.seeds is None:
            object.__setattr__(self, "seeds", STUDY_SEEDS if self.preset == "study" else (0, 1))
        if not self.seeds:
            raise ValueError("AblateConfig.seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"AblateConfig.seeds: a seed is given twice in {self.seeds}")
        if self.frames < 1:
            raise ValueError(f"AblateConfig.frames must be >= 1, got {self.frames}")
        if self.sampler not in ("uniform", "cbgs"):
            raise ValueError(f"AblateConfig.sampler must be 'uniform' or 'cbgs', got {self.sampler!r}")


def run(cfg: AblateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every row for every seed (reusing finished ones); write the table and the charts.

    Students are trained seed by seed, across the rows in ``cfg.rows``' order, and the table is rewritten after
    each seed, so a run cut short leaves a table whose rows are paired over the same seeds."""
    overrides = {k: v for k, v in (("teacher_epochs", cfg.teacher_epochs), ("student_epochs", cfg.student_epochs))
                 if v is not None}
    if cfg.augment:
        overrides["student_augment"] = True
    overrides.update(student_frames=cfg.frames, student_sampler=cfg.sampler)
    seeds = cfg.seeds or ()
    demo = DemoConfig(out_dir=cfg.out_dir, seed=seeds[0], workers=cfg.workers, tiny=cfg.tiny,
                      **{**world_preset(cfg.preset), **overrides})
    world = prepare_world(demo, progress=progress)
    by_key = {r.key: r for r in ABLATION_ROWS}
    done: dict[str, dict[str, dict[str, Any]]] = {}
    result: dict[str, Any] = {}
    for i, seed in enumerate(seeds):
        for key in cfg.rows or ():
            row = by_key[key]
            # The demo's two students are rows of this table (same weights, source, seed and budget): reused.
            name = _DEMO_STUDENTS.get(row.key) if seed == demo.seed and cfg.preset == "demo" and not cfg.tag \
                else None
            budget = demo if row.steps_factor == 1.0 else \
                dataclasses.replace(demo, student_epochs=row.epochs(demo.student_epochs))
            m = train_demo_student(budget, world, name or f"ablate{cfg.tag}-{row.key}-s{seed}", row.weights,
                                   row.source, seed=seed, cache=row.cache, progress=progress)
            done.setdefault(key, {})[str(seed)] = {k: m[k] for k in (*_METRICS, "step_s", "commit")}
        result = _write_table(cfg, demo, world, done, seeds[:i + 1])
    return result


def _write_table(cfg: AblateConfig, demo: DemoConfig, world: DemoWorld, done: dict[str, dict[str, dict[str, Any]]],
                 seeds: tuple[int, ...]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for row in ABLATION_ROWS:
        if row.key not in done:
            continue
        per_seed = done[row.key]
        values = list(per_seed.values())
        summary = {k: statistics.fmean(s[k] for s in values) for k in (*_METRICS, "step_s")}
        spread = {k: (max(s[k] for s in values) - min(s[k] for s in values)) / 2 for k in _METRICS}
        ci95 = {k: mean_interval([s[k] for s in values])[1] if len(values) > 1 else None for k in _METRICS}
        rows.append({"key": row.key, "label": row.label, "source": row.source,
                     "weights": dataclasses.asdict(row.weights), "mean": summary, "ci95_half": ci95,
                     "half_range": spread, "per_seed": per_seed, "published": PUBLISHED.get(row.key, ""),
                     "cache": row.cache.dirname if row.source == "cache" else None})
    commits = sorted({s["commit"] for r in done.values() for s in r.values()})
    result = {"preset": cfg.preset, "seeds": list(seeds), "student_epochs": demo.student_epochs, "rows": rows,
              "augment": cfg.augment, "frames": cfg.frames, "sampler": cfg.sampler, "stages": world.stages,
              "world": world.pin, "student_commits": commits}
    result["headlines"] = headline_deltas(result)
    stem = f"ablation{cfg.tag}"
    write_json_atomic(cfg.out_dir / f"{stem}.json", result)
    (cfg.out_dir / f"{stem}.md").write_text(ablation_table(result))
    plot_ablation(cfg.out_dir / f"{stem}.png", result)
    if result["headlines"]:
        plot_paired(cfg.out_dir / f"{stem}-paired.png", result["headlines"],
                    f"{cfg.preset} world, {demo.student_epochs} epoch(s)" + (", BDA" if cfg.augment else ""))
    return result


def headline_deltas(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The :data:`HEADLINES` whose two rows were both trained: mAP and NDS differences in points (x 100), paired by
    seed: the mean of the per-seed differences with its 95 % t interval and its reading (resolved where the interval
    excludes 0), the sign agreement beside it, and the published difference."""
    by_key = {r["key"]: r for r in result["rows"]}
    out = []
    for key, ref, reading, published in HEADLINES:
        if key not in by_key or ref not in by_key:
            continue
        # One direction of the cache-vs-online comparison per table: the cache's over the teacher's under BDA.
        if (key, ref) == (("online", "inter_keypoint") if result.get("augment") else ("inter_keypoint", "online")):
            continue
        entry = paired_entry(by_key[key], by_key[ref])
        if entry is None:
            continue
        pub = None if published is None else dict(zip(("mAP", "NDS"), published))
        out.append({"row": key, "reference": ref, "reading": reading, "published_points": pub, **entry})
    return out


def paired_entry(row: dict[str, Any], ref: dict[str, Any], metrics: tuple[str, ...] = ("mAP", "NDS")
                 ) -> dict[str, Any] | None:
    """``row`` against ``ref`` (two table rows with ``per_seed`` metrics), paired by seed: per metric the mean
    difference in points, its 95 % interval, the reading and the sign agreement; None when no seed is shared."""
    entry: dict[str, Any] = {}
    for metric in metrics:
        d = paired_difference({s: v[metric] for s, v in row["per_seed"].items()},
                              {s: v[metric] for s, v in ref["per_seed"].items()}, scale=100.0)
        if d is None:
            return None
        entry["seeds"] = list(d.per_seed)
        entry[metric] = {"mean_points": d.mean, "ci95_half_points": d.half_width if d.n > 1 else None,
                         "ci95_points": [d.low, d.high] if d.n > 1 else None,
                         "per_seed_points": d.per_seed, "verdict": d.reading, "signs": d.signs, "cell": d.cell()}
    return entry


def paired_verdict(diffs: list[float]) -> str:
    """How paired differences read: ``resolved up`` / ``resolved down`` where their 95 % t interval excludes 0,
    ``inside the noise`` otherwise (``one seed`` for a single difference)."""
    d = paired_difference({str(i): v for i, v in enumerate(diffs)}, {str(i): 0.0 for i in range(len(diffs))})
    return "one seed" if d is None else d.reading


def ablation_table(result: dict[str, Any]) -> str:
    seeds = len(result["seeds"])
    head = "| row | mAP | NDS | mATE | mAOE | step (s) | published |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for r in result["rows"]:
        cells = []
        for k in _METRICS:
            values = [s[k] for s in r["per_seed"].values()]
            mean, half = mean_interval(values)
            cells.append(f"{mean:.4f}" + (f" ± {half:.4f}" if len(values) > 1 else ""))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['mean']['step_s']:.2f} | {r['published']} |")
    recipe = ", ".join(x for x in ("image augmentation and BDA" if result.get("augment") else "",
                                   f"{result['frames']} key frames" if result.get("frames", 1) > 1 else "",
                                   "CBGS" if result.get("sampler") == "cbgs" else "") if x)
    note = (f"\nMean over {seeds} seed(s) (± the half-width of the 95 % t interval of the mean), "
            f"{result['student_epochs']} epochs each" + (f" ({recipe})" if recipe else "") + ", synth_val, "
            "official nuScenes metrics; TP errors are in metres / radians (lower is better).\n")
    heads = headline_deltas(result)
    if heads:
        note += ("\n| comparison | seeds | ΔmAP (points) | ΔNDS (points) | published ΔmAP / ΔNDS (nuScenes val) | "
                 "reading (mAP / NDS) | signs (mAP / NDS) |\n|---|---|---|---|---|---|---|\n")
        for h in heads:
            pub = h["published_points"]
            note += (f"| {h['reading']} | {len(h['seeds'])} | {h['mAP']['cell']} | {h['NDS']['cell']} | "
                     + ("" if pub is None else f"{pub['mAP']:+.1f} / {pub['NDS']:+.1f}")
                     + f" | {h['mAP']['verdict']} / {h['NDS']['verdict']} | {h['mAP']['signs']} / "
                       f"{h['NDS']['signs']} |\n")
        note += ("\nDifferences are paired by seed: the mean of the per-seed differences ± the half-width of its 95 % "
                 "confidence interval (Student's t, n - 1 degrees of freedom); resolved where the interval excludes "
                 "0, inside the noise otherwise. Sign agreement over the seeds is shown beside, not read.\n")
    return head + "\n".join(lines) + "\n" + note


def plot_ablation(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 1.6), sharey=True)
    for ax, metric in zip(axes, ("mAP", "NDS")):
        values = [r["mean"][metric] for r in rows]
        lows = [v - min(s[metric] for s in r["per_seed"].values()) for v, r in zip(values, rows)]
        highs = [max(s[metric] for s in r["per_seed"].values()) - v for v, r in zip(values, rows)]
        ax.barh(range(len(rows)), values, xerr=[lows, highs] if len(result["seeds"]) > 1 else None,
                color="tab:blue", alpha=0.8)  # bar: the mean; whiskers: the lowest to the highest seed
        for i, r in enumerate(rows):  # every seed's value, so the spread behind each mean is visible
            seed_values = [s[metric] for s in r["per_seed"].values()]
            ax.plot(seed_values, [i] * len(seed_values), "o", color="black", markersize=3.5, alpha=0.7,
                    label="one seed" if i == 0 else None)
        ax.set_title(f"{metric} (synth_val, mean of {len(result['seeds'])} seed(s))")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[1].legend(loc="lower right")
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(path: Path, headlines: list[dict[str, Any]], title: str) -> None:
    """Each paired comparison's mean difference (mAP and NDS points) with its 95 % interval as whiskers and every
    seed's difference as a dot; a filled marker where the interval excludes 0 (resolved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(headlines) + 1.8), sharey=True)
    for ax, metric in zip(axes, ("mAP", "NDS")):
        for i, h in enumerate(headlines):
            d = h[metric]
            half = d["ci95_half_points"]
            resolved = d["verdict"].startswith("resolved")
            ax.errorbar([d["mean_points"]], [i], xerr=None if half is None else [[half], [half]], fmt="o",
                        color="tab:blue" if resolved else "tab:gray", mfc="tab:blue" if resolved else "white",
                        capsize=4, markersize=7, label=None)
            seeds = list(d["per_seed_points"].values())
            ax.plot(seeds, [i] * len(seeds), ".", color="black", alpha=0.5, markersize=4)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"Δ{metric} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(headlines)), [f"{h['reading']} (n={len(h['seeds'])})" for h in headlines])
    axes[0].invert_yaxis()
    fig.suptitle(f"Paired by seed ({title}): the mean difference with its 95 % interval, a dot per seed; "
                 "filled where the interval excludes 0", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
