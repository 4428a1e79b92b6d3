"""Fixtures for the service tests: a tiny checkpoint with a model card, loaded once."""

from __future__ import annotations

import pytest
import torch

from leukodetect.models import create_model
from leukodetect.runtime.checkpoint import make_bundle, save_checkpoint
from leukodetect.runtime.classifier import Classifier

MODEL_CARD = {"intended_use": "Research use only, not for diagnosis (test card).", "metrics": {"accuracy": 0.5}}


@pytest.fixture(scope="session")
def model_card() -> dict:
    return MODEL_CARD


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory):
    """An untrained tiny model: the service needs a network, not a good one. Threshold and temperature
    are not the defaults, so the tests see that the stored ones are used."""
    torch.manual_seed(0)
    bundle = make_bundle(create_model("tiny"), arch="tiny", image_size=24, mean=[0.6] * 3, std=[0.25] * 3, config={},
                         threshold=0.45, temperature=1.5, extra={"model_card": MODEL_CARD})
    return save_checkpoint(bundle, tmp_path_factory.mktemp("serving") / "best.pt")


@pytest.fixture(scope="session")
def classifier(serving_checkpoint):
    return Classifier.from_checkpoint(serving_checkpoint, device="cpu", precision="fp32")
