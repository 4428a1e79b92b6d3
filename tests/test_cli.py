"""End-to-end through the command line, on the tiny model and tiny images."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.training import engine

runner = CliRunner()
TINY = ["--arch", "tiny", "--image-size", "24", "--batch-size", "8", "--lr", "0.01"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tiny_tree, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke("train", "--data", tiny_tree, "--out", run, "--epochs", 2, *TINY)
    assert result.exit_code == 0, result.output
    return run


def test_train_writes_a_self_describing_checkpoint_and_test_metrics(trained):
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    assert ckpt["arch"] == "tiny" and ckpt["class_names"] == ["normal", "blast"]
    assert ckpt["image_size"] == 24 and len(ckpt["mean"]) == 3 and ckpt["threshold"] == 0.5
    assert ckpt["config"]["train"]["epochs"] == 2 and "torch" in ckpt["versions"]
    assert [row["epoch"] for row in ckpt["history"]] == [1, 2]
    metrics = json.loads((trained / "test" / "metrics.json").read_text())
    split = json.loads((trained / "split.json").read_text())
    assert metrics["n"] == len(split["test"]) > 0
    assert set(metrics["metrics"]) >= {"accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "fpr", "fnr", "roc_auc"}
    for name in ("roc.png", "confusion_matrix.png", "training_curves.png", "report.html", "predictions.csv"):
        assert (trained / "test" / name).is_file(), name
    # split parts are disjoint and cover the data
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 29


def test_existing_run_is_not_overwritten(trained, tiny_tree):
    result = invoke("train", "--data", tiny_tree, "--out", trained, "--epochs", 1, *TINY)
    assert result.exit_code == 2
    assert "already holds a training run" in result.output and "--resume" in result.output


def test_evaluate_leaves_out_training_images(trained, tiny_tree, tmp_path):
    result = invoke("evaluate", "--checkpoint", trained / "best.pt", "--data", tiny_tree, "--out", tmp_path / "ev", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_test = len(json.loads((trained / "split.json").read_text())["test"])
    assert report["n"] == n_test and report["excluded_trained_on"] == 29 - n_test
    for ci in report["metrics"].values():
        assert ci["ci_low"] is None or ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    assert (tmp_path / "ev" / "training_curves.png").is_file()


def test_predict_reports_bad_files_and_goes_on(trained, tiny_tree, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "good.png"
    good.write_bytes((tiny_tree / "blast" / "blast_01.png").read_bytes())
    result = invoke("predict", tmp_path, "--checkpoint", trained / "best.pt", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert 0 <= by_name["good.png"]["prob_blast"] <= 1 and by_name["good.png"]["label"] in ("normal", "blast")
    assert "not an image" in by_name["bad.jpg"]["error"] and "bad.jpg" in by_name["bad.jpg"]["error"]
    assert "empty" in by_name["empty.png"]["error"]
    csv_out = invoke("predict", good, "--checkpoint", trained / "best.pt", "--csv")
    assert csv_out.stdout.splitlines()[0] == "path,label,prob_blast,error,ood_score,reason"
    # Several files at once, as a shell glob gives them; a missing one is named.
    several = invoke("predict", good, tmp_path / "bad.jpg", "--checkpoint", trained / "best.pt", "--csv")
    assert several.exit_code == 0 and len(several.stdout.splitlines()) == 3
    missing = invoke("predict", good, tmp_path / "nope.png", "--checkpoint", trained / "best.pt")
    assert missing.exit_code == 2 and "nope.png does not exist" in missing.output


def test_predict_fails_only_when_nothing_could_be_read(trained, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    result = invoke("predict", tmp_path / "bad.jpg", "--checkpoint", trained / "best.pt")
    assert result.exit_code == 1


def test_wrong_checkpoint_gets_one_sentence(tmp_path, tiny_tree):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_text("junk")
    for name, phrase in (("plain.pt", "not a leukodetect checkpoint"), ("junk.pt", "not a readable"), ("missing.pt", "does not exist")):
        result = invoke("predict", tiny_tree / "blast" / "blast_01.png", "--checkpoint", tmp_path / name)
        assert result.exit_code == 2 and phrase in result.output and name in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("ema", [(), ("--ema", 0.5)], ids=["plain", "ema"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_tree, tmp_path, monkeypatch, ema):
    args = ("train", "--data", tiny_tree, "--epochs", 3, *TINY, *ema)
    assert invoke(*args, "--out", tmp_path / "straight").exit_code == 0

    real = engine.train_one_epoch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", interrupted)
    result = invoke(*args, "--out", tmp_path / "cut")
    assert result.exit_code == 130 and "--resume" in result.output
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", real)

    result = invoke(*args, "--out", tmp_path / "cut", "--resume")
    assert result.exit_code == 0, result.output
    assert "Resuming" in result.output and "epoch 2" in result.output
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert [r["epoch"] for r in b["history"]] == [1, 2, 3]
    assert np.allclose([r["train_loss"] for r in a["history"]], [r["train_loss"] for r in b["history"]], atol=1e-6)
    for weights in ("state_dict", "raw_state_dict") if ema else ("state_dict",):
        for k in a[weights]:
            assert torch.allclose(a[weights][k].float(), b[weights][k].float(), atol=1e-5), (weights, k)


def _interrupt_at(monkeypatch, call: int) -> None:
    real, calls = engine.train_one_epoch, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", interrupted)


def test_checkpoint_every_writes_resume_points_sparsely_and_resume_still_matches(tiny_tree, tmp_path, monkeypatch):
    args = ("train", "--data", tiny_tree, "--epochs", 5, *TINY, "--checkpoint-every", 2)
    assert invoke(*args, "--out", tmp_path / "straight").exit_code == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert straight["epoch"] == 5  # the last epoch always leaves a resume point

    real = engine.train_one_epoch
    _interrupt_at(monkeypatch, 4)  # epochs 1-3 ran; the last resume point is epoch 2
    assert invoke(*args, "--out", tmp_path / "cut").exit_code == 130
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in json.loads((tmp_path / "cut" / "history.json").read_text())] == [1, 2, 3]
    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", real)
    result = invoke(*args, "--out", tmp_path / "cut", "--resume")
    assert result.exit_code == 0 and "epoch 3" in result.output, result.output
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4, 5]
    assert np.allclose([r["train_loss"] for r in straight["history"]], [r["train_loss"] for r in resumed["history"]], atol=1e-6)


def test_a_run_stopped_before_its_first_resume_point_is_not_overwritten_silently(tiny_tree, tmp_path, monkeypatch):
    args = ("train", "--data", tiny_tree, "--epochs", 3, *TINY, "--checkpoint-every", 5, "--out", tmp_path / "run")
    real = engine.train_one_epoch
    _interrupt_at(monkeypatch, 2)
    assert invoke(*args).exit_code == 130
    assert (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr("leukodetect.training.fit.train_one_epoch", real)
    refused = invoke(*args)
    assert refused.exit_code != 0 and "already holds a training run" in refused.output
    result = invoke(*args, "--resume")
    assert result.exit_code == 0 and "starts again at epoch 1" in result.output, result.output


def test_resume_keeps_a_better_best_checkpoint_from_after_the_resume_point(tmp_path):
    from leukodetect.models import create_model
    from leukodetect.runtime.checkpoint import make_bundle, save_checkpoint
    from leukodetect.training.fit import _kept_best

    history = [{"epoch": e, "val_loss": loss} for e, loss in [(1, 0.9), (2, 0.7), (3, 0.4)]]
    path = tmp_path / "best.pt"
    bundle = make_bundle(create_model("tiny", num_classes=2), arch="tiny", image_size=24, mean=(0.5,) * 3, std=(0.2,) * 3,
                         config={}, history=history, extra={"epoch": 3})
    save_checkpoint(bundle, path)
    assert _kept_best(path, 2, 0.7, 2) == (0.4, 3)  # written after the resume point, and better
    assert _kept_best(path, 3, 0.4, 3) == (0.4, 3)
    assert _kept_best(path, 2, 0.3, 1) == (0.3, 1)  # cannot happen in one run, but a lower loss wins
    assert _kept_best(tmp_path / "none.pt", 2, 0.7, 2) == (0.7, 2)


def test_ema_weights_are_the_ones_validated_and_saved(tiny_tree, tmp_path):
    result = invoke("train", "--data", tiny_tree, "--out", tmp_path / "run", "--epochs", 2, *TINY, "--ema", 0.9)
    assert result.exit_code == 0, result.output
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    steps = last["ema_updates"]
    assert steps >= 2 and last["config"]["train"]["ema"] == 0.9
    # The averaged weights trail the trained ones: they differ, and they are what best.pt holds.
    differs = [k for k in last["state_dict"] if last["state_dict"][k].is_floating_point()
               and not torch.allclose(last["state_dict"][k], last["raw_state_dict"][k])]
    assert differs
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert "raw_state_dict" not in best
    if best["epoch"] == last["epoch"]:
        assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    bad = invoke("train", "--data", tiny_tree, "--out", tmp_path / "bad", "--epochs", 1, *TINY, "--ema", 1.5)
    assert bad.exit_code == 2 and "--ema 1.5" in bad.output


def test_cv_predicts_every_image_once_and_resumes(tiny_tree, tmp_path):
    out = tmp_path / "cv"
    result = invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 3, "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.output
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    paths = [r.split(",")[0] for r in rows]
    assert len(paths) == len(set(paths)) == 29
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 3 and metrics["folds"]["accuracy"]["n_folds"] == 3
    # Resuming a finished CV retrains nothing and gives the same pooled figures.
    again = invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 3, "--epochs", 1, *TINY, "--resume")
    assert again.exit_code == 0 and again.output.count("already finished") == 3
    assert json.loads((out / "metrics.json").read_text())["metrics"] == metrics["metrics"]


def test_paper_protocol_expands_first_and_reports_leakage(tiny_tree, tmp_path):
    out = tmp_path / "paper"
    result = invoke("train", "--data", tiny_tree, "--out", out, "--epochs", 1, "--protocol", "paper", *TINY,
                    "--config", _paper_total(tmp_path, 60))
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    assert sum(len(v) for v in split.values()) == 60
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["protocol"] == "paper"
    assert metrics["test_images_sharing_a_source_with_training"] > 0


def _paper_total(tmp_path, total):
    path = tmp_path / "paper.yaml"
    path.write_text(f"data:\n  paper_total: {total}\n")
    return path


def test_data_check_json(tiny_tree, tmp_path):
    result = invoke("data", "check", tiny_tree, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["n_images"] == 29 and report["counts"] == {"normal": 14, "blast": 15}
    assert len(report["duplicate_sets"]) == 1


def test_augment_command(tiny_tree, tmp_path):
    result = invoke("augment", tiny_tree, tmp_path / "aug", "--total", 40)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "aug").rglob("*.png"))) == 40
    again = invoke("augment", tiny_tree, tmp_path / "aug", "--total", 40)
    assert again.exit_code == 2 and "not empty" in again.output


def test_models_lists_the_registry():
    result = invoke("models")
    assert "resnet50" in result.stdout and "vgg19" in result.stdout


def test_relative_out_folder(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--data", tiny_tree, "--out", "runs/rel", "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "rel" / "test" / "report.html").is_file()


def test_cv_without_a_validation_part_trains_on_every_training_image_and_keeps_the_last_epoch(tiny_tree, tmp_path):
    out = tmp_path / "cv0"
    result = invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 3, "--epochs", 2, *TINY, "--val-fraction", 0,
                    "--devices", "off")
    assert result.exit_code == 0, result.output
    assert result.output.count("0 validation") == 3
    plan = json.loads((out / "cv_plan.json").read_text())["test"]
    for k in range(3):
        best = torch.load(out / f"fold_{k}" / "best.pt", weights_only=True)
        assert best["epoch"] == 2 and all(row["val_loss"] is None for row in best["history"])
        assert len(best["trained_on"]) == 29 - len(plan[k])  # the fold's whole training part
        assert best["config"]["data"]["val_fraction"] == 0
    bad = invoke("cv", "--data", tiny_tree, "--out", tmp_path / "bad", *TINY, "--val-fraction", 1)
    assert bad.exit_code == 2 and "--val-fraction 1" in bad.output


def test_train_with_mixup_cutmix_and_no_validation_part(tiny_tree, tmp_path):
    result = invoke("train", "--data", tiny_tree, "--out", tmp_path / "mix", "--epochs", 2, *TINY, "--mixup", 0.2, "--cutmix", 1.0,
                    "--val-fraction", 0)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "mix" / "best.pt", weights_only=True)
    assert ckpt["config"]["train"]["mixup"] == 0.2 and ckpt["config"]["train"]["cutmix"] == 1.0
    split = json.loads((tmp_path / "mix" / "split.json").read_text())
    assert split["val"] == [] and len(split["train"]) + len(split["test"]) == 29 and ckpt["epoch"] == 2
    assert 0 <= ckpt["history"][0]["train_acc"] <= 1
    bad = invoke("train", "--data", tiny_tree, "--out", tmp_path / "bad", *TINY, "--mixup", -1)
    assert bad.exit_code == 2 and "--mixup -1" in bad.output


# The options train, cv and compare share (detect-eval and train-detector likewise) are declared once in cli.py;
# these tests hold each command's copy to the same flag, default and help, and check that every one reaches the config.
TRAINING_OPTIONS = ("--data", "--arch", "--epochs", "--image-size", "--batch-size", "--lr", "--optimizer", "--label-smoothing", "--ema",
                    "--mixup", "--cutmix", "--val-fraction", "--checkpoint-every", "--weights", "--protocol", "--group-by", "--allidb1",
                    "--format", "--seed", "--device", "--precision", "--workers", "--config")
COMPARE_OWN = {"--arch", "--optimizer", "--weights",  # compare names its architectures with --archs, each with its own recipe
               "--lr", "--protocol"}  # its --lr is one rate for every architecture, its --protocol may be "both"
DETECTOR_OPTIONS = ("--data", "--epochs", "--image-size", "--arch", "--batch-size", "--crop-factor", "--smudge-gate", "--gate-keep",
                    "--cell-scorer", "--photo-context", "--val-fraction", "--label-smoothing")


def _options(command: str) -> dict:
    """A command's options by flag: what --help shows of each and what it parses to."""
    import typer

    params = typer.main.get_command(app).commands[command].params
    return {p.opts[0]: (tuple(p.secondary_opts), p.default, p.help, p.required, getattr(p, "min", None), getattr(p, "max", None))
            for p in params}


@pytest.mark.parametrize("commands, flags", [(("train", "cv", "compare"), TRAINING_OPTIONS),
                                             (("detect-eval", "train-detector"), DETECTOR_OPTIONS)], ids=["training", "detector"])
def test_shared_options_are_alike_in_every_command(commands, flags):
    options = {c: _options(c) for c in commands}
    for flag in flags:
        having = [c for c in commands if not (c == "compare" and flag in COMPARE_OWN)]
        assert all(flag in options[c] for c in having), flag
        assert len({options[c][flag] for c in having}) == 1, flag
    assert _options("compare")["--protocol"][1] == "clean" and "--archs" in _options("compare")


def test_every_training_option_reaches_the_run_config(tiny_tree, tmp_path, monkeypatch):
    """train, cv and compare build their RunConfig alike: --config's YAML first, then every option given."""
    import typer

    (tmp_path / "defaults.yaml").write_text("data:\n  test_fraction: 0.3\ntrain:\n  epochs: 9\n  batch_size: 5\n")
    split = tmp_path / "split.json"
    split.write_text("{}")
    common = ["--data", tiny_tree, "--out", tmp_path / "out", "--epochs", 3, "--image-size", 32, "--lr", 0.002, "--label-smoothing", 0.1,
              "--ema", 0.9, "--mixup", 0.2, "--cutmix", 1.0, "--val-fraction", 0.1, "--checkpoint-every", 2, "--group-by", "source",
              "--allidb1", tmp_path, "--format", "folders", "--seed", 7, "--device", "cpu", "--precision", "fp32", "--workers", 1,
              "--config", tmp_path / "defaults.yaml"]
    recipe = ["--arch", "tiny", "--optimizer", "sgd", "--weights", "imagenet", "--protocol", "paper"]
    configs = {}

    def job(name):
        def run(cfg, *args, **kwargs):
            configs[name] = cfg
            raise typer.Exit(0)
        return run

    monkeypatch.setattr("leukodetect.jobs.train.run_train", job("train"))
    monkeypatch.setattr("leukodetect.jobs.train.run_cv", job("cv"))
    monkeypatch.setattr("leukodetect.jobs.compare.run_comparison", job("compare"))
    for args in (["train", *common, *recipe, "--split-file", split], ["cv", *common, *recipe], ["compare", *common]):
        assert invoke(*args).exit_code == 0, args[0]
    for name, cfg in configs.items():
        data, train = cfg.data, cfg.train
        assert (data.path, data.format, data.image_size, data.val_fraction, data.group_by, data.allidb1, data.num_workers) == (
            str(tiny_tree), "folders", 32, 0.1, "source", str(tmp_path), 1), name
        assert (train.epochs, train.lr, train.label_smoothing, train.ema, train.mixup, train.cutmix, train.checkpoint_every,
                train.seed, train.device, train.precision) == (3, 0.002, 0.1, 0.9, 0.2, 1.0, 2, 7, "cpu", "fp32"), name
        assert (data.test_fraction, train.batch_size) == (0.3, 5), name  # from the YAML, which no option overrides
    for name in ("train", "cv"):
        cfg = configs[name]
        assert (cfg.model.arch, cfg.model.weights, cfg.train.optimizer, cfg.data.protocol) == ("tiny", "imagenet", "sgd", "paper")
    assert configs["train"].data.split_file == str(split) and configs["cv"].data.split_file is None
    assert configs["compare"].data.protocol == "clean"  # compare's --protocol picks its runs; it is not the config's


def test_predict_walks_folders_as_detect_does(trained, tiny_tree, tmp_path, monkeypatch):
    """Each path given to predict is read as detect reads its one: a folder is searched recursively for image files."""
    folder = tmp_path / "cells"
    (folder / "b" / "deeper").mkdir(parents=True)
    for name in ("b/deeper/c.PNG", "a.png", "b/a.png"):
        (folder / name).write_bytes((tiny_tree / "blast" / "blast_01.png").read_bytes())
    (folder / "notes.txt").write_text("not an image file")
    expected = [folder / "a.png", folder / "b" / "a.png", folder / "b" / "deeper" / "c.PNG"]
    result = invoke("predict", folder, "--checkpoint", trained / "best.pt", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(p) for p in expected]
    walked = []
    monkeypatch.setattr("leukodetect.jobs.detect.detect_paths", lambda paths, *a, **k: walked.extend(paths) or [])
    invoke("detect", folder, "--locate-only", "--out", tmp_path / "detections")
    assert walked == expected


def test_predict_names_a_folder_with_no_images_in_one_sentence(trained, tiny_tree, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    good = tiny_tree / "blast" / "blast_01.png"
    for args in ([tmp_path / "empty"], [good, tmp_path / "empty"]):
        result = invoke("predict", *args, "--checkpoint", trained / "best.pt")
        assert result.exit_code == 2 and f"{tmp_path / 'empty'} holds no image files (.bmp, .jpeg" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    missing = invoke("predict", tmp_path / "nowhere", "--checkpoint", trained / "best.pt")
    assert missing.exit_code == 2 and "nowhere does not exist: pass an image file or a folder of images." in missing.output


def test_resume_refuses_changed_settings_naming_each_and_keeps_the_run(tiny_tree, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", "--data", tiny_tree, "--out", run, "--epochs", 2, *TINY).exit_code == 0
    kept = {name: (run / name).read_bytes() for name in ("config.yaml", "best.pt", "last.pt", "split.json", "test/metrics.json")}
    changed = ["--arch", "tiny", "--image-size", "32", "--batch-size", "8", "--lr", "0.02"]
    result = invoke("train", "--data", tiny_tree, "--out", run, "--epochs", 3, *changed, "--seed", 1, "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    for change in ("train.epochs 2 -> 3", "data.image_size 24 -> 32", "train.lr 0.01 -> 0.02", "train.seed 0 -> 1"):
        assert change in message, change
    assert "cosine schedule" in message and f"{run / 'config.yaml'}" in message and "--config" in message
    assert {name: (run / name).read_bytes() for name in kept} == kept  # nothing trained, nothing rewritten
    # Where and how fast it runs may change; the same data path spelt otherwise is the same setting.
    again = invoke("train", "--data", f"{tiny_tree}/", "--out", run, "--epochs", 2, *TINY, "--device", "cpu", "--workers", 0,
                   "--checkpoint-every", 3, "--resume")
    assert again.exit_code == 0, again.output


def test_cv_resume_refuses_other_folds_and_changed_settings(tiny_tree, tmp_path):
    out = tmp_path / "cv"
    assert invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 2, "--epochs", 1, *TINY, "--devices", "off").exit_code == 0
    folds = invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 3, "--epochs", 1, *TINY, "--resume")
    assert folds.exit_code == 2 and "--folds 2, not 3" in folds.output
    longer = invoke("cv", "--data", tiny_tree, "--out", out, "--folds", 2, "--epochs", 2, *TINY, "--resume")
    assert longer.exit_code == 2 and "train.epochs 1 -> 2" in " ".join(longer.output.split())
    assert "fold_0" in longer.output and "Traceback" not in longer.output


def test_config_changes_names_each_setting_that_differs(tmp_path, monkeypatch):
    from leukodetect.config import RunConfig, config_changes

    monkeypatch.chdir(tmp_path)
    before, after = RunConfig(), RunConfig()
    before.data.path, after.data.path = "cells", str(tmp_path / "cells")  # one folder, two spellings
    after.train.epochs, after.data.labs, after.train.device = 8, ["aria"], "cuda"
    assert config_changes(before, after, ignore=frozenset({"train.device"})) == ["data.labs [] -> [aria]", "train.epochs 100 -> 8"]
    assert config_changes(before, before) == []


def test_data_check_exits_1_when_a_file_is_bad(tmp_path, write_image):
    write_image(tmp_path / "blast" / "a.png", seed=1)
    write_image(tmp_path / "normal" / "b.png", seed=2)
    assert invoke("data", "check", tmp_path).exit_code == 0
    (tmp_path / "normal" / "c.png").write_text("not an image")
    result = invoke("data", "check", tmp_path)
    assert result.exit_code == 1 and "c.png" in result.output and "[folders]" in result.output
    assert json.loads(invoke("data", "check", tmp_path, "--json").stdout)["ok"] is False


def test_data_check_takes_a_plain_folder_of_unlabelled_images(tmp_path, write_image):
    write_image(tmp_path / "field_1.png", seed=1)
    write_image(tmp_path / "more" / "field_2.jpg", seed=2)
    result = invoke("data", "check", tmp_path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "[unlabelled]: 2 images" in text and "labels: absent" in text


def test_export_defaults_to_the_shipped_model(tmp_path, monkeypatch):
    from leukodetect.weights import DEFAULT_MODEL

    seen = {}

    def fake_export(checkpoint, out_file, **kwargs):
        seen["checkpoint"] = checkpoint
        return {"path": str(out_file), "max_abs_diff": 0.0}

    monkeypatch.setattr("leukodetect.runtime.export.export_model", fake_export)
    result = invoke("export", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert seen["checkpoint"] == DEFAULT_MODEL


def test_serve_passes_allowed_hosts_to_the_service(monkeypatch):
    seen = {}

    def fake_serve(checkpoint, *, allowed_hosts=None, **kwargs):
        seen["allowed_hosts"] = allowed_hosts

    monkeypatch.setattr("leukodetect.serving.serve", fake_serve)
    assert invoke("serve", "--allowed-host", "lab.example", "--allowed-host", "10.0.0.2").exit_code == 0
    assert seen["allowed_hosts"] == ["lab.example", "10.0.0.2"]
    assert invoke("serve").exit_code == 0 and seen["allowed_hosts"] is None  # the service's default: bound host and localhost


def test_train_says_which_gifs_it_leaves_out(tiny_tree, tmp_path):
    import shutil

    from PIL import Image

    data = tmp_path / "cells"
    shutil.copytree(tiny_tree, data)
    Image.open(data / "blast" / "blast_00.png").save(data / "blast" / "extra.gif")
    result = invoke("train", "--data", data, "--out", tmp_path / "run", "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert f"Leaving out 1 GIF file(s), e.g. {data / 'blast' / 'extra.gif'}: a GIF is not a microscope format" in result.output


def test_select_last_keeps_the_last_epoch_and_still_scores_the_validation_part(tiny_tree, tmp_path):
    from leukodetect.runtime.checkpoint import load_checkpoint

    result = invoke("train", "--data", tiny_tree, "--epochs", 3, *TINY, "--select", "last", "--out", tmp_path / "last")
    assert result.exit_code == 0, result.output
    best = load_checkpoint(tmp_path / "last" / "best.pt")
    last = torch.load(tmp_path / "last" / "last.pt", weights_only=True)
    assert best["epoch"] == 3 and best["config"]["train"]["select"] == "last"
    assert all(row["val_loss"] is not None for row in best["history"])  # the validation part was scored every epoch
    assert all(torch.equal(best["state_dict"][k].float(), last["state_dict"][k].float()) for k in best["state_dict"])
    wrong = runner.invoke(app, ["train", "--data", str(tiny_tree), "--select", "first", "--out", str(tmp_path / "x")])
    assert wrong.exit_code != 0 and "--select 'first'" in wrong.output and not (tmp_path / "x").exists()


def test_predict_says_what_to_do_when_many_images_are_unlike_the_training_images(tmp_path):
    """Noise through the shipped model: every image is flagged, and one note says what it means and what to do."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / f"noise_{i}.png")
    result = invoke("predict", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["review"] * 3
    assert "3 of 3 images are unlike the images this model was trained on" in result.stderr
    assert "Your own laboratory" in result.stderr


def test_the_hint_stays_quiet_for_a_few_flagged_images_among_many():
    from leukodetect.cli import unlike_training_hint

    assert unlike_training_hint(2, 66, "2 of 66 images are") is None  # about the guard's own rate on its laboratories' cells
    assert unlike_training_hint(1, 1, "1 of 1 images are") is None  # one image: its own line says review and why
    said = unlike_training_hint(20, 66, "20 of 66 images are")
    assert said.startswith("20 of 66 images are unlike the images this model was trained on") and "fine-tune" in said


def test_detect_ends_with_the_note_when_many_smears_hold_cells_unlike_the_training_images(tmp_path, capsys):
    from leukodetect.cli import _print_detections

    def smear(i, unlike):
        return {"image": f"s{i}.png", "verdict": "review" if unlike else "healthy", "reason": None, "n_blast": 0, "n_cells": 3,
                "n_unlike_training": unlike, "timing": {"total_s": 0.1}, "cells": []}

    _print_detections([smear(0, 2), smear(1, 1), smear(2, 0), {"image": "bad.png", "error": "unreadable"}], tmp_path, False)
    assert "2 of 3 smears hold white cells unlike the images this model was trained on" in capsys.readouterr().err
    _print_detections([smear(i, int(i == 0)) for i in range(10)], tmp_path, False)
    assert "unlike the images" not in capsys.readouterr().err  # one smear of ten: its own line says why
