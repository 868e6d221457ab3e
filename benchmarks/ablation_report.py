"""Re-read a saved ablation table (``ablation*.json``) with the current reading: every paired comparison as the mean
of the per-seed differences with its 95 % t interval, resolved only where the interval excludes 0 (trains nothing).

    python benchmarks/ablation_report.py docs/img/ablation-aug-study.json --write docs/img/ablation-aug-study
    # writes <prefix>.md (the rows and the comparisons) and <prefix>-paired.png (the comparisons' intervals)

Tables written before the intervals existed keep their per-seed numbers, so their comparisons can be read anew.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tigbev.pipeline.ablate import ablation_table, headline_deltas, plot_paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path, help="an ablation*.json")
    parser.add_argument("--write", type=Path, required=True, help="path prefix of the .md and -paired.png written")
    parser.add_argument("--title", default=None, help="the chart's title (default: preset and budget)")
    args = parser.parse_args()
    result = json.loads(args.table.read_text())
    heads = headline_deltas(result)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    md = ablation_table(result)
    args.write.with_suffix(".md").write_text(md)
    if heads:
        title = args.title or (f"{result['preset']} world, {result['student_epochs']} epoch(s)"
                               + (", BDA" if result.get("augment") else ""))
        plot_paired(args.write.parent / f"{args.write.name}-paired.png", heads, title)
    print(md)


if __name__ == "__main__":
    main()
