"""Whole-smear detection: locate white cells, crop each at the classifier's scale, classify, count.

``analyze`` is the library entry point (an image in memory, a result dict out); ``analyze_file``
adds reading, the overlay and gallery PNGs and the JSON; ``detect_paths`` runs a list of files and
skips unreadable ones. Crops are cut from the full-resolution image (localisation runs on a
downscaled copy), with side ``crop_factor`` x the photograph's measured red-cell diameter, the
scale the crop classifier was trained at (stored in its checkpoint under ``"detection"``).
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from leukodetect.detection.crops import DEFAULT_CROP_FACTOR, crop_around
from leukodetect.detection.gate import SmudgeGate
from leukodetect.detection.locate import (
    LEGACY_VALUES,
    Cell,
    Localisation,
    LocateParams,
    as_array,
    locate_cells,
)
from leukodetect.detection.scorer import CellScorer, white_density
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.runtime.checkpoint import DetectorSettings
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.guard import UNLIKE_TRAINING
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.runtime.scale import MEASURED_SOURCES, estimate_smear_diameter, stain_free_diameter

#: Smallest width or height analysed, pixels. Real smear photographs are hundreds to thousands of
#: pixels a side (ALL-IDB: 2592x1944 and 1712x1368); below 32 px an image cannot hold a single red
#: cell at any magnification the detector was trained on, and 1-pixel strips broke the overlay.
MIN_SIDE = 32

#: Box colours (RGB) by call.
COLOURS = {"blast": (220, 20, 20), "review": (255, 150, 0), "normal": (20, 170, 40), "cell": (30, 90, 230), "smudge": (120, 120, 120)}


@dataclass(frozen=True, kw_only=True)
class VerdictRule:
    """Photograph verdict from the per-cell calls.

    ALL when at least ``min_blasts`` cells are confident blasts (P >= the band's top); healthy when
    no cell is a blast or in the review band; review otherwise (some blast-like cells, too few or
    too uncertain to decide). The default ``min_blasts = 1`` is set by the data: 7 of
    ALL-IDB1's 49 ALL photographs hold a single annotated blast, so requiring two would cap the
    photograph sensitivity at 42/49 = 86% before any classifier error.
    """

    min_blasts: int = 1

    def __call__(self, n_blast: int, n_review: int) -> str:
        if n_blast >= self.min_blasts:
            return "ALL"
        if n_blast + n_review == 0:
            return "healthy"
        return "review"


def check_smear_size(width: int, height: int, where: str = "The image", *, min_side: int = MIN_SIDE) -> None:
    """Refuse an image narrower or shorter than ``min_side`` with one sentence that starts with ``where``.

    Raises:
        BadImageError: the image is too small on either side to be a smear photograph.
    """
    if min(width, height) < min_side:
        raise BadImageError(
            f"{where} is {width}x{height} pixels, below the {min_side}-pixel minimum side of a smear photograph; "
            f"send the photograph itself, at least {min_side}x{min_side} pixels."
        )


def locate_params_of(settings: DetectorSettings | None) -> LocateParams:
    """The localisation settings a detector was trained and evaluated with (its checkpoint's).

    Settings it lacks take their defaults, except the steps added later
    (:data:`~leukodetect.detection.locate.LEGACY_VALUES`), which a checkpoint from before them was
    never evaluated with: those are off. Without a stored record (no classifier, a plain cell
    classifier) the defaults apply.
    """
    if settings is None or settings.locate is None:
        return LocateParams()
    known = {f.name for f in fields(LocateParams)}
    return LocateParams(**{**LEGACY_VALUES, **{k: v for k, v in settings.locate.items() if k in known}})


def gate_of(settings: DetectorSettings | None) -> SmudgeGate | None:
    """The smudge gate stored with a detector (:mod:`.gate`), or None."""
    return None if settings is None or settings.gate is None else SmudgeGate.from_dict(dict(settings.gate))


def scorer_of(settings: DetectorSettings | None) -> CellScorer | None:
    """The cell scorer stored with a detector (:mod:`.scorer`), or None."""
    return None if settings is None or settings.scorer is None else CellScorer.from_dict(dict(settings.scorer))


#: A located cell whose centre lies nearer the photograph's frame than this many red-cell diameters is cut by it:
#: a white cell is about 1.5 red cells wide, so a third or more of it lies outside the picture, and its crop is
#: filled in by reflection. Such a cell is never a confident blast (a blast call becomes "review"). ALL-IDB1's
#: annotators left cut cells out too: none of its 510 annotated blasts lies this near its frame. Measured on
#: 2026-12-07 (docs/detection.md, "Cells cut by the frame"): with the shipped pair, ALL-IDB1's blast calls on no
#: annotated blast fall from 97 to 71 and no annotated blast is lost; BCCD's verdicts are unchanged; 8 benign Aria
#: fields of 804 go from ALL to review, and 2 ALL fields too.
EDGE_MARGIN = 0.5


def cut_by_frame(x: float, y: float, width: int, height: int, diameter: float, margin: float = EDGE_MARGIN) -> bool:
    """Whether a cell centred at (x, y) lies within ``margin`` red-cell diameters of the frame (never with margin 0)."""
    return bool(margin > 0 and min(x, y, width - 1 - x, height - 1 - y) < margin * diameter)


#: The review band of a model whose threshold is 0.5: P(blast) below 0.3 is normal, at or above 0.7 a blast.
REVIEW_BAND = (0.3, 0.7)


def review_band_of(threshold: float, given: tuple[float | None, float | None] | None = None) -> tuple[float, float]:
    """The review band around a model's blast threshold, with the sides ``given`` (None: derived) kept as they are.

    At the threshold 0.5 it is :data:`REVIEW_BAND`. A threshold chosen by ``calibrate`` moves the band with it, as wide
    in log-odds, so that the calibrated threshold is where the band's middle lies: with 0.2, P(blast) below about 0.1
    is normal and at or above 0.37 a blast. Without this the smear pipeline ignored a calibrated threshold.
    """
    lo_given, hi_given = given if given is not None else (None, None)
    t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    shift = np.log(t / (1 - t))
    lo, hi = (round(float(1 / (1 + np.exp(-(np.log(b / (1 - b)) + shift)))), 6) for b in REVIEW_BAND)
    return (lo if lo_given is None else lo_given), (hi if hi_given is None else hi_given)


def check_review_band(band: tuple[float | None, float | None] | None) -> None:
    """Refuse a review band outside [0, 1] or upside down (a side left None is derived later, :func:`review_band_of`)."""
    if band is None:
        return
    lo, hi = band
    if any(v is not None and not 0 <= v <= 1 for v in band) or (lo is not None and hi is not None and lo > hi):
        raise LeukoError(f"Review band {tuple(band)} must satisfy 0 <= lo <= hi <= 1.")


def call_of(prob: float | None, band: tuple[float, float]) -> str:
    """blast (P >= hi), normal (P < lo), review in between; "cell" when unclassified."""
    if prob is None:
        return "cell"
    lo, hi = band
    return "blast" if prob >= hi else "normal" if prob < lo else "review"


def analyze(
    image: Image.Image | np.ndarray,
    classifier=None,
    *,
    review_band: tuple[float | None, float | None] | None = None,
    rule: VerdictRule = VerdictRule(),
    params: LocateParams | None = None,
    batch_size: int = 32,
    use_gate: bool = True,
    use_scorer: bool = True,
    locator: WhiteCellLocator | None = None,
    rbc_diameter: float | None = None,
    edge_margin: float = EDGE_MARGIN,
    declared_as: str = "declared",
) -> dict:
    """Detect and classify the white cells of one smear photograph.

    Args:
        image: full-resolution RGB photograph.
        classifier: an :class:`~leukodetect.runtime.base.ImageClassifier` trained on cell crops
            (see :mod:`.crops`); None locates cells only (calls "cell", verdict "not classified").
        review_band: (lo, hi): P(blast) >= hi is a blast, < lo normal, in between review. None, or a side None: around
            the classifier's threshold (:func:`review_band_of`: 0.3 and 0.7 at 0.5; a cell scorer's probabilities
            keep 0.3 and 0.7, since a threshold calibrated on the crop classifier is not theirs).
        rule: the photograph verdict rule.
        params: localisation settings; None: those stored with the classifier
            (:func:`locate_params_of`).
        use_gate: apply the smudge gate stored with the classifier, if it has one (:mod:`.gate`):
            a located object it rejects is called "smudge", shown but not counted as a white cell.
        use_scorer: combine the crop classifier's P(blast) with the region measurements through the
            cell scorer stored with the classifier, if it has one (:mod:`.scorer`); each cell then
            also carries the crop classifier's own probability as ``prob_crop``. A scorer trained
            with the photograph's white-cell density uses it (``white_density`` in the result).
        locator: the learned white-cell locator (:mod:`leukodetect.runtime.locator`); None: the colour
            locator (:func:`~leukodetect.detection.locate.locate_cells`). With it, the red-cell diameter
            is measured first (touching red cells too) and the smudge gate and cell scorer, which read
            the colour locator's region measurements, are not used.
        rbc_diameter: the red-cell diameter in this photograph's pixels as the laboratory declares it (from its
            camera's pixel size, ``detect --pixel-size``), used instead of the one measured on each photograph;
            learned locator only. A photograph on which no red cell can be measured still cannot be assessed.
        declared_as: the result's ``scale`` where ``rbc_diameter`` is given: ``"declared"`` (the camera's pixel size) or
            ``"batch"`` (the median of a batch's readings, ``detect --batch-scale``).
        edge_margin: a cell centred within this many red-cell diameters of the frame is cut by it
            (:data:`EDGE_MARGIN`, :func:`cut_by_frame`): it is counted as a white cell, but a blast call on it
            becomes "review"; 0 switches this off.

    Returns:
        A JSON-ready dict: scale, cells (centroid, box, area, prob_blast, p_white_cell, call; with a
        guarded cell model also ood_score and unlike_training: a cell beyond the guard is called
        "review" whatever its P(blast); cut_by_frame: a blast-like cell cut by the frame is "review" too),
        counts, blast fraction among the white cells (smudge cells excluded), white-cell density
        (:func:`~leukodetect.detection.scorer.white_density`), verdict, reason (why a photograph cannot be assessed,
        or why it is "review" when some of its cells are unlike the model's training images or cut by the frame) and
        timing.
    """
    check_review_band(review_band)
    if not edge_margin >= 0:
        raise LeukoError(f"Edge margin {edge_margin} must be 0 (off) or a positive number of red-cell diameters.")
    check_declared_scale(rbc_diameter, locator)
    t0 = time.perf_counter()
    rgb = as_array(image)
    settings = classifier.detector if classifier is not None else None
    small = min(rgb.shape[:2]) < MIN_SIDE
    grey = not small and is_grayscale(rgb)
    scale_source = "measured"
    if small or grey:  # too small to be a smear, or no stain to threshold: any "cell" would be an artefact
        loc = nothing_located(params if params is not None else locate_params_of(settings))
    elif locator is not None:
        loc, scale_source = locate_learned(rgb, locator, rbc_diameter, declared_as=declared_as)
        use_gate = use_scorer = False  # both were fitted on the colour locator's region measurements
    else:
        loc = locate_cells(rgb, params if params is not None else locate_params_of(settings))
    t1 = time.perf_counter()
    cell_scale = getattr(classifier, "scale", None)
    factor = cell_scale.field if cell_scale is not None else settings.crop_factor if settings is not None else DEFAULT_CROP_FACTOR
    side = factor * loc.rbc_diameter
    probs: list[float | None] = [None] * len(loc.cells)
    ood: list[float | None] = [None] * len(loc.cells)  # the cell model's guard score, where it has a guard
    if classifier is not None and loc.cells:
        size = classifier.preset.image_size
        crops = [crop_around(rgb, c.x, c.y, side, size) for c in loc.cells]
        found, scores = classifier.image_outputs(crops, batch_size=batch_size)
        probs = [float(p) for p in found]
        if scores is not None:
            ood = [float(v) for v in scores]
    unlike = [classifier is not None and classifier.beyond_guard(v) for v in ood]
    height, width = rgb.shape[:2]
    cut = [cut_by_frame(c.x, c.y, width, height, loc.rbc_diameter, edge_margin) for c in loc.cells]
    gate = gate_of(settings) if use_gate else None
    p_cell = gate.probability(loc.features) if gate is not None and loc.cells else [None] * len(loc.cells)
    n_kept = sum(q is None or q >= gate.threshold for q in p_cell)
    density = white_density(n_kept, width, height, loc.rbc_diameter)
    scorer = scorer_of(settings) if use_scorer else None
    crop_probs = probs
    if scorer is not None and loc.cells:
        probs = [float(p) for p in scorer.combine(crop_probs, loc.features, density)]
    t2 = time.perf_counter()
    smudge = [q is not None and q < gate.threshold for q in p_cell]
    lo, hi = band = review_band_of(0.5 if classifier is None or scorer is not None else classifier.threshold, review_band)
    check_review_band(band)
    # A cell beyond the cell model's guard, or a blast-like one cut by the frame, is "review" whatever its P(blast),
    # which stays beside it.
    blast_like = [call_of(p, band) for p in probs]
    calls = ["smudge" if s else "review" if odd or (k and b == "blast") else b for s, odd, k, b in zip(smudge, unlike, cut, blast_like)]
    cut_blasts = sum(k and b == "blast" and not odd and not s for k, b, odd, s in zip(cut, blast_like, unlike, smudge))
    cells = [
        {**c.to_dict(), "prob_blast": None if p is None else round(p, 5),
         "p_white_cell": None if q is None else round(float(q), 5), "call": call, "cut_by_frame": k}
        | ({"prob_crop": round(float(pc), 5)} if scorer is not None else {})
        | ({"ood_score": round(v, 4), "unlike_training": odd} if v is not None else {})
        for c, p, q, pc, v, odd, k, call in zip(loc.cells, probs, p_cell, crop_probs, ood, unlike, cut, calls)
    ]
    counts = {k: sum(c["call"] == k for c in cells) for k in ("blast", "review", "normal", "smudge")}
    white = len(cells) - counts["smudge"]
    n_unlike = sum(c.get("unlike_training", False) and c["call"] != "smudge" for c in cells)
    measured = loc.rbc_diameter if locator is not None and scale_source in MEASURED_SOURCES else None
    reason = assessment(grey, loc.rbc_count, white, size=(width, height) if small else None, measured_diameter=measured)
    if reason is not None:
        verdict = CANNOT_ASSESS
    else:
        verdict = rule(counts["blast"], counts["review"]) if classifier is not None else "not classified"
        why = []
        if verdict == "review" and n_unlike:
            why.append(f"{n_unlike} of its {white} white cells {'is' if n_unlike == 1 else 'are'} {UNLIKE_TRAINING}")
        if verdict == "review" and cut_blasts:
            why.append(f"{cut_blasts} blast-like {'cell is' if cut_blasts == 1 else 'cells are'} cut by the photograph's frame")
        reason = "; ".join(why) + ": a person should look" if why else None
    return {
        "width": width, "height": height,
        "rbc_diameter": loc.rbc_diameter, "rbc_count": loc.rbc_count,
        "crop_factor": factor, "crop_side": round(side, 1),
        "review_band": [lo, hi], "rule": asdict(rule), "locator": "learned" if locator is not None else "colour",
        "scale": "unknown" if loc.rbc_count == 0 else scale_source,
        "n_cells": white, "n_blast": counts["blast"], "n_review": counts["review"], "n_normal": counts["normal"],
        "n_smudge": counts["smudge"], "n_unlike_training": n_unlike,
        "n_cut_blast_like": cut_blasts, "edge_margin": edge_margin, "smudge_gate": gate is not None, "cell_scorer": scorer is not None,
        "white_density": round(density, 4),
        "blast_fraction": counts["blast"] / white if white and classifier is not None else None,
        "verdict": verdict, "reason": reason,
        "timing": {"locate_s": round(t1 - t0, 3), "classify_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)},
        "cells": cells,
    }


def check_declared_scale(rbc_diameter: float | None, locator) -> None:
    """Refuse a declared red-cell diameter without the learned locator (the colour locator measures its own)."""
    if rbc_diameter is not None and locator is None:
        raise LeukoError("A declared pixel size (--pixel-size) works with the learned locator (--locator learned, the "
                         "default); the colour locator measures each photograph itself.")


#: Where the learned locator finds no white cell at a smear's red-cell estimate, and the stain-free estimate
#: differs from it by more than this factor, the locator looks again at the stain-free one (a second look). The
#: packed red-cell estimate of a blurred or crowded field can be clumps, 1.5-10 times too large: measured on
#: 2026-12-07 (docs/detection.md, "A second look"), 2 of BCCD's 364 fields (139 and 181 px) and 5 of Aria's 804 (47-154
#: px) found no white cell at it, the stain-free estimate read them at 84-90 px (BCCD's median red cell: 91 px) and
#: 15-21 px (Aria's: 15 px), and at it all 7 got the right verdict. Only then: where cells were found, a ratio does not
#: tell a wrong estimate from a right one (on 19 of BCCD's fields, all right, the stain-free estimate reads 44-67 px
#: against red-cell estimates of 79-114).
SECOND_LOOK_RATIO = 1.5


def locate_learned(rgb: np.ndarray, locator: WhiteCellLocator, declared: float | None = None, *,
                   declared_as: str = "declared") -> tuple[Localisation, str]:
    """White cells found by the learned locator, at the red-cell diameter measured first (or ``declared``); and
    where the diameter came from ("measured", "packed", "foreground", or ``declared_as`` ("declared", "batch");
    :func:`~leukodetect.runtime.scale.estimate_smear_diameter`).

    An image whose cells cannot be measured, with the stain or without it, gets no cells and ``rbc_count`` 0: its
    scale is unknown, and the verdict says so rather than guess; a declared diameter does not change that, since
    an image without cells (a blank frame, noise) is no smear. Where no white cell is found at a measured
    diameter that the stain-free estimate contradicts (:data:`SECOND_LOOK_RATIO`), the locator looks again at the
    stain-free one, which is then the photograph's diameter (source "foreground") if it finds cells there. Each
    cell's box is 1.5 red-cell diameters square (a white cell's usual size); its area is that of a disc of the same
    diameter.
    """
    scale = estimate_smear_diameter(rgb, stain_free_check=declared is None)  # declared: is this a smear?
    if scale.diameter is None:  # the placeholder diameter only sizes the (empty) drawings; "scale" says unknown
        return nothing_located(LocateParams()), "unknown"
    d = scale.diameter if declared is None else float(declared)
    source = scale.source if declared is None else declared_as
    found = locator.locate(rgb, d)
    if not found and declared is None:
        other = stain_free_diameter(rgb)
        if other is not None and max(d, other) > SECOND_LOOK_RATIO * min(d, other):
            again = locator.locate(rgb, other)
            if again:
                d, found, source = other, again, "foreground"
    height, width = rgb.shape[:2]
    half = 0.75 * d
    cells = [
        Cell(x=round(x, 1), y=round(y, 1),
             box=(max(0, int(x - half)), max(0, int(y - half)), min(width, int(x + half) + 1), min(height, int(y + half) + 1)),
             area=round(float(np.pi * half ** 2), 1))
        for x, y, _ in sorted(found, key=lambda p: (p[1], p[0]))
    ]
    work = locator.settings.rbc_px / d
    return Localisation(cells=cells, rbc_diameter=d, rbc_count=max(1, scale.red_cells), work_factor=work, stain_threshold=0.0), source


#: The verdict of a photograph that holds no evidence either way, with a ``reason``: "healthy" means white
#: cells were seen and none was a blast, never that nothing could be seen.
CANNOT_ASSESS = "cannot_assess"


def is_grayscale(rgb: np.ndarray, *, tolerance: int = 6) -> bool:
    """Whether an image has no colour (every pixel's channels within ``tolerance`` levels): no stain to read."""
    step = max(1, round(max(rgb.shape[:2]) / 512))  # a sample is enough to tell
    sample = rgb[::step, ::step].astype(np.int16)
    return int(np.abs(sample - sample.mean(axis=2, keepdims=True)).max()) <= tolerance


def nothing_located(params: LocateParams) -> Localisation:
    """The localisation of an image that is not looked into (too small, or without colour): no cells, no red cells."""
    return Localisation(cells=[], rbc_diameter=params.default_diameter, rbc_count=0, work_factor=1.0, stain_threshold=0.0)


def assessment(grey: bool, rbc_count: int, white_cells: int, *, size: tuple[int, int] | None = None,
               measured_diameter: float | None = None) -> str | None:
    """Why a photograph cannot be assessed, or None when it can.

    An image below :data:`MIN_SIDE` pixels a side (``size``, width and height) cannot show a smear; a
    grayscale image has no stain; without red cells to measure, the scale (and so every cell's crop)
    is a guess, which is also what noise and blank frames give; and a photograph in which no white
    cell was found says nothing about blasts. Where the learned locator looked at a measured red-cell diameter
    (``measured_diameter``), that reason names it and says what to do if it is wrong: a blurred field's red cells can be
    misread at twice their size or more, and then its white cells are missed (BCCD 00050 and 00090: 199 and 208 px
    against the laboratory's 91).
    """
    if size is not None:
        return (f"the image is {size[0]}x{size[1]} pixels, below the {MIN_SIDE}-pixel minimum side of a smear photograph, "
                "so it cannot show a blood smear (send the photograph itself)")
    if grey:
        return "the image has no colour; a stained blood smear is in colour (send the colour photograph)"
    if rbc_count == 0:
        return "no red cells could be measured, so the image's scale is unknown (is this a blood-smear photograph?)"
    if white_cells == 0 and measured_diameter is not None:
        return (f"no white cells were found, so nothing can be said about blasts (looked for at a measured red-cell diameter of "
                f"{measured_diameter:.0f} pixels; if the camera's pixel size is known, pass it with --pixel-size)")
    if white_cells == 0:
        return "no white cells were found, so nothing can be said about blasts"
    return None


#: Overlays of smaller photographs are enlarged to this long side, so that boxes and numbers can be read
#: (Aria's fields are 224 pixels, BCCD's 640).
OVERLAY_MIN_SIDE = 800


def overlay_header(result: dict) -> str:
    """The overlay's first line: the verdict with its reason, or with the counts where there is none."""
    header = f"{result['verdict']}: {result['n_blast']} blast, {result['n_review']} review, {result['n_cells']} white cells"
    if result.get("reason"):
        header = f"{result['verdict']}: {result['reason']}"
    if result.get("n_smudge"):
        header += f", {result['n_smudge']} smudge"
    return header


def draw_overlay(image: Image.Image | np.ndarray, result: dict, *, max_side: int = 2000,
                 min_side: int = OVERLAY_MIN_SIDE) -> Image.Image:
    """The photograph with a box per cell coloured by call and P(blast), under a white band with the verdict.

    The photograph is downscaled to ``max_side`` or, when smaller than ``min_side``, enlarged to it; the
    verdict and its reason are wrapped to the picture's width in the band above it, so that neither is cut
    off nor drawn over the cells.
    """
    rgb = as_array(image)
    height, width = rgb.shape[:2]
    long_side = max(height, width)
    scale = max_side / long_side if long_side > max_side else min_side / long_side if long_side < min_side else 1.0
    # An explicit size, at least 1 pixel a side: with fx/fy a 1x20000 strip rounded to a 0-pixel width.
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = rgb.copy() if scale == 1 else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    thick = max(1, round(max(canvas.shape[:2]) / 600))
    for cell in result["cells"]:
        x0, y0, x1, y1 = (round(v * scale) for v in cell["box"])
        colour = COLOURS[cell["call"]]
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thick)
        if cell["prob_blast"] is not None:
            text = f"{cell['prob_blast']:.2f}"
            (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, thick)
            cv2.putText(canvas, text, (label_x(x0, x1, text_width, canvas.shape[1]), max(12, y0 + 12)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thick, colour, thick, cv2.LINE_AA)
    return Image.fromarray(np.vstack([header_band(overlay_header(result), canvas.shape[1], thick), canvas]))


def label_x(x0: int, x1: int, text_width: int, width: int) -> int:
    """Where a box's P(blast) starts: right of the box, or left of it where the frame would cut it (a cell at the
    right edge), and never outside a picture ``width`` pixels wide."""
    x = x1 + 2 if x1 + 2 + text_width <= width else x0 - 2 - text_width
    return int(min(max(0, x), max(0, width - text_width)))


def header_band(text: str, width: int, thick: int = 1) -> np.ndarray:
    """A white band ``width`` pixels wide holding ``text`` in black, wrapped to lines that fit it."""
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.6 * thick
    (sample, line), _ = cv2.getTextSize("x" * 40, font, size, thick + 1)
    per_line = max(8, int((width - 20) / (sample / 40)))
    lines = textwrap.wrap(text, per_line) or [""]
    step = line + 12 * thick
    band = np.full((step * len(lines) + 10 * thick, width, 3), 255, np.uint8)
    for i, words in enumerate(lines):
        cv2.putText(band, words, (10, step * (i + 1)), font, size, (0, 0, 0), thick + 1, cv2.LINE_AA)
    return band


def draw_gallery(image: Image.Image | np.ndarray, result: dict, *, tile: int = 96, columns: int = 10) -> Image.Image:
    """The cell crops as tiles, highest P(blast) first, each captioned with its P(blast) and call."""
    rgb = as_array(image)
    order = sorted(result["cells"], key=lambda c: -(c["prob_blast"] if c["prob_blast"] is not None else -1))
    rows = max(1, -(-len(order) // columns))
    caption = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, cell in enumerate(order):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        sheet.paste(Image.fromarray(crop_around(rgb, cell["x"], cell["y"], result["crop_side"], tile)), (x, y))
        text = cell["call"] if cell["prob_blast"] is None else f"{cell['prob_blast']:.2f} {cell['call']}"
        draw.text((x + 3, y + tile), text, fill=COLOURS[cell["call"]])
    if not order:
        draw.text((5, 5), "no white cells found", fill=(0, 0, 0))
    return sheet


class Detector:
    """The whole-smear detector served at ``/v1/analyze``: :func:`analyze` plus the overlay image.

    An image below :data:`MIN_SIDE` pixels a side is answered ``cannot_assess`` with its reason, as
    :func:`analyze` answers it.
    """

    def __init__(self, classifier, **kwargs) -> None:
        self.classifier = classifier
        self.kwargs = kwargs

    def analyze(self, image: Image.Image) -> dict:
        rgb = pixels_of(image)  # once: analysis, overlay and gallery share one array
        result = analyze(rgb, self.classifier, **self.kwargs)
        result["counts"] = {k: result[f"n_{k}"] for k in ("blast", "review", "normal", "smudge")}
        result["cells"] = [{**c, "label": c["call"]} for c in result["cells"]]
        result["overlay"] = draw_overlay(rgb, result)
        result["gallery"] = draw_gallery(rgb, result)  # the reviewer's per-cell sheet, highest P(blast) first
        return result


def pixels_of(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as the (H, W, 3) uint8 array :func:`analyze` and the drawings take, converted once.

    An RGB image (what :func:`~leukodetect.runtime.images.open_rgb` returns) is read without the
    intermediate copy ``as_array``'s ``convert("RGB")`` makes: for a 60-megapixel smear that copy
    is 180 MB more at the service's peak.
    """
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return np.asarray(image)
    return as_array(image)


def load_detector(path: Path, *, locator: Path | None = None, rbc_diameter: float | None = None, **classifier_kwargs) -> Detector:
    """A :class:`Detector` around the crop classifier checkpoint at ``path`` and the learned locator at ``locator``
    (None: the colour locator), at the laboratory's declared red-cell diameter if given (:func:`analyze`).

    ``classifier_kwargs`` go to :class:`~leukodetect.runtime.classifier.Classifier` (backend, threads, log).
    """
    kwargs = {"locator": WhiteCellLocator.load(Path(locator))} if locator is not None else {}
    if rbc_diameter is not None:
        kwargs["rbc_diameter"] = rbc_diameter
    return Detector(Classifier.from_checkpoint(Path(path), **classifier_kwargs), **kwargs)
