"""Load a checkpoint once and classify images with the preprocessing it carries."""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from leukodetect.errors import LeukoError
from leukodetect.models import get_spec
from leukodetect.runtime.base import ImageClassifier
from leukodetect.runtime.checkpoint import (
    DetectorSettings,
    load_checkpoint,
    model_from_checkpoint,
)
from leukodetect.runtime.device import (
    autocast,
    autocast_dtype,
    channels_last,
    resolve_device,
)
from leukodetect.runtime.export import cached_onnx_classifier
from leukodetect.runtime.guard import Guard, GuardedNetwork
from leukodetect.runtime.preprocess import EvalPreset
from leukodetect.runtime.scale import CanonicalScale

BACKENDS = ("auto", "torch", "onnx")
#: Read by ``backend="auto"`` only: ``torch`` or ``onnx`` there overrides the automatic choice (the
#: test suite sets ``torch``, so that only the tests of the backends pay for ONNX exports).
BACKEND_ENV = "LEUKODETECT_BACKEND"
#: The largest difference in P(blast) between the two backends, enforced by every export's check
#: and by tests/test_inference_backends.py.
BACKEND_ATOL = 1e-4


class Classifier(ImageClassifier):
    """A checkpoint ready for inference: model in eval mode plus its preprocessing and threshold.

    ``probabilities`` runs one of two backends; both compute softmax(logits / temperature)[:, 1]
    from the same weights and agree within ``BACKEND_ATOL`` (1e-4) in P(blast):

    - ``"onnx"``: ONNX Runtime on the CPU, running the checkpoint's ONNX export (exported once per
      checkpoint content and cached, see :func:`leukodetect.runtime.export.cached_onnx_classifier`). The
      fastest path measured on CPU (docs/benchmarks.md).
    - ``"torch"``: the PyTorch module with batch norm folded, channels-last, autocast where the
      device computes reduced precision natively.

    ``"auto"`` (the default) picks ``"onnx"`` on a CPU running float32, when onnxruntime is
    installed, and ``"torch"`` otherwise (GPUs, and CPUs with native bfloat16, where no measurement
    says ONNX Runtime's float32 is faster); ``$LEUKODETECT_BACKEND`` can override that choice. If the
    export or ONNX Runtime fails, auto logs one sentence and uses ``"torch"``; an explicit ``"onnx"``
    raises instead. Whatever the backend, ``model`` is the checkpoint's PyTorch module on ``device``
    (Grad-CAM hooks its layers) and ``inference_model`` its batch-norm-folded copy (calibration).

    Args:
        threads: ONNX Runtime intra-op threads (None: ``torch.get_num_threads()``).
        log: receives the sentences about exports and fallbacks (default: standard error, so that
            ``predict --json`` output stays clean).
    """

    def __init__(
        self,
        bundle: dict,
        *,
        device: str = "auto",
        precision: str = "auto",
        source: str = "checkpoint",
        backend: str = "auto",
        threads: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.channels_last = channels_last(self.device)
        self.model = model_from_checkpoint(bundle, source).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preset = EvalPreset(image_size=bundle["image_size"], mean=tuple(bundle["mean"]), std=tuple(bundle["std"]))
        self.threshold = float(bundle["threshold"])
        self.temperature = float(bundle["temperature"])
        self.class_names = list(bundle["class_names"])
        self.detector = DetectorSettings.of(bundle)
        self.scale = CanonicalScale.from_dict(bundle.get("scale"))
        guard = bundle.get("guard")
        self.guard_threshold = float(guard["threshold"]) if guard else None
        # The network the runtime runs: logits and the guard's score from one pass, sharing ``model``'s weights.
        self.network = GuardedNetwork(self.model, get_spec(bundle["arch"]).head, Guard.from_stats(guard, mean=bundle["mean"], std=bundle["std"]) if guard else None).to(self.device)
        if backend not in BACKENDS:
            raise LeukoError(f"Unknown backend '{backend}': use --backend auto, torch or onnx.")
        requested = (_env_backend() or "auto") if backend == "auto" else backend
        self.backend = auto_backend(self.device, self.amp_dtype) if requested == "auto" else requested
        self._onnx = None
        if self.backend == "onnx":
            self._onnx = self._open_onnx(source, threads, log or _stderr, explicit=requested == "onnx")
            if self._onnx is None:
                self.backend = "torch"

    @classmethod
    def from_checkpoint(cls, path: Path, **kwargs) -> Classifier:
        return cls(load_checkpoint(path), source=str(path), **kwargs)

    def _open_onnx(self, source: str, threads: int | None, log: Callable[[str], None], *, explicit: bool):

        try:
            return cached_onnx_classifier(self.bundle, source=source, threads=threads, log=log)
        except Exception as exc:  # an exporter or runtime limit for this architecture: PyTorch still works
            if explicit:
                if isinstance(exc, LeukoError):
                    raise
                raise LeukoError(f"ONNX Runtime cannot run {source} ({type(exc).__name__}: {exc}): use --backend torch.") from exc
            cause = exc.__cause__ or exc
            reason = str(cause) if isinstance(cause, LeukoError) else f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            log(f"Using PyTorch for {source}: its ONNX Runtime version could not be prepared ({reason}).")
            return None

    @functools.cached_property
    def inference_model(self) -> nn.Module:
        """``network`` with batch norm folded into the convolutions (built on first use): ``x -> (logits, score)``."""
        return fuse_batch_norm(self.network)

    def outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Blast probability (temperature applied) and guard score (None without a guard) for a preprocessed batch."""
        if self._onnx is not None:
            return self._onnx.outputs(batch)
        return self._torch_outputs(batch)

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch on the model's device and in its memory layout: what the network is called on."""
        x = batch.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def _torch_outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        with autocast(self.device, self.amp_dtype):
            logits, score = self.inference_model(self.model_input(batch))
        prob = torch.softmax(logits.float() / self.temperature, dim=1)[:, 1].cpu().numpy()
        return prob, (score.float().cpu().numpy() if self.guard_threshold is not None else None)

    @torch.inference_mode()
    def image_features(self, images, *, batch_size: int = 16) -> np.ndarray:
        """Float32 penultimate-layer features (N, D) of model inputs, without autocast: what the guard is fitted on."""
        out = [self.network.body(self.model_input(batch)).float().cpu() for batch in self.preprocessed_batches(images, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)

    def image_logits(self, images, *, batch_size: int = 16) -> np.ndarray:
        """Float32 logits (N, C) of decoded images, without autocast: what calibration fits.

        They come from ``inference_model``, the network the PyTorch backend runs, so a threshold
        chosen on them sits on the numbers the calls use.
        """
        return self.image_logits_and_scores(images, batch_size=batch_size)[0]

    @torch.inference_mode()
    def image_logits_and_scores(self, images, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`image_logits` and, from the same pass, the guard's scores (N,), or None without a guard."""
        logits, scores = [], []
        for batch in self.preprocessed_batches(images, batch_size):
            out, score = self.inference_model(self.model_input(batch))
            logits.append(out.float().cpu())
            scores.append(score.float().cpu())
        guarded = self.guard_threshold is not None
        if not logits:
            return np.zeros((0, len(self.class_names)), dtype=np.float32), np.zeros(0, np.float32) if guarded else None
        return torch.cat(logits).numpy(), torch.cat(scores).numpy() if guarded else None


def auto_backend(device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """What ``backend="auto"`` runs: ONNX Runtime on a float32 CPU when it is installed, else PyTorch."""
    return "onnx" if device.type == "cpu" and amp_dtype is None and _has_onnxruntime() else "torch"


def _env_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value and value not in BACKENDS:
        raise LeukoError(f"{BACKEND_ENV}={value} is not a backend: set it to auto, torch or onnx, or unset it.")
    return value or None


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401  (optional backend: imported where used, so its absence is one sentence)
    except ImportError:
        return False
    return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def fuse_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every batch norm folded into the convolution before it.

    Inference only (the folded weights use the running statistics). One pass less over each
    activation map: ResNet-50 at 224x224 on the 2-core AVX2 EPYC ran 8% faster at batch 32 and 4%
    at batch 1 together with ``inference_mode`` (see docs/benchmarks.md). P(blast) agrees with the
    unfused model to float32 rounding (tests/test_benchmark.py checks 1e-5). A model torch.fx cannot
    trace is returned unfused, in eval mode.
    """
    model.eval()
    try:
        return fuse(copy.deepcopy(model)).eval()
    except Exception:  # tracing limits of torch.fx are not the user's problem: run the plain module
        return model
