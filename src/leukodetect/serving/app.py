"""The HTTP API and web page of the lab service, over one classifier loaded once.

``create_app`` takes a loaded classifier (and, later, a whole-smear detector) and returns a FastAPI
app: ``POST /v1/classify`` (single-cell images), ``POST /v1/analyze`` (a whole smear; 501 until a
detector is plugged in), ``GET /v1/model``, ``GET /health``, the page at ``/`` and the OpenAPI
description at ``/openapi.json`` and ``/docs`` (Swagger UI served from the installed
``swagger-ui-py`` package, never from a CDN, so the page works without internet).

Uploads are bounded before they are parsed (:class:`BodyLimit`: declared Content-Length, then bytes
counted as they arrive) and decoded with :func:`leukodetect.runtime.images.open_rgb`, which checks the
content, not the extension, and refuses images over ``max_pixels`` from their header. They live in
memory only (decoded from their bytes, never written to disk); nothing is kept after the answer.

All model work (decoding, classifying, analyzing: :class:`ModelWork`) runs in one worker thread
(:mod:`leukodetect.serving.worker`); classify requests that wait for it are answered together by one
forward pass. The routes are registered per area (cells, smears, service), the tags of ``/docs``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections import deque
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leukodetect import __version__
from leukodetect.errors import LeukoError
from leukodetect.reporting.gradcam import gradcam, overlay
from leukodetect.runtime.base import ImageClassifier
from leukodetect.runtime.images import DEFAULT_MAX_PIXELS, open_rgb
from leukodetect.serving.worker import Busy, InferenceWorker

DEFAULT_MAX_BYTES = 25 * 2**20
#: Shown on the page and in every answer unless the checkpoint's model card says otherwise.
INTENDED_USE = "Research use only, not for diagnosis."
STATIC_DIR = Path(__file__).parent / "static"
_BATCH = 16  # images per forward pass: bounds memory whatever the number of files


class Detector(Protocol):
    """What ``/v1/analyze`` needs from the whole-smear detection module.

    ``analyze`` takes a decoded 8-bit RGB smear photograph and returns a dict such as
    ``{"verdict": ..., "counts": {...}, "cells": [{"box": [x0, y0, x1, y1], "label": ..., "prob_blast": ...,
    "crop": <PIL image>}, ...], "overlay": <PIL image>}``. Any PIL image in it, at any depth, is sent
    as a base64 PNG under the key ``<key>_png``; numpy values become plain numbers and lists.
    """

    def analyze(self, image: Image.Image) -> dict: ...


# ---- response models: they document the API in /openapi.json (and drive the fuzz test) ----


class CellResult(BaseModel):
    filename: str = Field(description="The uploaded file's name (without folders).")
    label: str = Field(description="The call: the positive class (blast) when prob_blast >= threshold.")
    prob_blast: float = Field(description="Blast probability, temperature applied.")
    threshold: float = Field(description="The checkpoint's decision threshold used for the call.")
    notes: list[str] = Field(default_factory=list, description="Conversions made while reading (e.g. RGBA to RGB).")
    gradcam_png: str | None = Field(None, description="Grad-CAM overlay as a base64 PNG (only with ?gradcam=true).")


class ClassifyResponse(BaseModel):
    results: list[CellResult]
    intended_use: str


class ModelInfo(BaseModel):
    arch: str
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    threshold: float
    temperature: float
    model_card: dict[str, Any] | None = Field(description="The checkpoint's stored model card (metrics, data), if any.")
    intended_use: str
    leukodetect_version: str
    backend: str = Field(description="What computes prob_blast: onnx (ONNX Runtime on the CPU), torch (PyTorch) or torchscript.")
    gradcam: bool = Field(description="Whether /v1/classify can return Grad-CAM overlays (PyTorch checkpoints only).")
    smear_analysis: bool = Field(description="Whether /v1/analyze is available (a detector is loaded).")
    limits: dict[str, int]


class Health(BaseModel):
    status: str
    pending: int = Field(description="Requests waiting for or using the model.")


class ErrorBody(BaseModel):
    error: str = Field(description="One sentence: what went wrong and what to do.")


_ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 422, 503)}


@dataclass(frozen=True)
class Upload:
    """One uploaded file, in memory."""

    name: str  # shown in answers and errors
    data: bytes


@dataclass(eq=False)
class _Waiting:
    """A classify request waiting for the model; its future is completed on its own event loop."""

    uploads: Sequence[Upload]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class ModelWork:
    """Everything the service asks of the models, run in the one worker thread: decode uploads,
    classify them, analyze a smear.

    Classify requests (without Grad-CAM) that arrive while the model is busy wait in ``waiting``; the
    next turn of the worker (:meth:`classify_waiting`) takes all of them as one batch, so under load
    one forward pass serves many clients instead of one pass per request.
    """

    def __init__(self, classifier: ImageClassifier, *, detector: Detector | None, max_pixels: int, intended_use: str) -> None:
        self.classifier = classifier
        self.detector = detector
        self.max_pixels = max_pixels
        self.intended_use = intended_use
        self.waiting: deque[_Waiting] = deque()  # appended by the event loop, emptied by the worker thread

    def classify(self, uploads: Sequence[Upload], with_gradcam: bool) -> list[dict]:
        """One request's result rows, in upload order; a bad upload fails the whole request."""
        decoded = self._decode_all(uploads)
        return self._rows(uploads, decoded, self._probabilities([image for image, _ in decoded]), with_gradcam)

    def classify_waiting(self) -> None:
        """Answer every waiting request with one batched forward pass; a bad upload fails its own request only."""
        jobs = []
        while True:
            try:
                jobs.append(self.waiting.popleft())
            except IndexError:
                break
        ready = []  # (job, decoded) of the requests whose files all decoded
        for job in jobs:
            try:
                ready.append((job, self._decode_all(job.uploads)))
            except Exception as exc:  # a bad upload fails its own request only
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
        try:
            probs = self._probabilities([image for _, decoded in ready for image, _ in decoded])
        except Exception as exc:
            for job, _ in ready:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        start = 0
        for job, decoded in ready:
            rows = self._rows(job.uploads, decoded, probs[start:start + len(decoded)], False)
            start += len(decoded)
            job.loop.call_soon_threadsafe(_settle, job.future, rows, None)

    def analyze(self, upload: Upload) -> dict:
        """The detector's analysis of one smear, as JSON, with the file name and the intended use."""
        image, notes = _decode(upload, self.max_pixels)
        result = _jsonable(self.detector.analyze(image))
        return {"filename": upload.name, "notes": notes, "intended_use": self.intended_use, **result}

    def _decode_all(self, uploads: Sequence[Upload]) -> list[tuple[Image.Image, list[str]]]:
        return [_decode(u, self.max_pixels) for u in uploads]

    def _probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.classifier.image_probabilities(images, batch_size=_BATCH)

    def _rows(self, uploads, decoded, probs, with_gradcam: bool) -> list[dict]:
        classifier = self.classifier
        return [
            {"filename": upload.name, "label": classifier.call(float(prob)), "prob_blast": float(prob),
             "threshold": float(classifier.threshold), "notes": notes,
             "gradcam_png": _gradcam_png(classifier, image) if with_gradcam else None}
            for upload, (image, notes), prob in zip(uploads, decoded, probs)
        ]


@dataclass
class _Service:
    """What the routes share: the loaded models and what they say about themselves, the limits, and
    the worker thread that runs :class:`ModelWork`."""

    classifier: ImageClassifier
    detector: Detector | None
    worker: InferenceWorker
    work: ModelWork
    meta: dict
    card: dict | None
    intended_use: str
    can_gradcam: bool
    limits: dict[str, int]

    async def run(self, fn, *args):
        """``fn(*args)`` in the worker thread; a full queue is 503, a bad upload 422 naming the file."""
        try:
            return await self.worker.run(fn, *args)
        except Busy as exc:
            raise HTTPException(503, f"The service is busy ({exc}); retry in a few seconds.",
                                headers={"Retry-After": "5"}) from None
        except LeukoError as exc:  # a bad upload: one sentence naming the file
            raise HTTPException(422, str(exc)) from None

    async def classify_batched(self, uploads: list[Upload]) -> list[dict]:
        """One request's result rows, computed together with those of every other waiting request."""
        loop = asyncio.get_running_loop()
        job = _Waiting(uploads, loop.create_future(), loop)
        self.work.waiting.append(job)
        try:
            await self.run(self.work.classify_waiting)  # may find this request already answered by an earlier turn
        except HTTPException:  # busy: the request was never queued for the model
            if job in self.work.waiting:
                self.work.waiting.remove(job)
            raise
        try:
            return await job.future
        except LeukoError as exc:
            raise HTTPException(422, str(exc)) from None


def create_app(
    classifier: ImageClassifier,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_files: int = 100,
    detector: Detector | None = None,
    torch_threads: int | None = None,
    max_pending: int = 64,
) -> FastAPI:
    """Build the service around an already loaded classifier (loaded once, never per request).

    Args:
        classifier: a :class:`~leukodetect.runtime.classifier.Classifier` (Grad-CAM available) or an exported
            model (:class:`~leukodetect.runtime.export.ExportedClassifier`).
        max_bytes: largest request body, all files together; larger ones get 413.
        max_pixels: largest image (width x height), checked from the header before decoding; a larger
            one gets 422 naming the file.
        max_files: most files in one ``/v1/classify`` request.
        detector: the whole-smear detector behind ``/v1/analyze`` (None: that endpoint answers 501).
        torch_threads: PyTorch threads, set once in the inference thread (None: unchanged).
        max_pending: requests that may wait for the model at once; one more gets 503.
    """
    meta = _metadata(classifier)
    card = meta.get("model_card") if isinstance(meta.get("model_card"), dict) else None
    intended_use = str((card or {}).get("intended_use") or INTENDED_USE)
    service = _Service(
        classifier=classifier, detector=detector,
        worker=InferenceWorker(torch_threads=torch_threads, max_pending=max_pending),
        work=ModelWork(classifier, detector=detector, max_pixels=max_pixels, intended_use=intended_use),
        meta=meta, card=card, intended_use=intended_use, can_gradcam=hasattr(classifier, "model") and "arch" in meta,
        limits={"max_bytes": max_bytes, "max_pixels": max_pixels, "max_files": max_files},
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.worker.close()

    app = FastAPI(
        title="leukodetect lab service",
        version=__version__,
        description=f"Blast probability for single-cell blood-smear images. {intended_use}",
        docs_url=None,  # replaced below by a Swagger UI served from the installed package, not a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.worker = service.worker
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    _add_error_handlers(app)
    _add_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_cell_routes(app, service)
    _add_smear_routes(app, service)
    _add_service_routes(app, service)
    return app


# ---- routes, by area (the tags of /docs) ----


def _add_cell_routes(app: FastAPI, service: _Service) -> None:
    max_files = service.limits["max_files"]

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, tags=["cells"])
    async def classify(
        files: list[UploadFile] = File(..., description="One or more single-cell images (PNG, JPEG, TIFF, BMP, WebP)."),
        gradcam: bool = Query(False, description="Also return a Grad-CAM overlay per image (slower)."),
    ) -> dict:
        """Blast probability and call for each uploaded single-cell image.

        The request fails as a whole (4xx naming the file) if any file is not a readable image.
        """
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files were sent, more than the limit of {max_files}; send them in smaller batches.")
        if gradcam and not service.can_gradcam:
            raise HTTPException(400, "Grad-CAM needs a PyTorch checkpoint, and this service runs an exported model; call without gradcam=true.")
        uploads = [Upload(_display_name(f.filename, i), await f.read()) for i, f in enumerate(files)]
        if gradcam:  # Grad-CAM hooks the model per image: these requests are not batched with others
            results = await service.run(service.work.classify, uploads, True)
        else:
            results = await service.classify_batched(uploads)
        return {"results": results, "intended_use": service.intended_use}


def _add_smear_routes(app: FastAPI, service: _Service) -> None:
    @app.post("/v1/analyze", responses={**_ERRORS, 501: {"model": ErrorBody}}, tags=["smears"])
    async def analyze(file: UploadFile = File(..., description="A whole blood-smear photograph.")) -> dict:
        """Whole-smear analysis: cells found, each classified, counts, verdict and an overlay."""
        if service.detector is None:
            raise HTTPException(501, "Whole-smear analysis needs the detection module, which this service was started without: "
                                     "start 'leukodetect serve' with --detector-checkpoint, or classify single-cell crops with /v1/classify.")
        upload = Upload(_display_name(file.filename, 0), await file.read())
        return await service.run(service.work.analyze, upload)


def _add_service_routes(app: FastAPI, service: _Service) -> None:
    classifier, meta = service.classifier, service.meta

    @app.get("/v1/model", response_model=ModelInfo, tags=["service"])
    async def model_info() -> dict:
        """The loaded model: architecture, classes, preprocessing, threshold, temperature, model card."""
        return {
            "arch": str(meta.get("arch", "unknown")),
            "class_names": list(classifier.class_names),
            "image_size": int(classifier.preset.image_size),
            "mean": [float(v) for v in meta.get("mean", [])],
            "std": [float(v) for v in meta.get("std", [])],
            "threshold": float(classifier.threshold),
            "temperature": float(getattr(classifier, "temperature", 1.0)),
            "model_card": service.card,
            "intended_use": service.intended_use,
            "leukodetect_version": __version__,
            "backend": str(getattr(classifier, "backend", "unknown")),
            "gradcam": service.can_gradcam,
            "smear_analysis": service.detector is not None,
            "limits": service.limits,
        }

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> dict:
        return {"status": "ok", "pending": service.worker.pending}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


# ---- request size ----


class UploadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The upload is larger than the limit of {_mib(limit)}; send fewer or smaller images per request.")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) before they fill memory.

    The declared Content-Length is checked before anything is read; the bytes that actually
    arrive are counted too, which catches chunked uploads and lying headers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, error = (413, UploadTooLarge(self.max_bytes).detail) if declared.isdigit() else (400, "The Content-Length header is not a number.")
            await JSONResponse({"error": error}, status_code=status, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge as exc:  # normally answered by the error handler; this is the fallback
            if started:
                raise
            await JSONResponse({"error": exc.detail}, status_code=413)(scope, receive, send)


# ---- errors: always {"error": "one sentence"} ----


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                    for e in exc.errors()]
        first = problems[0] if problems else {"loc": [], "msg": "invalid", "type": ""}
        where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"]) or "request"
        if first["type"] == "missing" and first["loc"][:1] == ["body"]:
            sentence = (f"The request has no multipart field '{where}': send the image(s) as multipart/form-data "
                        f"under the field name '{where}' (see /docs).")
        else:
            sentence = f"Invalid request: {where}: {first['msg'].rstrip('.')} (see /docs)."
        return JSONResponse({"error": sentence, "detail": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"Internal error ({type(exc).__name__}); the service log has the details."}, status_code=500)


# ---- /docs without a CDN ----


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the JavaScript and CSS shipped in the ``swagger-ui-py`` package."""
    try:
        import swagger_ui  # optional: without it the service still answers, with no /docs page
    except ImportError:  # then there is no /docs, only /openapi.json
        return

    assets = Path(swagger_ui.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


# ---- helpers (run in the worker thread where they touch images or the model) ----


def _metadata(classifier: ImageClassifier) -> dict:
    """The checkpoint bundle (PyTorch) or the stored metadata (exported models)."""
    return dict(getattr(classifier, "bundle", None) or getattr(classifier, "meta", None) or {})


def _display_name(filename: str | None, index: int) -> str:
    """The client's file name without folders or control characters, for answers and errors."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:200] or f"file {index + 1}"


def _decode(upload: Upload, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """Decode an upload in memory with ``open_rgb`` (content sniffed, pixels bounded); errors name the upload."""
    notes: list[str] = []
    image = open_rgb(upload.data, name=upload.name, max_pixels=max_pixels, notes=notes)
    return image, notes


def _settle(future, result, exc) -> None:
    """Complete a waiting request's future from the event loop (called via call_soon_threadsafe)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _gradcam_png(classifier, image: Image.Image) -> str:
    return _png_base64(overlay(image, gradcam(classifier, image, target_class=1)))


def _png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jsonable(value: Any) -> Any:
    """A detector's result as JSON: PIL images become base64 PNGs under ``<key>_png``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, Image.Image):
                out[f"{key}_png"] = _png_base64(item)
            else:
                out[str(key)] = _jsonable(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_png_base64(v) if isinstance(v, Image.Image) else _jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n:,} bytes"
