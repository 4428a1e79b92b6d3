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

Memory follows decoded pixels, not upload bytes (a white 7700x7700 PNG is 192 KB and 178 MB decoded),
so pixels are budgeted from the image headers before anything is decoded: one request may hold at
most ``max_request_pixels`` (413 beyond), and the requests admitted and not yet answered at most
``max_pending_pixels`` together (503 beyond, retry later). The worker decodes one image at a time,
and a single-cell image is downscaled to :data:`CELL_MAX_SIDE` pixels a side as soon as it is decoded,
so what a batch holds is small whatever was uploaded. ``benchmarks/memory_service.py`` measures it.

The service answers only to its own host names (``allowed_hosts``; by default the loopback names and
the address the request reached, which keeps a DNS-rebinding page out), refuses uploads whose
``Origin`` is another site (403), and sends security headers with every answer (:class:`Guard`).

All model work (decoding, classifying, analyzing: :class:`ModelWork`) runs in one worker thread
(:mod:`leukodetect.serving.worker`); classify requests that wait for it are answered together by one
forward pass. The routes are registered per area (cells, smears, service), the tags of ``/docs``.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import io
import re
import warnings
from collections import deque
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leukodetect import __version__
from leukodetect.detection.pipeline import check_smear_size
from leukodetect.errors import LeukoError
from leukodetect.reporting.gradcam import gradcam, overlay
from leukodetect.runtime.base import ImageClassifier
from leukodetect.runtime.guard import REVIEW, UNLIKE_TRAINING
from leukodetect.runtime.images import DEFAULT_MAX_PIXELS, open_rgb
from leukodetect.serving.worker import Busy, InferenceWorker

DEFAULT_MAX_BYTES = 25 * 2**20
#: Most pixels (width x height, read from the headers) of all the images of one request: 100 single
#: cells of 1000x1000, or one whole smear up to the 60-megapixel image limit. Decoded, a pixel is 3 bytes.
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
#: Most pixels of all the requests admitted and not yet answered. Classify requests that wait together
#: are decoded together for one batched forward pass, so this bounds what such a batch holds
#: (at most 3 bytes a pixel, less after downscaling); a request that would pass it gets 503.
DEFAULT_MAX_PENDING_PIXELS = 150_000_000
#: A single-cell image larger than this a side (or twice the model's input, if larger) is downscaled,
#: aspect kept, right after decoding: the model sees a few hundred pixels a side at most, and the
#: cell images of the data sets used are 360-450 pixels a side, so they are never touched.
CELL_MAX_SIDE = 512
#: Host names the service always answers to (with the address the request reached, unless
#: ``allowed_hosts`` says otherwise).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Headers sent with every answer. The page and /docs load scripts and styles from this service only,
#: show images from it or from data: URLs (results arrive as base64 PNGs), and may not be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: Shown on the page and in every answer unless the checkpoint's model card says otherwise.
INTENDED_USE = "Research use only, not for diagnosis."
STATIC_DIR = Path(__file__).parent / "static"
_BATCH = 16  # images per forward pass: bounds memory whatever the number of files
#: After a worker turn that decoded more pixels than this, freed memory is handed back to the system.
_TRIM_AFTER_PIXELS = 4_000_000


class Detector(Protocol):
    """What ``/v1/analyze`` needs from the whole-smear detection module.

    ``analyze`` takes a decoded 8-bit RGB smear photograph and returns a dict such as
    ``{"verdict": ..., "counts": {...}, "cells": [{"box": [x0, y0, x1, y1], "label": ..., "prob_blast": ...,
    "crop": <PIL image>}, ...], "overlay": <PIL image>}``. Any PIL image in it, at any depth, is sent
    as a base64 PNG under the key ``<key>_png``; numpy values become plain numbers and lists.

    A detector may declare ``min_side``, the smallest width or height it analyses: a smaller upload
    is then refused with 422 and a sentence naming the file, before the detector sees it.
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
    ood_score: float | None = Field(None, description="The out-of-distribution guard's score (models with a guard); above the "
                                    "model's guard threshold the label is 'review'.")
    reason: str | None = Field(None, description="Why the label is 'review': the image is unlike the images the model was trained on.")


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


_ERRORS = {code: {"model": ErrorBody} for code in (400, 403, 413, 422, 503)}


@dataclass(frozen=True)
class Upload:
    """One uploaded file, in memory."""

    name: str  # shown in answers and errors
    data: bytes

    def header_size(self) -> tuple[int, int] | None:
        """(width, height) from the image's header, without decoding it; None if Pillow cannot read
        the header (``open_rgb`` then says why, naming the file, or decodes it within ``max_pixels``)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(self.data)) as image:
                    return image.size
        except Exception:  # noqa: BLE001  # not an image, or one Pillow refuses outright: decoding says which, naming the file
            return None


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
        input_size = getattr(getattr(classifier, "preset", None), "image_size", 0)
        self.cell_side = max(CELL_MAX_SIDE, 2 * int(input_size))
        self.waiting: deque[_Waiting] = deque()  # appended by the event loop, emptied by the worker thread
        self.decoded_pixels = 0  # since memory was last handed back (worker thread only)

    def turn(self, fn, *args):
        """One turn of the worker: ``fn(*args)``, then, if it decoded large images, the memory they
        freed goes back to the system (glibc keeps freed blocks of a few MB for reuse, and a service
        that decoded eight 7700x7700 PNGs stayed 2 GB larger without this)."""
        try:
            return fn(*args)
        finally:
            if self.decoded_pixels > _TRIM_AFTER_PIXELS:
                self.decoded_pixels = 0
                _release_freed_memory()

    def classify(self, uploads: Sequence[Upload], with_gradcam: bool) -> list[dict]:
        """One request's result rows, in upload order; a bad upload fails the whole request."""
        decoded = self._decode_all(uploads)
        return self._rows(uploads, decoded, *self._outputs([image for image, _ in decoded]), with_gradcam)

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
            probs, scores = self._outputs([image for _, decoded in ready for image, _ in decoded])
        except Exception as exc:
            for job, _ in ready:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        start = 0
        for job, decoded in ready:
            rows = self._rows(job.uploads, decoded, probs[start:start + len(decoded)],
                              None if scores is None else scores[start:start + len(decoded)], False)
            start += len(decoded)
            job.loop.call_soon_threadsafe(_settle, job.future, rows, None)

    def analyze(self, upload: Upload) -> dict:
        """The detector's analysis of one smear, as JSON, with the file name and the intended use."""
        image, notes = self._decode(upload)
        min_side = getattr(self.detector, "min_side", 0)
        if min_side:
            check_smear_size(*image.size, f"Image '{upload.name}'", min_side=min_side)
        result = _jsonable(self.detector.analyze(image))
        return {"filename": upload.name, "notes": notes, "intended_use": self.intended_use, **result}

    def _decode_all(self, uploads: Sequence[Upload]) -> list[tuple[Image.Image, list[str]]]:
        """Decode single-cell uploads one at a time, each downscaled before the next is decoded."""
        return [self._decode_cell(u) for u in uploads]

    def _decode(self, upload: Upload) -> tuple[Image.Image, list[str]]:
        image, notes = _decode(upload, self.max_pixels)
        self.decoded_pixels += image.width * image.height
        return image, notes

    def _decode_cell(self, upload: Upload) -> tuple[Image.Image, list[str]]:
        image, notes = self._decode(upload)
        if max(image.size) > self.cell_side:
            width, height = image.size
            image.thumbnail((self.cell_side, self.cell_side))  # in place: the full-size pixels are freed here
            notes.append(f"{upload.name} was downscaled on arrival from {width}x{height} to {image.width}x{image.height} "
                         f"pixels, still more than the model uses.")
        shown, _ = self.classifier.view(image, name=upload.name, notes=notes)  # a model with a scale: its window of red-cell diameters
        return shown, notes

    def _outputs(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.classifier.image_outputs(images, batch_size=_BATCH)

    def _rows(self, uploads, decoded, probs, scores, with_gradcam: bool) -> list[dict]:
        classifier = self.classifier
        rows = []
        for k, (upload, (image, notes), prob) in enumerate(zip(uploads, decoded, probs)):
            score = None if scores is None else float(scores[k])
            label = classifier.call(float(prob), score)
            rows.append({"filename": upload.name, "label": label, "prob_blast": float(prob),
                         "threshold": float(classifier.threshold), "notes": notes,
                         "gradcam_png": _gradcam_png(classifier, image) if with_gradcam else None,
                         "ood_score": score, "reason": UNLIKE_TRAINING if label == REVIEW else None})
        return rows


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
    pending_pixels: int = 0  # of the requests admitted and not yet answered; only touched on the event loop

    @asynccontextmanager
    async def admitted(self, uploads: Sequence[Upload]):
        """Hold a request's pixels (from the headers) in the budget while it is served.

        More than ``max_request_pixels`` in one request is 413; a request that would take the
        requests in flight past ``max_pending_pixels`` is 503 (one request alone is always admitted).
        """
        sizes = [(upload, size) for upload in uploads if (size := upload.header_size()) is not None]
        total = sum(w * h for _, (w, h) in sizes)
        limit = self.limits["max_request_pixels"]
        if total > limit:
            largest, (w, h) = max(sizes, key=lambda item: item[1][0] * item[1][1])
            if len(uploads) == 1:
                raise HTTPException(413, f"Image '{largest.name}' is {w}x{h} = {total:,} pixels, more than the limit of {limit:,} "
                                         f"per request; downscale or tile it.")
            raise HTTPException(413, f"The images of this request hold {total:,} pixels together (the largest, '{largest.name}', "
                                     f"is {w}x{h}), more than the limit of {limit:,} per request; send fewer or smaller images "
                                     f"per request (a single cell needs a few hundred pixels a side).")
        if self.pending_pixels and self.pending_pixels + total > self.limits["max_pending_pixels"]:
            raise HTTPException(503, f"The service is busy (images of {self.pending_pixels:,} pixels are waiting for the model); "
                                     f"retry in a few seconds.", headers={"Retry-After": "5"})
        self.pending_pixels += total
        try:
            yield
        finally:
            self.pending_pixels -= total

    async def run(self, fn, *args):
        """``fn(*args)`` in the worker thread; a full queue is 503, a bad upload 422 naming the file."""
        try:
            return await self.worker.run(self.work.turn, fn, *args)
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
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    max_pending_pixels: int = DEFAULT_MAX_PENDING_PIXELS,
    allowed_hosts: Sequence[str] | None = None,
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
        max_request_pixels: most pixels (from the headers, before decoding) of all the images of one
            request; more gets 413.
        max_pending_pixels: most pixels of the requests admitted and not yet answered; a request that
            would pass it gets 503 (a request alone is always admitted).
        allowed_hosts: the host names (``Host`` header, port aside) the service answers to: names,
            ``*.example.org`` for subdomains, or ``*`` for any. None: the loopback names
            (:data:`LOOPBACK_HOSTS`) and the address the request reached. Uploads whose ``Origin``
            is neither this service nor an allowed host get 403.
    """
    meta = _metadata(classifier)
    card = meta.get("model_card") if isinstance(meta.get("model_card"), dict) else None
    intended_use = str((card or {}).get("intended_use") or INTENDED_USE)
    service = _Service(
        classifier=classifier, detector=detector,
        worker=InferenceWorker(torch_threads=torch_threads, max_pending=max_pending),
        work=ModelWork(classifier, detector=detector, max_pixels=max_pixels, intended_use=intended_use),
        meta=meta, card=card, intended_use=intended_use, can_gradcam=hasattr(classifier, "model") and "arch" in meta,
        limits={"max_bytes": max_bytes, "max_pixels": max_pixels, "max_files": max_files,
                "max_request_pixels": max_request_pixels, "max_pending_pixels": max_pending_pixels},
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
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)  # outermost: a foreign Host is refused before the body is read
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
        async with service.admitted(uploads):
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
        async with service.admitted([upload]):
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


# ---- who may ask: Host, Origin, and the security headers ----


class Guard:
    """Answer only requests addressed to this service's own host names, refuse uploads from other
    sites, and send :data:`SECURITY_HEADERS` with every answer.

    Host (400 otherwise): a DNS-rebinding page (``attacker.example`` made to resolve to 127.0.0.1)
    reaches a loopback service with its own name in the Host header, which the browser sets and the
    page cannot change. ``allowed_hosts`` None allows the loopback names and the address the request
    reached (an IP literal on a real socket, ``testserver`` under Starlette's TestClient).

    Origin (403 otherwise): a browser names the page behind every cross-site POST; one from a page of
    another site (or an opaque ``null`` origin) is refused unless that site's host is allowed. Clients
    that are not browsers send no Origin and are not affected. A wildcard ``*`` allows any Host but
    never a foreign Origin.

    Starlette's TrustedHostMiddleware checks the Host alone and answers in plain text; this answers
    in the service's ``{"error": sentence}`` form and checks the Origin too.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else tuple(h.strip().lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        origin = headers.get("origin")
        if not self._allows(_hostname(host_header), scope):
            shown = _shown(_hostname(host_header))
            error = (400, (f"This service does not answer to the host name '{shown}'; open it at the address 'leukodetect serve' "
                           f"printed, or start it with --allowed-host {shown or 'NAME'} to allow that name."))
        elif scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None and not self._origin_ok(origin, host_header, scope):
            error = (403, (f"Cross-origin request from {_shown(origin)} refused: this service takes uploads only from its own page "
                           f"or from clients that send no Origin header; use the page at / or start 'leukodetect serve' with "
                           f"--allowed-host for that site's host name."))
        else:
            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    response_headers = MutableHeaders(scope=message)
                    for key, value in SECURITY_HEADERS.items():
                        response_headers.setdefault(key, value)
                await send(message)

            await self.app(scope, receive, send_with_headers)
            return
        await JSONResponse({"error": error[1]}, status_code=error[0], headers=SECURITY_HEADERS)(scope, receive, send)

    def _allows(self, host: str, scope: Scope, *, wildcard: bool = True) -> bool:
        if not host:
            return False
        if self.allowed is None:
            server = scope.get("server")
            return host in LOOPBACK_HOSTS or (server is not None and host == str(server[0]).lower())
        return any((pattern == "*" and wildcard) or host == pattern
                   or (pattern.startswith("*.") and host.endswith(pattern[1:])) for pattern in self.allowed)

    def _origin_ok(self, origin: str, host_header: str, scope: Scope) -> bool:
        parts = urlsplit(origin.strip().lower())
        if parts.netloc and parts.netloc == host_header.strip().lower():
            return True  # this service's own page
        return self._allows(parts.hostname or "", scope, wildcard=False)


def _hostname(host_header: str) -> str:
    """The host name of a Host header, lower case, without the port: ``[::1]:8000`` is ``::1``."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _shown(value: str, limit: int = 100) -> str:
    """A client-sent header value fit to quote in an error sentence."""
    value = re.sub(r"[\x00-\x1f\x7f]", "", value)
    return value if len(value) <= limit else value[:limit] + "..."


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
        # Starlette answers these outside every middleware, Guard included: the headers are set here.
        return JSONResponse({"error": f"Internal error ({type(exc).__name__}); the service log has the details."}, status_code=500,
                            headers=SECURITY_HEADERS)


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
        page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
        # The page starts Swagger UI from one inline script: allowed by its hash, and only here.
        inline = re.findall(rb"<script>(.*?)</script>", page.body, re.DOTALL)
        hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(code).digest()).decode()}'" for code in inline)
        page.headers["Content-Security-Policy"] = SECURITY_HEADERS["Content-Security-Policy"].replace(
            "script-src 'self'", f"script-src 'self' {hashes}")
        return page


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


def _release_freed_memory() -> None:
    """Return freed heap memory to the system where the C library can (glibc's ``malloc_trim``)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    try:  # the C library already loaded into this process
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows): nothing to hand back this way
        return None


_MALLOC_TRIM = _find_malloc_trim()


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
