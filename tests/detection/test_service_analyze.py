"""The real whole-smear detector behind the lab service's /v1/analyze."""

import base64
import io

from fastapi.testclient import TestClient
from PIL import Image

from leukodetect.detection import load_detector
from leukodetect.runtime.classifier import Classifier
from leukodetect.serving import create_app


def test_analyze_returns_cells_counts_verdict_overlay_and_gallery(crop_checkpoint, smear_png):
    app = create_app(Classifier.from_checkpoint(crop_checkpoint), detector=load_detector(crop_checkpoint))
    with open(smear_png, "rb") as f:
        response = TestClient(app).post("/v1/analyze", files={"file": ("smear.png", f, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["cells"]) == 3  # the synthetic smear holds three white cells
    assert sum(body["counts"].values()) == 3
    assert body["verdict"] in ("ALL", "healthy", "review")
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size == (400, 400)
    assert Image.open(io.BytesIO(base64.b64decode(body["gallery_png"]))).format == "PNG"
