"""Macenko stain normalisation toward the training domain, for cross-dataset checks.

A model trained on one lab's smears sees another lab's stain as a shift in colour. Macenko's method
(ISBI 2009, here torchstain's numpy implementation) estimates each image's two stain vectors and
stain concentrations in optical density, and re-renders the image with the stain vectors and
concentration scale of a reference fitted on images of the training domain.

Segmented data sets (C-NMC 2019) put each cell on pure black. Black is not stain: its optical
density is the highest of any pixel and would dominate the estimate. Pixels whose every channel is
at most :data:`BACKGROUND_LEVEL` are therefore left out: only the other pixels are normalised and
the background is put back unchanged, so the result does not depend on how much black surrounds a
cell. An image Macenko cannot handle (too few stained pixels, one colour only, a degenerate fit) is
kept unnormalised with a note and counted in :attr:`MacenkoStain.failed`, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torchstain
from PIL import Image

from leukodetect.errors import LeukoError
from leukodetect.runtime.images import IMAGE_SUFFIXES, open_rgb

#: A pixel whose R, G and B are all at most this is background (C-NMC's black), not stain.
BACKGROUND_LEVEL = 10
#: Transmitted light intensity Io and transparency threshold beta of torchstain's Macenko defaults.
IO = 240
BETA = 0.15
#: Fewer stained pixels (optical density >= beta in every channel) than this give no stable estimate.
MIN_STAINED_PIXELS = 50
#: Stain vectors closer than this cosine are one stain: the image has a single colour to unmix.
MAX_STAIN_COSINE = 0.999
#: Reference images used when a folder is given: evenly spaced over its sorted files.
REFERENCE_IMAGES = 8


class StainError(LeukoError):
    """Macenko normalisation is impossible for this image (or reference)."""


def foreground(rgb: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the pixels that are not black background."""
    return rgb.max(axis=-1) > BACKGROUND_LEVEL


def _macenko():
    return torchstain.normalizers.MacenkoNormalizer(backend="numpy")


def _estimate(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix (3x2) and 99th-percentile concentrations of (N, 3) uint8 pixels, checked.

    Raises StainError where the estimate would be meaningless instead of returning garbage.
    """
    od = -np.log((pixels.astype(float) + 1) / IO)
    stained = int(np.all(od >= BETA, axis=1).sum())
    if stained < MIN_STAINED_PIXELS:
        raise StainError(f"{stained} stained pixels, fewer than the {MIN_STAINED_PIXELS} Macenko needs")
    probe = _macenko()
    with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
        try:
            probe.fit(pixels.reshape(-1, 1, 3), Io=IO, beta=BETA)
        except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError) as exc:
            raise StainError(f"the stain estimate failed ({type(exc).__name__}: {exc})") from exc
    he, max_c = np.asarray(probe.HERef, float), np.asarray(probe.maxCRef, float)
    if not (np.all(np.isfinite(he)) and np.all(np.isfinite(max_c))) or np.any(max_c <= 0):
        raise StainError("the stain estimate is not finite or has no stain concentration")
    cosine = abs(he[:, 0] @ he[:, 1]) / (np.linalg.norm(he[:, 0]) * np.linalg.norm(he[:, 1]))
    if cosine > MAX_STAIN_COSINE:
        raise StainError("one stain colour only (the two stain vectors coincide)")
    return he, max_c


class MacenkoStain:
    """PIL RGB image -> PIL RGB image re-rendered in the reference's stain; black background kept.

    Build it with :meth:`fit` (images) or :meth:`from_reference` (a file or folder). Calling it never
    raises: an image that cannot be normalised comes back unchanged, a sentence is appended to
    ``notes`` and :attr:`failed` grows by one; :attr:`normalised` counts the others.
    """

    method = "macenko"

    def __init__(self, stain_matrix: np.ndarray, max_concentrations: np.ndarray, reference: Sequence[str] = ()) -> None:
        """``stain_matrix``: the reference's stain vectors (3x2, optical density per R, G, B);
        ``max_concentrations``: their 99th-percentile concentrations; ``reference``: the files fitted on."""
        self.stain_matrix = np.asarray(stain_matrix, float)
        self.max_concentrations = np.asarray(max_concentrations, float)
        self.reference = [str(p) for p in reference]
        self.normalised = 0
        self.failed = 0
        self.reordered = 0

    @classmethod
    def fit(cls, images: Sequence[Image.Image], reference: Sequence[str] = ()) -> MacenkoStain:
        """Fit the reference stain on the non-background pixels of all ``images`` together."""
        pixels = [np.asarray(im.convert("RGB")).reshape(-1, 3) for im in images]
        pixels = np.concatenate([p[p.max(axis=1) > BACKGROUND_LEVEL] for p in pixels] or [np.empty((0, 3), np.uint8)])
        try:
            he, max_c = _estimate(pixels)
        except StainError as exc:
            where = ", ".join(Path(p).name for p in reference[:3]) or "the reference images"
            raise LeukoError(f"Cannot fit a stain reference on {where}: {exc}; pass stained cell images "
                             "of the training data to --stain-reference.") from None
        return cls(he, max_c, reference)

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> MacenkoStain:
        """Fit on these image files together."""
        return cls.fit([open_rgb(p) for p in paths], reference=[str(p) for p in paths])

    @classmethod
    def from_reference(cls, path: str | Path, *, n: int = REFERENCE_IMAGES) -> MacenkoStain:
        """Fit on one image, or on ``n`` images evenly spaced over a folder's sorted image files."""
        return cls.from_paths(reference_paths(path, n=n))

    def fresh(self) -> MacenkoStain:
        """The same reference with its counts at zero."""
        return MacenkoStain(self.stain_matrix, self.max_concentrations, self.reference)

    def describe(self) -> dict:
        """JSON-ready facts for a report: method, reference files, counts."""
        return {"method": self.method, "reference": self.reference, "background_level": BACKGROUND_LEVEL,
                "normalised": self.normalised, "failed": self.failed,
                "stain_order_matched_to_reference": self.reordered}

    def normalize(self, image: Image.Image) -> Image.Image:
        """The normalised image; raises StainError where Macenko cannot handle it."""
        return self._normalize(image)[0]

    def _normalize(self, image: Image.Image) -> tuple[Image.Image, bool]:
        """The normalised image, and whether the reference stains were paired in swapped order."""
        rgb = np.asarray(image.convert("RGB"))
        mask = foreground(rgb)
        cell = rgb[mask]
        he, _ = _estimate(cell)  # fails loudly on what torchstain would silently turn into nonsense
        normalizer = _macenko()
        normalizer.HERef, normalizer.maxCRef, swapped = self.matched_reference(he)
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            try:
                out, _, _ = normalizer.normalize(cell.reshape(-1, 1, 3), Io=IO, beta=BETA, stains=False)
            except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError) as exc:
                raise StainError(f"normalisation failed ({type(exc).__name__}: {exc})") from exc
        result = rgb.copy()
        result[mask] = out.reshape(-1, 3)
        return Image.fromarray(result), swapped

    def matched_reference(self, stain_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """The reference stains (and concentrations) in the order that matches the image's own stain
        vectors, and whether that order is swapped.

        torchstain orders an image's two stain vectors by their red optical density, a rule made for
        H&E. In a Giemsa-stained cell without red cells around it (C-NMC), the purple nucleus has the
        smaller red density of the two, so the rule pairs the nucleus with the reference's pink (red
        cell) stain and paints it orange. Pairing each vector with the reference vector it points
        closest to (largest summed cosine) keeps the nucleus purple; where torchstain's order is
        already the closer one (H&E-like images, the reference domain itself), nothing changes.
        """
        ref_he, ref_max = self.stain_matrix, self.max_concentrations
        unit = stain_matrix / np.linalg.norm(stain_matrix, axis=0)
        ref_unit = ref_he / np.linalg.norm(ref_he, axis=0)
        cos = unit.T @ ref_unit  # cos[i, j]: image stain i against reference stain j
        if cos[0, 1] + cos[1, 0] > cos[0, 0] + cos[1, 1]:
            return ref_he[:, ::-1].copy(), ref_max[::-1].copy(), True
        return ref_he, ref_max, False

    def __call__(self, image: Image.Image, notes: list[str] | None = None) -> Image.Image:
        try:
            out, swapped = self._normalize(image)
        except StainError as exc:
            self.failed += 1
            if notes is not None:
                notes.append(f"stain normalisation skipped, image kept as it is: {exc}")
            return image
        self.normalised += 1
        self.reordered += int(swapped)
        return out


def reference_paths(path: str | Path, *, n: int = REFERENCE_IMAGES) -> list[Path]:
    """The reference images: ``path`` itself, or ``n`` evenly spaced over a folder's sorted images."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LeukoError(f"Stain reference {path} does not exist: pass an image or a folder of training-domain images.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LeukoError(f"Stain reference {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return pick_evenly(files, n)


def pick_evenly(items: Sequence, n: int) -> list:
    """``n`` items evenly spaced over ``items`` (all of them if there are no more than ``n``)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def stain_from_options(method: str, reference: str | Path | None) -> MacenkoStain | None:
    """The normaliser a command's ``--stain-normalize`` / ``--stain-reference`` ask for (None: none)."""
    if method not in ("none", "macenko"):
        raise LeukoError(f"Unknown --stain-normalize '{method}': use none or macenko.")
    if method == "none":
        if reference is not None:
            raise LeukoError("--stain-reference is only used with --stain-normalize macenko: add it, or drop --stain-reference.")
        return None
    if reference is None:
        raise LeukoError("--stain-normalize macenko needs --stain-reference: an image or folder of the model's training data "
                         "(e.g. a few ALL-IDB2 crops for the shipped model).")
    return MacenkoStain.from_reference(reference)
