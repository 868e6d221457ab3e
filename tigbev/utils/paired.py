"""Paired comparisons over seeds: the mean of the per-seed differences with its 95 % confidence interval.

Two students trained with the same seed share their initial weights, data order and augmentation draws, so the
difference of a metric between them, seed by seed, removes most of the seed-to-seed noise. The reading of a
comparison is the mean of those differences with a Student's t interval (n - 1 degrees of freedom): **resolved**
where the interval excludes 0, **inside the noise** otherwise. Agreement in sign over seeds is reported beside it
(``3 of 5 up``), never as the reading: with three seeds and no difference at all, three equal signs happen one time
in four.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CONFIDENCE", "PairedDifference", "mean_interval", "paired_difference", "t_quantile"]

CONFIDENCE = 0.95


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student's t critical value: ``P(|T| <= t) = confidence`` with ``dof`` degrees of freedom."""
    from scipy.stats import t

    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    return float(t.ppf(0.5 + confidence / 2, dof))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``confidence`` t interval of the mean; half-width NaN for fewer than two."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval: no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``a - b`` of one metric between two rows, and their t interval."""

    per_seed: dict[str, float]
    mean: float
    half_width: float
    """Half-width of the ``confidence`` interval of the mean difference (NaN with one seed)."""
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def resolved(self) -> bool:
        """The interval excludes 0."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    @property
    def reading(self) -> str:
        """``resolved up`` / ``resolved down`` / ``inside the noise`` / ``one seed``."""
        if self.n < 2:
            return "one seed"
        if not self.resolved:
            return "inside the noise"
        return "resolved up" if self.mean > 0 else "resolved down"

    @property
    def signs(self) -> str:
        """Sign agreement, shown beside the reading: ``4 of 5 up``."""
        up = sum(d > 0 for d in self.per_seed.values())
        return f"{up} of {self.n} up"

    def cell(self, digits: int = 1) -> str:
        """``+1.2 ± 0.8`` (the mean and the interval's half-width), or ``+1.2`` with one seed."""
        text = f"{self.mean:+.{digits}f}"
        return text if self.n < 2 else f"{text} ± {self.half_width:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95_half_width": self.half_width if self.n >= 2 else None,
                "ci95": [self.low, self.high] if self.n >= 2 else None, "n": self.n, "reading": self.reading,
                "signs": self.signs, "per_seed": dict(self.per_seed)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, scale: float = 1.0,
                      confidence: float = CONFIDENCE) -> PairedDifference | None:
    """``scale * (a[s] - b[s])`` over the seeds ``s`` both rows have (in ``a``'s order); None when they share none."""
    seeds = [s for s in a if s in b]
    if not seeds:
        return None
    diffs = {s: scale * (float(a[s]) - float(b[s])) for s in seeds}
    mean, half = mean_interval(list(diffs.values()), confidence)
    return PairedDifference(per_seed=diffs, mean=mean, half_width=half, confidence=confidence)
