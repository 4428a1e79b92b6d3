"""``leukodetect cross-lab``: train on every laboratory but one, test on the one left out, for each in turn.

A model is only as good as its worst laboratory, and a laboratory it never saw is the honest test
of one that will meet new laboratories. For each held-out laboratory L the run trains on the cells
of all the others (a validation part of them, whole groups, chooses the epoch and sets the guard's
threshold) and scores every cell of L once. One more run trains on a single laboratory alone
(``--only``, ALL-IDB by default: what the paper's recipe sees) and is scored on every other one,
for comparison on the same held-out cells.

Figures per held-out laboratory (``cross_lab.json`` and ``report.md``), at the model's threshold:

- cells: sensitivity, specificity and ROC AUC with 95% intervals (Wilson for proportions, a
  bootstrap over cells for AUC, which ignores that cells of one field or patient are alike), on
  every cell whatever the guard said, and the guard's flag rate (cells called "review: unlike the
  images this model was trained on"); a laboratory of one class (PBC, BCCD) has no sensitivity or AUC;
- PBC: specificity for lymphocytes and for the other cell types apart;
- Aria: per field as well: a field is called ALL when its most blast-like cell is (the highest
  P(blast) of its cells), the call a person reviewing the field's gallery would start from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukodetect.config import RunConfig
from leukodetect.data.split import holdout_indices
from leukodetect.errors import LeukoError
from leukodetect.evaluation.labs import cell_rows, lab_figures
from leukodetect.jobs.train import (
    FoldJob,
    Prepared,
    prepare,
    split_strata,
    train_fold,
    train_folds_on_devices,
)
from leukodetect.reporting.render import Section, render_markdown
from leukodetect.reporting.report import LAB_HEADER, lab_table_rows
from leukodetect.training import parallel
from leukodetect.utils import atomic_write_text, environment_facts, write_json

THRESHOLD = 0.5


def plan_runs(prep: Prepared, cfg: RunConfig, out_dir: Path, *, hold_out: Sequence[str], only: str | None,
              resume: bool) -> list[FoldJob]:
    """One training job per held-out laboratory, plus the single-laboratory run; finished ones are skipped."""
    labs = sorted({r.lab for r in prep.records})
    index = {lab: [i for i, r in enumerate(prep.records) if r.lab == lab] for lab in labs}
    runs = [(f"without_{lab}", [i for other in labs if other != lab for i in index[other]], index[lab]) for lab in hold_out]
    if only:
        runs.append((f"only_{only}", index[only], [i for lab in labs if lab != only for i in index[lab]]))
    jobs = []
    for k, (name, train_all, test) in enumerate(runs):
        run_dir = out_dir / name
        if (run_dir / "predictions.json").exists():
            continue
        train_all = np.array(train_all)
        strata = split_strata([prep.records[i] for i in train_all])
        groups = np.array(prep.groups)[train_all]
        inner_train, inner_val = holdout_indices(strata, groups, fraction=cfg.data.val_fraction, seed=cfg.train.seed + k)
        jobs.append(FoldJob(
            cfg=cfg, fold_dir=run_dir, fold=k, folds=len(runs),
            train=[prep.records[i] for i in train_all[inner_train]], val=[prep.records[i] for i in train_all[inner_val]],
            test=[prep.records[i] for i in test], trained_on=[prep.hashes[i] for i in train_all], resume=resume, scale=prep.scale,
        ))
    return jobs


def run_cross_lab(cfg: RunConfig, out_dir: Path, *, hold_out: Sequence[str] = (), only: str | None = "allidb", resume: bool = False,
                  progress: bool = False, devices: str | None = "auto", command: str = "", log=print) -> dict:
    """Leave each laboratory out in turn (``hold_out``: all by default) and score it; return the table."""
    out_dir = Path(out_dir)
    if (out_dir / "cross_lab_plan.json").exists() and not resume:
        raise LeukoError(f"{out_dir} already holds a cross-laboratory run: pass --resume to continue it or choose another --out.")
    if not cfg.data.val_fraction:
        raise LeukoError("A cross-laboratory run needs a validation part of the training laboratories (--val-fraction above 0): "
                         "it chooses the epoch and sets the guard's threshold.")
    prep = prepare(cfg, out_dir, log=log)
    labs = sorted({r.lab for r in prep.records})
    if None in labs or len(labs) < 2:
        raise LeukoError("A cross-laboratory run needs two or more named laboratories: pass --data LAB=PATH for each.")
    hold_out = list(hold_out) or labs
    unknown = sorted(set(hold_out) - set(labs)) + ([only] if only and only not in labs else [])
    if unknown:
        raise LeukoError(f"{', '.join(map(str, unknown))} is not a laboratory of this run (it holds {', '.join(labs)}).")
    write_json(out_dir / "cross_lab_plan.json", {"labs": labs, "hold_out": hold_out, "only": only, "command": command})
    jobs = plan_runs(prep, cfg, out_dir, hold_out=hold_out, only=only, resume=resume)
    chosen = parallel.parse_devices(devices, device=cfg.train.device)
    if chosen:
        train_folds_on_devices(jobs, chosen, hint="rerun with --resume to train only those", log=log)
    else:
        for job in jobs:
            train_fold(job, progress=progress, log=log)
    table = score_runs(prep, out_dir, hold_out=hold_out, only=only)
    write_json(out_dir / "cross_lab.json", table)
    atomic_write_text(out_dir / "report.md", render_markdown("Leave one laboratory out", report_sections(table, cfg, command)))
    return table


def _cell_rows(prep: Prepared, run_dir: Path) -> list[dict]:
    stored = json.loads((run_dir / "predictions.json").read_text())
    by_path = {str(r.path): r for r in prep.records}
    calls = stored.get("call") or [None] * len(stored["test"])  # a model without a guard flags nothing
    return cell_rows([by_path[path] for path in stored["test"]], stored["prob_blast"], [call == "review" for call in calls])


def score_runs(prep: Prepared, out_dir: Path, *, hold_out: Sequence[str], only: str | None) -> dict:
    """The table: per held-out laboratory, the model trained without it, and the single-laboratory model."""
    table: dict = {"threshold": THRESHOLD, "held_out": {}, "only": None, "versions": environment_facts()}
    for lab in hold_out:
        rows = _cell_rows(prep, out_dir / f"without_{lab}")
        table["held_out"][lab] = lab_figures(rows, THRESHOLD)
    if only:
        rows = _cell_rows(prep, out_dir / f"only_{only}")
        table["only"] = {"trained_on": only, "labs": {lab: lab_figures([r for r in rows if r["lab"] == lab], THRESHOLD)
                                                        for lab in sorted({r["lab"] for r in rows})}}
    return table


def report_sections(table: dict, cfg: RunConfig, command: str) -> list[Section]:
    facts = [("command", command), ("architecture", cfg.model.arch), ("epochs", str(cfg.train.epochs)),
             ("input", f"{cfg.data.image_size} px = {cfg.data.field_diameters or 3:g} red-cell diameters"),
             ("threshold", str(table["threshold"])), *((k, str(v)) for k, v in table["versions"].items())]
    sections = [Section("Held-out laboratories", ["Each laboratory scored by the model trained on all the others."],
                        [(None, LAB_HEADER, lab_table_rows(table["held_out"]))])]
    if table["only"]:
        sections.append(Section(f"Trained on {table['only']['trained_on']} alone", ["The same recipe on one laboratory, scored on each other one."],
                                [(None, LAB_HEADER, lab_table_rows(table["only"]["labs"]))]))
    sections.append(Section("Run", [], [(None, ("fact", "value"), facts)]))
    return sections
