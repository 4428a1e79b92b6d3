"""Load the model once and run the lab service with uvicorn (``leukodetect serve``)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import uvicorn

from leukodetect.detection.pipeline import check_declared_scale, load_detector
from leukodetect.runtime.classifier import Classifier
from leukodetect.serving.app import LOOPBACK_HOSTS, create_app
from leukodetect.serving.worker import available_cores
from leukodetect.weights import resolve_checkpoint as resolve
from leukodetect.weights import resolve_detector

LOOPBACK = "127.0.0.1"
#: Bind addresses that listen on every interface: the service is then reached by names we cannot know.
ALL_INTERFACES = ("0.0.0.0", "::")


def default_allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The host names the service answers to when bound to ``host``: that host, the loopback names
    and the ``extra`` names (``--allowed-host``). Bound to every interface (``0.0.0.0`` or ``::``)
    without extra names, any name: the machine's names are not known here."""
    if host in ALL_INTERFACES and not extra:
        return ["*"]
    bound = [] if host in ALL_INTERFACES else [host.lower()]
    return list(dict.fromkeys([*bound, *LOOPBACK_HOSTS, *(name.strip().lower() for name in extra)]))


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    """The checkpoint to serve: the one given, else the model shipped with leukodetect."""

    return resolve(checkpoint)


def build_app(
    checkpoint: Path | None,
    *,
    detector_checkpoint: Path | None = None,
    locator: Path | None = None,
    rbc_diameter: float | None = None,
    torch_threads: int | None = None,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    **limits,
):
    """Load the checkpoint (and detector) once and build the app around them.

    ``torch_threads`` (default: every available core) is both PyTorch's thread count in the inference
    thread and ONNX Runtime's intra-op thread count; ``backend`` is
    :class:`~leukodetect.runtime.classifier.Classifier`'s (auto: ONNX Runtime on CPU). ``limits`` go
    to :func:`~leukodetect.serving.app.create_app` (``allowed_hosts`` among them). ``rbc_diameter``: the
    laboratory's declared red-cell diameter in its photographs' pixels, for ``/v1/analyze`` (learned locator).
    """

    check_declared_scale(rbc_diameter, locator)  # before anything is loaded
    threads = torch_threads or available_cores()
    options = {"backend": backend, "threads": threads, "log": log}
    classifier = Classifier.from_checkpoint(resolve_checkpoint(checkpoint), **options)
    detector_path = resolve_detector(detector_checkpoint, "learned" if locator is not None else "colour")
    detector = load_detector(detector_path, locator=locator, rbc_diameter=rbc_diameter, **options) if detector_path is not None else None
    return create_app(classifier, detector=detector, torch_threads=threads, **limits)


def serve(
    checkpoint: Path | None,
    *,
    detector_checkpoint: Path | None = None,
    locator: Path | None = None,
    rbc_diameter: float | None = None,
    host: str = LOOPBACK,
    port: int = 8000,
    threads: int | None = None,
    backend: str = "auto",
    allowed_hosts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Serve until interrupted. Binds to loopback unless another ``host`` is named.

    ``allowed_hosts``: host names to answer to (``Host`` header; ``*.example.org``, or ``*`` for any)
    besides ``host`` and the loopback names (:func:`default_allowed_hosts`). Uploads from a page of
    any other site get 403.

    ``threads`` (default: every available core) is the thread count of the one inference thread's
    PyTorch and ONNX Runtime. Use 1 where other jobs keep the cores busy: PyTorch's threads wait for
    each other at every layer, and a 2-thread forward pass of the tiny model went from 1.7 ms to
    130 ms on 2 cores shared with a training run (measured 2026-11-25). ``backend``: see
    :class:`~leukodetect.runtime.classifier.Classifier` (auto: ONNX Runtime on CPU; ``GET /v1/model`` says which).
    """

    allowed = default_allowed_hosts(host, allowed_hosts or ())
    app = build_app(checkpoint, detector_checkpoint=detector_checkpoint, locator=locator, rbc_diameter=rbc_diameter,
                    torch_threads=threads, backend=backend, allowed_hosts=allowed, log=log)
    if host not in (LOOPBACK, "localhost", "::1"):
        log(f"Listening on {host}: anyone who can reach this machine can upload images; the service has no authentication.")
    if allowed != ["*"]:
        log(f"Answering to the host names {', '.join(allowed)} (more with --allowed-host).")
    log(f"Open http://{LOOPBACK if host in ALL_INTERFACES else host}:{port}/ (API description at /docs).")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


@contextlib.contextmanager
def running(app, *, host: str = LOOPBACK, port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL (a free port by default).

    For the browser test and the load benchmark: the socket is bound before the thread starts, so
    the port is known and no other process can take it in between.
    """

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="leukodetect-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
