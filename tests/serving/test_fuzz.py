"""Property-based fuzzing of the API from its own OpenAPI description (schemathesis, in process).

Whatever schemathesis sends (wrong types, odd multipart bodies, missing fields), the service must
answer with a 4xx, never a 5xx. The run is bounded (25 examples per operation, no deadline: the
machine is shared) so it stays within a few seconds on the tiny model. A stand-in detector is
plugged in so that /v1/analyze is fuzzed too (without one it answers 501 by design, see test_api).

The schema is loaded at import, not from a fixture: ``schemathesis.pytest.from_fixture`` (4.32)
sets ``node._nodeid``, which pytest 9 no longer has. The app is an untrained tiny model, built
in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from leukodetect.models import create_model
from leukodetect.runtime.checkpoint import make_bundle
from leukodetect.runtime.classifier import Classifier
from leukodetect.serving import create_app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")
from schemathesis.checks import not_a_server_error  # noqa: E402


class EchoDetector:
    """Stands in for the detection module, so /v1/analyze is fuzzed past its 501."""

    def analyze(self, image):
        return {"verdict": "not classified", "counts": {}, "overlay": image, "cells": []}


def _app():
    torch.manual_seed(0)
    bundle = make_bundle(create_model("tiny"), arch="tiny", image_size=24, mean=[0.6] * 3, std=[0.25] * 3, config={})
    return create_app(Classifier(bundle, device="cpu", precision="fp32"), max_bytes=2**20, detector=EchoDetector())


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
