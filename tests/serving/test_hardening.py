"""The service under hostile clients: pixel-heavy uploads, foreign Host and Origin headers, framing."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import leukodetect.serving.app as app_module
from leukodetect.runtime.base import ImageClassifier
from leukodetect.serving import create_app
from leukodetect.serving.server import default_allowed_hosts

try:  # Starlette 1.x's TestClient uses httpx2 (httpx's successor); older releases use httpx
    import httpx2 as httpx
except ImportError:
    import httpx


def white_png(side: int) -> bytes:
    """A white side x side RGB PNG, encoded row by row (the image itself is never in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, deflate = b"\x00" + b"\xff" * (3 * side), zlib.compressobj(6)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bytes(size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 150, 160)).save(buf, format="PNG")
    return buf.getvalue()


class Broken:
    def analyze(self, image):
        raise RuntimeError("detector bug")


# ---- pixels: budgeted from the headers, decoded one at a time, cells downscaled on arrival ----


def test_eight_pixel_heavy_pngs_are_refused_from_their_headers_without_decoding(classifier, monkeypatch):
    png = white_png(7700)  # 59.3 megapixels, 178 MB decoded, about 200 KB on the wire
    assert len(png) < 300_000
    decoded = []
    monkeypatch.setattr(app_module, "open_rgb", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    client = TestClient(create_app(classifier))
    response = client.post("/v1/classify", files=[("files", (f"white_{i}.png", png, "image/png")) for i in range(8)])
    assert response.status_code == 413 and decoded == []
    error = response.json()["error"]
    assert "474,320,000 pixels" in error and "'white_0.png', is 7700x7700" in error and "100,000,000" in error
    assert error.count(". ") == 0 and error.endswith(".")  # one sentence


def test_request_pixel_budget_is_configurable_and_counts_every_file(classifier):
    client = TestClient(create_app(classifier, max_request_pixels=10_000, detector=Broken()))
    small = [("files", (f"cell_{i}.png", png_bytes(), "image/png")) for i in range(3)]
    assert client.post("/v1/classify", files=small).status_code == 200  # 3 x 576 pixels
    response = client.post("/v1/classify", files=[*small, ("files", ("big.png", png_bytes((100, 100)), "image/png"))])
    assert response.status_code == 413 and "'big.png', is 100x100" in response.json()["error"]
    alone = client.post("/v1/analyze", files={"file": ("big.png", png_bytes((100, 101)), "image/png")})  # before the detector
    assert alone.status_code == 413 and alone.json()["error"] == (
        "Image 'big.png' is 100x101 = 10,100 pixels, more than the limit of 10,000 per request; downscale or tile it.")
    assert client.get("/v1/model").json()["limits"]["max_request_pixels"] == 10_000


class Slow(ImageClassifier):
    """A classifier whose forward pass takes a while, so that requests overlap."""

    def __init__(self, inner):
        self.inner, self.preset, self.threshold, self.class_names = inner, inner.preset, inner.threshold, inner.class_names

    def outputs(self, batch):
        threading.Event().wait(0.3)
        return self.inner.outputs(batch)


def test_pixels_in_flight_are_bounded_across_requests(classifier):
    app = create_app(Slow(classifier), max_request_pixels=1000, max_pending_pixels=1000)
    body = [("files", ("cell.png", png_bytes(), "image/png"))]  # 576 pixels: two do not fit in 1000

    async def two():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/v1/classify", files=body) for _ in range(2)))

    responses = asyncio.run(two())
    assert sorted(r.status_code for r in responses) == [200, 503]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "5" and "576 pixels are waiting" in busy.json()["error"]
    # Once answered, the pixels are released: a lone request is admitted again.
    assert TestClient(app).post("/v1/classify", files=body).status_code == 200
    app.state.worker.close()


def test_a_large_cell_image_is_downscaled_on_arrival_and_memory_handed_back(classifier, monkeypatch):
    released = []
    monkeypatch.setattr(app_module, "_release_freed_memory", lambda: released.append(1))
    client = TestClient(create_app(classifier))
    small = client.post("/v1/classify", files=[("files", ("cell.png", png_bytes(), "image/png"))])
    assert small.status_code == 200 and small.json()["results"][0]["notes"] == [] and released == []
    big = client.post("/v1/classify", files=[("files", ("photo.png", png_bytes((3000, 2000)), "image/png"))])
    assert big.status_code == 200, big.text
    assert big.json()["results"][0]["notes"] == [
        "photo.png was downscaled on arrival from 3000x2000 to 512x341 pixels, still more than the model uses."]
    assert released == [1]  # the 6-megapixel decode's memory went back to the system


# ---- Host and Origin ----


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier)) as c:
        yield c


def cell_upload():
    return [("files", ("cell.png", png_bytes(), "image/png"))]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", ""])
def test_a_foreign_host_is_refused_in_one_sentence(client, host):
    response = client.get("/v1/model", headers={"host": host})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("This service does not answer to the host name") and "--allowed-host" in error
    assert response.headers["x-frame-options"] == "DENY"
    assert client.post("/v1/classify", files=cell_upload(), headers={"host": host}).status_code == 400


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "testserver", "TestServer"])
def test_loopback_names_and_the_address_reached_are_answered(client, host):
    assert client.get("/health", headers={"host": host}).status_code == 200


def test_allowed_hosts_replace_the_defaults(classifier):
    client = TestClient(create_app(classifier, allowed_hosts=["lab.example", "*.hospital.org"]))
    assert client.get("/health").status_code == 400  # testserver is not in the list
    assert client.get("/health", headers={"host": "lab.example:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "ward.hospital.org"}).status_code == 200
    assert client.get("/health", headers={"host": "hospital.org.attacker.example"}).status_code == 400
    anyone = TestClient(create_app(classifier, allowed_hosts=["*"]))
    assert anyone.get("/health", headers={"host": "any.name"}).status_code == 200
    # A wildcard Host never lets a foreign page upload.
    assert anyone.post("/v1/classify", files=cell_upload(), headers={"origin": "http://evil.example"}).status_code == 403


def test_cross_origin_uploads_are_refused_and_same_origin_ones_served(client):
    for origin in ("http://evil.example", "https://evil.example:8443", "null"):
        response = client.post("/v1/classify", files=cell_upload(), headers={"origin": origin})
        assert response.status_code == 403, origin
        error = response.json()["error"]
        assert error.startswith(f"Cross-origin request from {origin} refused") and error.count(". ") == 0
    assert client.post("/v1/analyze", files={"file": ("s.png", png_bytes(), "image/png")},
                       headers={"origin": "http://evil.example"}).status_code == 403
    # The service's own page, a loopback page, and clients without an Origin (curl, scripts) are served.
    for headers in ({"origin": "http://testserver"}, {"origin": "http://127.0.0.1:8000"}, {}):
        assert client.post("/v1/classify", files=cell_upload(), headers=headers).status_code == 200, headers
    # Reads are not uploads: the browser keeps a foreign page from reading the answer anyway.
    assert client.get("/v1/model", headers={"origin": "http://evil.example"}).status_code == 200


def test_default_allowed_hosts_follow_the_bound_address():
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    assert default_allowed_hosts("192.168.1.20") == ["192.168.1.20", "localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("0.0.0.0") == ["*"] and default_allowed_hosts("::") == ["*"]
    assert default_allowed_hosts("0.0.0.0", ["Lab.example"]) == ["localhost", "127.0.0.1", "::1", "lab.example"]


# ---- security headers on every answer ----


def test_security_headers_on_every_answer(classifier):
    client = TestClient(create_app(classifier, max_bytes=2000, detector=Broken()), raise_server_exceptions=False)
    answers = {
        "page": client.get("/"),
        "static": client.get("/static/app.js"),
        "model": client.get("/v1/model"),
        "not found": client.get("/nothing-here"),
        "bad upload": client.post("/v1/classify", files=[("files", ("x.png", b"junk", "image/png"))]),
        "too large": client.post("/v1/classify", content=b"x", headers={"content-length": str(10**9)}),
        "internal error": client.post("/v1/analyze", files={"file": ("s.png", png_bytes((40, 40)), "image/png")}),
        "foreign host": client.get("/", headers={"host": "evil.example"}),
    }
    assert [r.status_code for r in answers.values()] == [200, 200, 200, 404, 422, 413, 500, 400]
    for name, response in answers.items():
        csp = response.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp, name
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["x-frame-options"] == "DENY" and response.headers["referrer-policy"] == "no-referrer", name


def test_docs_page_allows_only_its_own_inline_script(client):
    pytest.importorskip("swagger_ui")
    response = client.get("/docs")
    csp = response.headers["content-security-policy"]
    assert response.status_code == 200 and "script-src 'self' 'sha256-" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp
