"""Train the white-cell locator (:mod:`leukodetect.runtime.locator`) from points on smear photographs.

Every photograph is measured (red-cell diameter) and resampled once to the locator's scale; training
then draws square patches from these canonical images with the augmentation a new laboratory needs:
scale (0.8-1.25: a measured diameter is off by up to a fifth), rotation by right angles and flips,
stain and camera variation (:func:`~leukodetect.data.transforms.augment_colour`: HED, brightness,
contrast, saturation, blur, JPEG). Targets are Gaussian bumps (sigma one heat-map cell) at the
annotated centres; the loss is CenterNet's focal loss, with the heat-map cells around a photograph's
unannotated objects (:attr:`Smear.ignore`) left out of it. Runs on a CPU in minutes.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors

from leukodetect.config import AugmentConfig
from leukodetect.data.transforms import augment_colour
from leukodetect.models.centres import STRIDE, CentreNet, focal_loss
from leukodetect.runtime.images import open_rgb
from leukodetect.runtime.locator import (
    LocatorSettings,
    WhiteCellLocator,
    resample,
    standardise,
)
from leukodetect.runtime.scale import ScaleEstimate, estimate_rbc_diameter, estimate_smear_diameter


@dataclass(frozen=True)
class Smear:
    """One annotated photograph, resampled to the locator's scale.

    ``points`` are the white-cell centres in the canonical image's pixels; ``factor`` maps the
    photograph's pixels to them; ``rbc_diameter`` (photograph pixels) and ``scale_source`` say how
    the scale was found.
    """

    name: str
    lab: str
    image: np.ndarray
    points: np.ndarray
    factor: float
    rbc_diameter: float
    scale_source: str
    path: Path | None = None
    layout: str = ""
    annotated: str = "all"  # "all" white cells, only the "blasts", or "none"
    #: centres (canonical pixels) of objects that may be white cells nobody annotated (ALL-IDB1's normal
    #: white cells on photographs whose blasts alone carry positions): left out of the loss, not background.
    ignore: np.ndarray | None = None
    #: the annotated white-cell boxes (x0, y0, x1, y1; canonical pixels) whose centres ``points`` are, where the
    #: layout draws boxes (BCCD): a found cell inside one also counts as found (``locator-eval``'s box columns).
    boxes: np.ndarray | None = None
    #: the annotated white-cell regions as a label image (0 background, 1..n a region; canonical pixels), where the
    #: layout draws masks (ALL-IDB1's ten masked photographs, one region per cell): a found cell inside one counts as
    #: found, a region once (``locator-eval``'s mask columns, as ``detect-eval`` scores them).
    regions: np.ndarray | None = None
    #: the white-cell centres (canonical pixels) a locator is scored against where they are not ``points``, the ones it
    #: is trained on: on ALL-IDB1's masked photographs each cell of the masks (``detection.match.mask_cells``), while
    #: training takes touching cells together (``jobs.locator._points``), as the shipped locator was trained.
    scored: np.ndarray | None = None

    @property
    def trainable(self) -> bool:
        """Whether it can teach the locator: its white cells (all, or its blasts) carry positions, or its
        unannotated objects are known (``ignore``), so that the rest of it is background."""
        return self.annotated != "none" or self.ignore is not None


@dataclass(frozen=True, kw_only=True)
class LocatorRecipe:
    """Training settings of the locator (recorded in its weights file)."""

    iterations: int = 2000
    batch_size: int = 16
    patch: int = 128
    lr: float = 2e-3
    scale_jitter: float = 1.25
    near_cell: float = 0.6  # share of patches centred near an annotated cell
    #: radius (red-cell diameters) around each of a smear's ``ignore`` points left out of the loss; 0: none.
    #: 1.0 since 2026-12-07: BCCD held out, recall 0.67 -> 0.92 (docs/detection.md).
    ignore_radius: float = 1.0
    hed: float = 0.05
    colour: float = 0.3
    blur: float = 0.3
    jpeg: float = 0.3
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Marks:
    """What a photograph's annotation gives, in the photograph's own pixels (:func:`canonical_smear` resamples each to
    the locator's scale; :class:`Smear` names what each becomes)."""

    #: white-cell centres (x, y); None: one cell at the image's centre (a single-cell crop, PBC)
    points: Sequence[tuple[float, float]] | np.ndarray | None = None
    #: which white cells ``points`` covers: "all", only the "blasts", or "none"
    annotated: str = "all"
    #: objects that may be white cells nobody annotated (:attr:`Smear.ignore`)
    ignore: np.ndarray | None = None
    #: white-cell boxes (x0, y0, x1, y1) (:attr:`Smear.boxes`)
    boxes: Sequence[tuple[float, float, float, float]] | np.ndarray | None = None
    #: white-cell regions, a label image of the photograph's size (:attr:`Smear.regions`)
    regions: np.ndarray | None = None
    #: the centres to score against where they are not ``points`` (:attr:`Smear.scored`)
    scored: np.ndarray | None = None


def _scaled(values, factor: float, width: int) -> np.ndarray | None:
    """``values`` (rows of ``width`` coordinates, photograph pixels) in canonical pixels, or None."""
    return None if values is None else np.asarray(values, dtype=np.float32).reshape(-1, width) * factor


def canonical_smear(path: Path, lab: str, marks: Marks, rbc_px: float = LocatorSettings.rbc_px, *, name: str | None = None,
                    layout: str = "", rgb: np.ndarray | None = None, declared: float | None = None) -> Smear | str:
    """The photograph at ``path`` resampled to ``rbc_px`` pixels per red cell, with its annotation ``marks``, or why it
    cannot be.

    ``rgb``: the photograph's pixels where the caller has read them already; ``declared``: the red-cell diameter in its
    pixels where its laboratory declares one (``LAB=PATH@PIXELS``): it is used instead of measuring one (scale source
    "declared").
    """
    rgb = np.asarray(open_rgb(path)) if rgb is None else rgb
    single = marks.points is None
    points = (((rgb.shape[1]) / 2, (rgb.shape[0]) / 2),) if single else marks.points
    if declared is not None:
        scale = ScaleEstimate(float(declared), "declared")
    else:  # a field is measured as detect measures it; a single-cell crop (no positions) holds too few cells to go without red ones
        scale = estimate_rbc_diameter(rgb, packed=True) if single else estimate_smear_diameter(rgb)
    if scale.diameter is None:
        return f"{path}: no red-cell diameter could be measured, so its scale is unknown; left out"
    factor = rbc_px / scale.diameter
    small = resample(rgb, factor)
    masked = None if marks.regions is None else cv2.resize(np.asarray(marks.regions, np.int32).astype(np.float32), small.shape[1::-1],
                                                           interpolation=cv2.INTER_NEAREST).astype(np.int32)
    return Smear(name or Path(path).stem, lab, small, _scaled(points, factor, 2), factor, scale.diameter, scale.source, Path(path),
                 layout, marks.annotated, _scaled(marks.ignore, factor, 2), _scaled(marks.boxes, factor, 4), masked,
                 _scaled(marks.scored, factor, 2))


def heat_target(points: np.ndarray, size: int) -> np.ndarray:
    """(size/STRIDE)^2 target: 1 at each centre's cell, a Gaussian (sigma 1 cell) around it, the maximum where they overlap."""
    cells = size // STRIDE
    target = np.zeros((cells, cells), np.float32)
    if len(points) == 0:
        return target
    grid_y, grid_x = np.mgrid[0:cells, 0:cells]
    for x, y in points:
        c, r = int(x // STRIDE), int(y // STRIDE)
        if not (0 <= c < cells and 0 <= r < cells):
            continue
        bump = np.exp(-((grid_x - c) ** 2 + (grid_y - r) ** 2) / 2.0)
        np.maximum(target, bump, out=target)
        target[r, c] = 1.0
    return target


def ignore_weight(points: np.ndarray, size: int, radius: float) -> np.ndarray:
    """(size/STRIDE)^2 loss weights: 0 on the heat-map cells within ``radius`` input pixels of any of ``points``, else 1."""
    cells = size // STRIDE
    weight = np.ones((cells, cells), np.float32)
    if len(points) == 0 or radius <= 0:
        return weight
    centres = (np.mgrid[0:cells, 0:cells] + 0.5) * STRIDE  # (row, col) centres in input pixels
    for x, y in points:
        weight[(centres[1] - x) ** 2 + (centres[0] - y) ** 2 <= radius**2] = 0.0
    return weight


class PatchSampler:
    """Random augmented training patches (standardised image, target, loss weight) from canonical smears."""

    def __init__(self, smears: list[Smear], recipe: LocatorRecipe) -> None:
        self.smears = smears
        self.recipe = recipe
        self.rng = np.random.default_rng(recipe.seed)
        self.colour = augment_colour(AugmentConfig(hed=recipe.hed, colour=recipe.colour, blur=recipe.blur, jpeg=recipe.jpeg))
        # Each laboratory gets an equal share of patches; within one, photographs are drawn in proportion
        # to their area, so a large photograph is not seen as often as a small field.
        area = np.array([s.image.shape[0] * s.image.shape[1] for s in smears], dtype=float)
        labs = [s.lab for s in smears]
        lab_area = {lab: sum(a for a, b in zip(area, labs) if b == lab) for lab in set(labs)}
        self.weights = np.array([a / lab_area[b] for a, b in zip(area, labs)]) / len(lab_area)
        self.fill = [tuple(int(v) for v in np.median(s.image.reshape(-1, 3), axis=0)) for s in smears]

    def patch(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        rec, rng = self.recipe, self.rng
        index = rng.choice(len(self.smears), p=self.weights)
        smear = self.smears[index]
        zoom = math.exp(rng.uniform(-math.log(rec.scale_jitter), math.log(rec.scale_jitter)))
        height, width = smear.image.shape[:2]
        if len(smear.points) and rng.random() < rec.near_cell:
            cx, cy = smear.points[rng.integers(len(smear.points))] + rng.uniform(-rec.patch / 3, rec.patch / 3, 2) / zoom
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        half = (rec.patch - 1) / 2
        matrix = np.array([[zoom, 0.0, half - zoom * cx], [0.0, zoom, half - zoom * cy]])
        # Beyond the photograph: its median colour (a reflection would mirror white cells without their labels).
        img = cv2.warpAffine(smear.image, matrix, (rec.patch, rec.patch), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill[index])
        # Annotated centres inside the patch become targets; unannotated objects (``ignore``) within the ignored
        # radius of it (in patch pixels: a canonical red cell is rbc_diameter * factor pixels) are left out of the loss.
        radius = rec.ignore_radius * smear.rbc_diameter * smear.factor * zoom if smear.ignore is not None else 0.0
        pts = np.concatenate([smear.points, smear.ignore]) if radius > 0 else smear.points
        labelled = np.arange(len(pts)) < len(smear.points)
        if len(pts):
            pts = pts @ matrix[:, :2].T + matrix[:, 2]
            low = np.where(labelled, 0.0, -radius)[:, None]
            keep = ((pts >= low) & (pts < rec.patch - low)).all(axis=1)
            pts, labelled = pts[keep], labelled[keep]
        k = int(rng.integers(4))
        if k:
            img = np.rot90(img, k)
            for _ in range(k):  # np.rot90 turns counter-clockwise: (x, y) -> (y, size - 1 - x)
                pts = np.stack([pts[:, 1], rec.patch - 1 - pts[:, 0]], axis=1) if len(pts) else pts
        if rng.random() < 0.5:
            img = img[:, ::-1]
            pts = np.stack([rec.patch - 1 - pts[:, 0], pts[:, 1]], axis=1) if len(pts) else pts
        tensor = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        if self.colour is not None:
            tensor = self.colour(tensor)
        rgb = tensor.permute(1, 2, 0).numpy()
        pts = np.asarray(pts).reshape(-1, 2)
        target = heat_target(pts[labelled], rec.patch)
        weight = np.maximum(ignore_weight(pts[~labelled], rec.patch, radius), target == 1)  # a centre always counts
        return standardise(rgb), target, weight

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, ws = zip(*(self.patch() for _ in range(n)))
        return torch.stack(xs), torch.from_numpy(np.stack(ys))[:, None], torch.from_numpy(np.stack(ws))[:, None]


def fit_locator(smears: list[Smear], recipe: LocatorRecipe | None = None, settings: LocatorSettings | None = None,
                *, log=print, every: int = 200) -> WhiteCellLocator:
    """Train a :class:`CentreNet` from scratch on ``smears`` (AdamW, one-cycle schedule)."""
    recipe = recipe or LocatorRecipe()
    settings = settings or LocatorSettings()
    if recipe.ignore_radius <= 0:  # nothing left out of the loss: a photograph without positions would teach its white cells as background
        smears = [s for s in smears if s.annotated != "none"]
    if not smears:
        raise ValueError("no annotated photographs to train the locator on")
    torch.manual_seed(recipe.seed)
    net = CentreNet(width=settings.width)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.iterations, pct_start=0.1)
    sampler = PatchSampler(smears, recipe)
    net.train()
    t0, running = time.perf_counter(), []
    for step in range(1, recipe.iterations + 1):
        x, y, w = sampler.batch(recipe.batch_size)
        loss = focal_loss(net(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % every == 0 or step == recipe.iterations:
            log(f"locator step {step}/{recipe.iterations}: loss {np.mean(running):.3f} ({time.perf_counter() - t0:.0f} s)")
            running = []
    labs = dict(Counter(s.lab for s in smears))
    trained = LocatorSettings(**{**asdict(settings), "trained_on": labs, "recipe": asdict(recipe)})
    return WhiteCellLocator(net.eval(), trained)
