"""The guard of a cell model on images that are not blood cells: noise, smooth colour noise, flat colours,
text, grey textures, crops of photographs (scikit-image's, scikit-learn's and matplotlib's samples) and of
stained tissue (scikit-image's immunohistochemistry image), white and black
frames (100 of each kind, seed 0, 128x128), shown as predict shows
an image without red cells. Prints, per kind, how many the guard flags and how many are called blast unflagged.

    python scripts/guard_probe.py src/leukodetect/weights/resnet50_5labs.safetensors
"""
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import sklearn.datasets
from PIL import Image, ImageDraw

from leukodetect.runtime.classifier import Classifier

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
# Photographs that are not blood (scikit-image's bundled samples, no download), and stained tissue under a
# microscope (immunohistochemistry, the nearest thing to a smear among them): random square crops of 64-300 px.
photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "colorwheel")}
# More photographs, added 2026-12-06 (late evening): scikit-image's other colour and grey samples, scikit-learn's
# two and matplotlib's portrait, all bundled with the packages.
more = [skimage.data.stereo_motorcycle()[0], skimage.data.logo()[..., :3], *sklearn.datasets.load_sample_images().images,
        np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")),
        np.stack([skimage.data.coins()] * 3, -1), np.stack([skimage.data.horse().astype(np.uint8) * 255] * 3, -1)]
for kind, sources in (("photograph", list(photos.values())), ("stained tissue", [skimage.data.immunohistochemistry()]),
                      ("photograph, more", more)):
    for i in range(100):
        a = sources[i % len(sources)]
        side = int(rng.integers(64, min(300, *a.shape[:2]) + 1))
        y, x = (int(rng.integers(0, a.shape[k] - side + 1)) for k in (0, 1))
        probes[f"{kind}_{i}"] = Image.fromarray(a[y:y + side, x:x + side, :3]).resize((128, 128), Image.BILINEAR)
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
