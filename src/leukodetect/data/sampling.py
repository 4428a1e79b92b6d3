"""How training images are drawn when laboratories differ in size: weighted, reproducible, rank-aware.

Across laboratories the strata are very unequal (1,800 normal PBC cells beside 37 C-NMC blasts).
Drawn once each per epoch, the largest laboratory sets what "normal" looks like. With
``--balance labs`` each epoch draws as many images as the training part holds, with replacement,
with weights such that both classes weigh the same and, within a class, each laboratory weighs
the square root of its size: larger laboratories still count more, but not in proportion.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from leukodetect.data.records import Record


def lab_balanced_weights(records: Sequence[Record]) -> np.ndarray:
    """One weight per record (summing to 1): classes equal, laboratories within a class by sqrt(size)."""
    strata = [(r.label, r.lab) for r in records]
    sizes = Counter(strata)
    classes = sorted({label for label, _ in strata})
    weights = np.zeros(len(records))
    for label in classes:
        labs = {lab: n for (lab_label, lab), n in sizes.items() if lab_label == label}
        total = sum(np.sqrt(n) for n in labs.values())
        for i, stratum in enumerate(strata):
            if stratum[0] == label:
                # The laboratory's share of its class, spread over its images.
                weights[i] = np.sqrt(sizes[stratum]) / total / sizes[stratum] / len(classes)
    return weights


class WeightedEpochSampler(Sampler[int]):
    """``len(weights)`` draws with replacement, seeded by (seed, epoch); rank r of W takes draws r, r+W, ...

    The union of the ranks' draws is the single-process draw, as with the unweighted
    ``DistributedSampler`` the training loop otherwise uses (the last ``len % W`` draws are dropped).
    """

    def __init__(self, weights: np.ndarray, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.total = len(self.weights) - len(self.weights) % world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size
