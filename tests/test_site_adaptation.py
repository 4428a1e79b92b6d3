"""scripts/site_adaptation.py: the draw keeps groups whole and apart from the test part; AdaBN re-estimates batch norm only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "site_adaptation.py"


def _script():
    spec = importlib.util.spec_from_file_location("site_adaptation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_draw_takes_at_least_k_of_each_label_as_whole_groups_and_tests_on_the_rest():
    cells = [{"path": f"{g}_{i}", "group": f"g{g}", "label": g % 2} for g in range(20) for i in range(g % 3 + 1)]
    script = _script()
    for seed in range(5):
        tune, test = script.draw(cells, 3, seed)
        assert sum(c["label"] == 1 for c in tune) >= 3 and sum(c["label"] == 0 for c in tune) >= 3
        assert {c["group"] for c in tune}.isdisjoint({c["group"] for c in test})
        assert sorted(c["path"] for c in tune + test) == sorted(c["path"] for c in cells)  # every cell once
    assert script.draw(cells, 3, 0) == script.draw(cells, 3, 0)  # seeded


def test_adabn_sets_the_first_batch_norm_to_the_statistics_of_the_new_images_and_leaves_the_weights(crop_checkpoint, tiny_tree):
    from leukodetect.runtime.classifier import Classifier

    clf = Classifier.from_checkpoint(crop_checkpoint, backend="torch", device="cpu", precision="fp32")
    weights = {k: v.clone() for k, v in clf.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    paths = sorted(str(p) for p in (tiny_tree / "blast").glob("*.png"))
    _script().adapt_batch_norm(clf, paths, rbc_diameter=None, batch_size=len(paths))  # one batch: the plain mean
    first_bn = next(m for m in clf.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    conv_before = next(m for m in clf.model.modules() if isinstance(m, torch.nn.Conv2d))
    batch = next(iter(clf.preprocessed_batches([clf.view(Image.open(p).convert("RGB"))[0] for p in paths], len(paths))))
    with torch.no_grad():
        expected = conv_before(batch).mean(dim=(0, 2, 3))
    assert torch.allclose(first_bn.running_mean, expected, atol=1e-5)
    assert not clf.model.training
    assert all(torch.equal(v, clf.model.state_dict()[k]) for k, v in weights.items())  # learned weights untouched
    assert np.isfinite([p.prob_blast for p in clf.predict_paths(paths)]).all()


def test_the_validation_part_is_whole_groups_of_the_tuning_cells_and_leaves_some_to_train():
    tune = [{"path": f"{g}_{i}", "group": f"g{g}", "label": i % 2} for g in range(6) for i in range(g + 2)]
    script = _script()
    for seed in range(5):
        fit, val = script.validation_part(tune, 0.2, seed)
        assert {c["group"] for c in fit}.isdisjoint({c["group"] for c in val}) and fit and val
        assert len(val) >= 0.2 * len(tune) and sorted(c["path"] for c in fit + val) == sorted(c["path"] for c in tune)
    fit, val = script.validation_part([c for c in tune if c["group"] == "g0"], 0.5, 0)  # one group: it trains
    assert val == [] and len(fit) == 2
