"""MixUp / CutMix on training batches: soft targets, and the training accuracy measured against them."""

import torch
from torch import nn

from leukodetect.training.engine import batch_mixer, train_one_epoch


def test_no_mixing_when_both_are_off():
    assert batch_mixer(0.0, 0.0) is None


def test_mixed_targets_are_soft_and_sum_to_one():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1] * 4)
    for mix in (batch_mixer(0.4, 0.0), batch_mixer(0.0, 1.0), batch_mixer(0.4, 1.0)):
        mixed, target = mix(x, y)
        assert mixed.shape == x.shape and target.shape == (8, 2)
        assert torch.allclose(target.sum(1), torch.ones(8))
        assert ((target > 0) & (target < 1)).any()  # some image really is a blend of two


def test_training_with_mixing_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    x = torch.cat([torch.zeros(16, 3, 8, 8), torch.ones(16, 3, 8, 8)]) + 0.1 * torch.randn(32, 3, 8, 8)
    y = torch.tensor([0] * 16 + [1] * 16)
    loader = [(x[i::4], y[i::4]) for i in range(4)]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    first, _ = train_one_epoch(model, loader, opt, loss_fn, device=torch.device("cpu"), amp_dtype=None, scaler=None,
                               channels_last=False, progress=False, mix=batch_mixer(0.4, 0.0))
    for _ in range(20):
        loss, acc = train_one_epoch(model, loader, opt, loss_fn, device=torch.device("cpu"), amp_dtype=None, scaler=None,
                                    channels_last=False, progress=False, mix=batch_mixer(0.4, 0.0))
    assert loss < first and 0 <= acc <= 1
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() == 1.0
