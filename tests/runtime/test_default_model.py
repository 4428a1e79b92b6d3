"""The half-precision safetensors checkpoint format and the shipped default model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import BadCheckpointError
from leukodetect.models import create_model
from leukodetect.runtime.checkpoint import (
    load_checkpoint,
    make_bundle,
    save_safetensors,
)
from leukodetect.runtime.classifier import Classifier
from leukodetect.sample import sample_dir
from leukodetect.weights import DEFAULT_MODEL


def test_safetensors_round_trip_keeps_the_description_and_predictions(tiny_tree, tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny")
    bundle = make_bundle(model, arch="tiny", image_size=24, mean=(0.5, 0.4, 0.6), std=(0.2, 0.2, 0.2),
                         config={"x": 1}, threshold=0.4, temperature=1.3, extra={"model_card": {"intended_use": "research"}})
    torch.save(bundle, tmp_path / "full.pt")
    save_safetensors(bundle, tmp_path / "half.safetensors")
    half = load_checkpoint(tmp_path / "half.safetensors")
    assert half["arch"] == "tiny" and half["threshold"] == 0.4 and half["temperature"] == 1.3
    assert half["model_card"]["intended_use"] == "research"
    assert all(t.dtype == torch.float32 for t in half["state_dict"].values() if t.is_floating_point())
    paths = sorted(tiny_tree.rglob("*.png"))
    a = Classifier.from_checkpoint(tmp_path / "full.pt").predict_paths(paths)
    b = Classifier.from_checkpoint(tmp_path / "half.safetensors").predict_paths(paths)
    # float16 weights: probabilities agree within 2e-3 (stated tolerance for the shipped model)
    assert max(abs(x.prob_blast - y.prob_blast) for x, y in zip(a, b)) < 2e-3
    # Loading (float16 -> float32) and saving again (-> float16) changes no weight: how a model card is
    # rewritten without touching the model (scripts/train_default_model.py --update-card).
    half["model_card"] = {"intended_use": "research, card rewritten"}
    save_safetensors(half, tmp_path / "again.safetensors")
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as f1, safe_open(str(tmp_path / "again.safetensors"), "pt") as f2:
        assert set(f1.keys()) == set(f2.keys())
        assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys())
    assert load_checkpoint(tmp_path / "again.safetensors")["model_card"]["intended_use"] == "research, card rewritten"


def test_bare_safetensors_is_refused_with_one_sentence(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(BadCheckpointError, match="without leukodetect's description"):
        load_checkpoint(tmp_path / "bare.safetensors")


def test_predict_without_checkpoint_uses_the_shipped_model():
    assert DEFAULT_MODEL.stat().st_size < 50 * 2**20
    bundle = load_checkpoint(DEFAULT_MODEL)
    assert bundle["arch"] == "resnet50" and "Research use only" in bundle["model_card"]["intended_use"]
    image = next(sample_dir().rglob("*.png"))
    result = CliRunner().invoke(app, ["predict", str(image), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[0])
    assert 0.0 <= row["prob_blast"] <= 1.0 and row["label"] in ("normal", "blast")


def test_serve_without_options_analyzes_smears_with_the_shipped_detector(smear_png):
    from fastapi.testclient import TestClient

    from leukodetect.serving.server import build_app
    from leukodetect.weights import DEFAULT_DETECTOR

    assert DEFAULT_DETECTOR.stat().st_size < 50 * 2**20
    bundle = load_checkpoint(DEFAULT_DETECTOR)
    assert bundle["arch"] == "googlenet" and bundle["detection"]["crop_factor"] == 2.0 and bundle["image_size"] == 96
    # It carries its smudge gate and the locator settings it was evaluated with (clump cutting on).
    from leukodetect.detection.gate import SmudgeGate

    gate = SmudgeGate.from_dict(bundle["detection"]["gate"])
    assert 0 < gate.threshold < 1 and gate.keep == 0.99
    assert bundle["detection"]["locate"]["clump_area"] > 0
    # It was trained and evaluated with the locator's current settings (the stain-weighted centre included), stored in it.

    from leukodetect.detection.locate import LocateParams
    from leukodetect.detection.pipeline import locate_params_of
    from leukodetect.runtime.checkpoint import DetectorSettings

    assert locate_params_of(DetectorSettings.of(bundle)) == LocateParams() and LocateParams().stain_centre
    # No validation photographs: every photograph's crops trained and the last of the 30 epochs was kept.
    assert bundle["config"]["data"]["val_fraction"] == 0 and bundle["epoch"] == 30 == bundle["config"]["train"]["epochs"]
    # And its cell scorer, which leaves the camera-dependent colours out.
    from leukodetect.detection.scorer import CellScorer

    scorer = CellScorer.from_dict(bundle["detection"]["scorer"])
    assert "red" not in scorer.feature_names and scorer.coef[scorer.feature_names.index("log_area")] != 0
    with TestClient(build_app(None, backend="torch", torch_threads=1, log=lambda _: None)) as client:
        with open(smear_png, "rb") as f:
            response = client.post("/v1/analyze", files={"file": ("smear.png", f, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["cells"]) == 3 and body["verdict"] in ("ALL", "healthy", "review")
    assert all(0.0 <= c["prob_blast"] <= 1.0 for c in body["cells"])
