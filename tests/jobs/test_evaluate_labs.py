"""evaluate across laboratories: LAB=PATH sources cut at the model's scale, and figures per laboratory (tiny model)."""

from __future__ import annotations

import csv

import pytest
from model_helpers import with_scale

from leukodetect.errors import LeukoError
from leukodetect.evaluation.labs import per_lab
from leukodetect.jobs.cells import LabSource
from leukodetect.jobs.evaluate import evaluate_checkpoint


def _row(lab, label, prob, *, kind="", parent=None, flagged=False):
    return {"lab": lab, "kind": kind, "parent": parent, "label": label, "prob": prob, "flagged": flagged}


def test_per_lab_figures_split_pbc_cell_types_and_score_aria_fields_by_their_most_blast_like_cell():
    rows = [_row("pbc", 0, 0.1, kind="lymphocyte"), _row("pbc", 0, 0.9, kind="lymphocyte", flagged=True),
            _row("pbc", 0, 0.2, kind="neutrophil"),
            _row("aria", 1, 0.2, parent="f1"), _row("aria", 1, 0.7, parent="f1"),
            _row("aria", 0, 0.4, parent="f2"), _row("aria", 0, 0.3, parent="f2"), _row("aria", 0, 0.6, parent="f3")]
    figures = per_lab(rows)
    assert list(figures) == ["aria", "pbc"]
    pbc = figures["pbc"]
    assert set(pbc) == {"cells", "lymphocytes", "other_types"} and "sensitivity" not in pbc["cells"]
    assert pbc["cells"]["specificity"]["value"] == pytest.approx(2 / 3) and pbc["cells"]["flagged"] == 1
    assert pbc["lymphocytes"]["specificity"]["value"] == 0.5 and pbc["other_types"]["specificity"]["value"] == 1.0
    fields = figures["aria"]["fields"]
    assert fields["fields"] == 3 and (fields["blast"], fields["normal"]) == (1, 2)
    assert fields["sensitivity"]["value"] == 1.0  # f1's most blast-like cell (0.7) is a blast
    assert fields["specificity"]["value"] == 0.5  # f2 (0.4) normal, f3 (0.6) not
    assert figures["aria"]["cells"]["cells"] == 5


@pytest.fixture(scope="module")
def scaled_checkpoint(crop_checkpoint, tmp_path_factory):
    """The tiny crop model with a physical scale: 24-pixel inputs of 3 red-cell diameters."""
    return with_scale(crop_checkpoint, tmp_path_factory.mktemp("scaled"))


def test_laboratories_given_as_sources_are_cut_at_the_model_scale_and_reported_each(scaled_checkpoint, tiny_tree, tmp_path):
    sources = [LabSource.parse(f"north={tiny_tree}@8"), LabSource.parse(f"south={tiny_tree}@10")]
    out = tmp_path / "eval"
    report = evaluate_checkpoint(scaled_checkpoint, None, out, sources=sources, backend="torch", progress=False, log=lambda *_: None)
    labs = report["labs"]
    assert set(labs) == {"north", "south"}
    for lab in labs.values():
        cells = lab["cells"]
        assert (cells["cells"], cells["blast"], cells["normal"]) == (29, 15, 14)  # every image of the tree, once per laboratory
        assert {"sensitivity", "specificity", "roc_auc"} <= set(cells)
    assert (out / "cells" / "cells.csv").is_file()
    with (out / "predictions.csv").open() as handle:
        assert {row["lab"] for row in csv.DictReader(handle)} == {"north", "south"}
    text = (out / "report.md").read_text()
    assert "Per laboratory" in text and "| north | cells | 29 |" in text


def test_sources_need_a_model_with_a_physical_scale(crop_checkpoint, tiny_tree, tmp_path):
    with pytest.raises(LeukoError, match="has no physical scale"):
        evaluate_checkpoint(crop_checkpoint, None, tmp_path / "eval", sources=[LabSource.parse(f"north={tiny_tree}@8")],
                            backend="torch", progress=False, log=lambda *_: None)
