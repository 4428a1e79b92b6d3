"""The default inference backend: ONNX Runtime on CPU, with the same P(blast) as PyTorch.

Tolerance: the two backends must agree within 1e-4 absolute in P(blast) (``BACKEND_ATOL``, the
export check's tolerance), on single images (batch 1) and on batches of several.

The rest of the suite runs PyTorch (tests/conftest.py sets ``LEUKODETECT_BACKEND=torch``); the
``real_default`` fixture removes that, so these tests run what a user gets.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import tiny_with_batchnorm_statistics
from torch import nn
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import LeukoError
from leukodetect.runtime import export
from leukodetect.runtime.checkpoint import make_bundle, save_checkpoint
from leukodetect.runtime.classifier import (
    BACKEND_ATOL,
    BACKEND_ENV,
    Classifier,
    auto_backend,
)


@pytest.fixture
def real_default(monkeypatch):
    """What a user gets on a CPU without native bfloat16 (where ``auto`` means ONNX Runtime). On a CPU
    with AVX512-BF16 or AMX ``auto`` keeps PyTorch with bfloat16 autocast instead
    (``test_backend_choice`` checks that choice); the end-to-end tests here pin the float32 case
    so that they run the ONNX path on every machine."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr("leukodetect.runtime.device.cpu_has_fast_bf16", lambda: False)


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """An empty cache for this test only (the session's cache is shared by the other tests here)."""
    monkeypatch.setenv("LEUKODETECT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bundle():
    """A tiny untrained model with non-trivial batch-norm statistics; temperature 0.05 spreads its P(blast) out."""
    model = tiny_with_batchnorm_statistics()
    return make_bundle(model, arch="tiny", image_size=24, mean=(0.6,) * 3, std=(0.25,) * 3, config={},
                       threshold=0.45, temperature=0.05)


@pytest.fixture(scope="module")
def checkpoint(bundle, tmp_path_factory):
    return save_checkpoint(bundle, tmp_path_factory.mktemp("backends") / "best.pt")


def test_onnx_backend_matches_torch_within_1e4(real_default, bundle, tiny_tree):
    logged = []
    onnx_clf = Classifier(bundle, device="cpu", precision="fp32", source="best.pt", log=logged.append)
    torch_clf = Classifier(bundle, device="cpu", precision="fp32", backend="torch")
    assert onnx_clf.backend == "onnx" and torch_clf.backend == "torch"
    assert any("Preparing the ONNX Runtime version of best.pt once" in line for line in logged) or not logged
    paths = sorted(tiny_tree.rglob("*.png"))
    reference = np.array([p.prob_blast for p in torch_clf.predict_paths(paths, batch_size=7)])
    assert reference.std() > 0.01  # P(blast) spread out, not saturated at 0 or 1
    for batch_size in (1, 5):  # batch 1, and batches of 5 with a last one of 4
        got = np.array([p.prob_blast for p in onnx_clf.predict_paths(paths, batch_size=batch_size)])
        assert np.max(np.abs(got - reference)) <= BACKEND_ATOL == 1e-4, batch_size
    # Grad-CAM and calibration still have the PyTorch module
    assert isinstance(onnx_clf.model, nn.Module) and onnx_clf.threshold == 0.45


def test_the_export_is_cached_and_reused(real_default, bundle, monkeypatch):
    Classifier(bundle, device="cpu", precision="fp32")  # exported here unless an earlier test did
    cached = export.onnx_cache_path(bundle)
    assert cached.is_file() and cached.parent.parent == export.cache_dir() == Path(os.environ["LEUKODETECT_CACHE"])
    mtime = cached.stat().st_mtime_ns

    def must_not_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds the file")

    monkeypatch.setattr(export, "export_bundle", must_not_export)
    logged = []
    again = Classifier(bundle, device="cpu", precision="fp32", log=logged.append)
    assert again.backend == "onnx" and logged == [] and cached.stat().st_mtime_ns == mtime
    # The threshold does not change the graph: a recalibrated threshold reuses the file; a new temperature does not.
    assert export.onnx_cache_path({**bundle, "threshold": 0.9}) == cached
    assert export.onnx_cache_path({**bundle, "temperature": 1.0}) != cached


def test_a_corrupt_cache_file_is_replaced(real_default, own_cache, bundle):
    cached = export.onnx_cache_path(bundle)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a file")
    logged = []
    clf = Classifier(bundle, device="cpu", precision="fp32", log=logged.append)
    assert clf.backend == "onnx" and cached.stat().st_size > 1000
    assert "cannot be read; exporting it again" in logged[0]
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left behind


def test_an_unwritable_cache_exports_to_a_temporary_folder(real_default, monkeypatch, tmp_path, bundle):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # fails for root too, unlike chmod
    monkeypatch.setenv("LEUKODETECT_CACHE", str(blocker))
    logged = []
    clf = Classifier(bundle, device="cpu", precision="fp32", log=logged.append)
    assert clf.backend == "onnx" and len(logged) == 1
    assert "cannot be written" in logged[0] and "LEUKODETECT_CACHE" in logged[0]
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    reference = Classifier(bundle, device="cpu", precision="fp32", backend="torch").probabilities(x)
    assert np.max(np.abs(clf.probabilities(x) - reference)) <= BACKEND_ATOL


def test_a_failed_export_falls_back_to_torch_with_one_sentence(real_default, own_cache, bundle, monkeypatch):
    def fails(*args, **kwargs):
        try:
            raise RuntimeError("no ONNX implementation for aten::strange_op\nlong details")
        except RuntimeError as exc:
            raise LeukoError("torch could not export best.pt (tiny) to onnx") from exc

    monkeypatch.setattr(export, "export_bundle", fails)
    logged = []
    clf = Classifier(bundle, device="cpu", precision="fp32", source="best.pt", log=logged.append)
    assert clf.backend == "torch" and clf.probabilities(torch.zeros(2, 3, 24, 24)).shape == (2,)
    assert logged[-1] == ("Using PyTorch for best.pt: its ONNX Runtime version could not be prepared "
                          "(RuntimeError: no ONNX implementation for aten::strange_op).")
    with pytest.raises(LeukoError, match="could not export"):  # asked for by name, it is an error
        Classifier(bundle, device="cpu", precision="fp32", backend="onnx", log=logged.append)


def test_backend_choice(monkeypatch, bundle):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_backend(cpu, None) == "onnx"
    assert auto_backend(cuda, None) == "torch" and auto_backend(cpu, torch.bfloat16) == "torch"
    with pytest.raises(LeukoError, match="Unknown backend 'tensorrt'"):
        Classifier(bundle, device="cpu", backend="tensorrt")
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(LeukoError, match="LEUKODETECT_BACKEND=fast is not a backend"):
        Classifier(bundle, device="cpu")
    assert Classifier(bundle, device="cpu", backend="torch").backend == "torch"  # a named backend ignores the variable


def test_predict_command_runs_onnx_by_default(real_default, checkpoint, tiny_tree, monkeypatch):
    """End to end: ``predict`` without --backend (ONNX Runtime) against ``--backend torch``."""
    runner = CliRunner()
    Classifier.from_checkpoint(checkpoint, device="cpu", precision="fp32")  # the export (and its self-check) happen here, not below
    onnx_calls = []
    run_onnx = export.ExportedClassifier.outputs
    monkeypatch.setattr(export.ExportedClassifier, "outputs", lambda self, batch: onnx_calls.append(len(batch)) or run_onnx(self, batch))

    def rows(*option):
        result = runner.invoke(app, ["predict", str(tiny_tree / "blast"), "--checkpoint", str(checkpoint), "--json", *option],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert all(line.startswith("{") for line in lines)  # the export's log line goes to stderr
        return [json.loads(line) for line in lines]

    by_default = rows()
    assert sum(onnx_calls) == 15  # every image went through ONNX Runtime
    by_torch = rows("--backend", "torch")
    assert sum(onnx_calls) == 15
    assert len(by_default) == 15 and [r["path"] for r in by_default] == [r["path"] for r in by_torch]
    for a, b in zip(by_default, by_torch):
        assert abs(a["prob_blast"] - b["prob_blast"]) <= BACKEND_ATOL
    bad = runner.invoke(app, ["predict", str(tiny_tree / "blast"), "--checkpoint", str(checkpoint), "--backend", "gpu"])
    assert bad.exit_code == 2 and "Unknown backend 'gpu'" in bad.output


def test_service_reports_its_backend(real_default, checkpoint):
    from fastapi.testclient import TestClient

    from leukodetect.serving.server import build_app

    for backend, expected in (("auto", "onnx"), ("torch", "torch")):
        with TestClient(build_app(checkpoint, backend=backend, torch_threads=1, log=lambda _: None)) as client:
            assert client.get("/v1/model").json()["backend"] == expected
