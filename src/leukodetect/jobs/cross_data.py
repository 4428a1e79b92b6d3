"""Cross-dataset check for ``leukodetect compare --cross-data``: how far the trained models travel.

After the cross-validation, the fold models of each (protocol, architecture) run (each fold's
``best.pt``) predict a labelled data set from another lab, once as the images are and once
Macenko stain-normalised toward the training data (:mod:`leukodetect.data.stain`). The prediction
per image is the mean of the fold models' P(blast), called a blast at 0.5 as in Table 2; the
metrics and their 95% intervals come from :func:`~leukodetect.evaluation.intervals.binary_report`.

Control: the models were trained on images as they are, so the Macenko rows measure the stain
transfer together with how far normalisation moves any image from what the models learnt. Each run's
own out-of-fold predictions are therefore repeated on Macenko-normalised training images (each image
by the fold model that held it out) and shown beside its Table 2 values.

The cross images are decoded, normalised and resized once for all runs (the comparison has one
image size; each fold model applies its own mean/std). Each run keeps its result in
``cross_dataset.json`` beside it, keyed on its fold checkpoints, the cross images and the stain
reference, so rerunning a finished comparison, or adding ``--cross-data`` to one, only predicts
what has changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leukodetect.data.indexers import index_dataset
from leukodetect.data.records import Record
from leukodetect.data.stain import REFERENCE_IMAGES, MacenkoStain, pick_evenly
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.intervals import binary_report
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.preprocess import EvalPreset
from leukodetect.utils import write_csv, write_json

#: Without normalisation, then with it.
VARIANTS = ("none", "macenko")
THRESHOLD = 0.5
PREDICTION = ("mean over the fold models (each fold's best.pt) of P(blast), called a blast at 0.5; "
              "one prediction per image, as a deployed ensemble of the folds would give")


@dataclass
class CrossData:
    """The cross data set's labelled records and the stain normaliser fitted on the training data."""

    path: Path
    records: list[Record]
    stain: MacenkoStain
    default_reference: bool

    def key(self, image_size: int) -> dict:
        """What a run's cached cross result depends on, besides its own checkpoints."""
        listing = "\n".join(f"{r.path}\t{r.label}\t{r.path.stat().st_mtime_ns if r.path.exists() else ''}" for r in self.records)
        return {"data": str(self.path), "images": hashlib.sha256(listing.encode()).hexdigest(), "image_size": int(image_size),
                "stain": {k: v for k, v in self.stain.describe().items() if k in ("method", "reference", "background_level")}}


def prepare_cross_data(path: Path, *, training_data: Path, training_format: str = "auto",
                       stain_reference: Path | None = None, fmt: str = "auto") -> CrossData:
    """Index the cross data set (labelled images only) and fit the stain reference.

    Without ``stain_reference`` the reference is :data:`~leukodetect.data.stain.REFERENCE_IMAGES`
    images evenly spaced over the training data's sorted files. Done before any training, so a bad
    path is reported at once rather than after hours of cross-validation.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise LeukoError(f"Cross data {path} does not exist: pass a labelled image folder or CSV manifest to --cross-data.")
    records = [r for r in index_dataset(path, fmt) if r.label is not None]
    if not records:
        raise LeukoError(f"{path} has no labelled images: the cross-dataset check needs labels (see 'leukodetect data check').")
    if stain_reference is not None:
        stain = MacenkoStain.from_reference(stain_reference)
    else:
        paths = sorted(r.path for r in index_dataset(training_data, training_format))
        stain = MacenkoStain.from_paths(pick_evenly(paths, REFERENCE_IMAGES))
    return CrossData(path=path, records=records, stain=stain, default_reference=stain_reference is None)


@dataclass
class CrossImages:
    """The cross images decoded once: per variant, a uint8 (N, 3, S, S) tensor of the readable ones."""

    records: list[Record]
    tensors: dict[str, torch.Tensor]
    unreadable: list[str] = field(default_factory=list)
    stain_failed: list[str] = field(default_factory=list)
    stain: dict = field(default_factory=dict)


def load_cross_images(cross: CrossData, image_size: int) -> CrossImages:
    """Decode, normalise (second variant) and resize every cross image; unreadable ones are listed."""
    resize = EvalPreset(image_size=image_size).resize()
    stain = cross.stain.fresh()
    kept, unreadable, failed = [], [], []
    images: dict[str, list[torch.Tensor]] = {v: [] for v in VARIANTS}
    for r in cross.records:
        try:
            image = open_rgb(r.path)
        except BadImageError as exc:
            unreadable.append(str(exc))
            continue
        notes: list[str] = []
        normalised = stain(image, notes=notes)
        if notes:
            failed.append(str(r.path))
        images["none"].append(resize(image).as_subclass(torch.Tensor))
        images["macenko"].append(resize(normalised).as_subclass(torch.Tensor))
        kept.append(r)
    if not kept:
        raise LeukoError(f"No image in {cross.path} could be read: run 'leukodetect data check {cross.path}'.")
    return CrossImages(records=kept, tensors={v: torch.stack(t) for v, t in images.items()}, unreadable=unreadable,
                       stain_failed=failed, stain=stain.describe())


class HeldOutImages:
    """The training data's images, Macenko-normalised and resized once each, shared by every run.

    For the control: the models never saw normalised images, so the cross check's Macenko rows
    measure the stain transfer together with how far normalisation moves any image from what the
    models learnt. Scoring the runs' own held-out images normalised the same way shows the second part.
    """

    def __init__(self, stain: MacenkoStain, image_size: int) -> None:
        self.stain = stain.fresh()
        self.resize = EvalPreset(image_size=image_size).resize()
        self.images: dict[str, torch.Tensor | None] = {}
        self.failed: set[str] = set()

    def get(self, path: str) -> torch.Tensor | None:
        """The normalised uint8 (3, S, S) image, or None where the file cannot be read."""
        if path not in self.images:
            try:
                image = open_rgb(path)
            except BadImageError:
                self.images[path] = None
                return None
            notes: list[str] = []
            self.images[path] = self.resize(self.stain(image, notes=notes)).as_subclass(torch.Tensor)
            if notes:
                self.failed.add(path)
        return self.images[path]


def fold_probabilities(checkpoint: Path, images: torch.Tensor, *, device: str = "auto", batch_size: int = 32) -> np.ndarray:
    """P(blast) of one checkpoint for uint8 images already resized to its input size."""

    clf = Classifier.from_checkpoint(checkpoint, device=device)
    if int(clf.bundle["image_size"]) != images.shape[-1]:
        raise LeukoError(f"{checkpoint} takes {clf.bundle['image_size']}-pixel inputs, not {images.shape[-1]}: "
                         "rerun the comparison in a new --out.")
    return clf.image_probabilities(images, batch_size=batch_size)


def control(result, checkpoints: list[Path], held_out: HeldOutImages, *, device: str = "auto") -> dict:
    """The run's out-of-fold predictions again, on Macenko-normalised images: each held-out image
    by the fold model that held it out, pooled and scored like Table 2."""
    y, prob, paths = [], [], []
    for k, checkpoint in enumerate(checkpoints):
        rows = [r for r in result.rows if int(r["fold"]) == k]
        kept = [(r, t) for r in rows if (t := held_out.get(r["path"])) is not None]
        if kept:
            prob.append(fold_probabilities(checkpoint, torch.stack([t for _, t in kept]), device=device))
            y += [int(r["label"]) for r, _ in kept]
            paths += [r["path"] for r, _ in kept]
    report = binary_report(np.array(y, dtype=int), np.concatenate(prob), threshold=THRESHOLD)
    return {**report, "stain_failed": sum(p in held_out.failed for p in paths), "unreadable": len(result.rows) - len(paths)}


def cross_run(result, folds: int, cross: CrossData, image_size: int, images: Callable[[], CrossImages],
              held_out: Callable[[], HeldOutImages], *, device: str = "auto") -> dict:
    """The cross-dataset result of one run (a :class:`~leukodetect.jobs.compare.RunResult`),
    from its cache when nothing it depends on changed.

    Writes ``cross_dataset.json`` (metrics per variant and the Macenko control, with the key) and
    ``cross_predictions.csv`` (per image: label and the fold-averaged P(blast) of each variant)
    into the run folder.
    """
    run_dir = Path(result.run_dir)
    checkpoints = [run_dir / f"fold_{k}" / "best.pt" for k in range(folds)]
    held = "\n".join(f"{r['path']}\t{r['label']}\t{r['fold']}" for r in result.rows)
    key = {**cross.key(image_size), "checkpoints": {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in checkpoints},
           "held_out": hashlib.sha256(held.encode()).hexdigest()}
    path = run_dir / "cross_dataset.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached["key"] == key:
                return cached["result"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    loaded = images()
    y = np.array([r.label for r in loaded.records], dtype=int)
    prob = {v: np.mean([fold_probabilities(c, loaded.tensors[v], device=device) for c in checkpoints], axis=0) for v in VARIANTS}
    out = {
        "folds": folds,
        "n": len(loaded.records),
        "unreadable": loaded.unreadable,
        "stain_failed_images": loaded.stain_failed,
        "stain": loaded.stain,
        **{v: binary_report(y, prob[v], threshold=THRESHOLD) for v in VARIANTS},
        "predictions": str(run_dir / "cross_predictions.csv"),
        "training_data_macenko": control(result, checkpoints, held_out(), device=device),
    }
    failed = set(loaded.stain_failed)
    write_csv(run_dir / "cross_predictions.csv", [
        {"path": r.path, "label": r.label, **{f"prob_blast_{v}": f"{prob[v][i]:.6f}" for v in VARIANTS},
         "stain_normalised": int(str(r.path) not in failed)} for i, r in enumerate(loaded.records)
    ], ["path", "label", *(f"prob_blast_{v}" for v in VARIANTS), "stain_normalised"])
    write_json(path, {"key": key, "result": out})
    return out


def cross_summary(cross: CrossData, results, *, folds: int, image_size: int, device: str = "auto", log=print) -> dict:
    """Run (or reuse) the cross-dataset check of every run; the ``cross_dataset`` entry of comparison.json."""
    cache: dict[str, object] = {}

    def images() -> CrossImages:
        if "cross" not in cache:
            log(f"Cross-dataset check: reading and stain-normalising {len(cross.records)} images of {cross.path}.")
            cache["cross"] = load_cross_images(cross, image_size)
        return cache["cross"]

    def held_out() -> HeldOutImages:
        if "held_out" not in cache:
            log("Cross-dataset check, control: stain-normalising the training data's held-out images.")
            cache["held_out"] = HeldOutImages(cross.stain, image_size)
        return cache["held_out"]

    runs = []
    for r in results:
        one = dict(cross_run(r, folds, cross, image_size, images, held_out, device=device))
        normalised = one.pop("training_data_macenko")
        as_run = {k: r.metrics[k] for k in ("n", "confusion", "metrics")}  # Table 2's pooled values, unnormalised
        runs.append({"protocol": r.protocol, "arch": r.arch, **one, "training_data": {"none": as_run, "macenko": normalised}})
    first = runs[0]
    stain = dict(first["stain"], default_reference=cross.default_reference,
                 failed_images=first["stain_failed_images"])
    if stain["failed"]:
        log(f"Cross-dataset check: stain normalisation failed on {stain['failed']} of {first['n']} images; "
            "they were scored unnormalised in the 'macenko' rows.")
    return {
        "data": str(cross.path),
        "n": first["n"],
        "unreadable": first["unreadable"],
        "prediction": PREDICTION,
        "threshold": THRESHOLD,
        "stain_normalization": stain,
        "runs": [{k: v for k, v in one.items() if k not in ("unreadable", "stain", "stain_failed_images")} for one in runs],
    }
