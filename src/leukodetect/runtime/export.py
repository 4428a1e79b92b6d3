"""Export a checkpoint to ONNX or TorchScript, check the export, and run exported files.

What the exported graph computes: a normalised float32 batch ``image`` (N, 3, S, S) -> ``prob_blast``
(N,), the blast probability ``softmax(logits / temperature)[:, 1]`` with the checkpoint's temperature
applied inside the graph, so a consumer needs no post-processing beyond the threshold. The batch axis
is dynamic. Preprocessing (resize to S x S, scale to [0, 1], normalise with mean/std) stays outside
the graph, because it runs on PIL images, but travels with the file as JSON (format
``leukodetect.runtime.export``): in the ONNX ``metadata_props`` under the key ``leukodetect`` and, for
TorchScript, as the extra file ``leukodetect.json`` inside the archive. :class:`ExportedClassifier`
reads that JSON and classifies images exactly as :class:`leukodetect.runtime.classifier.Classifier` does.

Every export checks itself: the written file is reloaded (ONNX Runtime on CPU, or ``torch.jit.load``),
fed a random batch of 4 inputs and compared with the PyTorch model in float32 eval mode; a largest
absolute difference in P(blast) above ``atol`` (default 1e-4) discards the file and raises.

:func:`cached_onnx_classifier` is what makes ONNX Runtime the default inference backend on the CPU
(see :class:`leukodetect.runtime.classifier.Classifier`): it exports a checkpoint once, through the same
self-checking export, into a cache keyed by a hash of what decides the outputs, and reuses the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukodetect import __version__
from leukodetect.errors import BadCheckpointError, LeukoError
from leukodetect.models import get_spec
from leukodetect.runtime.base import ImageClassifier
from leukodetect.runtime.checkpoint import (
    GUARD_TENSORS,
    DetectorSettings,
    load_checkpoint,
    model_from_checkpoint,
)
from leukodetect.runtime.guard import Guard, GuardedNetwork
from leukodetect.runtime.preprocess import EvalPreset
from leukodetect.runtime.scale import CanonicalScale
from leukodetect.utils import atomic_write, cache_dir

FORMATS = ("onnx", "torchscript")
META_FORMAT = "leukodetect.export"
META_FORMAT_VERSION = 1
META_KEY = "leukodetect"  # ONNX metadata_props key
EXTRA_FILE = "leukodetect.json"  # TorchScript extra file
META_REQUIRED = ("arch", "class_names", "image_size", "mean", "std", "threshold", "temperature")
INPUT_NAME, OUTPUT_NAME, SCORE_NAME = "image", "prob_blast", "ood_score"
DEFAULT_ATOL = 1e-4
MIN_OPSET = 18  # torch's ONNX exporter has no implementations below opset 18
CACHE_VERSION = 2  # bump when the exported graph changes, so older cached files are not reused (2: the guard's score)


class BlastProbability(nn.Module):
    """The network plus its calibrated softmax (and, with a guard, its out-of-distribution score): what gets exported."""

    def __init__(self, network: GuardedNetwork, temperature: float) -> None:
        super().__init__()
        self.network = network
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor):
        logits, score = self.network(image)
        prob = torch.softmax(logits / self.temperature, dim=1)[:, 1]
        return (prob, score) if self.network.guard is not None else prob


def exported_network(bundle: dict[str, Any], source: Path | str) -> BlastProbability:
    """The float32 CPU module an export is traced from."""
    guard = bundle.get("guard")
    network = GuardedNetwork(model_from_checkpoint(bundle, source).float().cpu(), get_spec(bundle["arch"]).head,
                             Guard.from_stats(guard, mean=bundle["mean"], std=bundle["std"]) if guard else None)
    return BlastProbability(network, bundle["temperature"]).eval()


def export_metadata(bundle: dict[str, Any], *, fmt: str, source: Path) -> dict[str, Any]:
    """The JSON stored with an exported file: what a runner needs to preprocess and call.

    A detector's crop scale, localisation settings, smudge gate and cell scorer
    (:class:`~leukodetect.runtime.checkpoint.DetectorSettings`) travel too, under ``"detection"``.
    """
    detector = DetectorSettings.of(bundle)
    return {
        "format": META_FORMAT,
        "format_version": META_FORMAT_VERSION,
        "model_format": fmt,
        **{key: bundle[key] for key in META_REQUIRED},
        "input": f"{INPUT_NAME}: float32 (N, 3, {bundle['image_size']}, {bundle['image_size']}), "
                 "RGB resized to image_size, scaled to [0, 1], normalised with mean/std",
        "output": f"{OUTPUT_NAME}: float32 (N,), softmax(logits / temperature)[:, 1]; blast if >= threshold",
        "source_checkpoint": Path(source).name,
        "trained_with": bundle.get("versions", {}),
        "exported_with": {"leukodetect": __version__, "torch": str(torch.__version__)},
        "exported": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **({"detection": detector.to_dict()} if detector is not None else {}),
        **({"scale": bundle["scale"]} if bundle.get("scale") else {}),
        **({"guard": {k: v for k, v in bundle["guard"].items() if k not in GUARD_TENSORS}} if bundle.get("guard") else {}),
        **({"labs": bundle["labs"]} if bundle.get("labs") else {}),
    }


def export_model(
    checkpoint: Path,
    out: Path,
    *,
    fmt: str,
    opset: int = MIN_OPSET,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` as ONNX or TorchScript and verify it against PyTorch.

    Args:
        fmt: ``"onnx"`` (torch's ``torch.export``-based exporter, run by ONNX Runtime) or
            ``"torchscript"`` (``torch.jit.trace``).
        opset: ONNX opset version (18 or newer); ignored for TorchScript.
        atol: the largest absolute difference in P(blast) allowed between the reloaded export and
            the float32 PyTorch model on a random batch of 4 inputs.
        seed: seeds that random batch.

    Returns:
        ``{"path", "format", "max_abs_diff", "atol", "opset"}``.

    Raises:
        LeukoError: ``out`` already exists, an unknown format or opset, or the reloaded export
            differs from PyTorch by more than ``atol`` (the file is then not written).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_format(fmt, opset)
    if out.exists():
        raise LeukoError(f"{out} already exists: choose another --out or delete the file first.")
    return export_bundle(load_checkpoint(checkpoint), out, fmt=fmt, source=checkpoint, opset=opset, atol=atol, seed=seed)


def _check_format(fmt: str, opset: int) -> None:
    if fmt not in FORMATS:
        raise LeukoError(f"Unknown export format '{fmt}': use --format onnx or --format torchscript.")
    if fmt == "onnx" and opset < MIN_OPSET:
        raise LeukoError(f"ONNX opset {opset} is too old: torch's exporter writes opset {MIN_OPSET} or newer.")


def export_bundle(
    bundle: dict[str, Any],
    out: Path,
    *,
    fmt: str,
    source: Path | str,
    opset: int = MIN_OPSET,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`export_model` for a checkpoint already in memory; replaces ``out`` atomically if it exists.

    ``source`` names the checkpoint in messages and in the stored metadata.
    """
    out = Path(out)
    _check_format(fmt, opset)
    model = exported_network(bundle, source)
    meta = export_metadata(bundle, fmt=fmt, source=Path(str(source)))
    size = int(bundle["image_size"])
    example = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(example)
    expected_prob = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    expected_score = expected[1].numpy() if isinstance(expected, tuple) else None
    measured: dict[str, float] = {}

    def write_and_verify(tmp: Path) -> None:
        # Verified before the rename, so a failed check never leaves a file at ``out``.
        try:
            if fmt == "onnx":
                _write_onnx(model, example, tmp, meta, opset)
            else:
                _write_torchscript(model, example, tmp, meta)
        except Exception as exc:  # an exporter limitation, not the user's input; keep the cause chained
            raise LeukoError(
                f"torch could not export {source} ({bundle['arch']}) to {fmt} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): try the other --format."
            ) from exc
        got, got_score = _reload(tmp, fmt).outputs(example)
        measured["max_abs_diff"] = diff = float(np.max(np.abs(got - expected_prob)))
        if not diff <= atol:  # also catches NaN
            raise LeukoError(
                f"The {fmt} export of {source} differs from PyTorch by {diff:.2e} in P(blast) (tolerance "
                f"{atol:.0e}), so {out} was not written: report this with the checkpoint's architecture."
            )
        if expected_score is not None:
            # The guard's score is a squared distance: compared relative to its size.
            rel = float(np.max(np.abs(got_score - expected_score) / np.maximum(np.abs(expected_score), 1.0)))
            measured["guard_rel_diff"] = rel
            if not rel <= 1e-3:
                raise LeukoError(f"The {fmt} export of {source} computes the guard's score {rel:.1e} (relative) away from "
                                 f"PyTorch, so {out} was not written: report this with the checkpoint's architecture.")

    atomic_write(out, write_and_verify)
    return {"path": str(out), "format": fmt, "max_abs_diff": measured["max_abs_diff"], "atol": atol,
            "opset": opset if fmt == "onnx" else None}


# ---- the ONNX cache behind the default inference backend ----


def onnx_cache_key(bundle: dict[str, Any]) -> str:
    """A hash of everything that decides the exported graph's output: the weights (names, dtypes,
    shapes, bytes) and the guard's arrays, architecture, classes, input size, temperature, and the
    export's own version.

    Mean and std are included although preprocessing runs outside the graph, since the file stores
    them. The threshold is not: it only turns P(blast) into a call, and :class:`Classifier` reads
    it from the checkpoint, so a recalibrated threshold reuses the same file.
    """
    described = {key: bundle[key] for key in ("arch", "class_names", "image_size", "mean", "std", "temperature")}
    digest = hashlib.sha256(json.dumps({"cache": CACHE_VERSION, "opset": MIN_OPSET, **described}, sort_keys=True).encode())
    guard = {f"guard.{k}": torch.as_tensor(bundle["guard"][k]) for k in GUARD_TENSORS if k in (bundle.get("guard") or {})}
    for name, tensor in sorted({**bundle["state_dict"], **guard}.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def onnx_cache_path(bundle: dict[str, Any]) -> Path:
    """``<cache>/onnx/<arch>-<hash>.onnx``, the cache being ``$LEUKODETECT_CACHE`` or ``~/.cache/leukodetect``."""
    return cache_dir() / "onnx" / f"{bundle['arch']}-{onnx_cache_key(bundle)}.onnx"


def cached_onnx_classifier(
    bundle: dict[str, Any], *, source: str, threads: int | None = None, log=print,
) -> ExportedClassifier:
    """The checkpoint ``bundle`` run by ONNX Runtime, exported once and then read from the cache.

    The file is written atomically (two processes exporting the same checkpoint each rename a complete
    file into place) by :func:`export_bundle`, so it passed the export's 1e-4 check against PyTorch. A
    cached file ONNX Runtime cannot read is exported again; a cache folder that cannot be written
    gives an export into a temporary folder, used for this run only.

    Args:
        source: names the checkpoint in the log lines.
        threads: ONNX Runtime intra-op threads (None: ``torch.get_num_threads()``).
        log: receives one sentence when an export happens or the cache cannot be used.

    Raises:
        LeukoError: onnxruntime is missing, or torch cannot export this architecture.
    """
    try:
        import onnxruntime  # noqa: F401  (optional backend: imported where used, so its absence is one sentence)
    except ImportError:
        raise LeukoError("onnxruntime is not installed: install it (pip install onnxruntime) or use --backend torch.") from None
    path = onnx_cache_path(bundle)
    if path.is_file():
        try:
            return _reload(path, "onnx", threads=threads)
        except BadCheckpointError:
            log(f"The cached ONNX file {path} cannot be read; exporting it again.")
    if not _can_write(path.parent):
        log(f"The ONNX cache folder {path.parent} cannot be written: exporting {source} to a temporary folder "
            "for this run only; set LEUKODETECT_CACHE to a writable folder to keep the export.")
        with tempfile.TemporaryDirectory(prefix="leukodetect-onnx-") as tmp:
            # The session holds the model in memory, so the file may go with the folder.
            return _export_and_open(bundle, Path(tmp) / path.name, source=source, threads=threads)
    log(f"Preparing the ONNX Runtime version of {source} once (cached in {path})...")
    return _export_and_open(bundle, path, source=source, threads=threads)


def _export_and_open(bundle: dict[str, Any], path: Path, *, source: str, threads: int | None) -> ExportedClassifier:
    export_bundle(bundle, path, fmt="onnx", source=source)
    return _reload(path, "onnx", threads=threads)


def _can_write(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (made if missing); tried, not guessed from permissions."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int) -> None:
    outputs = [OUTPUT_NAME, SCORE_NAME] if model.network.guard is not None else [OUTPUT_NAME]
    program = torch.onnx.export(
        model, (example,), None, dynamo=True, opset_version=opset, verbose=False,
        input_names=[INPUT_NAME], output_names=outputs, dynamic_shapes=({0: "batch"},),
    )
    program.model.metadata_props[META_KEY] = json.dumps(meta)
    program.model.doc_string = "leukodetect: P(blast) for normalised blood-cell images; see metadata 'leukodetect'."
    program.save(path, external_data=False)


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.14 marks torch.jit as deprecated; TorchScript is still what C++ and mobile runtimes load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        yield


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with _quiet_jit():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def _reload(path: Path, fmt: str, *, threads: int | None = None) -> ExportedClassifier:
    """Open an exported file, metadata first, so a file without it is refused before it runs."""
    if fmt == "onnx":
        session = _onnx_session(path, threads=threads)
        meta = _check_meta(path, session.get_modelmeta().custom_metadata_map.get(META_KEY))
        return ExportedClassifier(path, meta, session=session)
    meta = _torchscript_meta(path)
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise _not_exported(path, f"torch.jit.load failed: {type(exc).__name__}") from None
    return ExportedClassifier(path, meta, module=module)


def _not_exported(path: Path, why: str) -> BadCheckpointError:
    return BadCheckpointError(
        f"{path} is not a model exported by 'leukodetect export' ({why}): export a best.pt with "
        "'leukodetect export', or pass a best.pt with --checkpoint."
    )


def _check_meta(path: Path, text: str | None) -> dict[str, Any]:
    if not text:
        raise _not_exported(path, "no leukodetect metadata")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise _not_exported(path, "its leukodetect metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise _not_exported(path, "unknown metadata format")
    missing = [key for key in META_REQUIRED if key not in meta]
    if missing:
        raise _not_exported(path, f"its metadata lacks {', '.join(missing)}")
    if meta.get("format_version", 0) > META_FORMAT_VERSION:
        raise BadCheckpointError(f"{path} was exported by a newer leukodetect: upgrade leukodetect to run it.")
    return meta


def _onnx_session(path: Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default: PyTorch's thread count,
    the same budget), one inter-op thread and sequential execution, since a classifier is a chain of
    layers with nothing to run side by side."""
    import onnxruntime as ort  # optional backend, imported where used

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types for unreadable files
        raise _not_exported(path, f"ONNX Runtime cannot read it: {type(exc).__name__}") from None


def _torchscript_meta(path: Path) -> dict[str, Any]:
    # Read the metadata from the zip archive before torch.jit.load, which would run the archive's code.
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{EXTRA_FILE}")]
            text = archive.read(names[0]).decode("utf-8") if names else None
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError):
        raise _not_exported(path, "not a TorchScript archive") from None
    return _check_meta(path, text)


class ExportedClassifier(ImageClassifier):
    """An exported file ready for inference, with the preprocessing and threshold stored in it.

    ONNX files run in ONNX Runtime on the CPU; TorchScript files with ``torch.jit.load`` on the CPU.
    """

    def __init__(self, path: Path, meta: dict[str, Any], *, session=None, module: nn.Module | None = None) -> None:
        if (session is None) == (module is None):
            raise ValueError("pass exactly one of an ONNX Runtime session or a TorchScript module")
        self.path, self.meta = Path(path), meta
        self.format = "onnx" if session is not None else "torchscript"
        self.backend = self.format  # what runs the network, as reported by the service
        self._session, self._module = session, module
        self.preset = EvalPreset(image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta["temperature"])
        self.class_names = list(meta["class_names"])
        self.detector = DetectorSettings.from_dict(meta.get("detection"))
        self.scale = CanonicalScale.from_dict(meta.get("scale"))
        self.guard_threshold = float(meta["guard"]["threshold"]) if meta.get("guard") else None

    @classmethod
    def from_file(cls, path: Path) -> ExportedClassifier:
        """Open an ``.onnx`` or TorchScript file written by :func:`export_model`.

        The format is told by content (a TorchScript archive is a zip file, ONNX is not).

        Raises:
            BadCheckpointError: the file is missing, unreadable or lacks leukodetect metadata.
        """
        path = Path(path)
        if not path.is_file():
            raise BadCheckpointError(f"Exported model {path} does not exist: check the path given to --model.")
        fmt = "torchscript" if zipfile.is_zipfile(path) else "onnx"
        return _reload(path, fmt)

    @torch.no_grad()
    def outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Blast probability (temperature applied in the graph) and, for a model with a guard, its score."""
        x = batch.detach().to("cpu", torch.float32).contiguous()
        if self._session is not None:
            names = [o.name for o in self._session.get_outputs()]
            got = self._session.run(names, {INPUT_NAME: x.numpy()})
            return got[0], (got[1] if len(got) > 1 else None)
        got = self._module(x)
        return (got[0].numpy(), got[1].numpy()) if isinstance(got, tuple) else (got.numpy(), None)
