"""``leukodetect demo``: the whole pipeline on the bundled C-NMC sample, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from leukodetect.config import RunConfig
from leukodetect.jobs.train import run_train
from leukodetect.runtime.classifier import Classifier
from leukodetect.sample import sample_dir
from leukodetect.utils import fresh_dir


def run_demo(out_dir: Path, *, epochs: int = 20, image_size: int = 160, command: str = "", log=print, progress=False, console=None) -> dict:
    """Train ResNet-50 from scratch on the sample (split by patient), evaluate, predict held-out cells.

    The sample is far too small for a useful model: the demo shows that every step works and what
    each writes, not a figure to quote.
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
    summary = [
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
    if console is not None:
        console.print("\n".join(summary), highlight=False, soft_wrap=True)
    else:
        print("\n".join(summary))
    return result
