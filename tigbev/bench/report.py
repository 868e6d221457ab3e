"""The bench's report: goals, Markdown tables and the plot, from ``bench.json``'s dictionary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tigbev.bench.config import GOALS

__all__ = ["evaluate_goals", "finite_json", "markdown_tables", "plot_report", "render"]


def evaluate_goals(report: dict[str, Any]) -> dict[str, Any]:
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
        "cache_read_over_memmap": report["loader"]["workers"][min(report["loader"]["workers"], key=int)][
            "cache_over_memmap"],
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
    teacher = "seeded random weights" if report["teacher"]["random_weights"] else report["teacher"]["checkpoint"]
    about = (f"Data: {report['dataset']['description']}; teacher: {teacher}; batch 1; {report['config']['repeats']} "
             f"repeats x {report['config']['steps']} interleaved steps per mode, medians; peak memory: "
             f"{report['peak_memory_method']}.")
    lines = [f"### `{report['preset']}` preset, {report['device_name']} ({report['date']})", "", about, ""]
    lines += step_and_loader_tables(report)
    lines.append(f"| training wait for data (cache mode, 1 worker) | {100 * report['loader']['wait_fraction']:.1f}% "
                 f"of the step time | | |")
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
    lines += ["", ("| storage | KiB/sample | compression | read (ms/sample) | " + " | ".join(f"{a} KiB" for a in arrays)
                   + " | L_kp rel. err. | L_ch rel. err. | features rel. err. |"),
              "|---|---|---|---|" + "---|" * len(arrays) + "---|---|---|"]
    for name, s in report["storage"].items():
        f = s["fidelity"]
        read = s.get("read_s_per_sample")
        lines.append(f"| {name} | {s['bytes_per_sample_total'] / 1024:.0f} | {s['compression_ratio']:.2f}x | "
                     f"{'' if read is None else f'{1e3 * read:.2f}'} | "
                     + " | ".join(f"{s['bytes_per_sample'].get(a, 0) / 1024:.0f}" for a in arrays)
                     + f" | {f['inter_keypoint_rel_error']:.1e} | {f['inter_channel_rel_error']:.1e} | "
                       f"{f['keypoint_features_rel_error']:.1e} |")
    lines += bda_table(report["bda"]) if "bda" in report else []
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


def step_and_loader_tables(report: dict[str, Any]) -> list[str]:
    """Markdown lines: the training step of each mode, then cache reads against a raw memmap."""
    mib = 2 ** 20
    lines = [("| training step | step (s) | x no-distill | teacher targets (s) | peak memory (MiB) | x no-distill | "
              "sample load, no workers (s) |"), "|---|---|---|---|---|---|---|"]
    names = {"none": "no distillation", "cache": "TiG-BEV from the cache", "online": "TiG-BEV, online teacher"}
    for mode, s in report["step"].items():
        name = names.get(mode) or f"TiG-BEV from the cache, {mode.removeprefix('cache_').removesuffix('f')} key frames"
        lines.append(f"| {name} | {s['median_step_s']:.3f} | {s['ratio_to_none']:.2f} | "
                     f"{s['median_targets_s']:.3f} | {s['peak_memory_bytes'] / mib:.0f} | "
                     f"{s['peak_memory_ratio_to_none']:.2f} | {s['sample_load_s']:.3f} |")
    ld = report["loader"]
    lines += ["", "| loader | cache | raw memmap | cache / memmap |", "|---|---|---|---|",
              (f"| read per sample, in process (ms) | {1e3 * ld['cache_read_s_per_sample']:.2f} | "
               f"{1e3 * ld['memmap_read_s_per_sample']:.3f} | {1 / ld['cache_over_memmap_time']:.2f}x rate |")]
    for w, r in ld["workers"].items():
        lines.append(f"| {w} worker(s) (samples/s) | {r['cache_samples_per_s']:.0f} | {r['memmap_samples_per_s']:.0f}"
                     f" | {r['cache_over_memmap']:.2f}x rate |")
    return lines


def bda_table(bda: dict[str, Any]) -> list[str]:
    """Markdown lines: each cache mode's fidelity to the online teacher under each BDA kind, and its bytes."""
    sizes = bda["sizes"]
    modes = list(sizes)
    lines = ["", (f"Under BEV augmentation ({bda['samples']} samples x {bda['views_per_sample']} augmented views; "
                  f"reference: {bda['reference']}). Per box, mean over boxes: relative error of the inter-keypoint "
                  "(L_kp) and inter-channel (L_ch) targets, and the keypoint features' cosine."), "",
             "| BDA | " + " | ".join(f"{m}: L_kp err. / L_ch err. / cosine" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for kind, row in bda["fidelity"].items():
        lines.append(f"| {kind} | " + " | ".join(
            f"{row[m]['inter_keypoint_target_rel_error']:.3f} / {row[m]['inter_channel_target_rel_error']:.3f} / "
            f"{row[m]['keypoint_cosine']:.3f}" for m in modes) + " |")
    lines.append("| KiB/sample (x canonical) | " + " | ".join(
        f"{sizes[m]['bytes_per_sample'] / 1024:.0f} ({sizes[m]['over_canonical']:.2f}x, {sizes[m]['maps']} maps)"
        for m in modes) + " |")
    return lines


def plot_report(report: dict[str, Any], path: Path) -> Path:
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



def render(out_dir: Path) -> tuple[Path, Path]:
    """Rewrite ``bench.md`` and ``bench.png`` from an existing ``bench.json`` (e.g. after a change of the tables)."""
    report = json.loads((Path(out_dir) / "bench.json").read_text())
    report["goals"] = evaluate_goals(report)
    md = Path(out_dir) / "bench.md"
    md.write_text(markdown_tables(report))
    return md, plot_report(report, Path(out_dir) / "bench.png")


def finite_json(obj: Any) -> Any:
    """JSON without NaN / inf (written as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
