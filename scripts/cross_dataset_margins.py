"""Logit margins of a checkpoint on a cross data set: does it rank the cells at all?

``leukodetect evaluate`` scores P(blast). Far outside its training domain a model can be so sure
that P(blast) rounds to 1.0 in float32 for every image; the ROC AUC of those ties is 0.5 whatever
the ranking underneath. The margin logit(blast) - logit(normal) keeps that ranking. Printed per
preprocessing: the images as they are, Macenko-normalised (as ``--stain-normalize macenko``), and,
as a diagnostic of the black background only, both again with the background painted white.

    python scripts/cross_dataset_margins.py src/leukodetect/sample \
        --checkpoint src/leukodetect/weights/resnet50_allidb2.safetensors \
        --stain-reference ../shared/datasets/ALL-IDB2/ALL_IDB2/img
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from leukodetect.data.indexers import index_dataset
from leukodetect.data.stain import MacenkoStain, foreground
from leukodetect.evaluation.intervals import auc_rows, bootstrap_interval
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import open_rgb


def white_background(image: Image.Image) -> Image.Image:
    rgb = np.asarray(image).copy()
    rgb[~foreground(rgb)] = 255
    return Image.fromarray(rgb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--stain-reference", type=Path, required=True)
    args = parser.parse_args()

    clf = Classifier.from_checkpoint(args.checkpoint)
    stain = MacenkoStain.from_reference(args.stain_reference)
    records = [r for r in index_dataset(args.data) if r.label is not None]
    y = np.array([r.label for r in records])
    plain = [open_rgb(r.path) for r in records]
    normalised = [stain(im) for im in plain]
    variants = {
        "as they are": plain,
        "Macenko": normalised,
        "background white (diagnostic)": [white_background(im) for im in plain],
        "Macenko, background white (diagnostic)": [white_background(im) for im in normalised],
    }
    print(f"{len(y)} images ({int(y.sum())} blast) of {args.data}; checkpoint {args.checkpoint}")
    print("| preprocessing | margin min / median / max | ROC AUC of the margin (95% CI, bootstrap) | called blast |")
    print("|---|---|---|---|")
    for name, images in variants.items():
        x = torch.stack([clf.preset(im) for im in images])
        with torch.inference_mode():
            logits = clf.inference_model(x)[0].float()
        margin = (logits[:, 1] - logits[:, 0]).numpy()
        called = int((torch.softmax(logits / clf.temperature, 1)[:, 1] >= clf.threshold).sum())
        low, high = bootstrap_interval(y, margin, auc_rows, vectorized=True)
        print(f"| {name} | {margin.min():.1f} / {np.median(margin):.1f} / {margin.max():.1f} | "
              f"{roc_auc_score(y, margin):.3f} ({low:.3f} – {high:.3f}) | {called} of {len(y)} |")
    print(f"Macenko: {stain.failed} images could not be normalised.")


if __name__ == "__main__":
    main()
