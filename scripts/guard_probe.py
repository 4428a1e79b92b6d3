"""The guard of a cell model on images that are not blood cells: noise, smooth colour noise, flat colours,
text, grey textures, crops of photographs (scikit-image's, scikit-learn's and matplotlib's samples) and of
stained tissue (scikit-image's immunohistochemistry image), white and black
frames (100 of each kind, seed 0, 128x128), shown as predict shows
an image without red cells. Prints, per kind, how many the guard flags and how many are called blast unflagged.

    python scripts/guard_probe.py src/leukodetect/weights/resnet50_5labs.safetensors
"""
import json
import sys

import numpy as np
from PIL import Image, ImageDraw

from leukodetect.runtime.classifier import Classifier
from probe_pictures import crops, pictures

clf = Classifier.from_checkpoint(sys.argv[1], backend="torch", device="cpu")
rng = np.random.default_rng(0)
probes = {}
for i in range(100):
    probes[f"noise_{i}"] = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    probes[f"smooth noise_{i}"] = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((128, 128), Image.BILINEAR)
    probes[f"flat colour_{i}"] = Image.new("RGB", (128, 128), tuple(int(v) for v in rng.integers(0, 256, 3)))
    t = Image.new("RGB", (128, 128), "white"); d = ImageDraw.Draw(t)
    for k in range(6):
        d.text((4, 4 + 20 * k), "".join(chr(int(x)) for x in rng.integers(65, 90, 12)), fill=(0, 0, 0))
    probes[f"text_{i}"] = t
    g = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((128, 128), Image.BICUBIC).convert("RGB")
    probes[f"grey texture_{i}"] = g
probes["white_0"] = Image.new("RGB", (128, 128), "white"); probes["black_0"] = Image.new("RGB", (128, 128), "black")
# Photographs that are not blood and stained tissue (probe_pictures.py): 100 random square crops of each kind.
for kind, sources in pictures().items():
    for i, crop in enumerate(crops(sources, 100, rng)):
        probes[f"{kind}_{i}"] = crop
views = [clf.view(im)[0] for im in probes.values()]  # no red cells: each is shown whole, as predict would
probs, scores = clf.image_outputs(views, batch_size=32)
out = {"threshold": clf.guard_threshold}
for kind in sorted({k.rsplit("_", 1)[0] for k in probes}):
    idx = [i for i, k in enumerate(probes) if k.rsplit("_", 1)[0] == kind]
    out[kind] = {"n": len(idx), "flagged": int(sum(scores[i] > clf.guard_threshold for i in idx)),
                 "called blast, not flagged": int(sum(probs[i] >= clf.threshold and scores[i] <= clf.guard_threshold for i in idx)),
                 "lowest score": round(float(scores[idx].min()), 2)}
n = sum(v["n"] for k, v in out.items() if k != "threshold"); f = sum(v["flagged"] for k, v in out.items() if k != "threshold")
out["all"] = {"n": n, "flagged": f}
print(json.dumps(out, indent=1))
