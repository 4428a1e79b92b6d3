"""No smear, no verdict: blank, black, grey, noise and 1-pixel images through analyze with both locators.

    python scripts/no_smear_probe.py

Uses the shipped detector crop classifier and the shipped locator; prints the verdicts per kind (all should be
cannot_assess). Recorded in docs/detection.md.
"""
import collections

import numpy as np

from leukodetect.detection.pipeline import analyze
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.locator import WhiteCellLocator
from leukodetect.weights import resolve_detector, resolve_locator

clf = Classifier.from_checkpoint(resolve_detector(None), backend="torch")
loc = WhiteCellLocator.load(resolve_locator(None))
rng = np.random.default_rng(0)
def images(kind, n=20):
    for i in range(n):
        h, w = rng.integers(200, 900, 2)
        if kind == "blank": yield np.full((h, w, 3), rng.integers(200, 256), np.uint8)
        elif kind == "black": yield np.full((h, w, 3), rng.integers(0, 30), np.uint8)
        elif kind == "grey": yield np.repeat(rng.integers(0, 255, (h, w, 1), dtype=np.uint8), 3, axis=2)
        elif kind == "noise": yield rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        elif kind == "1-pixel": yield rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)
for kind in ("blank", "black", "grey", "noise", "1-pixel"):
    for name, kw in (("colour", {}), ("learned", {"locator": loc})):
        c = collections.Counter(analyze(im, clf, **kw)["verdict"] for im in images(kind))
        print(kind, name, dict(c))
