"""Grad-CAM: where in a cell image the model looked when it scored it.

Grad-CAM (Selvaraju et al., 2017) weights the activations of one convolutional layer by the
gradient of a class score and keeps the positive part. The layer comes from the model registry
(``ModelSpec.cam_layer``: ``layer4`` for the ResNets, ``features`` for VGG and the tiny model), so
every architecture is explained the same way. The computation is pytorch-grad-cam's; this module
only feeds it the checkpoint's preprocessing and writes the overlays.

The output of :func:`explain_file` is a folder or a file: an existing folder, or a path ending in a
separator, receives ``<image>_gradcam.png``; any other path is the file itself. Output files are never
overwritten: a file named by the caller that already exists is refused with a :class:`LeukoError`;
names made up here (``<image>_gradcam.png``) move on to ``_gradcam-2.png``, ``-3``... when taken, as
run folders do.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from leukodetect.errors import BadImageError, LeukoError
from leukodetect.reporting.gradcam import gradcam_batch, overlay
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.guard import REVIEW, UNLIKE_TRAINING
from leukodetect.runtime.images import open_rgb
from leukodetect.utils import atomic_write

SUFFIX = "_gradcam"


def explain_file(
    checkpoint_or_classifier: Classifier | str | Path,
    path: str | Path,
    out: str | Path | None = None,
    *,
    target_class: int = 1,
    rbc_diameter: float | None = None,
) -> dict:
    """Write the Grad-CAM overlay of one image file, shown to the model as ``predict`` shows it.

    A model with a physical scale (the shipped one) sees a window of its red-cell diameters around the
    image's centre, at ``rbc_diameter`` pixels per red cell (declared) or the diameter measured on the
    image's red cells; the overlay is drawn on that window, the image the model scored. Where the scale
    cannot be known, the window is the whole image (and a note says so); a model without a scale takes the
    whole image, and the overlay has the image's size.

    Args:
        checkpoint_or_classifier: a loaded :class:`Classifier` or a checkpoint path.
        path: the image.
        out: a folder (one that exists, or a path ending in a separator, made if missing) that
            receives ``<image stem>_gradcam.png`` (``_gradcam-2.png``... if that name is taken); or
            the PNG to write, which must not exist. None: the image's own folder.
        rbc_diameter: the image's red-cell diameter in pixels (from ``--pixel-size``); None measures it.

    Returns:
        {"path", "prob_blast", "label", "out", "ood_score", "reason", "notes"}: the blast probability
        (temperature applied) from the same float32 forward pass that Grad-CAM used, and the call as
        ``predict`` makes it: "review" with the reason where the model's guard finds the image unlike
        its training images (``ood_score`` None for a model without a guard).

    Raises:
        BadImageError: the image cannot be read (one sentence naming it).
        LeukoError: ``out`` already exists.
    """
    clf = _classifier(checkpoint_or_classifier)
    path = Path(path)
    folder = overlay_folder(path, out)
    if folder is None and Path(out).exists():
        raise _exists(out)
    notes: list[str] = []
    image, _ = clf.view(open_rgb(path, notes=notes), rbc_diameter=rbc_diameter, name=path.name, notes=notes)
    heatmaps, probs, scores = gradcam_batch(clf, [image], target_class)
    score = None if scores is None else float(scores[0])
    label = clf.call(float(probs[0]), score)
    png = _png_bytes(overlay(image, heatmaps[0]))
    if folder is not None:
        written = _write_fresh(folder / f"{path.stem}{SUFFIX}.png", png)
    else:
        try:
            written = _write_new(Path(out), png)
        except FileExistsError:
            raise _exists(out) from None
    return {"path": str(path), "prob_blast": float(probs[0]), "label": label, "out": str(written),
            "ood_score": None if score is None else round(score, 4), "reason": UNLIKE_TRAINING if label == REVIEW else None,
            "notes": notes}


def overlay_folder(image: str | Path, out: str | Path | None) -> Path | None:
    """The folder :func:`explain_file` makes up a name in for ``out``, or None where ``out`` names the file itself."""
    if out is None:
        return Path(image).parent
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out)
    return None


def explain_many(
    classifier: Classifier | str | Path,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    target_class: int = 1,
    batch_size: int = 16,
) -> list[dict]:
    """Overlays for many images, in batches, as ``out_dir/<image stem>_gradcam.png`` (for a gallery).

    Existing files and repeated stems get a fresh name (``-2``, ``-3``...). An unreadable image
    gets an entry with ``error`` (one sentence naming it) and the others go on.

    Returns:
        one dict per input path, in order: {"path", "prob_blast", "label", "out", "error"}; the label is
        "review" where the model's guard finds the image unlike its training images, as ``predict`` says.
    """
    clf = _classifier(classifier)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [{"path": str(p), "prob_blast": None, "label": None, "out": None, "error": None} for p in paths]
    for start in range(0, len(paths), batch_size):  # images are read batch by batch, not all at once
        chunk: list[tuple[int, Image.Image]] = []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                chunk.append((i, open_rgb(paths[i])))
            except BadImageError as exc:
                results[i]["error"] = str(exc)
        if not chunk:
            continue
        heatmaps, probs, scores = gradcam_batch(clf, [image for _, image in chunk], target_class)
        for k, ((i, image), heatmap, prob) in enumerate(zip(chunk, heatmaps, probs)):
            target = out_dir / f"{Path(paths[i]).stem}{SUFFIX}.png"
            written = _write_fresh(target, _png_bytes(overlay(image, heatmap)))
            score = None if scores is None else float(scores[k])
            results[i].update(prob_blast=float(prob), label=clf.call(float(prob), score), out=str(written))
    return results


def _exists(out) -> LeukoError:
    return LeukoError(f"{out} already exists: pass another --out or delete it first; overlays are never overwritten.")


def _classifier(obj: Classifier | str | Path) -> Classifier:
    return obj if isinstance(obj, Classifier) else Classifier.from_checkpoint(Path(obj), backend="torch")  # Grad-CAM runs PyTorch


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_new(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, failing with FileExistsError if ``path`` exists.

    Overlays are never overwritten, even by a file another process created since we last looked
    (:func:`~leukodetect.utils.atomic_write` with ``exclusive=True``).
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), exclusive=True)


def _write_fresh(path: Path, data: bytes) -> Path:
    """Write to ``path``, or ``<stem>-2<suffix>``, ``-3``... if taken; returns the name used."""
    candidate, n = path, 1
    while True:
        try:
            return _write_new(candidate, data)
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
