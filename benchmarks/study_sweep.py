"""The weight sweep of the study, paired by seed against the reference rows (reads only; trains nothing).

    python benchmarks/study_sweep.py --levers runs/study/levers.json --ablation docs/img/ablation-study.json \
        --out docs/img/study-sweep        # writes study-sweep.md, study-sweep.json and study-sweep.png

``levers.json`` is what ``benchmarks/study_levers.py`` writes (``inner_depth_<w>`` and ``inter_channel_<w>`` levers on
the TiG-BEV row, ``inter_keypoint``); ``ablation.json`` is ``tigbev ablate --preset study``'s table of the same world,
whose TiG-BEV row is the sweep's reference (inner-depth 1, inter-channel 10) and whose side row ``keypoint_only`` is
the end of both sweeps (both weights 0). Every difference is paired by seed: the mean of the per-seed differences
against the reference ± the half-width of its 95 % t interval, over the seeds both have; "resolved" where the
interval excludes 0, else "inside the noise", with the sign agreement beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tigbev.utils.paired import mean_interval, paired_difference

_ROW = "inter_keypoint"
_TERMS = {"inner_depth": ("inner-depth", 1.0), "inter_channel": ("inter-channel", 10.0)}


def _per_seed(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    return next((r["per_seed"] for r in rows if r["key"] == key), {})


def sweep(levers: dict[str, Any], ablation: dict[str, Any]) -> dict[str, Any]:
    """Per term: one point per weight (the reference's, each lever's, and 0 from the side row), with its per-seed
    metrics and its paired difference to the reference."""
    reference = _per_seed(ablation["rows"], _ROW)
    zero = _per_seed(ablation["rows"], "keypoint_only")
    out: dict[str, Any] = {}
    for term, (label, published) in _TERMS.items():
        points = {published: reference, 0.0: zero}
        for name, entry in levers.items():
            if name.startswith(term + "_") and _ROW in entry["rows"]:
                points[float(name.removeprefix(term + "_"))] = entry["rows"][_ROW]["per_seed"]
        rows = []
        for weight in sorted(points):
            seeds = sorted(set(points[weight]) & set(reference), key=int)
            if not seeds:
                continue
            row: dict[str, Any] = {"weight": weight, "seeds": seeds, "published": weight == published,
                                   "other_weight_zero": weight == 0.0,
                                   "per_seed": {s: points[weight][s] for s in seeds}}
            for metric in ("mAP", "NDS"):
                row[metric], row[f"{metric}_ci95_half"] = mean_interval([points[weight][s][metric] for s in seeds])
                d = paired_difference({s: points[weight][s][metric] for s in seeds},
                                      {s: reference[s][metric] for s in seeds}, scale=100.0)
                assert d is not None
                row[f"d{metric}"], row[f"d{metric}_cell"], row[f"d{metric}_signs"] = d.mean, d.cell(), d.signs
                row[f"d{metric}_ci95_half"] = d.half_width if d.n > 1 else None
                row[f"d{metric}_reading"] = "reference" if all(v == 0 for v in d.per_seed.values()) else d.reading
            rows.append(row)
        out[term] = {"label": label, "published_weight": published, "points": rows}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| term | weight | seeds | mAP | NDS | ΔmAP (points) | ΔNDS (points) | reading (mAP / NDS) | "
             "signs (mAP / NDS) |", "|---|---|---|---|---|---|---|---|---|"]
    for term in result.values():
        for p in term["points"]:
            note = " (published)" if p["published"] else " (the side row: both terms off)" if p["other_weight_zero"] \
                else ""
            lines.append(
                f"| {term['label']} | {p['weight']:g}{note} | {len(p['seeds'])} | {p['mAP']:.4f} ± "
                f"{p['mAP_ci95_half']:.4f} | {p['NDS']:.4f} ± {p['NDS_ci95_half']:.4f} | "
                f"{p['dmAP_cell']} | {p['dNDS_cell']} | {p['dmAP_reading']} / {p['dNDS_reading']} | "
                f"{p['dmAP_signs']} / {p['dNDS_signs']} |")
    lines.append("")
    lines.append("Differences against TiG-BEV with the published weights (inner-depth 1, inter-channel 10), paired by "
                 "seed: the mean of the per-seed differences ± the half-width of its 95 % t interval. Weight 0 is the side row "
                 "(inter-keypoint alone + dense depth), where the other term is off too.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("mAP", "NDS")):
        for term in result.values():
            pts = [p for p in term["points"] if not p["other_weight_zero"]]
            xs = [p["weight"] / term["published_weight"] for p in pts]
            ax.errorbar(xs, [p[metric] for p in pts], yerr=[p[f"{metric}_ci95_half"] for p in pts], marker="o",
                        capsize=3, label=f"{term['label']} (x published {term['published_weight']:g})")
        zero = next((p for t in result.values() for p in t["points"] if p["other_weight_zero"]), None)
        if zero is not None:
            ax.axhline(zero[metric], color="grey", ls="--", lw=1, label="both off (inter-keypoint alone)")
        ax.set_xscale("log")
        ax.set_xlabel("weight / published weight")
        ax.set_title(f"{metric} (mean over seeds, 95 % CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("TiG-BEV, study configuration: the inner-depth and inter-channel weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levers", type=Path, required=True)
    parser.add_argument("--ablation", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="path prefix of the .md, .json and .png written")
    args = parser.parse_args()
    result = sweep(json.loads(args.levers.read_text()), json.loads(args.ablation.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
