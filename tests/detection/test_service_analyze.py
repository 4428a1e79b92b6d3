"""The real whole-smear detector behind the lab service's /v1/analyze."""

import base64
import io

from fastapi.testclient import TestClient
from PIL import Image

from leukodetect.detection import load_detector
from leukodetect.detection.pipeline import OVERLAY_MIN_SIDE
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
    # The 400-pixel smear, enlarged to the overlay's minimum side, under its verdict band.
    width, height = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size
    assert width == OVERLAY_MIN_SIDE and height > OVERLAY_MIN_SIDE
    assert Image.open(io.BytesIO(base64.b64decode(body["gallery_png"]))).format == "PNG"


def test_analyze_answers_a_thin_or_1_pixel_image_cannot_assess_with_its_size(crop_checkpoint):
    app = create_app(Classifier.from_checkpoint(crop_checkpoint), detector=load_detector(crop_checkpoint))
    client = TestClient(app)
    for size, shown in (((1, 20000), "1x20000"), ((20000, 2), "20000x2"), ((1, 1), "1x1")):
        buf = io.BytesIO()
        Image.new("RGB", size, "white").save(buf, format="PNG")
        response = client.post("/v1/analyze", files={"file": ("thin.png", buf.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["verdict"] == "cannot_assess" and body["cells"] == []
        assert f"{shown} pixels, below the 32-pixel minimum side" in body["reason"]


def test_analyze_says_cannot_assess_for_a_blank_or_grayscale_frame(crop_checkpoint, smear_png):
    app = create_app(Classifier.from_checkpoint(crop_checkpoint), detector=load_detector(crop_checkpoint))
    client = TestClient(app)
    for name, image in (("blank.png", Image.new("RGB", (300, 300), (245, 245, 245))), ("grey.png", Image.open(smear_png).convert("L"))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        response = client.post("/v1/analyze", files={"file": (name, buf.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        assert response.json()["verdict"] == "cannot_assess" and response.json()["reason"], name


def test_analyze_with_the_learned_locator_finds_the_cells_and_says_which_locator(crop_checkpoint, smear_png):
    from leukodetect.weights import resolve_locator

    detector = load_detector(crop_checkpoint, locator=resolve_locator(None))
    client = TestClient(create_app(Classifier.from_checkpoint(crop_checkpoint), detector=detector))
    with open(smear_png, "rb") as f:
        body = client.post("/v1/analyze", files={"file": ("smear.png", f, "image/png")}).json()
    assert body["locator"] == "learned" and body["scale"] in ("measured", "packed")
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (245, 245, 245)).save(buf, format="PNG")
    blank = client.post("/v1/analyze", files={"file": ("blank.png", buf.getvalue(), "image/png")}).json()
    assert blank["verdict"] == "cannot_assess" and blank["reason"]
