"""The benchmark's logic on the tiny model: structure of the result and ratios, never timings."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import LeukoError
from leukodetect.jobs.benchmark import BenchmarkConfig, render_benchmark, run_benchmark


@pytest.fixture(scope="module")
def result(tiny_tree):
    cfg = BenchmarkConfig(archs=("tiny",), image_size=24, batch_size=4, steps=2, infer_batch=4, infer_runs=2,
                          latency_runs=3, matmul_size=64, data=str(tiny_tree))
    return run_benchmark(cfg, log=lambda _msg: None)


def test_result_has_every_figure(result):
    assert set(result) >= {"config", "machine", "hardware", "data", "models", "targets"}
    assert result["machine"]["torch_threads"] >= 1 and result["machine"]["cpu"]
    assert set(result["hardware"]) >= {"fp32_gflops", "bf16_gflops"}
    assert result["data"]["images"] == 29  # the tiny tree: 14 + 14 + one duplicate
    for key in ("cold_images_per_s", "decode_only_images_per_s", "warm_images_per_s"):
        assert result["data"][key] > 0
    (model,) = result["models"]
    assert model["arch"] == "tiny" and model["forward_gflop_per_image"] > 0
    assert model["train"]["ours"]["runs"] == model["train"]["naive"]["runs"] == 2
    inf = model["inference"]
    assert {"ours", "naive", "onnxruntime"} <= set(inf)
    for name in ("ours", "naive", "onnxruntime"):
        assert inf[name]["latency_batch1"]["runs"] == 3
        assert inf[name]["latency_batch1"]["p95_ms"] >= inf[name]["latency_batch1"]["p50_ms"] > 0
        # Every path computes the same P(blast) as the float32 eager model.
        assert inf[name]["max_abs_diff_vs_naive"] < 1e-4
    assert set(model["targets"]) >= {"train_speedup", "inference_speedup", "latency_p50_ms"}
    json.dumps(result)  # JSON-ready


def test_ratios_and_fractions_follow_from_the_reported_figures(result):
    (model,) = result["models"]
    train, inf, peak = model["train"], model["inference"], result["hardware"]["fp32_gflops"]
    assert train["speedup"] == pytest.approx(train["ours"]["images_per_s"] / train["naive"]["images_per_s"])
    for name in ("ours", "onnxruntime"):
        assert inf[name]["speedup"] == pytest.approx(inf[name]["images_per_s"] / inf["naive"]["images_per_s"])
        assert inf[name]["latency_speedup"] == pytest.approx(
            inf["naive"]["latency_batch1"]["p50_ms"] / inf[name]["latency_batch1"]["p50_ms"])
    flops = model["forward_gflop_per_image"]
    assert train["ours"]["gflops"] == pytest.approx(3 * flops * train["ours"]["images_per_s"])
    assert inf["ours"]["gflops"] == pytest.approx(flops * inf["ours"]["images_per_s"])
    assert inf["ours"]["fraction_of_fp32_matmul"] == pytest.approx(inf["ours"]["gflops"] / peak)
    assert model["targets"]["train_speedup"] == (train["speedup"] >= result["targets"]["train_speedup"])


def test_matmul_rate_is_two_n_cubed_flops_over_the_best_time(monkeypatch):
    """The machine's reference rate: 2 n^3 FLOPs per product, over the fastest of the timed products."""
    from leukodetect.jobs import benchmark

    clock = iter([0.0, 1.0, 1.25, 2.0, 3.0, 3.5, 4.0, 9.0, 9.5, 10.0])  # start, then (t0, end, budget check) x 3: 0.25, 0.5, 0.5 s
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(clock))
    rate = benchmark.matmul_gflops(torch.float32, n=16, repeats=3, budget_s=100.0)
    assert rate == pytest.approx(2 * 16**3 / 0.25 / 1e9)


def test_forward_flops_counts_a_multiply_add_as_two():
    from torch import nn

    from leukodetect.jobs.benchmark import forward_flops

    # A 1x1 convolution 3 -> 4 channels on 8x8: 8*8*4*3 multiply-adds, then a 4 -> 2 linear layer.
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert forward_flops(model, 8) == 2 * (8 * 8 * 4 * 3) + 2 * (4 * 2)


def test_tables_render(result):
    from rich.console import Console

    console = Console(record=True, width=200)
    for table in render_benchmark(result):
        console.print(table)
    text = console.export_text()
    assert "tiny" in text and "infer onnxruntime" in text and "warm" in text


def test_unknown_architecture_is_one_sentence():
    with pytest.raises(LeukoError, match="Unknown architecture 'nope'"):
        BenchmarkConfig(archs=("nope",)).validate()
    out = CliRunner().invoke(app, ["benchmark", "--archs", "nope"])
    assert out.exit_code == 2 and "Unknown architecture" in out.output


def test_classifier_with_folded_batch_norm_matches_the_plain_model():
    """The speed-up in Classifier (batch norm folded into convolutions) keeps P(blast) within 1e-5."""
    import numpy as np
    import torch
    from model_helpers import tiny_with_batchnorm_statistics
    from torch import nn

    from leukodetect.runtime.checkpoint import make_bundle
    from leukodetect.runtime.classifier import Classifier, fuse_batch_norm

    model = tiny_with_batchnorm_statistics()
    bundle = make_bundle(model, arch="tiny", image_size=24, mean=(0.5,) * 3, std=(0.25,) * 3, config={}, temperature=2.0)
    clf = Classifier(bundle, device="cpu", precision="fp32", backend="torch")
    x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x) / 2.0, dim=1)[:, 1].numpy()
    np.testing.assert_allclose(clf.probabilities(x), expected, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fuse_batch_norm(model).modules())
    # The checkpoint's module itself is untouched: Grad-CAM hooks its layers.
    assert any(isinstance(m, nn.BatchNorm2d) for m in clf.model.modules())
