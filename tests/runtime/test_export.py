"""Export to ONNX and TorchScript: self-checked, metadata stored and read back, same calls as PyTorch."""

import json
import zipfile

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.config import RunConfig
from leukodetect.data.indexers import index_dataset
from leukodetect.errors import LeukoError
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.export import (
    DEFAULT_ATOL,
    EXTRA_FILE,
    META_KEY,
    ExportedClassifier,
    export_model,
)
from leukodetect.training.fit import train_model

runner = CliRunner()
PREPROCESSING = ("arch", "class_names", "image_size", "mean", "std", "threshold", "temperature")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_tree, tmp_path_factory):
    """A tiny model trained for 2 epochs, given a non-trivial temperature and threshold."""
    root = tmp_path_factory.mktemp("export")
    cfg = RunConfig()
    cfg.data.image_size, cfg.model.arch = 24, "tiny"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.device = 2, 8, 0.01, "cpu"
    records = index_dataset(tiny_tree, "folders")
    result = train_model(cfg, records, records[::3], root / "run", progress=False, log=lambda *_: None)
    bundle = load_checkpoint(result.best_path)
    bundle.update(temperature=1.7, threshold=0.45)
    return save_checkpoint(bundle, root / "calibrated.pt")


@pytest.fixture(scope="module")
def exported(checkpoint):
    """Both formats: ONNX through the command, TorchScript through the library."""
    folder = checkpoint.parent
    cli = invoke("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", folder / "model.onnx", "--json")
    assert cli.exit_code == 0, cli.output
    ts = export_model(checkpoint, folder / "model.pt", fmt="torchscript")
    return {"onnx": json.loads(cli.stdout), "torchscript": ts}


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated:FutureWarning")
def test_export_checks_itself_and_stores_the_preprocessing(exported, checkpoint):
    bundle = load_checkpoint(checkpoint)
    for fmt, result in exported.items():
        assert result["format"] == fmt and result["atol"] == DEFAULT_ATOL == 1e-4
        assert 0 <= result["max_abs_diff"] <= result["atol"]
    proto = onnx.load(exported["onnx"]["path"])
    onnx_meta = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
    extra = {EXTRA_FILE: ""}
    torch.jit.load(exported["torchscript"]["path"], _extra_files=extra)
    ts_meta = json.loads(extra[EXTRA_FILE])
    for meta, fmt in ((onnx_meta, "onnx"), (ts_meta, "torchscript")):
        assert {k: meta[k] for k in PREPROCESSING} == {k: bundle[k] for k in PREPROCESSING}
        assert meta["model_format"] == fmt and meta["exported_with"]["leukodetect"] and meta["temperature"] == 1.7
    # one input, one output, both with a dynamic batch axis
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and outp.name == "prob_blast"
    assert inp.type.tensor_type.shape.dim[0].dim_param and [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 24, 24]


def test_exported_models_match_pytorch_on_real_images(exported, checkpoint, tiny_tree):
    paths = sorted(tiny_tree.rglob("*.png"))
    reference = Classifier.from_checkpoint(checkpoint, device="cpu", precision="fp32").predict_paths(paths, batch_size=7)
    ref = np.array([p.prob_blast for p in reference])
    assert ref.std() > 0.01  # a trained model, not a constant 0.5
    for fmt, result in exported.items():
        clf = ExportedClassifier.from_file(result["path"])
        assert clf.format == fmt and clf.threshold == 0.45 and clf.preset.image_size == 24
        preds = clf.predict_paths(paths, batch_size=5)  # batches of 5 and a last one of 4: dynamic batch
        got = np.array([p.prob_blast for p in preds])
        assert np.max(np.abs(got - ref)) <= DEFAULT_ATOL, fmt
        clear = np.abs(ref - 0.45) > DEFAULT_ATOL
        assert [p.label for p, c in zip(preds, clear) if c] == [p.label for p, c in zip(reference, clear) if c]


def test_predict_with_an_exported_model_gives_the_checkpoints_calls(exported, checkpoint, tiny_tree, monkeypatch):
    # The checkpoint in float32 as the export was checked against, also on CPUs with native bfloat16.
    monkeypatch.setattr("leukodetect.runtime.device.cpu_has_fast_bf16", lambda: False)
    def rows(*option):
        result = invoke("predict", tiny_tree / "blast", *option, "--json")
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    by_checkpoint, by_model = rows("--checkpoint", checkpoint), rows("--model", exported["onnx"]["path"])
    assert [r["path"] for r in by_model] == [r["path"] for r in by_checkpoint] and len(by_model) == 15
    for a, b in zip(by_checkpoint, by_model):
        assert abs(a["prob_blast"] - b["prob_blast"]) <= DEFAULT_ATOL
        assert a["label"] == b["label"] or abs(a["prob_blast"] - 0.45) <= DEFAULT_ATOL


def test_export_refuses_to_overwrite(checkpoint, tmp_path):
    target = tmp_path / "taken.onnx"
    target.write_text("keep me")
    result = invoke("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", target)
    assert result.exit_code == 2 and "taken.onnx already exists" in result.output and "--out" in result.output
    assert target.read_text() == "keep me"


def test_a_failed_check_leaves_no_file(checkpoint, tmp_path):
    with pytest.raises(LeukoError, match="differs from PyTorch"):
        export_model(checkpoint, tmp_path / "m.pt", fmt="torchscript", atol=-1.0)  # no difference passes
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_and_files_get_one_sentence(exported, checkpoint, tiny_tree, tmp_path):
    image = tiny_tree / "blast" / "blast_01.png"
    (tmp_path / "junk.onnx").write_text("junk")
    proto = onnx.load(exported["onnx"]["path"])
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with zipfile.ZipFile(tmp_path / "no_meta.pt", "w") as z:
        z.writestr("m/data.pkl", b"")
    cases = [
        (("--model", tmp_path / "junk.onnx"), "junk.onnx is not a model exported by 'leukodetect export'"),
        (("--model", tmp_path / "bare.onnx"), "bare.onnx is not a model exported by 'leukodetect export' (no leukodetect metadata)"),
        (("--model", tmp_path / "no_meta.pt"), "no_meta.pt is not a model exported"),
        (("--model", checkpoint), "calibrated.pt is not a model exported"),
        (("--model", tmp_path / "missing.onnx"), "missing.onnx does not exist"),
        (("--model", exported["onnx"]["path"], "--checkpoint", checkpoint), "not both"),
    ]
    for option, phrase in cases:
        result = invoke("predict", image, *option)
        assert result.exit_code == 2 and phrase in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "--format onnx or --format torchscript" in invoke(
        "export", "--checkpoint", checkpoint, "--format", "tflite", "--out", tmp_path / "m.tflite").output


def test_a_detectors_settings_survive_onnx_export(checkpoint, tmp_path):
    """Crop scale, localisation, gate and scorer travel in the ONNX metadata and come back typed."""
    from leukodetect.runtime.checkpoint import DetectorSettings

    settings = DetectorSettings(crop_factor=2.0, crop_size=24, locate={"min_area": 0.4}, gate={"threshold": 0.1}, scorer=None)
    bundle = load_checkpoint(checkpoint)
    bundle["detection"] = settings.to_dict()
    detector = save_checkpoint(bundle, tmp_path / "detector.pt")
    export_model(detector, tmp_path / "detector.onnx", fmt="onnx")
    reloaded = ExportedClassifier.from_file(tmp_path / "detector.onnx")
    assert reloaded.detector == settings == Classifier.from_checkpoint(detector, backend="torch").detector
    assert "scorer" not in reloaded.meta["detection"]  # unset entries are left out, as in the checkpoint
    plain = export_model(checkpoint, tmp_path / "plain.onnx", fmt="onnx")
    assert ExportedClassifier.from_file(plain["path"]).detector is None


def test_image_probabilities_match_predict_paths_at_any_batch_size(checkpoint, tiny_tree):
    """The one batched method: PIL images, arrays and files give the same P(blast), batch by batch."""
    from leukodetect.runtime.images import open_rgb

    clf = Classifier.from_checkpoint(checkpoint, backend="torch", precision="fp32")
    paths = [r.path for r in index_dataset(tiny_tree, "folders")][:7]
    images = [open_rgb(p) for p in paths]
    by_path = np.array([p.prob_blast for p in clf.predict_paths(paths, batch_size=3)])
    np.testing.assert_allclose(clf.image_probabilities(images, batch_size=2), by_path, atol=1e-6)
    np.testing.assert_allclose(clf.image_probabilities([np.asarray(im) for im in images], batch_size=7), by_path, atol=1e-6)
    assert clf.image_probabilities([], batch_size=4).shape == (0,)
    logits = clf.image_logits(images, batch_size=4)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits) / clf.temperature, 1)[:, 1].numpy(), by_path, atol=1e-5)


def _guarded(checkpoint, tiny_tree, tmp_path, *, scale=None):
    """The export fixture's tiny model with a guard fitted on its training cells (threshold at their 97.5th percentile)."""
    from leukodetect.evaluation.ood import fit_guard, guard_scores, guard_threshold
    from leukodetect.runtime.images import open_rgb

    clf = Classifier.from_checkpoint(checkpoint, backend="torch", precision="fp32")
    records = index_dataset(tiny_tree, "folders")
    images = [open_rgb(r.path) for r in records]
    features = clf.image_features(images)
    fit = fit_guard(features, np.array([r.label for r in records]))
    bundle = load_checkpoint(checkpoint)
    bundle["guard"] = {"center": torch.from_numpy(fit.center), "projection": torch.from_numpy(fit.projection),
                       "class_means": torch.from_numpy(fit.class_means), "percentile": 97.5,
                       "threshold": guard_threshold(guard_scores(features, fit), 97.5)}
    if scale is not None:
        bundle["scale"] = scale
    return save_checkpoint(bundle, tmp_path / "guarded.pt"), records


def test_the_guard_flags_noise_for_review_and_survives_onnx_and_safetensors(checkpoint, tiny_tree, tmp_path):
    """Noise, blank frames and text are 'review: unlike the images this model was trained on', with the score."""
    from PIL import Image, ImageDraw

    from leukodetect.runtime.checkpoint import save_safetensors

    guarded, records = _guarded(checkpoint, tiny_tree, tmp_path)
    rng = np.random.default_rng(0)
    odd = {"noise.png": Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
           "white.png": Image.new("RGB", (40, 40), "white"), "black.png": Image.new("RGB", (40, 40), "black")}
    text = Image.new("RGB", (60, 40), "white")
    ImageDraw.Draw(text).text((2, 10), "leukemia?", fill="black")
    odd["text.png"] = text
    for name, image in odd.items():
        image.save(tmp_path / name)
    paths = [tmp_path / name for name in odd]
    torch_clf = Classifier.from_checkpoint(guarded, backend="torch", precision="fp32")
    preds = torch_clf.predict_paths(paths)
    assert [p.label for p in preds] == ["review"] * 4
    assert all(p.reason == "unlike the images this model was trained on" and p.ood_score > torch_clf.guard_threshold
               and 0 <= p.prob_blast <= 1 for p in preds)
    assert set(preds[0].to_dict()) >= {"prob_blast", "ood_score", "reason", "label"}
    # The training cells themselves stay classes, not review (the threshold is their 97.5th percentile).
    cells = torch_clf.predict_paths([r.path for r in records])
    assert sum(p.label == "review" for p in cells) <= 0.05 * len(cells) + 1
    # The score travels in the ONNX graph (a second output) and the threshold in its metadata.
    export_model(guarded, tmp_path / "guarded.onnx", fmt="onnx")
    onnx_clf = ExportedClassifier.from_file(tmp_path / "guarded.onnx")
    assert onnx_clf.guard_threshold == pytest.approx(torch_clf.guard_threshold)
    onnx_preds = onnx_clf.predict_paths(paths + [r.path for r in records])
    np.testing.assert_allclose([p.ood_score for p in onnx_preds], [p.ood_score for p in preds + cells], rtol=1e-3)
    assert [p.label for p in onnx_preds] == [p.label for p in preds + cells]
    # And through the shipped format: safetensors keeps the guard's arrays in float32.
    shipped = save_safetensors(load_checkpoint(guarded), tmp_path / "guarded.safetensors")
    again = Classifier.from_checkpoint(shipped, backend="torch", precision="fp32")
    assert again.guard_threshold == torch_clf.guard_threshold
    assert [p.label for p in again.predict_paths(paths)] == ["review"] * 4


def test_a_model_with_a_scale_shows_each_cell_in_red_cell_diameters(checkpoint, tmp_path):
    """predict measures red cells (or takes --pixel-size) and says when the scale is unknown."""
    from PIL import Image

    bundle = load_checkpoint(checkpoint)
    bundle["scale"] = {"field": 3.0, "size": 24, "rbc_um": 7.5}
    scaled = save_checkpoint(bundle, tmp_path / "scaled.pt")
    clf = Classifier.from_checkpoint(scaled, backend="torch", precision="fp32")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (30, 30), (240, 230, 220)).save(plain)
    unknown, declared = clf.predict_paths([plain]), clf.predict_paths([plain], rbc_diameter=10.0)
    assert unknown[0].scale == "unknown" and unknown[0].rbc_diameter is None and "scale unknown" in unknown[0].notes[0]
    assert declared[0].scale == "declared" and declared[0].rbc_diameter == 10.0 and declared[0].notes == []
    assert ExportedClassifier.from_file(export_model(scaled, tmp_path / "scaled.onnx", fmt="onnx")["path"]).scale == clf.scale
