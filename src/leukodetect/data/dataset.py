"""A torch Dataset over records with a decode-once cache and per-sample seeded augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from leukodetect.data.records import Record
from leukodetect.data.transforms import TrainPreset
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.preprocess import EvalPreset


class ImageDataset(Dataset):
    """Yields ``(tensor, label)`` for each record.

    Each image is decoded and resized once (``preset.resize``) and kept in memory as uint8, since
    the data sets this tool targets are a few hundred to a few thousand cells. With ``seed`` set, the
    random augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``: a run is
    reproducible whatever the worker count, and a resumed run sees the same augmentations.
    """

    def __init__(self, records: Sequence[Record], preset: EvalPreset, *, seed: int | None = None) -> None:
        self.records = list(records)
        self.preset = preset
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, torch.Tensor] = {}
        self._resize = preset.resize()
        self._finish = preset.finish()
        self._random = preset.random() if isinstance(preset, TrainPreset) else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def base_image(self, i: int) -> torch.Tensor:
        """Decoded, resized uint8 image (3, S, S)."""
        if i not in self._cache:
            self._cache[i] = self._resize(open_rgb(self.records[i].path)).as_subclass(torch.Tensor)
        return self._cache[i]

    def __getitem__(self, i: int):
        x = self.base_image(i)
        if self._random is not None:
            if self.seed is None:
                x = self._random(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(((self.seed * 1_000_003) + self.epoch * 100_003 + i) % (2**63))
                    x = self._random(x)
        label = self.records[i].label
        return self._finish(x), -1 if label is None else label
