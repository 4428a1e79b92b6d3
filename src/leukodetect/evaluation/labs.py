"""Figures per laboratory: cells, fields and cell types, with 95% intervals and the guard's flag rate.

Pure functions of rows ``{"lab", "kind", "parent", "label", "prob", "flagged"}`` (one per cell, made by
:func:`cell_rows`): ``cross-lab`` scores each held-out laboratory with them; ``evaluate``, ``train``'s test
part and ``cv``'s out-of-fold predictions each laboratory of their data.

- cells: sensitivity, specificity and ROC AUC at ``threshold`` (Wilson intervals for proportions, a
  bootstrap over cells for AUC); a laboratory of one class (PBC, BCCD) gets the proportion of its
  class alone;
- fields (where several cells share a parent field, as Aria's do): a field's P(blast) is the highest
  of its cells', the call a person reviewing the field's gallery would start from;
- PBC-like data with a ``lymphocyte`` kind: lymphocytes and the other cell types apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from leukodetect.evaluation.intervals import binary_report, wilson_interval

#: The rule that makes a field's P(blast) from its cells'.
FIELD_RULE = "a field's P(blast) is the highest of its cells'"


def cell_rows(records: Sequence, probs: Sequence[float], flagged: Sequence[bool] | None = None) -> list[dict]:
    """The rows the functions below read, from records (their ``lab``, ``kind``, ``parent`` and ``label``), each
    one's P(blast) and whether the guard flagged it (None: a model without a guard flags nothing)."""
    flagged = [False] * len(records) if flagged is None else flagged
    return [{"lab": r.lab or "unnamed", "kind": r.kind, "parent": r.parent, "label": r.label, "prob": float(p), "flagged": bool(f)}
            for r, p, f in zip(records, probs, flagged, strict=True)]


def names_labs(records: Sequence) -> bool:
    """Whether any record names its laboratory (then the figures are given per laboratory too)."""
    return any(r.lab for r in records)


def score_cells(rows: Sequence[dict], threshold: float = 0.5) -> dict:
    """Cell-level figures of one laboratory: both classes, or the one class it holds."""
    y = np.array([r["label"] for r in rows], dtype=int)
    p = np.array([r["prob"] for r in rows], dtype=float)
    flagged = np.array([r["flagged"] for r in rows], dtype=bool)
    out = {"cells": len(rows), "blast": int(y.sum()), "normal": int((1 - y).sum()),
           "flagged": int(flagged.sum()), "flag_rate": float(flagged.mean()) if len(rows) else None}
    if 0 < y.sum() < len(y):
        report = binary_report(y, p, threshold=threshold)
        out.update({k: report["metrics"][k] for k in ("sensitivity", "specificity", "roc_auc")})
    for name, label, called in (("specificity", 0, p < threshold), ("sensitivity", 1, p >= threshold)):
        if name not in out and (y == label).any():
            k, n = int(called[y == label].sum()), int((y == label).sum())
            low, high = wilson_interval(k, n)
            out[name] = {"value": k / n, "ci_low": low, "ci_high": high, "method": "wilson"}
    return out


def field_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per field (cells sharing a ``parent``), by :data:`FIELD_RULE`: ALL when any of its cells is a blast (an ALL-IDB1
    photograph also holds normal cells), flagged when all its cells are."""
    fields: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        fields[r["parent"]].append(r)
    return [{"label": max(c["label"] for c in cells), "prob": max(c["prob"] for c in cells), "flagged": all(c["flagged"] for c in cells),
             "lab": cells[0]["lab"], "kind": cells[0]["kind"], "parent": parent} for parent, cells in fields.items()]


def score_fields(rows: Sequence[dict], threshold: float = 0.5) -> dict:
    """Field-level figures: a field is ALL when its most blast-like cell is called a blast."""
    merged = field_rows(rows)
    return {**score_cells(merged, threshold), "fields": len(merged), "rule": FIELD_RULE}


def lab_figures(rows: Sequence[dict], threshold: float = 0.5) -> dict:
    """One laboratory's figures: ``cells``, and ``fields`` / ``lymphocytes`` / ``other_types`` where they apply."""
    figures = {"cells": score_cells(rows, threshold)}
    kinds = {r["kind"] for r in rows if r["kind"]}
    if any(r["parent"] for r in rows) and len({r["parent"] for r in rows}) < len(rows):
        figures["fields"] = score_fields(rows, threshold)
    if "lymphocyte" in kinds:
        figures["lymphocytes"] = score_cells([r for r in rows if r["kind"] == "lymphocyte"], threshold)
        figures["other_types"] = score_cells([r for r in rows if r["kind"] != "lymphocyte"], threshold)
    return figures


def per_lab(rows: Sequence[dict], threshold: float = 0.5) -> dict[str, dict]:
    """:func:`lab_figures` of each laboratory named in ``rows``, in name order."""
    return {lab: lab_figures([r for r in rows if r["lab"] == lab], threshold) for lab in sorted({r["lab"] for r in rows})}
