"""--group-by source: ALL-IDB2-style crops cut from one photograph never straddle a fold."""


import numpy as np
from PIL import Image
from typer.testing import CliRunner

from leukodetect.cli import app


def _layout(root):
    """Twelve textured 'photographs' (ALL-IDB1 layout) and 2 crops from each (ALL-IDB2 layout)."""
    rng = np.random.default_rng(1)
    im, xyc, crops = root / "ALL-IDB1" / "ALL_IDB1" / "im", root / "ALL-IDB1" / "ALL_IDB1" / "xyc", root / "ALL-IDB2" / "ALL_IDB2" / "img"
    for d in (im, xyc, crops):
        d.mkdir(parents=True)
    n = 0
    for p, label in ((p, p % 2) for p in range(1, 13)):
        texture = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        photo = Image.fromarray(texture).resize((320, 240), Image.BICUBIC)
        photo.save(im / f"Im{p:03d}_{label}.jpg", quality=95)
        (xyc / f"Im{p:03d}_{label}.xyc").write_text("10 10\n" if label else "")
        decoded = np.asarray(Image.open(im / f"Im{p:03d}_{label}.jpg").convert("RGB"))
        for k in range(2):
            n += 1
            y, x = 20 + 60 * k, 30 + 80 * k
            Image.fromarray(decoded[y:y + 48, x:x + 48]).save(crops / f"Im{n:03d}_{label}.tif")
    return crops


def test_cv_group_by_source_keeps_photographs_together(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKODETECT_CACHE", str(tmp_path / "cache"))
    crops = _layout(tmp_path)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["cv", "--data", str(crops), "--out", str(out), "--folds", "2", "--epochs", "1",
                                      "--arch", "tiny", "--image-size", "24", "--group-by", "source"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "24 of 24 crops matched, 12 groups" in result.output
    rows = [line.split(",") for line in (out / "predictions.csv").read_text().splitlines()[1:]]
    fold_of_group = {}
    for row in rows:
        group, fold = row[2], row[3]
        assert group.startswith("photo:")
        assert fold_of_group.setdefault(group, fold) == fold, "a photograph's crops straddle folds"
    assert len(fold_of_group) == 12


def test_group_by_source_needs_allidb2(tiny_tree, tmp_path):
    result = CliRunner().invoke(app, ["cv", "--data", str(tiny_tree), "--out", str(tmp_path / "x"), "--arch", "tiny",
                                      "--group-by", "source"])
    assert result.exit_code == 2 and "needs ALL-IDB2 crops" in result.output
