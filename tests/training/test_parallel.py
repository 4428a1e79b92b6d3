"""Folds and architectures trained at the same time, one worker process per device.

There is no GPU here, so the workers run on ``--devices cpu,cpu``: two spawned processes, exactly the
code path of ``cuda:0,cuda:1`` except for ``torch.cuda.set_device``. Both the sequential and the
parallel runs use one CPU thread per process (conftest sets 1 in this process; the workers get this
process's count divided by the number of workers, at least 1), and every fold seeds itself, so the
predictions are expected to be identical: they are compared with ``atol=TOL``.
"""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leukodetect.cli import app
from leukodetect.errors import LeukoError
from leukodetect.training.parallel import parse_devices

runner = CliRunner()
TINY = ["--epochs", 1, "--image-size", 24, "--batch-size", 8, "--lr", 0.01]
TOL = 1e-6  # measured difference: 0 (same seeds, one thread per process in both runs)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def fold_predictions(run_dir, folds):
    return [json.loads((run_dir / f"fold_{k}" / "predictions.json").read_text()) for k in range(folds)]


# --- Which devices ------------------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend that ``n`` CUDA GPUs are visible (only the count is faked: nothing runs on them)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def visible(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return visible


def test_auto_takes_every_gpu_when_there_are_several(gpus):
    gpus(4)
    assert parse_devices("auto") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices(None, device="cuda") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


@pytest.mark.parametrize("count", [0, 1])
def test_auto_runs_folds_one_after_another_without_two_gpus(gpus, count):
    gpus(count)
    assert parse_devices("auto") == []


def test_auto_respects_a_single_device_and_off(gpus):
    gpus(2)
    assert parse_devices("auto", device="cpu") == []
    assert parse_devices("auto", device="cuda:1") == []
    assert parse_devices("off") == []


def test_auto_is_off_under_torchrun_and_a_list_is_refused(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_devices("auto") == []
    with pytest.raises(LeukoError, match="torchrun"):
        parse_devices("cuda:0,cuda:1")


def test_explicit_lists(gpus):
    gpus(2)
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    # Several workers may share one GPU (small models leave a large GPU idle).
    assert parse_devices("cuda:0,cuda:0,cuda:1") == ["cuda:0", "cuda:0", "cuda:1"]
    for spec, message in [
        ("cuda:0,cuda:2", "2 CUDA GPU"),
        ("cuda,cuda", "GPU number"),
        ("tpu:0", "unknown device 'tpu:0'"),
        ("meta,meta", "only cpu and cuda"),
        (",", "names no device"),
    ]:
        with pytest.raises(LeukoError, match=message):
            parse_devices(spec)
    gpus(0)
    with pytest.raises(LeukoError, match="no CUDA GPU is visible"):
        parse_devices("cuda:0,cuda:1")


def test_a_bad_device_list_is_one_sentence_before_any_work(tiny_tree, tmp_path):
    result = invoke("cv", "--data", tiny_tree, "--out", tmp_path / "cv", "--arch", "tiny", *TINY, "--devices", "gpu0")
    assert result.exit_code == 2 and "unknown device 'gpu0'" in result.output
    assert not (tmp_path / "cv").exists()


# --- cv and compare on two CPU worker processes -------------------------------------------------


def test_parallel_cv_names_a_failed_fold_keeps_the_others_and_matches_the_sequential_run(tiny_tree, tmp_path):
    # One test, one pool of workers: starting two spawned processes (each importing torch) is what
    # costs time here, not the tiny folds.
    out = tmp_path / "par"
    blocker = out / "fold_1" / "last.pt"  # fold 1 refuses to start: its folder already holds a run
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a checkpoint")
    common = ("cv", "--data", tiny_tree, "--folds", 3, "--arch", "tiny", *TINY)
    result = invoke(*common, "--out", out, "--devices", "cpu,cpu")
    assert result.exit_code == 2
    assert "Running 3 jobs on 2 devices in parallel" in result.output
    message = " ".join(result.output.split())  # the console wraps long lines
    assert f"1 of 3 folds failed: {out / 'fold_1'} (tiny, clean protocol)" in message
    assert "rerun with --resume" in message
    finished = {k: (out / f"fold_{k}" / "predictions.json") for k in (0, 2)}
    assert all(p.is_file() for p in finished.values())
    assert not (out / "fold_1" / "predictions.json").exists() and not (out / "metrics.json").exists()
    stamps = {k: p.stat().st_mtime_ns for k, p in finished.items()}

    blocker.unlink()
    again = invoke(*common, "--out", out, "--resume", "--devices", "off")
    assert again.exit_code == 0, again.output
    assert "Fold 0: already finished" in again.output and "Fold 2: already finished" in again.output
    assert {k: p.stat().st_mtime_ns for k, p in finished.items()} == stamps
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    paths = [r.split(",")[0] for r in rows]
    assert len(paths) == len(set(paths)) == 29

    # Folds 0 and 2 were trained by the worker processes: they equal a sequential run's.
    sequential = invoke(*common, "--out", tmp_path / "seq", "--devices", "off")
    assert sequential.exit_code == 0, sequential.output
    par, seq = fold_predictions(out, 3), fold_predictions(tmp_path / "seq", 3)
    assert sorted(p for f in par for p in f["test"]) == sorted(paths)
    for a, b in zip(par, seq):
        assert a["test"] == b["test"]
        assert np.allclose(a["prob_blast"], b["prob_blast"], rtol=0, atol=TOL), np.abs(np.subtract(a["prob_blast"], b["prob_blast"])).max()
    pooled = [json.loads((tmp_path / d / "metrics.json").read_text())["metrics"] for d in ("par", "seq")]
    assert pooled[0] == pooled[1]


def test_parallel_compare_pools_every_fold_of_every_run(tiny_tree, tmp_path):
    config = tmp_path / "paper.yaml"
    config.write_text("data:\n  paper_total: 40\n")
    out = tmp_path / "table2"
    result = invoke("compare", "--data", tiny_tree, "--out", out, "--archs", "tiny", "--protocol", "both", "--folds", 2, *TINY,
                    "--config", config, "--devices", "cpu,cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("Running 4 jobs on 2 devices in parallel") == 1  # clean and paper folds in one pool
    # The paper protocol's expansion was written by the parent, before the workers started.
    assert len((out / "paper" / "tiny" / "paper-expanded" / "manifest.csv").read_text().splitlines()) == 41
    for protocol, n in (("clean", 29), ("paper", 40)):
        folds = fold_predictions(out / protocol / "tiny", 2)
        tested = [p for f in folds for p in f["test"]]
        assert len(tested) == len(set(tested)) == n
        assert json.loads((out / protocol / "tiny" / "metrics.json").read_text())["n"] == n
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert [(r["protocol"], r["arch"]) for r in runs] == [("clean", "tiny"), ("paper", "tiny")]


def _loader_start_methods(_=None) -> tuple[str, str | None]:
    from multiprocessing import get_start_method

    from leukodetect.training.fit import _worker_context

    ctx = _worker_context(2)
    return get_start_method(), ctx.get_start_method() if ctx else None


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="loader workers fork on Linux only")
def test_loader_workers_fork_even_inside_a_spawned_fold_worker():
    # A --devices worker is spawned, and a spawned process spawns its own children by default: the
    # loader would then re-import torch and pickle every decoded image each epoch (31 s per epoch
    # instead of 0.7 s on an H200). The training loaders ask for fork explicitly.
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from leukodetect.training.fit import _worker_context

    assert _worker_context(0) is None  # no workers: nothing to start
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        default, ours = pool.submit(_loader_start_methods).result()
    assert (default, ours) == ("spawn", "fork")
