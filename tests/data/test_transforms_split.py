from pathlib import Path

import numpy as np
import torch

from leukodetect.config import AugmentConfig
from leukodetect.data.dataset import ImageDataset
from leukodetect.data.duplicates import effective_groups, hash_records
from leukodetect.data.indexers import index_dataset
from leukodetect.data.split import kfold_indices, train_val_test_indices
from leukodetect.data.transforms import TrainPreset, channel_stats
from leukodetect.runtime.preprocess import EvalPreset


def _train_ds(tree, seed):
    records = index_dataset(tree)
    return ImageDataset(records, TrainPreset(image_size=32, augment=AugmentConfig()), seed=seed)


def test_augmentation_is_deterministic_for_a_seed(tiny_tree):
    a, b = _train_ds(tiny_tree, 7), _train_ds(tiny_tree, 7)
    a.set_epoch(3), b.set_epoch(3)
    assert torch.equal(a[5][0], b[5][0])
    # Order of access does not matter: augmentation depends on (seed, epoch, index) only.
    _ = b[4]
    assert torch.equal(a[5][0], b[5][0])


def test_augmentation_changes_with_epoch_and_seed(tiny_tree):
    a, c = _train_ds(tiny_tree, 7), _train_ds(tiny_tree, 8)
    first = a[5][0]
    a.set_epoch(1)
    assert not torch.equal(first, a[5][0])
    assert not torch.equal(first, c[5][0])


def test_augmentation_keeps_the_global_rng_untouched(tiny_tree):
    ds = _train_ds(tiny_tree, 7)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _ = ds[0]
    assert torch.equal(torch.rand(3), expected)


def test_eval_preset_shape_and_normalisation(tiny_tree):
    records = index_dataset(tiny_tree)
    ds = ImageDataset(records, EvalPreset(image_size=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    x, y = ds[0]
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    raw = ds.base_image(0).float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-5)
    assert y in (0, 1)


def test_channel_stats_by_hand():
    img = torch.zeros(3, 2, 2, dtype=torch.uint8)
    img[0] = 255  # red channel all ones, others zero
    img[1, 0, 0] = 255  # green: one of four pixels
    mean, std = channel_stats([img])
    assert mean == (1.0, 0.25, 0.0)
    assert np.isclose(std[1], np.sqrt(0.25 * 0.75))


def _parts_of(index_sets, n):
    where = np.full(n, -1)
    for k, idx in enumerate(index_sets):
        assert (where[idx] == -1).all(), "an image is in two parts"
        where[idx] = k
    return where


def test_duplicates_never_straddle_any_split(tiny_tree):
    records = index_dataset(tiny_tree)
    hashes = hash_records(records)
    groups = effective_groups(records, hashes)
    labels = [r.label for r in records]
    dup = [i for i, r in enumerate(records) if r.path.name in ("blast_00.png", "copy_of_blast_00.png")]
    assert len(dup) == 2 and groups[dup[0]] == groups[dup[1]]
    for seed in range(5):
        parts = _parts_of(train_val_test_indices(labels, groups, val_fraction=0.2, test_fraction=0.2, seed=seed), len(records))
        assert (parts >= 0).all()
        assert parts[dup[0]] == parts[dup[1]]
        folds = kfold_indices(labels, groups, folds=4, seed=seed)
        where = _parts_of([te for _, te in folds], len(records))
        assert (where >= 0).all(), "every image is in exactly one test fold"
        assert where[dup[0]] == where[dup[1]]


def test_folds_are_stratified():
    labels = [0] * 50 + [1] * 50
    groups = [str(i) for i in range(100)]
    for _, te in kfold_indices(labels, groups, folds=5, seed=0):
        assert np.bincount(np.asarray(labels)[te]).tolist() == [10, 10]


def test_allidb2_duplicate_pair_stays_together(shared_datasets):
    records = index_dataset(shared_datasets / "ALL-IDB2" / "ALL_IDB2" / "img")
    hashes = hash_records(records)
    groups = effective_groups(records, hashes)
    idx = {Path(r.path).stem: i for i, r in enumerate(records)}
    assert groups[idx["Im223_0"]] == groups[idx["Im257_0"]]
    labels = [r.label for r in records]
    for _, te in kfold_indices(labels, groups, folds=5, seed=0):
        s = set(te.tolist())
        assert (idx["Im223_0"] in s) == (idx["Im257_0"] in s)


def test_resolution_drop_keeps_the_size_and_takes_the_finest_detail_away():
    import numpy as np
    import pytest
    import torch
    from torchvision import tv_tensors

    from leukodetect.config import AugmentConfig, RunConfig
    from leukodetect.data.transforms import ResolutionDrop, augment_colour
    from leukodetect.errors import LeukoError

    checker = np.indices((64, 64)).sum(0) % 2 * 255  # one-pixel checkerboard: all of its energy is the finest detail
    image = tv_tensors.Image(torch.from_numpy(np.stack([checker] * 3).astype(np.uint8)))
    torch.manual_seed(0)
    out = ResolutionDrop((2.0, 2.0))(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert float(out.float().std()) < 0.1 * float(image.float().std())  # averaged away to a flat grey
    assert "ResolutionDrop" in repr(augment_colour(AugmentConfig(lowres=0.5))) and augment_colour(AugmentConfig()) is None
    cfg = RunConfig()
    cfg.augment.lowres = 1.5
    with pytest.raises(LeukoError, match="probabilities"):
        cfg.validate()
