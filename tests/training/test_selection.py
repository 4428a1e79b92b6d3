"""Which epoch best.pt keeps: the lowest validation loss, or the last one (--select last, or no validation part)."""

from __future__ import annotations

import math

from leukodetect.training.fit import _TrainingState


def _kept(losses, **kw):
    state = _TrainingState(model=None, ema=None, optimizer=None, scheduler=None)
    improved = [state.record({"epoch": e}, loss, e, **kw) for e, loss in enumerate(losses, start=1)]
    return state.best_epoch, improved


def test_the_lowest_validation_loss_is_kept_by_default():
    assert _kept([0.5, 0.3, 0.4]) == (2, [True, True, False])


def test_select_last_keeps_every_new_epoch_although_its_loss_is_higher():
    assert _kept([0.5, 0.3, 0.4], keep_last=True) == (3, [True, True, True])


def test_without_a_validation_part_the_last_epoch_is_kept():
    assert _kept([math.nan] * 3) == (3, [True, True, True])
