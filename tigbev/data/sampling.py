"""Class-balanced grouping and sampling (CBGS, Zhu et al. 2019), the way mmdet3d's ``CBGSDataset`` does it.

Each class ``c`` contributes ``int(D / C)`` draws, with replacement, from the samples that hold it, where ``D`` is the
sum over classes of the number of samples holding each class (a sample with three classes counts three times) and
``C`` the number of classes. Rare classes' samples are therefore repeated, common ones thinned, and the epoch holds
about ``D`` samples. mmdet3d draws the list once, when the dataset is built; here it is fixed by the seed, so every
rank of a DDP run builds the same list and its ``DistributedSampler`` shards it. A class no sample holds contributes
nothing (mmdet3d would divide by zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch.utils.data import Dataset

__all__ = ["ClassBalancedDataset", "class_balanced_indices"]


def class_balanced_indices(sample_classes: Sequence[frozenset[int] | set[int]], num_classes: int, seed: int
                           ) -> NDArray[np.int64]:
    """The CBGS epoch: dataset indices, grouped class by class (class 0's draws first), int64.

    ``sample_classes[i]``: the classes (0 .. num_classes - 1) present in sample ``i``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, classes in enumerate(sample_classes):
        for c in sorted(classes):
            if not 0 <= c < num_classes:
                raise ValueError(f"sample {i} has class {c}, outside 0 .. {num_classes - 1}")
            per_class[c].append(i)
    duplicated = sum(len(v) for v in per_class)
    rng = np.random.default_rng(seed)
    frac = 1.0 / num_classes
    # mmdet3d's arithmetic, in its order: ratio = frac / (share of the class), count = int(len * ratio).
    draws = [rng.choice(np.asarray(idx, np.int64), int(len(idx) * (frac / (len(idx) / duplicated))))
             for idx in per_class if idx]
    return np.concatenate(draws).astype(np.int64) if draws else np.zeros(0, np.int64)


class ClassBalancedDataset(Dataset):
    """A dataset seen through its CBGS epoch. Repeats of one sample get their own augmentation draw (their position
    in the epoch), where the wrapped dataset has ``sample(index, draw)``; ``set_epoch`` is passed on."""

    def __init__(self, dataset: Any, sample_classes: Sequence[frozenset[int] | set[int]], num_classes: int,
                 seed: int):
        if len(sample_classes) != len(dataset):
            raise ValueError(f"{len(sample_classes)} class sets for a dataset of {len(dataset)} samples")
        self.dataset = dataset
        self.indices = class_balanced_indices(sample_classes, num_classes, seed)
        if not len(self.indices):
            raise ValueError("class-balanced sampling: no sample holds any class (no valid annotation)")

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, position: int) -> Any:
        index = int(self.indices[position])
        if hasattr(self.dataset, "sample"):
            return self.dataset.sample(index, draw=position)
        return self.dataset[index]
