"""``run``: every section of the bench in order, and the report written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tigbev.bench.config import (
    MODES,
    STORAGE_OPTIONS,
    BenchConfig,
    BenchResult,
    cycle,
    median,
)
from tigbev.bench.bda import AUG_KINDS, bench_bda
from tigbev.bench.extraction import bench_extraction, bench_storage
from tigbev.bench.growth import camera_loader_rate, train_epoch
from tigbev.bench.loader import bench_loader
from tigbev.bench.report import (
    evaluate_goals,
    finite_json,
    markdown_tables,
    plot_report,
    step_and_loader_tables,
)
from tigbev.bench.steps import ModeSpec, bench_steps
from tigbev.bench.world import extract, prepare_data, prepare_teacher

__all__ = ["run", "run_student_side"]


def run(cfg: BenchConfig) -> BenchResult:
    """Run every section and write bench.json, bench.md and bench.png to ``cfg.out_dir``."""
    from tqdm import tqdm

    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.utils.device import pick_device
    from tigbev.utils.provenance import provenance, write_json_atomic

    if cfg.cache is not None:
        return run_student_side(cfg)
    res = cfg.resolved()
    out = cfg.out_dir
    work = _work_dir(out)
    device = pick_device(cfg.device)
    n_base = res["samples"]
    need = max(n_base * max(res["growth"]), res["rate_samples"])
    dataroot, split, data_desc = prepare_data(cfg, work, need)
    ckpt, teacher_desc = prepare_teacher(cfg, work)
    split_tokens = NuScenesReader(dataroot).sample_tokens(split)
    repeated = len(split_tokens) < need
    base = cycle(split_tokens, n_base)
    grid = res["keypoint_grid"]
    desc = (f"{data_desc['source']}, split {split} ({len(split_tokens)} samples"
            + (", tokens repeated to reach the sizes below)" if repeated else ")"))
    report: dict[str, Any] = {
        "preset": cfg.preset, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **_device_fields(device),
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in res.items()},
                   "dataroot": str(dataroot)},
        "dataset": {**data_desc, "split": split, "split_samples": len(split_tokens), "tokens_repeated": repeated,
                    "description": desc},
        "teacher": teacher_desc,
        "provenance": provenance(),
    }
    sections = 4 + res["repeats"] + len(STORAGE_OPTIONS) + 2 * len(res["growth"]) + len(AUG_KINDS)
    bar = tqdm(total=sections, desc=f"bench {cfg.preset}", unit="part", disable=not cfg.progress)

    # The cache every later section reads (foreground float16: the default storage).
    cache_url = str(work / "cache-1x")
    extract(ckpt, dataroot, split, base, Path(cache_url), keypoint_grid=grid, device=cfg.device)
    bar.update(1)

    # 1. Training step per mode.
    common: dict[str, Any] = {"preset": cfg.preset, "dataroot": str(dataroot), "split": split,
                              "tokens": tuple(base), "teacher_checkpoint": str(ckpt), "keypoint_grid": grid,
                              "device": cfg.device, "seed": cfg.seed, "batches": min(n_base, res["steps"] + 1)}
    specs = {m: ModeSpec(mode=m, cache=cache_url if m == "cache" else None, **common) for m in MODES}
    if cfg.frames > 1:  # a temporal student from the same cache
        specs[f"cache_{cfg.frames}f"] = ModeSpec(mode="cache", cache=cache_url, frames=cfg.frames, **common)
    report["step"] = bench_steps(specs, repeats=res["repeats"], steps=res["steps"], progress=False)
    bar.update(1)

    # 3. Extraction vs forward-only (interleaved per repeat).
    rate_tokens = cycle(split_tokens, res["rate_samples"])
    report["extraction"] = bench_extraction(ckpt, dataroot, split, rate_tokens, work, repeats=res["repeats"],
                                            keypoint_grid=grid, device=cfg.device, bar=bar)

    # 4. Storage options and their fidelity.
    report["storage"] = bench_storage(ckpt, dataroot, split, base, work, preset=cfg.preset, keypoint_grid=grid,
                                      device=cfg.device, seed=cfg.seed, bar=bar)

    # 4b. Fidelity of each cache mode under BEV augmentation, against the online teacher on the same samples.
    report["bda"] = bench_bda(ckpt, dataroot, split, base, work, preset=cfg.preset, keypoint_grid=grid,
                              device=cfg.device, seed=cfg.seed, views=res["bda_views"], draws=res["bda_draws"],
                              bar=bar)

    # 5. Growth (and the loader wait fraction from its training epochs).
    growth: dict[str, Any] = {"factors": list(res["growth"]), "samples": [], "extraction_s": [],
                              "extraction_loop_s": [], "training_s": [], "training": []}
    for f in res["growth"]:
        toks = cycle(split_tokens, n_base * f)
        url = work / f"growth-{f}x"
        r = extract(ckpt, dataroot, split, toks, url, keypoint_grid=grid, device=cfg.device)
        bar.update(1)
        t = train_epoch(cfg.preset, dataroot, split, toks, str(url), device=cfg.device,
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
    big_tokens = cycle(split_tokens, n_base * max(res["growth"]))
    n_items = max(8, len(big_tokens))
    growth["camera_loader_samples_per_s"] = {
        str(w): median([camera_loader_rate(cfg.preset, dataroot, split, big_tokens, big, w, n_items)
                         for _ in range(max(1, res["repeats"] - 1))]) for w in res["loader_workers"]}
    per_sample = [s / n for s, n in zip(growth["training_s"], growth["samples"])]
    growth["training_per_sample_over_1x"] = [p / per_sample[0] for p in per_sample]
    per_sample_x = [s / n for s, n in zip(growth["extraction_loop_s"], growth["samples"])]
    growth["extraction_per_sample_over_1x"] = [p / per_sample_x[0] for p in per_sample_x]
    report["growth"] = growth
    shutil.rmtree(big, ignore_errors=True)

    # 2. Loader: cache reads vs raw memmap; the wait fraction from the growth training epochs.
    report["loader"] = bench_loader(cache_url, work, repeats=res["repeats"], workers=res["loader_workers"],
                                    n_items=max(16, n_base * 4))
    waits = [t["wait_s"] for t in growth["training"]]
    computes = [t["compute_s"] for t in growth["training"]]
    report["loader"]["wait_fraction"] = sum(waits) / max(sum(waits) + sum(computes), 1e-12)
    report["loader"]["wait_fraction_per_size"] = [t["wait_fraction"] for t in growth["training"]]
    bar.update(1)
    bar.close()

    report["goals"] = evaluate_goals(report)
    json_path = write_json_atomic(out / "bench.json", finite_json(report))
    md_path = out / "bench.md"
    md_path.write_text(markdown_tables(report))
    plot_path = plot_report(report, out / "bench.png")
    return BenchResult(json_path=json_path, markdown_path=md_path, plot_path=plot_path, report=report)


def _work_dir(out: Path) -> Path:
    """``out/work``, after checking that ``out`` holds nothing but the bench's own files."""
    from tigbev.utils.run_dir import check_output_dir

    check_output_dir(out, owns=lambda name: name in ("work", "bench.json", "bench.md", "bench.png")
                     or name.startswith(".bench.json.tmp"), what="tigbev bench")
    (out / "work").mkdir(parents=True, exist_ok=True)
    return out / "work"


def _device_fields(device: Any) -> dict[str, str]:
    import torch

    cuda = device.type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
            "peak_memory_method": "torch.cuda.max_memory_allocated per mode" if cuda
            else "peak RSS of each mode's own process (getrusage ru_maxrss)"}


def run_student_side(cfg: BenchConfig) -> BenchResult:
    """The student side from an existing cache: steps without distillation and from the cache (and with
    ``cfg.frames`` key frames), and the cache's read rate. Imports neither spconv nor the devkit, so it runs on a
    CUDA machine with numpy 2 and no teacher stack (``scripts/gpu_check.sh``)."""
    from tigbev.cache.store import CacheReader
    from tigbev.utils.device import pick_device
    from tigbev.utils.provenance import provenance, write_json_atomic

    assert cfg.cache is not None and cfg.dataroot is not None
    res = cfg.resolved()
    out = cfg.out_dir
    work = _work_dir(out)
    device = pick_device(cfg.device)
    tokens = CacheReader(cfg.cache).tokens  # the whole cache: its compatibility check is over its token list
    common: dict[str, Any] = {"preset": cfg.preset, "dataroot": str(cfg.dataroot), "split": res["split"],
                              "tokens": tuple(tokens), "teacher_checkpoint": None,
                              "keypoint_grid": res["keypoint_grid"], "device": cfg.device, "seed": cfg.seed,
                              "batches": min(len(tokens), res["steps"] + 1, res["samples"])}
    specs = {m: ModeSpec(mode=m, cache=cfg.cache if m == "cache" else None, **common) for m in ("none", "cache")}
    if cfg.frames > 1:
        specs[f"cache_{cfg.frames}f"] = ModeSpec(mode="cache", cache=cfg.cache, frames=cfg.frames, **common)
    report: dict[str, Any] = {
        "preset": cfg.preset, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **_device_fields(device),
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in res.items()},
                   "dataroot": str(cfg.dataroot), "cache": cfg.cache, "student_side_only": True},
        "provenance": provenance(),
    }
    report["step"] = bench_steps(specs, repeats=res["repeats"], steps=res["steps"], progress=cfg.progress)
    report["loader"] = bench_loader(cfg.cache, work, repeats=res["repeats"], workers=res["loader_workers"],
                                    n_items=max(16, res["samples"] * 4))
    json_path = write_json_atomic(out / "bench.json", finite_json(report))
    md_path = out / "bench.md"
    md_path.write_text("\n".join([
        f"### `{cfg.preset}` preset, student side only, {report['device_name']} ({report['date']})", "",
        f"Cache {cfg.cache} ({len(tokens)} samples of {res['split']}); batch 1; {res['repeats']} repeats x "
        f"{res['steps']} interleaved steps per mode, medians; peak memory: {report['peak_memory_method']}.", ""]
        + step_and_loader_tables(report)) + "\n")
    return BenchResult(json_path=json_path, markdown_path=md_path, plot_path=_plot_steps(report, out / "bench.png"),
                       report=report)


def _plot_steps(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["step"])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    ax.bar(modes, [report["step"][m]["median_step_s"] for m in modes], color=["#888", "#2a7", "#27c"][:len(modes)])
    for i, m in enumerate(modes):
        ax.text(i, report["step"][m]["median_step_s"], f"{report['step'][m]['ratio_to_none']:.2f}x", ha="center",
                va="bottom")
    ax.set_ylabel("training step (s)")
    ax.set_title(f"student step per mode, {report['device_name']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
