"""``leukodetect calibrate``: validation logits from a checkpoint, a temperature and a threshold
fitted on them (:mod:`leukodetect.evaluation.calibration`), written into a copy of the checkpoint
that :class:`~leukodetect.runtime.classifier.Classifier` then applies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leukodetect.errors import BadImageError, LeukoError
from leukodetect.evaluation.calibration import (
    T_BOUNDS,
    expected_calibration_error,
    fit_temperature,
    margin_threshold,
    per_smear,
    threshold_for_sensitivity,
)
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb


def select_split(records, split_file: str | Path, part: str = "val") -> list:
    """The records named in one part of a run's ``split.json`` (by resolved path)."""
    try:
        wanted = {str(Path(p).resolve()) for p in json.loads(Path(split_file).read_text())[part]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LeukoError(f"Cannot read the '{part}' part of {split_file} ({exc}): pass a split.json written by 'leukodetect train'.") from exc
    chosen = [r for r in records if str(Path(r.path).resolve()) in wanted]
    if not chosen:
        raise LeukoError(f"No image of the '{part}' part of {split_file} is in the data: pass the --data the run was trained on.")
    return chosen


def validation_logits(clf: Classifier, pairs: Sequence[tuple[Path, int]], *, batch_size: int = 16,
                      rbc_diameter: float | None = None, log=print) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Float32 logits (N, C), labels (N,), guard scores (N,) or None, and the indices in ``pairs`` (N,) of the readable images.

    Unreadable images are logged and skipped.

    Each image is shown to the model as ``predict`` shows it (:meth:`Classifier.view`): for a model with a
    physical scale, the canonical window at the red-cell diameter ``rbc_diameter`` (declared) or measured on
    the image's red cells, so the threshold is chosen on the numbers the calls will use. Images whose scale
    cannot be known are used at their own size, as ``predict`` uses them, and counted in one line.
    """
    images, labels, unknown, kept = [], [], [], []
    for i, (path, label) in enumerate(pairs):
        try:
            image = open_rgb(path)
        except BadImageError as exc:
            log(f"skipped: {exc}")
            continue
        kept.append(i)
        shown, estimate = clf.view(image, rbc_diameter=rbc_diameter)
        if estimate is not None and estimate.diameter is None:
            unknown.append(Path(path).name)
        images.append(shown)
        labels.append(label)
    if unknown:
        log(f"{len(unknown)} of {len(images)} images ({unknown[0]}{', ...' if len(unknown) > 1 else ''}) have no measurable "
            "red cells: used at their own size, as predict uses them; pass --pixel-size if you know it.")
    logits, scores = clf.image_logits_and_scores(images, batch_size=batch_size)
    return logits, np.array(labels, dtype=np.int64), scores, np.array(kept, dtype=np.int64)


def calibrate_checkpoint(
    checkpoint: str | Path,
    val,
    out: str | Path | None = None,
    *,
    target_sensitivity: float = 0.99,
    rbc_diameter: float | None = None,
    bank: bool = False,
    per: str = "cell",
    n_bins: int = 10,
    device: str = "auto",
    log=print,
) -> dict:
    """Fit a temperature and a decision threshold on validation images; save them in a new checkpoint.

    The temperature is fitted on raw (float32) logits, so it replaces any earlier one. The threshold
    finds the same validation cells as the highest whose validation sensitivity reaches ``target_sensitivity``,
    on probabilities with the new temperature applied, exactly as :class:`~leukodetect.runtime.classifier.Classifier`
    will compute them, and sits halfway to the next lower probability (:func:`margin_threshold`).

    Args:
        checkpoint: the checkpoint to calibrate; it is never modified.
        val: labelled validation images, as records (``.path``, ``.label``) or (path, label) pairs.
            Use images the model was not trained on, e.g. the run's validation part.
        out: the new checkpoint; it must not exist. None writes ``<name>-calibrated.pt`` beside the
            original (``-calibrated-2.pt``... if taken).
        rbc_diameter: the images' red-cell diameter in pixels, for a model with a physical scale (from
            ``--pixel-size``); None measures each image's red cells, as ``predict`` does.
        bank: the images are a cell bank's crops (``leukodetect cells``), cut at the model's own scale already.
        per: ``"cell"``: the threshold finds ``target_sensitivity`` of the blast cells; ``"smear"``: of the ALL smears,
            each scored by its most blast-like cell (:func:`~leukodetect.evaluation.calibration.per_smear`), for a
            cell bank cut from labelled smears, whose cells carry their smear's label and name it (``parent``).

    Returns:
        {"out", "temperature", "threshold", "calibration": {ece_before, ece_after,
        target_sensitivity, per, sensitivity, specificity, n_val, n_blast, temperature_at_bound,
        calibrated_from; with per "smear" also n_smears and n_all_smears}}.
    """

    if not 0.0 < target_sensitivity <= 1.0:
        raise LeukoError(f"Target sensitivity {target_sensitivity} is not a fraction: pass a value in (0, 1], e.g. 0.99.")
    checkpoint = Path(checkpoint)
    target = _output_path(checkpoint, out)
    if per not in ("cell", "smear"):
        raise LeukoError(f"Unknown calibration unit '{per}': use --per cell or smear.")
    labelled = [r for r in val if (r.label if hasattr(r, "path") else r[1]) is not None]
    pairs = [(Path(r.path), int(r.label)) if hasattr(r, "path") else (Path(r[0]), int(r[1])) for r in labelled]
    smears = [getattr(r, "parent", None) for r in labelled]
    if per == "smear" and (not smears or any(not s for s in smears)):
        raise LeukoError("Calibrating per smear needs a cell bank cut from labelled smears (leukodetect cells), whose cells name "
                         "their smear: pass its cells.csv as --data, or calibrate per cell.")
    bundle = load_checkpoint(checkpoint)
    clf = Classifier(bundle, device=device, precision="fp32", source=str(checkpoint), backend="torch")  # reads logits
    if bank:
        rbc_diameter = clf.bank_diameter
    logits, y, scores, kept = validation_logits(clf, pairs, rbc_diameter=rbc_diameter, log=log)
    if len(set(y.tolist())) < 2:
        raise LeukoError(
            f"Calibration needs readable validation images of both classes (got {len(y)} images, "
            f"{int(y.sum())} blasts): pass a labelled validation set holding normal cells and blasts."
        )
    temperature = fit_temperature(logits, y)
    at_bound = not T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] / 1.01
    if at_bound:
        log(f"warning: the temperature ran to the edge of its search range ({temperature:.3g}): the {len(y)} "
            "validation images are separated perfectly or not at all; calibrate on more images.")
    before = _blast_prob(logits, float(bundle["temperature"]))
    after = _blast_prob(logits, temperature)
    try:
        unit_y, unit_p = (y, after) if per == "cell" else per_smear(y, after, [smears[i] for i in kept])
    except ValueError as exc:  # cells labelled one by one (ALL-IDB1's blasts and normal cells of one photograph)
        raise LeukoError(f"{exc} Calibrating per smear needs cells that carry their smear's label (a bank cut from smears "
                         "labelled as a whole, as Aria's fields are): calibrate these per cell.") from exc
    if len(set(unit_y.tolist())) < 2:
        raise LeukoError(f"Calibrating per smear needs smears of both labels, got {len(unit_y)} smears, {int(unit_y.sum())} ALL.")
    choice = threshold_for_sensitivity(unit_y, unit_p, target_sensitivity)
    threshold = margin_threshold(unit_p, choice["threshold"])
    calibration = {
        "ece_before": expected_calibration_error(y, before, n_bins),
        "ece_after": expected_calibration_error(y, after, n_bins),
        "target_sensitivity": float(target_sensitivity),
        "per": per,
        **({"n_smears": int(len(unit_y)), "n_all_smears": int(unit_y.sum())} if per == "smear" else {}),
        "sensitivity": choice["sensitivity"],
        "specificity": choice["specificity"],
        "n_val": int(len(y)),
        "n_blast": int(y.sum()),
        "temperature_at_bound": at_bound,
        "calibrated_from": str(checkpoint),
        # The guard is not changed by calibration: images beyond it stay "review" whatever the threshold.
        "guard_flagged": None if scores is None else int(sum(clf.beyond_guard(float(v)) for v in scores)),
    }
    if calibration["guard_flagged"]:
        log(f"warning: {calibration['guard_flagged']} of {len(y)} of these images are beyond the model's guard (unlike "
            "the images it was trained on): predict calls them review whatever the threshold. For a laboratory of "
            "your own, fine-tune on its labelled cells with --guard (README, 'Your own laboratory').")
    bundle.update(temperature=temperature, threshold=threshold, calibration=calibration)
    if target.exists():  # checked again: another process may have written it meanwhile
        raise LeukoError(f"{target} already exists: choose another --out; checkpoints are never overwritten.")
    save_checkpoint(bundle, target)
    return {"out": str(target), "temperature": temperature, "threshold": threshold, "calibration": calibration}


def _blast_prob(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Blast probability computed exactly as the Classifier will (float32 torch), so an image whose
    probability equals the chosen threshold is still called blast after deployment."""

    return torch.softmax(torch.from_numpy(logits).float() / temperature, dim=1)[:, 1].numpy().astype(float)


def _output_path(checkpoint: Path, out: str | Path | None) -> Path:
    if out is None:
        candidate, n = checkpoint.with_name(f"{checkpoint.stem}-calibrated{checkpoint.suffix}"), 1
        while candidate.exists():
            n += 1
            candidate = checkpoint.with_name(f"{checkpoint.stem}-calibrated-{n}{checkpoint.suffix}")
        return candidate
    out = Path(out)
    if out.exists():
        raise LeukoError(f"{out} already exists: choose another --out; checkpoints are never overwritten.")
    return out
