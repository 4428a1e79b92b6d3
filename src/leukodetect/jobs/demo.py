"""``leukodetect demo``: the shipped models on the bundled cells and smear fields, in seconds on a CPU.

:func:`run_demo` is a newcomer's first run: the default cell model classifies the bundled C-NMC
cells, and the whole-smear pipeline ``leukodetect detect`` runs (:func:`~leukodetect.jobs.detect.run_detect`,
with its default locator and cell model) analyses the bundled BCCD smear fields; one HTML page shows both.
Nothing is trained. :func:`run_training_demo` (``demo --train``) trains ResNet-50 on the bundled
cells instead, to show the training pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from leukodetect.config import RunConfig
from leukodetect.evaluation.intervals import wilson_interval
from leukodetect.evaluation.metrics import accuracy, confusion, sensitivity, specificity
from leukodetect.jobs.cells import BANK_JPEG_QUALITIES, DECLARED, crop_hashes
from leukodetect.jobs.detect import run_detect
from leukodetect.jobs.train import run_train
from leukodetect.reporting.render import Section, Thumbnail, render_html
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb, pixel_hash
from leukodetect.runtime.scale import RBC_UM
from leukodetect.sample import SMEAR_TRUTH, sample_dir, sample_smear_dir
from leukodetect.utils import atomic_write_text, fresh_dir, write_csv, write_json
from leukodetect.weights import default_model_path, resolve_detector, resolve_locator

#: How the bundled C-NMC cells are scaled: C-NMC's declared red-cell diameter (its cells are segmented
#: on black, with no red cell to measure), as the cell banks the shipped model was trained on declare it.
CNMC_DIAMETER = DECLARED["cnmc"]
#: What a normal smear should get; any other verdict on a bundled BCCD field is a false alarm or no answer.
NORMAL_VERDICT = "healthy"
THUMBNAIL_PX = 64
TITLE = "leukodetect demo: the shipped models on the bundled sample"


def run_demo(out_dir: Path, *, progress: bool = False, log=print) -> dict:
    """Run the shipped cell model on the bundled C-NMC cells and ``detect`` on the bundled BCCD smears.

    Writes into a new folder (``out_dir``, or ``out_dir-N`` if that holds anything): ``cells/``
    (predictions.csv and .json, metrics.json, thumbnails), ``smears/`` (each field's overlay,
    gallery and JSON, summary.csv, as ``leukodetect detect`` writes them) and ``index.html``, one
    self-contained page showing all of it.

    Returns:
        ``out_dir``, ``index``, ``cells`` (model, figures, rows), ``smears`` (one row per field),
        ``files`` (relative to ``out_dir``), ``seconds`` and ``summary``: the lines to print.
    """
    t0 = time.perf_counter()
    out_dir = fresh_dir(out_dir)
    log(f"Demo: the shipped models on the bundled sample, nothing trained; outputs go to {out_dir}.")
    cells = classify_cells(out_dir, progress=progress, log=log)
    smears = analyse_smears(out_dir, progress=progress, log=log)
    index = out_dir / "index.html"
    files = _files(out_dir, smears)
    atomic_write_text(index, render_html(TITLE, _sections(cells, smears, files), out_dir))
    result = {"out_dir": str(out_dir), "index": str(index), "cells": cells, "smears": smears, "files": [f for f, _ in files],
              "seconds": round(time.perf_counter() - t0, 1)}
    result["summary"] = _summary(result)
    return result


# ---- cells ----


def classify_cells(out_dir: Path, *, progress: bool = False, log=print) -> dict:
    """Classify the bundled C-NMC cells with the default cell model; write ``cells/`` (predictions, figures, thumbnails).

    Each cell is shown at C-NMC's declared scale, as ``predict --pixel-size`` would, and marked if it
    was among the model's training or validation images (its ``trained_on`` pixel hashes).
    """
    checkpoint = default_model_path()
    clf = Classifier.from_checkpoint(checkpoint, backend="torch", log=log)  # 66 small images: an ONNX export would not pay
    paths = sorted(sample_dir().rglob("*.png"))
    preds = clf.predict_paths(paths, progress=progress, rbc_diameter=CNMC_DIAMETER)
    trained_on = set(clf.bundle.get("trained_on", ()))
    folder = out_dir / "cells"
    (folder / "thumbnails").mkdir(parents=True)
    rows = []
    for path, p in zip(paths, preds):
        if p.error:
            log(f"skipped: {p.error}")
            continue
        image = open_rgb(path)
        thumbnail = folder / "thumbnails" / path.name
        _save_thumbnail(image, thumbnail)
        hashes = {pixel_hash(image)} | (crop_hashes(image, clf.scale, CNMC_DIAMETER, BANK_JPEG_QUALITIES) if clf.scale else set())
        truth = "blast" if path.parent.name == "all" else "normal"  # the C-NMC layout: all = blast, hem = normal
        predicted = "blast" if p.prob_blast >= clf.threshold else "normal"
        rows.append({"file": path.name, "truth": truth, "prob_blast": round(p.prob_blast, 4), "predicted": predicted,
                     "call": p.label, "reason": p.reason or "", "ood_score": p.ood_score, "correct": predicted == truth,
                     "in_training": bool(hashes & trained_on), "path": str(path),
                     "thumbnail": thumbnail.relative_to(out_dir).as_posix()})
    unseen = [r for r in rows if not r["in_training"]]
    figures = {"all": _figures(rows), "not_in_training": _figures(unseen)}
    cells = {"checkpoint": str(checkpoint), "model": _describe(checkpoint, clf.bundle), "labs": clf.bundle.get("labs"),
             "threshold": clf.threshold, "rbc_diameter": CNMC_DIAMETER, "n": len(rows),
             "n_in_training": len(rows) - len(unseen), "n_review": sum(r["call"] == "review" for r in rows),
             "figures": figures, "rows": rows}
    columns = ["file", "truth", "prob_blast", "predicted", "call", "reason", "ood_score", "correct", "in_training", "path"]
    table = [{k: r[k] for k in columns} for r in rows]
    write_csv(folder / "predictions.csv", table, columns, lineterminator="\n")
    write_json(folder / "predictions.json", table)
    write_json(folder / "metrics.json", {k: v for k, v in cells.items() if k != "rows"})
    return cells


def _save_thumbnail(image: Image.Image, target: Path) -> None:
    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    small.save(target, format="PNG")


def _figures(rows: list[dict]) -> dict:
    """Accuracy, sensitivity and specificity of the class calls, each with its count and Wilson 95% interval."""
    c = confusion([r["truth"] == "blast" for r in rows], [r["predicted"] == "blast" for r in rows])
    out = {}
    for name, fn, k, n in (("accuracy", accuracy, c.tp + c.tn, c.n), ("sensitivity", sensitivity, c.tp, c.positives),
                           ("specificity", specificity, c.tn, c.negatives)):
        low, high = wilson_interval(k, n)
        out[name] = {"value": fn(c) if n else None, "k": k, "n": n, "low": low if n else None, "high": high if n else None}
    return out


def _describe(checkpoint: Path, bundle: dict) -> str:
    """A model in one line: its card's title (the card beside the file that names it), and the cells it was trained on."""
    title = (bundle.get("model_card") or {}).get("name") or bundle["arch"]
    for card in sorted(Path(checkpoint).parent.glob("*.md")):
        text = card.read_text(encoding="utf-8")
        if f"`{Path(checkpoint).name}`" in text:
            title = text.splitlines()[0].lstrip("# ").removeprefix("Model card: ")
            break
    labs = bundle.get("labs")
    if labs:
        counts = ", ".join(f"{lab} {n['normal'] + n['blast']}" for lab, n in labs.items())
        title += f"; trained and validated on {sum(n['normal'] + n['blast'] for n in labs.values())} cells ({counts})"
    return title


# ---- smears ----


def analyse_smears(out_dir: Path, *, progress: bool = False, log=print) -> list[dict]:
    """Run ``leukodetect detect`` on the bundled BCCD fields, as the command does by default; outputs in ``smears/``.

    The same job (:func:`~leukodetect.jobs.detect.run_detect`), locator and cell model (``resolve_locator``,
    ``resolve_detector`` with the learned locator) and settings (the job's defaults, which are the
    command's) as ``leukodetect detect``: when those change, the demo follows.
    """
    detector = resolve_detector(None, "learned")
    if detector is None:
        log("No cell model in this installation: locating cells only.")
    rows = run_detect(sample_smear_dir(), detector, out_dir / "smears", locator=resolve_locator(None), progress=progress, log=log)
    smears = []
    for r in rows:
        name = Path(r["image"]).name
        truth = SMEAR_TRUTH.get(name, {})
        smear = {"image": name, "path": r["image"], "diagnosis": truth.get("diagnosis"), "white_cells": truth.get("white_cells"),
                 "detector": str(detector) if detector else None,
                 "model": _describe(detector, {"arch": detector.name}) if detector else "none: cells located only"}
        if "error" in r:
            smears.append(smear | {"error": r["error"], "outcome": "could not be analysed"})
            continue
        smears.append(smear | {k: r.get(k) for k in ("verdict", "reason", "n_cells", "n_blast", "n_review", "n_smudge")}
                      | {"outputs": {k: Path(v).relative_to(out_dir).as_posix() for k, v in r["outputs"].items()},
                         "seconds": r["timing"]["total_s"], "outcome": _outcome(r["verdict"])})
    return smears


def _outcome(verdict: str) -> str:
    """What a verdict on a normal smear means."""
    if verdict == NORMAL_VERDICT:
        return "right"
    return {"ALL": "a false alarm", "review": "sent to a person for review", "cannot_assess": "no answer (cannot assess)"}.get(
        verdict, f"no answer ({verdict})")


# ---- the page and the printed summary ----


def _files(out_dir: Path, smears: list[dict]) -> list[tuple[str, str]]:
    """Every output, relative to ``out_dir``, with what it holds."""
    files = [("index.html", "this page: everything below, images embedded"),
             ("cells/predictions.csv", "one row per cell: truth, P(blast), class call, call (review where the guard flags it), "
                                       "reason, guard score, right or not, whether the model was trained on it"),
             ("cells/predictions.json", "the same rows as JSON"),
             ("cells/metrics.json", "the model, the scale used, accuracy / sensitivity / specificity with 95% intervals"),
             ("cells/thumbnails/", "the thumbnails shown below")]
    for s in smears:
        for key, what in (("overlay", "the field with each located white cell outlined and its P(blast)"),
                          ("gallery", "each located cell, highest P(blast) first"), ("json", "the analysis: cells, scale, counts, verdict")):
            if key in s.get("outputs", {}):
                files.append((s["outputs"][key], f"{s['image']}: {what}"))
    if (out_dir / "smears" / "summary.csv").is_file():
        files.append(("smears/summary.csv", "one row per smear field (as 'leukodetect detect' writes for a folder)"))
    return files


def _percent(entry: dict) -> str:
    if entry["value"] is None:
        return "-"
    return f"{entry['value']:.0%} ({entry['k']}/{entry['n']}; 95% CI {entry['low']:.0%}-{entry['high']:.0%})"


def _honesty(cells: dict) -> list[str]:
    """What the cell figures can and cannot say."""
    n, seen = cells["n"], cells["n_in_training"]
    lines = [f"{n} cells and {len(SMEAR_TRUTH)} smear fields say nothing about accuracy: this demo shows that every step "
             "runs and what each writes. The models' measured figures are in their cards (MODEL_CARD.md and "
             "DETECTOR_CARD.md, beside the model files)."]
    if seen:
        lines.append(f"{seen} of the {n} cells were among the cell model's own training or validation images (recognised by "
                     f"pixel hash: the bundled cells come from the same C-NMC 2019 subset as its C-NMC cells), so its figures "
                     f"on them are inflated; only the other {n - seen} are new to it.")
    else:
        lines.append(f"None of the {n} cells is among the cell model's training or validation images (by pixel hash).")
    return lines


def _sections(cells: dict, smears: list[dict], files: list[tuple[str, str]]) -> list[Section]:
    """The page: what this is, the cell figures, the smear fields, every cell, the files."""
    figures = cells["figures"]
    metric_rows = [(label, figures[key]["accuracy"]["n"], *(_percent(figures[key][m]) for m in ("accuracy", "sensitivity", "specificity")))
                   for key, label in (("all", f"all {cells['n']} cells"), ("not_in_training", "cells the model was not trained on"))]
    cell_rows = [(Thumbnail(Path(r["thumbnail"]), r["file"]), r["file"], r["truth"], f"{r['prob_blast']:.3f}", r["predicted"],
                  f"review: {r['reason']}" if r["call"] == "review" else "", "yes" if r["in_training"] else "no",
                  "yes" if r["correct"] else "NO") for r in cells["rows"]]
    smear_section = Section(f"Smear fields: {len(smears)} BCCD fields through 'leukodetect detect'", [
        f"White cells found by the learned locator; cell model: {smears[0]['model'] if smears else '-'} "
        f"({smears[0]['detector'] if smears else '-'}), with the default settings of 'leukodetect detect'. The fields are normal smears (BCCD holds no leukemia), each with one white cell in BCCD's annotation: the right verdict is "
        f"'{NORMAL_VERDICT}'."])
    for s in smears:
        smear_section.paragraphs.append(_smear_line(s))
        if "outputs" in s:
            smear_section.figures += [(f"{s['image']}: overlay, verdict {s['verdict']}", Path(s["outputs"]["overlay"])),
                                      (f"{s['image']}: gallery of the located cells", Path(s["outputs"]["gallery"]))]
    return [
        Section("What this is", [
            "The models shipped with leukodetect, run as they are: nothing here is trained. Cell model: "
            f"{cells['model']} ({cells['checkpoint']}).", *_honesty(cells), "Research use only, not for diagnosis."]),
        Section(f"Cells: {cells['n']} bundled C-NMC 2019 cells", [
            f"Each cell is shown to the model at C-NMC's declared scale ({cells['rbc_diameter']:g} pixels per red-cell diameter; "
            f"its cells are segmented on black, with no red cell to measure), as 'leukodetect predict --pixel-size "
            f"{RBC_UM / cells['rbc_diameter']:.4f}' would. "
            f"The class call is P(blast) >= {cells['threshold']:g}; 'review' marks a cell the model's guard finds unlike its "
            f"training images ({cells['n_review']} of {cells['n']}); the figures count every cell's class call. "
            "Truth is the C-NMC folder: all = blast, hem = normal. Every cell is listed at the end of this page."],
            tables=[(None, ("cells", "n", "accuracy", "sensitivity", "specificity"), metric_rows)]),
        smear_section,
        Section("Every cell", tables=[(None, ("cell", "file", "truth", "P(blast)", "class call", "review", "model trained on it",
                                              "right"), cell_rows)]),
        Section("Files", ["Every output of this run, relative to the folder of this page."],
                tables=[(None, ("file", "what it holds"), files)]),
        Section("Next", ["leukodetect predict IMAGE (a cell), leukodetect detect PHOTO (a smear field), leukodetect serve "
                         "(the lab page), leukodetect demo --train (trains ResNet-50 on the bundled cells: the training pipeline)."]),
    ]


def _smear_line(s: dict) -> str:
    """One smear field's result in a sentence."""
    if "error" in s:
        return f"{s['image']}: could not be analysed: {s['error']}"
    why = f" ({s['reason']})" if s["reason"] else ""
    return (f"{s['image']}: {s['verdict']}{why}, {s['n_blast']} blast / {_cells(s['n_cells'])} found "
            f"({s['white_cells']} annotated): {s['outcome']}.")


def _cells(n: int) -> str:
    return f"{n} white cell" + ("" if n == 1 else "s")


def _summary(result: dict) -> list[str]:
    """What ``leukodetect demo`` prints: the models, the figures with their caveats, each smear's verdict, where the files are."""
    cells, smears, out_dir = result["cells"], result["smears"], Path(result["out_dir"])
    figures = cells["figures"]
    detector = smears[0]["detector"] if smears else None
    lines = [f"Demo finished in {result['seconds']:.0f} s: the shipped models on the bundled sample, nothing trained.",
             f"Cell model {Path(cells['checkpoint']).name}: {cells['model']}.",
             f"Smears: the learned white-cell locator, then cell model {Path(detector).name if detector else '(none)'}.",
             f"Cells: {cells['n']} C-NMC 2019 cells at C-NMC's declared scale ({cells['rbc_diameter']:g} px per red cell): "
             f"accuracy {_percent(figures['all']['accuracy'])}, sensitivity {_percent(figures['all']['sensitivity'])}, "
             f"specificity {_percent(figures['all']['specificity'])}; {cells['n_review']} flagged for review."]
    unseen = figures["not_in_training"]["accuracy"]
    if cells["n_in_training"]:
        lines.append(f"  {cells['n_in_training']} of the {cells['n']} were among the model's training or validation images, so "
                     f"these figures are inflated; on the {unseen['n']} it was not trained on: accuracy {_percent(unseen)}.")
    lines.append(f"Smear fields (BCCD, normal smears: the right verdict is '{NORMAL_VERDICT}'):")
    lines += [f"  {_smear_line(s)}" for s in smears]
    lines += [f"{cells['n']} cells and {len(smears)} smear fields say nothing about accuracy: the measured figures are in "
              f"MODEL_CARD.md and DETECTOR_CARD.md ({Path(cells['checkpoint']).parent}).",
              "Outputs:",
              f"  summary page  {out_dir / 'index.html'}  (open it in a browser)",
              f"  cells         {out_dir / 'cells'}/: predictions.csv, predictions.json, metrics.json"]
    overlays = [out_dir / s["outputs"]["overlay"] for s in smears if "outputs" in s]
    lines += [f"  {'overlays' if k == 0 else '':13s} {path}" for k, path in enumerate(overlays)]
    lines.append(f"  smears        {out_dir / 'smears'}/: each field's gallery and JSON too, summary.csv")
    lines.append("Try: leukodetect predict IMAGE, leukodetect detect PHOTO, leukodetect demo --train (trains on the bundled cells).")
    return lines


# ---- demo --train ----


def run_training_demo(out_dir: Path, *, epochs: int = 20, image_size: int = 160, command: str = "", log=print, progress=False) -> dict:
    """Train ResNet-50 from scratch on the bundled cells (split by patient), evaluate, predict held-out cells.

    The sample is far too small for a useful model: this shows that every step of training works and
    what each writes, not a figure to quote. Returns ``run_train``'s result and ``summary``, the lines to print.
    """
    t0 = time.perf_counter()
    out_dir = fresh_dir(out_dir)
    cfg = RunConfig()
    cfg.data.path = str(sample_dir())
    cfg.data.image_size = image_size
    cfg.data.test_fraction = 0.25
    cfg.data.val_fraction = 0.2
    cfg.train.epochs = epochs
    cfg.train.batch_size = 8
    log(f"Demo: training resnet50 from scratch on the bundled C-NMC sample ({cfg.data.path}), "
        f"{epochs} epochs at {image_size}x{image_size}; outputs go to {out_dir}.")
    result = run_train(cfg, out_dir, progress=progress, command=command, log=log)

    test = json.loads((out_dir / "split.json").read_text())["test"]
    test_paths = [p for p in test if p.endswith("_all.png")][:3] + [p for p in test if p.endswith("_hem.png")][:3]
    clf = Classifier.from_checkpoint(Path(result["checkpoint"]), backend="torch")  # six images: an export would not pay
    lines = []
    for p in clf.predict_paths([Path(t) for t in test_paths]):
        truth = "blast" if p.path.endswith("_all.png") else "normal"
        lines.append(f"  {Path(p.path).name:34s} true {truth:6s}  predicted {p.label:6s}  P(blast)={p.prob_blast:.3f}")
    m = result["test"]["metrics"]
    result["summary"] = [
        f"Demo finished in {time.perf_counter() - t0:.0f} s.",
        f"Held-out test cells: {result['test']['n']} (accuracy {m['accuracy']['value']:.2f}; the sample is tiny, "
        "so this number says nothing about the method).",
        "Predictions on a few held-out cells:",
        *lines,
        "Outputs:",
        f"  checkpoint      {result['checkpoint']}",
        f"  report          {out_dir / 'test' / 'report.html'}",
        f"  metrics         {out_dir / 'test' / 'metrics.json'}",
        f"  figures         {out_dir / 'test'}/roc.png, confusion_matrix.png, training_curves.png",
        f"Try: leukodetect predict <image> --checkpoint {result['checkpoint']}",
    ]
    return result
