"""The comparison report: ``OUT/report.md``, a self-contained ``OUT/report.html`` and ``OUT/figures/*.png``.

Content, in order: facts (command, machine, date, versions, settings); per protocol the paper's
Table 2 for every architecture (pooled out-of-fold value with 95% interval, and fold mean ± sd),
cost (parameters, GFLOPs, training and inference time) and calibration; the paper's own figures,
labelled as quoted and not reproduced, beside ours; the inflation of the paper's protocol; ROC
curves, training curves, metric bars, confusion matrices, reliability diagrams; with ``--cross-data``,
the cross-dataset check without and with stain normalisation, and its control on the training data;
the Grad-CAM gallery.
Every number comes from ``comparison.json`` (itself copied from each run's ``metrics.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from leukodetect.evaluation.intervals import METRIC_NAMES
from leukodetect.evaluation.metrics import confusion
from leukodetect.models import get_spec
from leukodetect.reporting.calibration_plots import plot_reliability
from leukodetect.reporting.compare_plots import (
    grid_axes,
    mean_history,
    plot_gallery,
    plot_inflation,
    plot_mean_histories,
    plot_metric_grid,
    plot_roc_comparison,
)
from leukodetect.reporting.plots import plot_confusion, save_figure
from leukodetect.reporting.render import Section, render_html, render_markdown
from leukodetect.reporting.report import LAB_HEADER, format_value, lab_table_rows
from leukodetect.utils import atomic_write, atomic_write_text, environment_facts

#: Column headings of Table 2.
LABELS = {
    "accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity", "precision": "PPV",
    "npv": "NPV", "f1": "F1", "fpr": "FPR", "fnr": "FNR", "roc_auc": "ROC AUC",
}
QUOTED = "quoted from the paper, not reproduced"
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 90rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; font-size: 0.85rem; }
th { background: #f3f3f3; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9rem; }
"""
GALLERY_PAGE = 36


def _ci(name: str, e: dict) -> str:
    value = format_value(name, e.get("value"))
    if e.get("ci_low") is None or e.get("ci_high") is None:
        return value
    return f"{value} ({format_value(name, e['ci_low'])} – {format_value(name, e['ci_high'])})"


def _mean_sd(name: str, s: dict) -> str:
    return f"{format_value(name, s.get('mean'))} ± {format_value(name, s.get('sd'))}"


def _pp(v) -> str:
    return "n/a" if v is None else f"{v:+.2f} pp"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def table2_rows(runs: list[dict], protocol: str) -> tuple[list[tuple], list[tuple]]:
    """(pooled value with 95% CI rows, fold mean ± sd rows), one row per architecture."""
    mine = [r for r in runs if r["protocol"] == protocol]
    pooled = [(r["arch"], *(_ci(m, r["pooled"][m]) for m in METRIC_NAMES)) for r in mine]
    folds = [(r["arch"], *(_mean_sd(m, r["fold_mean_sd"].get(m, {})) for m in METRIC_NAMES)) for r in mine]
    return pooled, folds


def cost_rows(runs: list[dict], protocol: str) -> list[tuple]:
    rows = []
    for r in runs:
        if r["protocol"] != protocol:
            continue
        c, cal = r["cost"], r["calibration"]
        spec = "n/a" if cal.get("specificity") is None else f"{100 * cal['specificity']:.2f}%"
        thr = "n/a" if cal.get("threshold") is None else f"{cal['threshold']:.4f}"
        rows.append((
            r["arch"], f"{c['params']:,}", f"{c['gflops']:.4g}", _seconds(c["training_seconds"]),
            f"{c['inference_ms_per_image']:.2f} ({c['inference_device']}, batch {c['inference_batch_size']})",
            f"{cal['ece']:.3f}", thr, spec, str(r["held_out_images_sharing_a_source_with_training"]),
        ))
    return rows


def quoted_rows(summary: dict) -> list[tuple]:
    """The paper's figures (quoted) beside ours, per architecture and metric it reports."""
    quoted = summary["quoted_from_paper_not_reproduced"]["architectures"]
    by = {(r["protocol"], r["arch"]): r for r in summary["runs"]}
    rows = []
    # The compared architectures, then the paper's others, so its figures show even when not rerun here.
    for arch in dict.fromkeys([*summary["settings"]["archs"], *quoted]):
        for metric in ("accuracy", "sensitivity", "specificity"):
            q = (quoted.get(arch) or {}).get(metric)
            ours = [_ci(metric, by[(p, arch)]["pooled"][metric]) if (p, arch) in by else "not run" for p in ("paper", "clean")]
            rows.append((arch, metric, f"{100 * q:.2f}% ({QUOTED})" if q is not None else "not recorded here", *ours))
    return rows


def _save(fig, out_dir: Path, name: str, *, tight: bool = True) -> Path:
    """Save as PNG under ``out_dir/figures``; ``tight=False`` for many-panel figures whose margins
    are set by hand (a tight bounding box draws the figure twice, seconds on a loaded CPU)."""
    path = out_dir / "figures" / name
    if tight:
        save_figure(fig, path)
    else:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path.relative_to(out_dir)


def _figures(out_dir: Path, summary: dict, results, galleries: dict) -> dict[str, list[tuple[str, Path]]]:
    """Draw and save every figure; returns section key -> [(caption, relative path)]."""
    figs: dict[str, list] = {}
    protocols = summary["settings"]["protocols"]
    for protocol in protocols:
        mine = [r for r in results if r.protocol == protocol]
        key = f"figures:{protocol}"
        figs[key] = [
            (f"ROC curves, pooled out-of-fold predictions ({protocol} protocol)",
             _save(plot_roc_comparison({r.arch: (r.y_true, r.prob) for r in mine}, title=f"ROC curves ({protocol} protocol)"),
                   out_dir, f"roc_{protocol}.png")),
            (f"Training and validation accuracy and loss per epoch, mean over folds ({protocol} protocol)",
             _save(plot_mean_histories({r.arch: mean_history(r.histories) for r in mine}, title=protocol), out_dir,
                   f"training_curves_{protocol}.png")),
        ]
        fig, axes = grid_axes(len(mine), ncols=3, size=(4.0, 3.6))
        for ax, r in zip(axes, mine):
            plot_confusion(confusion(r.y_true, (r.prob >= 0.5).astype(int)), ax=ax)
            ax.set_title(f"{r.arch} ({protocol})")
        figs[key].append((f"Confusion matrices, pooled out-of-fold, threshold 0.5 ({protocol} protocol)",
                          _save(fig, out_dir, f"confusion_{protocol}.png")))
        fig, axes = grid_axes(len(mine), ncols=3, size=(4.5, 4.5))
        for ax, r in zip(axes, mine):
            plot_reliability(r.y_true, r.prob, ax=ax)
            ax.set_title(f"{r.arch} ({protocol})", fontsize=9)
        figs[key].append((f"Reliability diagrams of the pooled out-of-fold probabilities ({protocol} protocol)",
                          _save(fig, out_dir, f"reliability_{protocol}.png")))
    values = {p: {r.arch: r.metrics["metrics"] for r in results if r.protocol == p} for p in protocols}
    figs["bars"] = [("Each metric across architectures: pooled out-of-fold value with its 95% interval",
                     _save(plot_metric_grid(values, METRIC_NAMES), out_dir, "metrics_bars.png", tight=False))]
    if summary["inflation_paper_minus_clean_pp"]:
        figs["inflation"] = [("Paper minus clean protocol, percentage points",
                              _save(plot_inflation(summary["inflation_paper_minus_clean_pp"], METRIC_NAMES), out_dir, "inflation.png"))]
    for protocol, gallery in galleries.items():
        key = f"gradcam:{protocol}"
        figs[key] = []
        for kind, items in gallery.items():
            items = [i for i in items if i.get("overlay")]
            for page, start in enumerate(range(0, len(items), GALLERY_PAGE), start=1):
                chunk = items[start:start + GALLERY_PAGE]
                images = [np.asarray(Image.open(i["overlay"]).convert("RGB")) for i in chunk]
                captions = [f"{Path(i['path']).name[:22]}\ntrue {'blast' if int(i['label']) else 'normal'}, "
                            f"P(blast) {float(i['prob_blast']):.2f}\nfold {i['fold']}" for i in chunk]
                suffix = f"_{page}" if len(items) > GALLERY_PAGE else ""
                what = "highest-confidence correct calls (blasts, then normal cells)" if kind == "correct" else "every misclassified cell"
                fig = plot_gallery(images, captions, title=f"Grad-CAM ({protocol} protocol): {what}")
                figs[key].append((f"Grad-CAM of the blast score, {what} ({protocol} protocol)"
                                  f"{f', page {page}' if suffix else ''}", _save(fig, out_dir, f"gradcam_{protocol}_{kind}{suffix}.png", tight=False)))
    return figs


def _digest(summary: dict) -> str:
    """What the figures depend on: everything but the cross-dataset check, which draws none (so adding
    --cross-data to a finished comparison does not redraw them)."""
    drawn = {k: v for k, v in summary.items() if k != "cross_dataset"}
    return hashlib.sha256(json.dumps(drawn, sort_keys=True, default=str).encode()).hexdigest()


def _cached_figures(out_dir: Path, summary: dict) -> dict | None:
    """The figures of an earlier report on exactly the same results (a rerun of a finished comparison)."""
    try:
        index = json.loads((out_dir / "figures" / "index.json").read_text())
        if index["summary"] != _digest(summary):
            return None
        figs = {key: [(caption, Path(rel)) for caption, rel in items] for key, items in index["figures"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return figs if all((out_dir / rel).is_file() for items in figs.values() for _, rel in items) else None


def _store_figure_index(out_dir: Path, summary: dict, figs: dict) -> None:
    index = {"summary": _digest(summary), "figures": {k: [(c, rel.as_posix()) for c, rel in v] for k, v in figs.items()}}
    atomic_write_text(out_dir / "figures" / "index.json", json.dumps(index, indent=1))
    listed = {rel.name for items in figs.values() for _, rel in items}
    for stale in (out_dir / "figures").glob("*.png"):  # e.g. a gallery page an earlier, longer report had
        if stale.name not in listed:
            stale.unlink()


def build_sections(summary: dict, figs: dict, facts: dict) -> list[Section]:
    settings = summary["settings"]
    runs = summary["runs"]
    header = ("architecture", *(LABELS[m] for m in METRIC_NAMES))
    sections = [Section(
        "About this comparison",
        paragraphs=[
            "Every architecture was cross-validated with the same seed, hence the same folds, the same augmentation and "
            "the same number of epochs. Pooled: all out-of-fold predictions scored together, with a 95% interval "
            "(Wilson for proportions, stratified bootstrap for F1 and ROC AUC). Fold mean ± sd: the metric computed in "
            "each fold, then averaged (sample sd). Positive class = blast; specificity = TN/(TN+FP), PPV = TP/(TP+FP).",
            "Clean protocol: split first (stratified, whole groups, duplicates kept together), augment only training "
            "images. Paper protocol: expand the whole data set first, then split image by image, as the paper did; "
            "copies of one cell then sit on both sides of the split, so its figures are inflated.",
            "Research use only; not a medical device.",
        ],
        tables=[("Facts", ("fact", "value"), [(k, str(v)) for k, v in facts.items()])],
    )]
    for protocol in settings["protocols"]:
        pooled, folds = table2_rows(runs, protocol)
        s = Section(f"Table 2, {protocol} protocol", tables=[
            ("Pooled out-of-fold value (95% interval)", header, pooled),
            (f"Mean ± sd over the {settings['folds']} folds", header, folds),
            ("Cost and calibration", (
                "architecture", "parameters", "forward GFLOPs (1 image; multiply-add = 2 FLOPs)", "training time (all folds)",
                "inference ms / image", "ECE (pooled)", "threshold for sensitivity ≥ 0.99", "specificity at it",
                "held-out images sharing a source with training"), cost_rows(runs, protocol)),
        ])
        labs = [(r["arch"], *row) for r in runs if r["protocol"] == protocol and r.get("labs") for row in lab_table_rows(r["labs"])]
        if labs:
            s.tables.append(("Per laboratory, pooled out-of-fold (95% interval; fields: a field's P(blast) is the highest of its cells')",
                             ("architecture", *LAB_HEADER), labs))
        if not summary["same_folds"].get(protocol, True):
            s.paragraphs.append("Warning: the architectures did not all get the same folds under this protocol.")
        s.figures = figs.get(f"figures:{protocol}", [])
        sections.append(s)
    source = summary["quoted_from_paper_not_reproduced"].get("source", "the paper")
    sections.append(Section(
        f"The paper's figures ({QUOTED}) beside ours",
        paragraphs=[f"The 'paper' column is {QUOTED} ({source}); leukodetect did not compute it. The paper augmented "
                    "before splitting, so compare it with our paper-protocol column; the clean column is the honest estimate. "
                    "'not recorded here' means the figure has not been entered into jobs/paper_figures.yaml."],
        tables=[("Quoted vs ours", ("architecture", "metric", f"paper ({QUOTED})", "ours, paper protocol (95% CI)",
                                    "ours, clean protocol (95% CI)"), quoted_rows(summary))],
    ))
    infl = summary["inflation_paper_minus_clean_pp"]
    if infl:
        rows = [(arch, *(_pp(v.get(m)) for m in METRIC_NAMES),
                 str(v["held_out_images_sharing_a_source_with_training"]["paper"]),
                 str(v["held_out_images_sharing_a_source_with_training"]["clean"])) for arch, v in infl.items()]
        sections.append(Section(
            "Inflation by the paper's protocol (paper minus clean, percentage points)",
            paragraphs=["Pooled out-of-fold values; F1 and ROC AUC differences are also x 100. The last two columns count "
                        "held-out images whose source image (the cell they were copied from) also fed the training part."],
            tables=[("Paper minus clean", ("architecture", *(LABELS[m] for m in METRIC_NAMES),
                                           "leaked held-out images (paper)", "leaked held-out images (clean)"), rows)],
            figures=figs.get("inflation", []),
        ))
    if summary.get("cross_dataset"):
        sections.append(cross_section(summary["cross_dataset"]))
    if summary.get("cross_lab"):
        sections.append(cross_lab_section(summary["cross_lab"]))
    sections.append(Section("Metrics across architectures", figures=figs.get("bars", [])))
    for protocol, gallery in summary.get("gradcam", {}).items():
        counts = {kind: len(items) for kind, items in gallery.items()}
        sections.append(Section(
            f"Grad-CAM, {settings['archs'][0]} ({protocol} protocol)",
            paragraphs=[
                "Each cell is explained by the fold model that held it out (its best.pt). Red = regions that raised "
                f"the blast score most. Shown: {counts.get('correct', 0)} highest-confidence correct calls and all "
                f"{counts.get('misclassified', 0)} misclassified cells.",
                *(["No cell was misclassified."] if not counts.get("misclassified") else []),
            ],
            figures=figs.get(f"gradcam:{protocol}", []),
        ))
    return sections


CROSS_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
STAIN_LABELS = {"none": "none (images as they are)", "macenko": "Macenko, toward the training stain"}


def _stain_rows(cross: dict, part) -> list[tuple]:
    rows = []
    for run in cross["runs"]:
        for variant in ("none", "macenko"):
            r = part(run)[variant]
            c = r["confusion"]
            rows.append((run["protocol"], run["arch"], STAIN_LABELS[variant], str(r["n"]),
                         *(_ci(m, r["metrics"][m]) for m in CROSS_METRICS),
                         f"TP {c['tp']}, FN {c['fn']}, FP {c['fp']}, TN {c['tn']}"))
    return rows


def cross_rows(cross: dict) -> list[tuple]:
    """One row per (run, stain normalisation) on the cross data: n, metrics with 95% CIs, confusion counts."""
    return _stain_rows(cross, lambda run: run)


def control_rows(cross: dict) -> list[tuple]:
    """Per run: Table 2's pooled out-of-fold values, then the same predictions on normalised images."""
    return _stain_rows(cross, lambda run: run["training_data"])


def cross_section(cross: dict) -> Section:
    """The cross-dataset check: another lab's images, without and with stain normalisation."""
    stain = cross["stain_normalization"]
    reference = ", ".join(Path(p).name for p in stain["reference"])
    where = "a few images of the training data (--data), evenly spaced over its sorted files" if stain["default_reference"] \
        else "the images given to --stain-reference"
    failed = stain["failed"]
    paragraphs = [
        f"Every run's fold models predicted {cross['n']} labelled images of {cross['data']}, a data set none of them "
        f"was trained on. Prediction per image: the {cross['prediction']}. Metrics with 95% intervals as in Table 2.",
        f"Stain normalisation: Macenko (torchstain), fitted on {where} ({reference}); each cross image is re-rendered "
        f"with that reference's stain vectors and concentration scale. Near-black background pixels (every channel "
        f"≤ {stain['background_level']}) are left out of the estimate and kept black. An image's two stain vectors are "
        "paired with the reference's by direction, not by torchstain's H&E rule (more red first); the two differed on "
        f"{stain.get('stain_order_matched_to_reference', 0)} of {cross['n']} images.",
        f"Macenko could not normalise {failed} of {cross['n']} images; such images are scored as they are in the Macenko rows"
        + (f": {', '.join(Path(p).name for p in stain['failed_images'][:10])}{' ...' if failed > 10 else ''}." if failed else "."),
    ]
    if cross["unreadable"]:
        paragraphs.append(f"{len(cross['unreadable'])} cross images could not be read and were left out: "
                          + " ".join(cross["unreadable"][:5]))
    paragraphs.append(
        "Control: the models were trained on images as they are, never normalised, so the Macenko rows measure the "
        "stain transfer together with how far normalisation moves any image away from what the models learnt. The "
        "second table repeats each run's out-of-fold predictions on the training data (each image by the fold model "
        "that held it out, as in Table 2) with the same normalisation. Where the training data's own score falls "
        "with normalisation, a change in the Macenko rows above is not a stain effect alone. Training images Macenko "
        "could not normalise (scored as they are): " + "; ".join(
            f"{p} protocol {run['training_data']['macenko']['stain_failed']} of {run['training_data']['macenko']['n']}"
            for p, run in {run["protocol"]: run for run in cross["runs"]}.items()) + ".")
    header = ("protocol", "architecture", "stain normalisation", "n", *(LABELS[m] for m in CROSS_METRICS), "confusion (threshold 0.5)")
    return Section(f"Cross-dataset check: {Path(cross['data']).name}", paragraphs=paragraphs, tables=[
        ("Fold-averaged P(blast) on the cross data set (95% interval)", header, cross_rows(cross)),
        ("Control: the training data, pooled out-of-fold (95% interval)", header, control_rows(cross)),
    ])


def cross_lab_section(cross_lab: dict) -> Section:
    """Each architecture with one laboratory left out at a time (and, with --only, trained on one laboratory alone)."""
    header = ("architecture", *LAB_HEADER)
    held = [(arch, *row) for arch, table in cross_lab["archs"].items() for row in lab_table_rows(table["held_out"])]
    tables = [("Each laboratory scored by the model trained on all the others", header, held)]
    only = cross_lab.get("only")
    if only:
        alone = [(arch, *row) for arch, table in cross_lab["archs"].items() for row in lab_table_rows(table["only"]["labs"])]
        tables.append((f"Trained on {only} alone, scored on each other laboratory", header, alone))
    return Section("Laboratories held out", paragraphs=[
        "A model is only as good as its worst laboratory. For each laboratory, every architecture was trained (clean "
        "protocol, the settings above) on all the other laboratories and scored on every cell of the one left out, at "
        "threshold 0.5, whatever its guard said; the last column is the share its guard called unlike its training images. "
        "95% intervals: Wilson for proportions, a bootstrap over cells for ROC AUC. Fields: a field's P(blast) is the "
        "highest of its cells'."], tables=tables)


def _learning_rates(lr, archs) -> str:
    """One rate for all, or each architecture's own (``ModelSpec.scratch_lr``) when --lr was left out."""
    if lr is not None:
        return f"{lr:g}"

    return "each architecture's own: " + ", ".join(f"{a} {get_spec(a).scratch_lr:g}" for a in archs)


def write_compare_report(out_dir: Path, summary: dict, results, galleries: dict, *, command: str = "") -> tuple[Path, Path]:
    """Draw the figures into ``out_dir/figures`` and write ``report.md`` and ``report.html``.

    Args:
        summary: the dict of ``comparison.json``.
        results: the :class:`~leukodetect.jobs.compare.RunResult` of every run (for the arrays).
        galleries: protocol -> :func:`~leukodetect.jobs.compare.explain_gallery` result.
    """
    out_dir = Path(out_dir)
    settings = summary["settings"]
    cfg = settings["config"]
    facts = {
        "command": command or "(library call)",
        "data": cfg["data"]["path"],
        "architectures": ", ".join(settings["archs"]),
        "protocols": ", ".join(settings["protocols"]),
        "folds": settings["folds"],
        "epochs": cfg["train"]["epochs"],
        "image size": cfg["data"]["image_size"],
        "batch size": cfg["train"]["batch_size"],
        "optimizer, learning rate": f"{cfg['train']['optimizer']}, {_learning_rates(cfg['train']['lr'], settings['archs'])}",
        "weight decay, label smoothing, EMA": f"{cfg['train']['weight_decay']:g}, {cfg['train']['label_smoothing']:g}, "
                                              f"{cfg['train']['ema'] or 'off'}",
        "MixUp, CutMix (Beta parameter)": f"{cfg['train'].get('mixup') or 'off'}, {cfg['train'].get('cutmix') or 'off'}",
        "model selection": _selection(cfg),
        "seed": cfg["train"]["seed"],
        "paper protocol total": cfg["data"]["paper_total"] if "paper" in settings["protocols"] else "not run",
        "same folds for every architecture": ", ".join(f"{p}: {'yes' if v else 'NO'}" for p, v in summary["same_folds"].items()),
        **environment_facts(),
    }
    figs = _cached_figures(out_dir, summary) or _figures(out_dir, summary, results, galleries)
    _store_figure_index(out_dir, summary, figs)
    sections = build_sections(summary, figs, facts)
    title = "Architecture comparison: Shalini & Angel Viji (2022), Table 2, reproduced"
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, render_markdown(title, sections))
    atomic_write_text(page, render_html(title, sections, out_dir, css=_CSS))
    return md, page


def _selection(cfg: dict) -> str:
    """How each fold's kept epoch was chosen, from a run's config."""
    val = cfg["data"].get("val_fraction", 0.15)
    if val == 0:
        return "last epoch (no validation part)"
    held = f"{val:g} of the images held out of each training fold"
    return f"last epoch ({held}, scored but not choosing)" if cfg["train"].get("select", "best") == "last" else f"lowest validation loss ({held})"
