"""``leukodetect detect``: analyse smear photographs and write each one's JSON, overlay and gallery.

The library call is :func:`leukodetect.detection.pipeline.analyze` (an image in memory, a result
out); this job adds reading files, writing outputs that never overwrite anything, and a
``summary.csv`` for a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from leukodetect.detection.pipeline import (
    analyze,
    draw_gallery,
    draw_overlay,
    pixels_of,
)
from leukodetect.errors import BadImageError, LeukoError
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import image_paths_of, open_rgb
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.runtime.scale import (
    BATCH_SPREAD,
    MIN_BATCH,
    batch_basis,
    batch_diameter,
    estimate_smear_diameter,
    scale_agreement,
)
from leukodetect.utils import atomic_write, atomic_write_text, write_csv


def output_paths(image_path: Path, out_dir: Path) -> dict[str, Path]:
    """Where :func:`analyze_file` writes for ``image_path``."""
    stem = Path(image_path).stem
    return {"json": out_dir / f"{stem}.json", "overlay": out_dir / f"{stem}_overlay.png", "gallery": out_dir / f"{stem}_gallery.png"}


def check_distinct(paths: Sequence[Path], out_dir: Path) -> None:
    """Refuse two inputs that would write the same outputs (one name in two folders): one sentence naming both."""
    seen: dict[str, Path] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in seen and Path(seen[stem]) != Path(path):
            raise LeukoError(f"{seen[stem]} and {path} would both write {out_dir / stem}.json and its pictures; "
                             "run them into different --out folders, or rename one.")
        seen[stem] = Path(path)


def check_free(paths: Sequence[Path]) -> None:
    """Refuse to overwrite: one sentence naming the first output that already exists."""
    for path in paths:
        if Path(path).exists():
            raise LeukoError(f"{path} already exists; choose another --out folder or delete the old outputs first.")


def analyze_file(path: Path, classifier, out_dir: Path, **kwargs) -> dict:
    """Analyse one image file and write its JSON, overlay PNG and gallery PNG into ``out_dir``.

    Raises:
        BadImageError: the file cannot be read, is too small to be a smear photograph, or its analysis
            failed (one sentence naming it).
        LeukoError: an output already exists, or a setting is wrong.
    """
    path = Path(path)
    targets = output_paths(path, Path(out_dir))
    check_free(list(targets.values()))
    notes: list[str] = []
    try:  # reading and analysing: whatever fails here is this image's failure, said in one sentence
        image = open_rgb(path, notes=notes)
        rgb = pixels_of(image)
        result = {"image": str(path), **analyze(rgb, classifier, **kwargs), "notes": notes}
        overlay, gallery = draw_overlay(rgb, result), draw_gallery(rgb, result)
    except LeukoError:
        raise
    except Exception as exc:
        raise analysis_failed(path, exc) from exc
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for key, picture in (("overlay", overlay), ("gallery", gallery)):  # a crash mid-write leaves no half PNG behind
        atomic_write(targets[key], lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    result["outputs"] = {k: str(v) for k, v in targets.items()}
    atomic_write_text(targets["json"], json.dumps(result, indent=2) + "\n")
    return result


SUMMARY_COLUMNS = ("image", "verdict", "n_cells", "n_blast", "n_review", "n_smudge", "blast_fraction", "rbc_diameter", "scale", "locator",
                   "total_s", "error", "reason")


def detect_paths(paths: Sequence[Path], classifier, out_dir: Path, *, progress: bool = False, batch_scale: bool = False, log=print,
                 **kwargs) -> list[dict]:
    """Analyse many files; one that cannot be read or analysed is reported through ``log`` and skipped.

    With ``batch_scale`` every photograph is first measured, and all are then analysed at one red-cell diameter, the
    batch's (:func:`batch_scale_of`): for photographs of one microscope and camera whose pixel size is not known.

    Each failure is that file's error row, and the others go on. With more than one file a
    ``summary.csv`` (one row per file, errors included) is written too. Nothing is overwritten:
    every output is checked before the first image is read. A wrong setting, or a failure to write
    outputs (a full disk, a read-only folder), is not an image's fault and stops the run.
    """
    out_dir = Path(out_dir)
    summary = out_dir / "summary.csv"
    check_distinct(paths, out_dir)
    check_free([summary] * (len(paths) > 1) + [p for path in paths for p in output_paths(path, out_dir).values()])
    if batch_scale:
        kwargs.update(batch_scale_of(paths, locator=kwargs.get("locator"), declared=kwargs.get("rbc_diameter"), progress=progress, log=log))
    rows: list[dict] = []
    for path in tqdm(paths, desc="detect", disable=not progress):
        try:
            result = analyze_file(path, classifier, out_dir, **kwargs)
        except BadImageError as exc:  # unreadable, too small, or its analysis failed
            log(f"skipped: {exc}")
            rows.append({"image": str(path), "error": str(exc)})
            continue
        rows.append(result)
    note = scale_note(rows)
    if note:
        log(note)
    if len(paths) > 1:
        write_csv(summary, [{k: row.get("timing", {}).get(k) if k == "total_s" else row.get(k) for k in SUMMARY_COLUMNS}
                            for row in rows], SUMMARY_COLUMNS)
    return rows


def batch_scale_of(paths: Sequence[Path], *, locator, declared: float | None = None, progress: bool = False, log=print) -> dict:
    """The analysis settings (for ``analyze``) that give every photograph of ``paths`` the batch's red-cell diameter
    (:func:`~leukodetect.runtime.scale.batch_diameter` of each one's reading), or none (each photograph measured on its
    own) where fewer than :data:`~leukodetect.runtime.scale.MIN_BATCH` could be measured; said through ``log``.

    Each photograph is read here and again for its analysis: the batch's diameter is known only once all are measured,
    and keeping their pixels until then would hold the whole batch in memory (15 MB a 2592x1944 photograph).

    Raises:
        LeukoError: a pixel size is ``declared`` too, or ``locator`` is None (the colour locator measures each photograph
            itself).
    """
    if declared is not None:
        raise LeukoError("--batch-scale measures the batch's red-cell diameter and --pixel-size declares it: give one of them.")
    if locator is None:
        raise LeukoError("--batch-scale works with the learned locator (--locator learned, the default); the colour locator "
                         "measures each photograph itself.")
    readings = []
    for path in tqdm(paths, desc="red cells", disable=not progress):
        try:
            estimate = estimate_smear_diameter(pixels_of(open_rgb(path)))
        except Exception:  # noqa: BLE001 - unreadable or odd: that photograph's error row comes from the analysis that follows
            continue
        readings.append((estimate.diameter, estimate.source))
    basis = batch_basis(readings)
    if basis is None:
        log(f"--batch-scale: fewer than {MIN_BATCH} of these {len(paths)} photographs could be measured, so each is measured on "
            "its own.")
        return {}
    diameter = batch_diameter(readings)
    kind, values = basis
    log(f"--batch-scale: every photograph is analysed at a red-cell diameter of {diameter:g} px, the median of "
        + (f"the {len(values)} readings of isolated red cells" if kind == "isolated" else f"{len(values)} readings")
        + f" among {len(paths)} photographs.")
    return {"rbc_diameter": diameter, "declared_as": "batch"}


def scale_note(rows: Sequence[dict]) -> str | None:
    """One sentence when the red-cell diameters measured on a batch's photographs disagree (:func:`scale_agreement`), else
    None. Photographs with a declared scale, or none, do not count."""
    agreement = scale_agreement((row.get("rbc_diameter"), row.get("scale")) for row in rows)
    if agreement is None or not agreement["doubtful"]:
        return None
    return disagreement_sentence(agreement)


def disagreement_sentence(agreement: dict, *, images: str = "photographs", table: str = "summary.csv",
                          option: str = "--pixel-size") -> str:
    """The sentence for a batch whose red-cell readings disagree (a :func:`scale_agreement` result), in ``detect``'s log
    and ``smear-eval``'s report: how many of how many ``images``, their median, the ``table`` that lists each reading,
    and the ``option`` that declares the camera's pixel size."""
    return (f"The red-cell diameters measured on {agreement['disagree']} of these {agreement['photographs']} {images} lie more than "
            f"{BATCH_SPREAD:g} times above or below their median ({agreement['median']:g} px; the rbc_diameter column of {table}): "
            "if they come from one microscope and camera, those readings are wrong and misplace every cell on them; give the "
            f"camera's pixel size with {option}.")


def analysis_failed(path: Path, exc: Exception) -> BadImageError:
    """The one sentence for an image whose analysis raised something unexpected (``detect`` and ``smear-eval``)."""
    return BadImageError(f"Image {path} could not be analysed ({_one_line(exc)}); check that it is a smear photograph, "
                         "and report this message if it is.")


def _one_line(exc: Exception, limit: int = 200) -> str:
    """An exception as a short single line for an error sentence (OpenCV's messages span lines)."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_detect(
    images: Path | Sequence[Path], checkpoint: Path | None, out_dir: Path, *, locator: Path | None = None, backend: str = "auto",
    progress: bool = False, log=print, **kwargs,
) -> list[dict]:
    """``leukodetect detect``: load the classifier (if any) and the locator once, analyse every image, write outputs.

    ``images`` is an image, a folder (searched recursively) or several of either. ``locator`` is a
    learned white-cell locator's weights (None: the colour locator); ``backend`` is
    :class:`~leukodetect.runtime.classifier.Classifier`'s (auto: ONNX Runtime on CPU).
    """
    given = [images] if isinstance(images, (str, Path)) else images
    paths = list(dict.fromkeys(image_paths_of(given)))  # a file named twice (or inside a folder also named) once
    classifier = None
    if checkpoint is not None:
        classifier = Classifier.from_checkpoint(Path(checkpoint), backend=backend, log=log)
    if locator is not None:
        kwargs["locator"] = WhiteCellLocator.load(Path(locator))
    return detect_paths(paths, classifier, Path(out_dir), progress=progress, log=log, **kwargs)


