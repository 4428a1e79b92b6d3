"""MixStyle (training.mixstyle): statistics mixed as the paper says, only while training, reproducibly, and a plain network saved."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import LeukoError
from leukodetect.config import RunConfig
from leukodetect.models import create_model, get_spec
from leukodetect.training import mixstyle
from leukodetect.training.mixstyle import MixStyle, mix_statistics


def _maps(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 4.0, 1.0]).view(4, 1, 1, 1)
    shift = torch.tensor([-3.0, 0.0, 5.0, 1.0]).view(4, 1, 1, 1)
    return torch.randn(4, 3, 6, 6, generator=g) * scale + shift


def test_lambda_one_leaves_each_image_and_lambda_zero_gives_it_its_partners_statistics():
    x = _maps()
    perm = torch.tensor([1, 2, 3, 0])
    assert torch.allclose(mix_statistics(x, torch.ones(4, 1, 1, 1), perm), x, atol=1e-4)
    y = mix_statistics(x, torch.zeros(4, 1, 1, 1), perm)
    assert torch.allclose(y.mean(dim=(2, 3)), x[perm].mean(dim=(2, 3)), atol=1e-4)
    assert torch.allclose(y.std(dim=(2, 3)), x[perm].std(dim=(2, 3)), atol=1e-3)
    # the content is the image's own: the normalised map is unchanged
    norm = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(norm(y), norm(x), atol=1e-3)
    half = mix_statistics(x, torch.full((4, 1, 1, 1), 0.5), perm)
    assert torch.allclose(half.mean(dim=(2, 3)), (x.mean(dim=(2, 3)) + x[perm].mean(dim=(2, 3))) / 2, atol=1e-4)


def test_it_acts_in_training_mode_only_reproducibly_and_saves_the_usual_weights():
    model = create_model("resnet50", num_classes=2)
    keys = list(model.state_dict())
    style = MixStyle(model, 1.0, get_spec("resnet50").style_stages)
    x = torch.rand(4, 3, 32, 32)
    model.train()
    style.set_epoch(3, 2)
    torch.manual_seed(0)
    a = model(x)
    style.set_epoch(3, 2)
    torch.manual_seed(0)
    b = model(x)
    assert torch.equal(a, b)  # the same (seed, epoch): the same draws
    style.remove()
    torch.manual_seed(0)
    plain = model(x)
    assert not torch.allclose(a, plain)  # the hooks did act
    model.eval()
    style = MixStyle(model, 1.0, get_spec("resnet50").style_stages)
    with torch.no_grad():
        hooked = model(x)
    style.remove()
    with torch.no_grad():
        assert torch.equal(hooked, model(x))  # evaluation never mixes
    assert list(model.state_dict()) == keys


def test_a_network_without_stages_to_mix_or_a_bad_probability_is_refused_before_training_in_a_sentence():
    cfg = RunConfig()
    cfg.model.arch, cfg.train.mixstyle = "tiny", 0.5
    with pytest.raises(LeukoError, match="tiny has none: use resnet101, resnet152, resnet50"):
        cfg.validate()
    cfg.model.arch, cfg.train.mixstyle = "resnet50", 1.5
    with pytest.raises(LeukoError, match="not a probability"):
        cfg.validate()
    cfg.train.mixstyle = 0.5
    cfg.validate()
    with pytest.raises(LeukoError, match="cannot mix this network's stages"):
        MixStyle(create_model("tiny", num_classes=2), 0.5, ("layer1",))


def test_train_with_mixstyle_mixes_records_it_and_saves_a_plain_resnet(tiny_tree, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = mixstyle.mix_statistics

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(mixstyle, "mix_statistics", counted)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_tree), "--out", str(out), "--arch", "resnet50", "--image-size", "32",
                                      "--batch-size", "8", "--epochs", "1", "--mixstyle", "1.0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls["n"] >= 3  # three stages of every training batch of two or more images
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["train"]["mixstyle"] == 1.0
    create_model("resnet50", num_classes=2).load_state_dict(ckpt["state_dict"])  # no extra modules or keys


def test_a_resumed_run_with_mixstyle_continues_as_the_uninterrupted_one(tiny_tree, tmp_path, monkeypatch):
    from leukodetect.training import engine

    args = ["train", "--data", str(tiny_tree), "--arch", "resnet50", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
            "--mixstyle", "1.0"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "straight")], catch_exceptions=False).exit_code == 0
    real, calls = engine.train_one_epoch, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", interrupted)
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "cut")], catch_exceptions=False).exit_code == 130
    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", real)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "cut"), "--resume"], catch_exceptions=False)
    assert result.exit_code == 0 and "Resuming" in result.output
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
