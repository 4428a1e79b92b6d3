#!/usr/bin/env python
"""Would a damaged-cell gate on the cell model's features mend the learned pipeline's blast calls, and at what cost elsewhere?

Reads the cells ``damage_gate_cells.py`` wrote (one ``.npz`` per laboratory). The gate is a logistic
regression on the cell model's penultimate-layer features (standardised, then PCA), learned from ALL-IDB1's
located cells: intact (an annotated cell within 0.75 red-cell diameters) against unannotated (none within
one diameter). Its threshold keeps ``--keep`` of the intact cells, measured on photographs the gate did not
see (group k-fold inside the training photographs), as the colour pipeline's smudge gate does.

* ALL-IDB1: 5-fold cross-validation by photograph: blast calls against the annotated blasts (one-to-one within
  half a red-cell diameter) and photograph verdicts, with and without the gate.
* Every other laboratory: the gate fitted on all of ALL-IDB1, applied as is (never fitted there): BCCD's
  white cells (box centres) and PBC's centred cells kept; Aria's field verdicts.

    python scripts/damage_gate_probe.py /work/runs/damage
"""
import argparse
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukodetect.data.indexers import index_dataset
from leukodetect.detection.match import detection_scores, match_points
from leukodetect.detection.pipeline import VerdictRule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("cells", type=Path)
parser.add_argument("--allidb1", type=Path, default=Path("../shared/datasets/ALL-IDB1/ALL_IDB1"))
parser.add_argument("--keep", type=float, default=0.99)
parser.add_argument("--components", type=int, default=64)
parser.add_argument("--c", type=float, default=0.1)
parser.add_argument("--edge", type=float, default=None, help="also leave out cells whose centre is within this many diameters of the frame")
args = parser.parse_args()

HI, LO = 0.7, 0.3
RULE = VerdictRule()


def model():
    return make_pipeline(StandardScaler(), PCA(args.components, random_state=0), LogisticRegression(C=args.c, max_iter=5000))


def fit(x, y, g):
    """The gate and its threshold (keeps ``keep`` of the intact cells of photographs it did not see)."""
    held = cross_val_predict(model(), x, y, groups=g, cv=GroupKFold(4), method="predict_proba")[:, 1]
    return model().fit(x, y), float(np.quantile(held[y == 1], 1 - args.keep))


def calls(z, kept):
    """Per cell: blast / review / normal / out (gated), as detect calls them."""
    unlike = z["unlike"].astype(bool)
    p = z["prob"].astype(float)
    out = np.where(p >= HI, "blast", np.where(p < LO, "normal", "review")).astype(object)
    out[unlike] = "review"
    out[~kept] = "out"
    return out


def verdicts(z, call):
    """Each smear's verdict from its cells' calls, by detect's rule; cannot_assess where no white cell is left."""
    res = []
    for i in range(len(z["verdict"])):
        c = call[z["smear"] == i]
        white = (c != "out").sum()
        res.append("cannot_assess" if white == 0 else RULE(int((c == "blast").sum()), int((c == "review").sum())))
    return np.array(res)


def verdict_table(z, v):
    lab = z["smear_label"]
    t = {}
    for name, want in (("ALL", 1), ("healthy", 0)):
        part = v[lab == want]
        t[name] = "/".join(str((part == k).sum()) for k in ("ALL", "review", "healthy", "cannot_assess"))
    right = ((v == "ALL") & (lab == 1)) | ((v == "healthy") & (lab == 0))
    return f"right {right.sum()}/{len(v)} ({right.mean():.1%}); ALL smears {t['ALL']}, healthy smears {t['healthy']} (ALL/review/healthy/cannot)"


def blast_scores(z, call, records):
    tp = fp = fn = 0
    for i, r in enumerate(records):
        sel = (z["smear"] == i) & (call == "blast")
        d = z["d"][z["smear"] == i]
        radius = 0.5 * (d[0] if len(d) else 1.0)
        m = match_points(np.c_[z["x"][sel], z["y"][sel]], list(r.blasts or ()), radius)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    s = detection_scores(tp, fp, fn)
    return f"blast TP {tp} FP {fp} FN {fn}: recall {s['recall']:.3f} precision {s['precision']:.3f} F1 {s['f1']:.3f}"


a = dict(np.load(args.cells / "allidb1.npz"))
records = index_dataset(args.allidb1, "allidb1")
assert [str(r.path) for r in records] == list(a["smears"]), "ALL-IDB1 order differs from the cells file"
x, y, g = a["features"], a["gate"], a["smear"]
edge_ok = lambda z: np.ones(len(z["x"]), bool) if args.edge is None else z["edge"] >= args.edge  # noqa: E731
print(f"ALL-IDB1: {len(y)} located cells; intact {(y == 1).sum()}, unannotated {(y == 0).sum()}, in between {(y == -1).sum()}")
print(f"gate: PCA {args.components}, C {args.c}, keep {args.keep}" + (f", edge margin {args.edge} d" if args.edge else ""))
keep_cv = np.ones(len(y), bool)
p_cv = np.full(len(y), np.nan)
for train, test in GroupKFold(5).split(x, groups=g):
    use = train[y[train] >= 0]
    gate, thr = fit(x[use], y[use], g[use])
    p_cv[test] = gate.predict_proba(x[test])[:, 1]
    keep_cv[test] = p_cv[test] >= thr
keep_cv &= edge_ok(a)
base = calls(a, np.ones(len(y), bool))
gated = calls(a, keep_cv)
print("ALL-IDB1, no gate:   ", blast_scores(a, base, records), "|", verdict_table(a, verdicts(a, base)))
print("ALL-IDB1, gate (CV): ", blast_scores(a, gated, records), "|", verdict_table(a, verdicts(a, gated)))
for name, want in (("intact", 1), ("unannotated", 0), ("in between", -1)):
    sel = y == want
    print(f"  {name}: {(~keep_cv[sel]).sum()}/{sel.sum()} gated out")
sel = a["blast"] == 1
print(f"  cells on an annotated blast gated out: {(~keep_cv[sel]).sum()}/{sel.sum()}; "
      f"blast calls on no blast gated out: {(~keep_cv[(base == 'blast') & ~sel]).sum()}/{((base == 'blast') & ~sel).sum()}")

use = y >= 0
gate, thr = fit(x[use], y[use], g[use])
print(f"gate on all of ALL-IDB1: threshold {thr:.3f}")
for lab in ("bccd", "pbc", "aria"):
    path = args.cells / f"{lab}.npz"
    if not path.exists():
        continue
    z = dict(np.load(path))
    if len(z["x"]) == 0:
        continue
    kept = (gate.predict_proba(z["features"])[:, 1] >= thr) & edge_ok(z)
    line = f"{lab}: {len(kept)} cells, {(~kept).sum()} gated out ({(~kept).mean():.1%})"
    if lab in ("bccd", "pbc"):
        on = z["gate"] == 1
        line += f"; white cells (annotated) kept {kept[on].sum()}/{on.sum()}, other located objects gated out {(~kept[~on]).sum()}/{(~on).sum()}"
    print(line)
    if lab in ("bccd", "aria"):
        print("   no gate:", verdict_table(z, verdicts(z, calls(z, np.ones(len(kept), bool)))), "| stored:", verdict_table(z, z["verdict"]))
        print("   gate:   ", verdict_table(z, verdicts(z, calls(z, kept))))
