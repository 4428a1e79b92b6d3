"""The lab service's HTTP API, in process with FastAPI's TestClient, on the tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from leukodetect import __version__
from leukodetect.cli import app as cli_app
from leukodetect.runtime.base import ImageClassifier
from leukodetect.serving import create_app

try:  # Starlette 1.x's TestClient uses httpx2 (httpx's successor); older releases use httpx
    import httpx2 as httpx
except ImportError:
    import httpx


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier)) as c:
        yield c


@pytest.fixture(scope="module")
def cells(tiny_tree):
    return [tiny_tree / "blast" / "blast_01.png", tiny_tree / "normal" / "normal_02.png", tiny_tree / "blast" / "blast_03.png"]


def upload(*paths, field="files"):
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def png_bytes(size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 150, 160)).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_one_image_matches_predict(client, classifier, cells, model_card):
    response = client.post("/v1/classify", files=upload(cells[0]))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    (expected,) = classifier.predict_paths([cells[0]])
    assert result["filename"] == "blast_01.png"
    assert result["prob_blast"] == pytest.approx(expected.prob_blast, abs=1e-6)
    assert result["label"] == expected.label and result["threshold"] == 0.45
    assert result["gradcam_png"] is None
    assert response.json()["intended_use"] == model_card["intended_use"]


def test_classify_several_images_keeps_their_order(client, classifier, cells):
    response = client.post("/v1/classify", files=upload(*cells))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in cells]
    expected = classifier.predict_paths(cells)
    assert [r["prob_blast"] for r in results] == pytest.approx([p.prob_blast for p in expected], abs=1e-6)


def test_gradcam_overlay_is_a_png_of_the_image_size(client, cells):
    response = client.post("/v1/classify?gradcam=true", files=upload(cells[0], cells[1]))
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        overlay = Image.open(io.BytesIO(base64.b64decode(result["gradcam_png"])))
        assert overlay.format == "PNG" and overlay.size == (24, 24)


def test_content_decides_not_the_extension(client, cells):
    response = client.post("/v1/classify", files=[("files", ("cell.txt", cells[0].read_bytes(), "text/plain"))])
    assert response.status_code == 200 and response.json()["results"][0]["filename"] == "cell.txt"


def test_model_health_openapi_docs_and_page(client, classifier, model_card):
    model = client.get("/v1/model").json()
    assert model["arch"] == "tiny" and model["class_names"] == ["normal", "blast"] and model["image_size"] == 24
    assert model["threshold"] == 0.45 and model["temperature"] == 1.5 and model["model_card"] == model_card
    assert model["leukodetect_version"] == __version__ and model["intended_use"] == model_card["intended_use"]
    assert model["gradcam"] is True and model["smear_analysis"] is False and model["backend"] == classifier.backend
    assert client.get("/health").json() == {"status": "ok", "pending": 0}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/analyze", "/v1/model", "/health"} <= set(paths)
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    assert "Research use only, not for diagnosis" in page and "/static/app.js" in page and "http" not in page.lower().replace("http-equiv", "")
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def truncated_png(cells):
    return cells[0].read_bytes()[:-40]


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        ("empty.png", lambda cells: b"", "empty"),
        ("cut.png", truncated_png, "truncated"),
        ("notes.png", lambda cells: b"these are not pixels\n" * 10, "not an image"),
    ],
)
def test_bad_upload_is_a_4xx_sentence_naming_the_file(client, cells, name, make, words):
    response = client.post("/v1/classify", files=[("files", (name, make(cells), "image/png"))])
    assert response.status_code == 422
    error = response.json()["error"]
    assert f"'{name}'" in error and words in error and "/tmp" not in error and "upload-" not in error


def test_one_bad_file_fails_the_request_naming_it(client, cells):
    files = upload(cells[0]) + [("files", ("bad.png", b"GIF89a nope", "image/png"))]
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 422 and "'bad.png'" in response.json()["error"]


def test_uploads_are_not_kept(client, cells, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert client.post("/v1/classify", files=upload(cells[0])).status_code == 200
    assert client.post("/v1/classify", files=[("files", ("x.png", b"junk", "image/png"))]).status_code == 422
    assert list(tmp_path.iterdir()) == []


def test_byte_limit_checks_the_header_and_counts_the_bytes(classifier):
    client = TestClient(create_app(classifier, max_bytes=2000))
    declared = client.post("/v1/classify", content=b"x" * 10, headers={"content-length": str(10**12), "content-type": "multipart/form-data; boundary=x"})
    assert declared.status_code == 413 and "limit of 2,000 bytes" in declared.json()["error"]
    # No Content-Length (chunked): the bytes are counted as they arrive.
    body = httpx.Request("POST", "http://x", files=[("files", ("big.png", png_bytes((200, 200)) + b"\0" * 5000, "image/png"))])
    chunks = iter([body.read()[i:i + 512] for i in range(0, len(body.read()), 512)])
    streamed = client.post("/v1/classify", content=chunks, headers={"content-type": body.headers["content-type"]})
    assert streamed.status_code == 413 and "error" in streamed.json()
    assert client.post("/v1/classify", files=[("files", ("small.png", png_bytes(), "image/png"))]).status_code == 200


def test_pixel_limit_refuses_large_images_from_their_header(classifier):
    client = TestClient(create_app(classifier, max_pixels=500))
    response = client.post("/v1/classify", files=[("files", ("huge.png", png_bytes((30, 30)), "image/png"))])
    assert response.status_code == 422
    assert "'huge.png'" in response.json()["error"] and "900 pixels" in response.json()["error"]


def test_wrong_field_name_is_a_422_json_sentence(client, cells):
    response = client.post("/v1/classify", files=upload(cells[0], field="image"))
    assert response.status_code == 422
    assert "'files'" in response.json()["error"] and response.json()["detail"]


def test_analyze_without_detector_is_501(client, cells):
    response = client.post("/v1/analyze", files=upload(cells[0], field="file"))
    assert response.status_code == 501 and "--detector-checkpoint" in response.json()["error"]


class FakeDetector:
    def analyze(self, image):
        crop = image.crop((0, 0, 8, 8))
        return {"verdict": "no blasts found", "counts": {"blast": 0, "normal": 1}, "overlay": image,
                "cells": [{"box": [0, 0, 8, 8], "label": "normal", "prob_blast": 0.1, "crop": crop}]}


def test_a_detector_plugs_into_analyze(classifier, cells):
    client = TestClient(create_app(classifier, detector=FakeDetector()))
    response = client.post("/v1/analyze", files=upload(cells[0], field="file"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "blast_01.png" and body["counts"] == {"blast": 0, "normal": 1}
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size == (24, 24)
    assert Image.open(io.BytesIO(base64.b64decode(body["cells"][0]["crop_png"]))).size == (8, 8)
    assert client.get("/v1/model").json()["smear_analysis"] is True


class Recording(ImageClassifier):
    """Wraps a classifier and records which threads run it and how many at once."""

    def __init__(self, inner):
        self.inner, self.preset, self.threshold, self.class_names = inner, inner.preset, inner.threshold, inner.class_names
        self.threads, self.active, self.most = set(), 0, 0
        self.lock = threading.Lock()

    def outputs(self, batch):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        self.threads.add(threading.current_thread().name)
        try:
            threading.Event().wait(0.02)  # long enough for overlapping calls to show
            return self.inner.outputs(batch)
        finally:
            with self.lock:
                self.active -= 1


def test_concurrent_requests_queue_for_one_inference_thread(classifier, cells):
    recording = Recording(classifier)
    app = create_app(recording)

    async def many():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/v1/classify", files=upload(cells[i % 3])) for i in range(8)))

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 8
    assert recording.most == 1 and len(recording.threads) == 1
    assert next(iter(recording.threads)).startswith("leukodetect-inference")
    assert client_model(app)["gradcam"] is False  # not a PyTorch Classifier: no Grad-CAM offered
    app.state.worker.close()


def client_model(app):
    return TestClient(app).get("/v1/model").json()


def test_busy_service_answers_503(classifier, cells):
    response = TestClient(create_app(classifier, max_pending=0)).post("/v1/classify", files=upload(cells[0]))
    assert response.status_code == 503 and response.headers["retry-after"] == "5" and "busy" in response.json()["error"]


def test_serve_command_errors_are_one_sentence(serving_checkpoint):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", "--checkpoint", "missing-model.pt"])
    assert result.exit_code == 2 and "missing-model.pt" in result.output and "Traceback" not in result.output
    # A detector that cannot be loaded (no detection module yet, or no such file) is one sentence too.
    result = runner.invoke(cli_app, ["serve", "--checkpoint", str(serving_checkpoint), "--detector-checkpoint", "missing-det.pt"])
    assert result.exit_code == 2 and "missing-det.pt" in result.output and "Traceback" not in result.output
