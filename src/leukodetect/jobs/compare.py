"""``leukodetect compare``: the paper's Table 2, every architecture under the same folds and budget.

One :func:`~leukodetect.jobs.train.run_cv` per (protocol, architecture) into
``OUT/<protocol>/<arch>/``, all with one seed, so every architecture sees the same folds, the same
augmentation and the same number of epochs. The resolved settings are stored in ``OUT/compare.json``:
rerunning the same command continues where it stopped (finished runs are reused, finished folds are
not retrained) and a different command pointed at the same folder is refused. With several GPUs
(``--devices``) the folds of all runs train at the same time, one per GPU.

Then, per run: pooled out-of-fold metrics with their 95% intervals and the fold mean ± sd (both
read from the run's ``metrics.json``, never recomputed differently), parameter count, forward
GFLOPs, training time, inference time, calibration; for ``both`` protocols, how much the paper's
protocol inflates each metric; with ``--cross-data``, how each run's fold models do on another
lab's images, without and with stain normalisation (:mod:`.cross`). :func:`run_comparison` writes
``comparison.json`` and hands the figures and the report to :mod:`leukodetect.reporting.compare_report`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from leukodetect.config import PROTOCOLS, RunConfig
from leukodetect.errors import LeukoError
from leukodetect.evaluation.calibration import (
    expected_calibration_error,
    threshold_for_sensitivity,
)
from leukodetect.evaluation.intervals import METRIC_NAMES
from leukodetect.jobs.cross_data import cross_summary, prepare_cross_data
from leukodetect.jobs.cross_lab import run_cross_lab
from leukodetect.jobs.explain import explain_many
from leukodetect.jobs.train import finish_cv, run_cv, start_cv, train_folds_on_devices
from leukodetect.models import create_model, get_spec
from leukodetect.reporting.compare_report import write_compare_report
from leukodetect.runtime.classifier import Classifier
from leukodetect.training.parallel import parse_devices
from leukodetect.utils import write_json

#: The architectures of the paper's Table 2, in its order (ResNet-50 is the paper's model).
PAPER_ARCHS = ("resnet50", "googlenet", "resnet101", "resnet152", "vgg16", "vgg19")

#: Settings that change where or how fast a run happens, not what it computes: a rerun may differ.
IGNORED_SETTINGS = (("train", "device"), ("data", "num_workers"), ("train", "checkpoint_every"))

PAPER_FIGURES = Path(__file__).with_name("paper_figures.yaml")


def parse_protocols(protocol: str) -> tuple[str, ...]:
    """``clean``, ``paper`` or ``both`` -> the protocols to run, clean first."""
    if protocol == "both":
        return PROTOCOLS
    if protocol not in PROTOCOLS:
        raise LeukoError(f"Unknown --protocol '{protocol}': use clean, paper or both.")
    return (protocol,)


def parse_archs(archs: str | list[str]) -> tuple[str, ...]:
    """A comma-separated list (or a list) of registered architecture names, without repeats."""

    names = [a.strip() for a in (archs.split(",") if isinstance(archs, str) else archs) if a.strip()]
    if not names:
        raise LeukoError("--archs names no architecture: pass e.g. resnet50,googlenet,vgg16.")
    repeated = sorted({a for a in names if names.count(a) > 1})
    if repeated:
        raise LeukoError(f"--archs names {', '.join(repeated)} more than once: list each architecture once.")
    for name in names:
        get_spec(name)  # one clear sentence for an unknown name
    return tuple(names)


def comparison_settings(cfg: RunConfig, *, archs, protocols, folds: int) -> dict:
    """What a comparison's results depend on: stored in ``compare.json`` and checked on every rerun."""
    config = _normalised(cfg.to_dict())
    config["model"]["arch"] = "(per architecture)"
    config["data"]["protocol"] = "(per protocol)"
    for section, key in IGNORED_SETTINGS:
        config[section].pop(key, None)
    return {"archs": list(archs), "protocols": list(protocols), "folds": int(folds), "config": config}


def _normalised(obj):
    """A plain-data copy as YAML/JSON would give it back (tuples -> lists), so comparisons are fair."""
    return json.loads(json.dumps(obj, default=str))


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in dict.fromkeys([*old, *new]):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} there, {new!r} now)"]


def check_or_store_settings(out_dir: Path, settings: dict, command: str) -> bool:
    """Refuse a folder holding another comparison; record this invocation. True when resuming."""
    path = out_dir / "compare.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            old = stored["settings"]
            old["config"] = _comparable(old["config"])  # a record written before a setting was ignored may hold it
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LeukoError(f"{path} is not a comparison record ({exc}): choose another --out.") from exc
        diff = _differences(old, settings)
        if diff:
            raise LeukoError(
                f"{out_dir} holds a comparison with different settings ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}): rerun with the same settings to continue it, or choose another --out."
            )
        stored.setdefault("commands", []).append(command)
        write_json(path, stored)
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LeukoError(f"{out_dir} is not empty and holds no comparison (no compare.json): choose another --out.")
    write_json(path, {"settings": settings, "commands": [command]})
    return False


def run_config(cfg: RunConfig, *, arch: str, protocol: str) -> RunConfig:
    """A copy of the shared configuration for one (protocol, architecture) run."""
    one = RunConfig.from_dict(cfg.to_dict())
    one.model.arch, one.data.protocol = arch, protocol
    return one.resolved()  # without --lr each architecture trains at its own rate (1e-4 for the VGGs)


def _check_run_folder(run_dir: Path, cfg: RunConfig, folds: int) -> None:
    """A run folder may be continued only if its plan and configuration are this run's."""
    plan_path = run_dir / "cv_plan.json"
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, ValueError) as exc:
        raise LeukoError(f"Cannot read {plan_path} ({exc}): delete {run_dir} so it is run again.") from exc
    if plan.get("folds") != folds or plan.get("protocol") != cfg.data.protocol:
        raise LeukoError(f"{run_dir} was run with {plan.get('folds')} folds ({plan.get('protocol')} protocol), not {folds} "
                         f"({cfg.data.protocol}): delete {run_dir} or choose another --out.")
    want = _comparable(cfg.to_dict())
    for config_path in sorted(run_dir.glob("fold_*/config.yaml")):
        saved = _comparable(yaml.safe_load(config_path.read_text()) or {})
        diff = _differences(saved, want)
        if diff:
            raise LeukoError(f"{config_path} differs from this comparison ({'; '.join(diff[:3])}): "
                             f"delete {run_dir} so it is run again, or choose another --out.")


def _comparable(config: dict) -> dict:
    config = _normalised(config)
    for section, key in IGNORED_SETTINGS:
        config.get(section, {}).pop(key, None)
    return config


def _share_paper_expansion(run_dir: Path, first_run: Path | None, log) -> None:
    """Point this run at the first run's expanded images instead of writing 2470 more.

    The expansion depends only on the data, the augmentation settings and the seed, which every run
    shares, so the copies are identical; sharing them saves disk and time. The file names, hence the
    folds, stay the same (paths differ only in the run folder's prefix).
    """
    source = first_run / "paper-expanded" if first_run else None
    target = run_dir / "paper-expanded"
    if source is None or not (source / "manifest.csv").is_file() or target.exists() or target.is_symlink():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(os.path.relpath(source, run_dir), target_is_directory=True)
    except OSError:
        log(f"Could not link {target} to {source}; the images are expanded again.")


@dataclass
class RunResult:
    """One (protocol, architecture) cross-validation run, read back from its folder."""

    protocol: str
    arch: str
    run_dir: Path
    metrics: dict  # the run's metrics.json, as run_cv wrote it
    rows: list[dict]  # predictions.csv: path, label, group, fold, prob_blast, predicted
    histories: list[list[dict]]  # one history.json per fold
    cost: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    @property
    def y_true(self) -> np.ndarray:
        return np.array([int(r["label"]) for r in self.rows], dtype=int)

    @property
    def prob(self) -> np.ndarray:
        return np.array([float(r["prob_blast"]) for r in self.rows], dtype=float)

    def summary(self) -> dict:
        """The JSON-ready row of the comparison table (values copied from metrics.json)."""
        return {
            "protocol": self.protocol,
            "arch": self.arch,
            "run_dir": str(self.run_dir),
            "n": self.metrics["n"],
            "pooled": self.metrics["metrics"],
            "fold_mean_sd": self.metrics.get("folds", {}),
            "confusion": self.metrics["confusion"],
            "held_out_images_sharing_a_source_with_training": self.metrics.get("held_out_images_sharing_a_source_with_training"),
            "cost": self.cost,
            "calibration": self.calibration,
            **({"labs": self.metrics["labs"]} if self.metrics.get("labs") else {}),
        }


def read_run(run_dir: Path, *, protocol: str, arch: str, folds: int) -> RunResult:
    """Read a finished run_cv folder: metrics.json, predictions.csv and each fold's history."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    histories = [json.loads((run_dir / f"fold_{k}" / "history.json").read_text()) for k in range(folds)]
    return RunResult(protocol=protocol, arch=arch, run_dir=run_dir, metrics=metrics, rows=rows, histories=histories)


# --- Cost: parameters, FLOPs, training and inference time ------------------------------------------


def model_cost(arch: str, image_size: int) -> dict:
    """Parameter count and forward GFLOPs of one 1x3xSxS image (freshly built 2-class model).

    ``torch.utils.flop_counter.FlopCounterMode`` counts a multiply-add as 2 FLOPs, so GFLOPs here
    are twice the "GMACs" some papers quote.
    """


    model = create_model(arch, num_classes=2).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return {"params": int(params), "gflops": counter.get_total_flops() / 1e9}


def training_seconds(histories: list[list[dict]]) -> float:
    """Wall-clock training time: the sum of every epoch's "seconds" over all folds."""
    return float(sum(row.get("seconds") or 0.0 for history in histories for row in history))


def inference_ms_per_image(checkpoint: Path, *, batch_size: int = 8, repeats: int = 5, device: str = "auto") -> dict:
    """Median milliseconds per image of the checkpoint's forward pass on one batch (eval, no grad).

    Times what :class:`~leukodetect.runtime.classifier.Classifier`'s PyTorch backend runs on a preprocessed
    batch (its device, memory format and precision), after one warm-up pass; image decoding is not
    included. PyTorch rather than the CPU default, ONNX Runtime, so that a comparison of six
    architectures does not export six models; docs/benchmarks.md compares the two backends.
    """


    clf = Classifier.from_checkpoint(Path(checkpoint), device=device, backend="torch")
    size = int(clf.bundle["image_size"])
    x = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    clf.probabilities(x)  # warm-up: allocations, oneDNN / cuDNN kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.probabilities(x)  # returns a CPU array, so CUDA work is finished when it returns
        times.append(time.perf_counter() - t0)
    return {"inference_ms_per_image": 1000 * statistics.median(times) / batch_size,
            "inference_device": str(clf.device), "inference_batch_size": batch_size}


def run_cost(result: RunResult, image_size: int, *, device: str = "auto") -> dict:
    """Parameters, GFLOPs, training and inference time of one run, measured once.

    Kept in ``cost.json`` beside the run and reused while fold 0's best.pt is unchanged, so a rerun
    of a finished comparison reports the same inference time instead of a fresh, noisy one.
    """
    path = result.run_dir / "cost.json"
    checkpoint = result.run_dir / "fold_0" / "best.pt"
    stamp = checkpoint.stat().st_mtime_ns
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.pop("checkpoint_mtime_ns", None) == stamp:
                return cached
        except (OSError, ValueError):
            pass
    cost = {**model_cost(result.arch, image_size), "training_seconds": training_seconds(result.histories),
            **inference_ms_per_image(checkpoint, device=device)}
    write_json(path, {**cost, "checkpoint_mtime_ns": stamp})
    return cost


def calibration_summary(y_true, prob, *, target_sensitivity: float = 0.99) -> dict:
    """ECE of the pooled out-of-fold probabilities and the threshold reaching the target sensitivity."""

    out = {"ece": expected_calibration_error(y_true, prob), "target_sensitivity": target_sensitivity}
    try:
        out.update(threshold_for_sensitivity(y_true, prob, target_sensitivity))
    except ValueError:  # one class only: no threshold to choose
        out.update(threshold=None, sensitivity=None, specificity=None)
    return out


# --- Across runs ---------------------------------------------------------------------------------


def inflation(results: list[RunResult]) -> dict[str, dict]:
    """Per architecture: paper minus clean pooled value of every metric, in percentage points.

    F1 and ROC AUC are on a 0-1 scale too, so their difference is also given x 100. None where a
    value is undefined or the architecture was not run under both protocols.
    """
    by = {(r.protocol, r.arch): r for r in results}
    out = {}
    for arch in dict.fromkeys(r.arch for r in results):
        clean, paper = by.get(("clean", arch)), by.get(("paper", arch))
        if clean is None or paper is None:
            continue
        row = {}
        for name in METRIC_NAMES:
            a, b = paper.metrics["metrics"][name]["value"], clean.metrics["metrics"][name]["value"]
            row[name] = None if a is None or b is None else 100.0 * (a - b)
        row["held_out_images_sharing_a_source_with_training"] = {
            p: by[(p, arch)].metrics.get("held_out_images_sharing_a_source_with_training") for p in ("clean", "paper")
        }
        out[arch] = row
    return out


def fold_signature(run_dir: Path) -> list[list[str]]:
    """The held-out images of each fold, relative to the run folder when inside it (paper protocol)."""
    plan = json.loads((Path(run_dir) / "cv_plan.json").read_text())
    root = Path(run_dir).absolute()

    def rel(p: str) -> str:
        try:
            return Path(p).absolute().relative_to(root).as_posix()
        except ValueError:
            return p

    return [sorted(rel(p) for p in fold) for fold in plan["test"]]


def same_folds(results: list[RunResult]) -> dict[str, bool]:
    """Per protocol: did every architecture get exactly the same held-out images in each fold?"""
    out = {}
    for protocol in dict.fromkeys(r.protocol for r in results):
        sigs = [fold_signature(r.run_dir) for r in results if r.protocol == protocol]
        out[protocol] = all(s == sigs[0] for s in sigs)
    return out


def load_paper_figures(path: Path = PAPER_FIGURES) -> dict[str, dict]:
    """Figures quoted from the paper (never reproduced): arch -> {metric: fraction or None}."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LeukoError(f"Cannot read the paper's quoted figures {path} ({exc}): reinstall leukodetect.") from exc
    return {"source": raw.get("source", ""), "architectures": raw.get("architectures") or {}}


# --- Grad-CAM gallery --------------------------------------------------------------------------


def gallery_selection(rows: list[dict], *, n_correct: int = 4) -> dict[str, list[dict]]:
    """The cells to explain: the ``n_correct`` most confident correct calls of each class, and every
    misclassified cell (most confidently wrong first)."""

    def confidence(r: dict) -> float:
        p = float(r["prob_blast"])
        return p if int(r["predicted"]) == 1 else 1.0 - p

    correct = [r for r in rows if int(r["predicted"]) == int(r["label"])]
    chosen = []
    for label in (1, 0):
        chosen += sorted((r for r in correct if int(r["label"]) == label), key=confidence, reverse=True)[:n_correct]
    wrong = sorted((r for r in rows if int(r["predicted"]) != int(r["label"])), key=confidence, reverse=True)
    return {"correct": chosen, "misclassified": wrong}


def explain_gallery(result: RunResult, out_dir: Path, *, n_correct: int = 4) -> dict[str, list[dict]]:
    """Grad-CAM overlays (blast evidence) of the selected cells, each by the fold model that held it out.

    ``out_dir`` is emptied first: explain_many never overwrites, and a rerun must not pile up copies.
    Returns {"correct": [...], "misclassified": [...]}, each item a predictions.csv row plus ``overlay``.
    """

    picked = gallery_selection(result.rows, n_correct=n_correct)
    items = [dict(r, kind=kind) for kind, rows in picked.items() for r in rows]
    index = out_dir / "gallery.json"
    stamp = {str(p): p.stat().st_mtime_ns for p in sorted(result.run_dir.glob("fold_*/best.pt"))}
    if index.exists():  # same cells, same models: the overlays already drawn are still right
        try:
            cached = json.loads(index.read_text())
            if cached["checkpoints"] == stamp and [dict(i, overlay=None, error=None) for i in cached["items"]] == \
                    [dict(i, overlay=None, error=None) for i in items] and all(Path(i["overlay"]).is_file() for i in cached["items"] if i["overlay"]):
                return {kind: [i for i in cached["items"] if i["kind"] == kind] for kind in picked}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for fold in sorted({int(i["fold"]) for i in items}):
        mine = [i for i in items if int(i["fold"]) == fold]
        explained = explain_many(result.run_dir / f"fold_{fold}" / "best.pt", [i["path"] for i in mine], out_dir / f"fold_{fold}")
        for item, e in zip(mine, explained):
            item["overlay"], item["error"] = e["out"], e["error"]
    write_json(index, {"checkpoints": stamp, "items": items})
    return {kind: [i for i in items if i["kind"] == kind] for kind in picked}


# --- The command -------------------------------------------------------------------------------


def held_out_labs(cfg: RunConfig, run_dir: Path, *, arch: str, only: str | None, devices, progress: bool, command: str, log) -> dict:
    """One architecture's leave-one-laboratory-out table (clean protocol); finished runs in ``run_dir`` are reused."""
    log(f"{arch}: leaving each laboratory out in turn, into {run_dir}.")
    return run_cross_lab(run_config(cfg, arch=arch, protocol="clean"), run_dir, only=only, devices=devices, progress=progress,
                         resume=(run_dir / "cross_lab_plan.json").exists(), command=command, log=log)


def run_comparison(
    cfg: RunConfig,
    out_dir: Path,
    *,
    archs,
    protocols,
    folds: int = 5,
    command: str = "",
    progress: bool = True,
    gradcam: bool = True,
    cross_data: Path | None = None,
    stain_reference: Path | None = None,
    cross_lab: bool = False,
    only: str | None = None,
    devices: str | None = "auto",
    log=print,
) -> dict:
    """Cross-validate every architecture under every protocol with one seed, then write the report.

    Args:
        cfg: the shared configuration (data, image size, epochs, seed...); its ``model.arch`` and
            ``data.protocol`` are replaced per run.
        archs: architecture names; the first gets the Grad-CAM gallery.
        protocols: a subset of ("clean", "paper").
        cross_data: a labelled data set from another lab: every run's fold models predict it,
            without and with Macenko stain normalisation (:mod:`leukodetect.jobs.cross_data`).
        stain_reference: an image or folder of the training domain to normalise toward (default:
            a few images of ``cfg.data.path``).
        cross_lab: also leave each laboratory of the data out in turn, per architecture (clean
            protocol, :func:`~leukodetect.jobs.cross_lab.run_cross_lab` into ``OUT/cross-lab/<arch>/``),
            and put the held-out table in the report; ``only`` adds a model trained on that
            laboratory alone, scored on every other one.
        devices: ``auto``, ``off`` or a device list (:func:`~leukodetect.training.parallel.parse_devices`);
            with several devices the folds of every run go into one pool, one worker per device.

    Returns:
        the dict written to ``OUT/comparison.json``, with ``report`` (the report paths) added.
    """

    archs, protocols = parse_archs(list(archs)), tuple(protocols)
    for p in protocols:
        parse_protocols(p)
    parallel_devices = parse_devices(devices, device=cfg.train.device)
    if not Path(cfg.data.path).exists():
        raise LeukoError(f"Data {cfg.data.path} does not exist: pass an image folder or a CSV manifest to --data.")
    cfg = RunConfig.from_dict(cfg.to_dict())
    cfg.data.path = str(Path(cfg.data.path).absolute())
    out_dir = Path(out_dir).absolute()
    cross = None
    if cross_data is not None:  # checked and fitted first: a bad path should not wait for hours of training

        cross = prepare_cross_data(cross_data, training_data=Path(cfg.data.path), training_format=cfg.data.format,
                                   stain_reference=stain_reference)
    elif stain_reference is not None:
        raise LeukoError("--stain-reference is used by the cross-dataset check only: add --cross-data, or drop --stain-reference.")
    if cross_lab and not cfg.data.val_fraction:
        raise LeukoError("--cross-lab needs a validation part of the training laboratories (--val-fraction above 0): "
                         "it chooses each run's epoch and sets its guard.")
    if only and not cross_lab:
        raise LeukoError("--only is part of the leave-one-laboratory-out check: add --cross-lab, or drop --only.")
    settings = comparison_settings(cfg, archs=archs, protocols=protocols, folds=folds)
    resuming = check_or_store_settings(out_dir, settings, command)
    if resuming:
        log(f"Continuing the comparison in {out_dir}.")

    # With several devices every run is prepared and planned here first (the paper protocol's
    # expansion written once, in this process), then all their folds share one pool of workers.
    planned = []
    for protocol in protocols:
        first_run = None
        for arch in archs:
            one = run_config(cfg, arch=arch, protocol=protocol)
            run_dir = out_dir / protocol / arch
            started = (run_dir / "cv_plan.json").exists()
            if started:
                _check_run_folder(run_dir, one, folds)
            if started and (run_dir / "metrics.json").exists():
                log(f"{arch} ({protocol} protocol): already finished, reusing {run_dir}.")
            else:
                log(f"{arch} ({protocol} protocol): {folds}-fold cross-validation into {run_dir}.")
                if protocol == "paper":
                    _share_paper_expansion(run_dir, first_run, log)
                if parallel_devices:
                    planned.append(start_cv(one, run_dir, folds=folds, resume=started, log=log))
                else:
                    run_cv(one, run_dir, folds=folds, resume=started, progress=progress, command=command, devices="off", log=log)
            first_run = first_run or run_dir
    if planned:
        train_folds_on_devices([job for run in planned for job in run.todo], parallel_devices,
                               hint="rerun the same command to train only those", log=log)
        for run in planned:
            finish_cv(run, command=command)

    results = []
    for protocol in protocols:
        for arch in archs:
            run_dir = out_dir / protocol / arch
            result = read_run(run_dir, protocol=protocol, arch=arch, folds=folds)
            result.cost = run_cost(result, cfg.data.image_size, device=cfg.train.device)
            result.calibration = calibration_summary(result.y_true, result.prob)
            results.append(result)

    folds_equal = same_folds(results)
    for protocol, equal in folds_equal.items():
        if not equal:
            log(f"warning: the architectures did not get the same folds under the {protocol} protocol; see comparison.json.")
    galleries = {}
    if gradcam:
        for r in results:
            if r.arch == archs[0]:
                galleries[r.protocol] = explain_gallery(r, out_dir / "figures" / "gradcam" / r.protocol)
    cross_entry = None
    if cross is not None:

        cross_entry = cross_summary(cross, results, folds=folds, image_size=cfg.data.image_size, device=cfg.train.device, log=log)
    summary = {
        "settings": settings,
        "runs": [r.summary() for r in results],
        "inflation_paper_minus_clean_pp": inflation(results),
        "same_folds": folds_equal,
        "quoted_from_paper_not_reproduced": load_paper_figures(),
        "gradcam": {p: {kind: [{k: i.get(k) for k in ("path", "label", "fold", "prob_blast", "overlay", "error")} for i in items]
                        for kind, items in g.items()} for p, g in galleries.items()},
    }
    if cross_entry is not None:
        summary["cross_dataset"] = cross_entry
    if cross_lab:
        summary["cross_lab"] = {"only": only, "archs": {
            arch: held_out_labs(cfg, out_dir / "cross-lab" / arch, arch=arch, only=only, devices=devices, progress=progress,
                                command=command, log=log) for arch in archs}}
    write_json(out_dir / "comparison.json", summary)
    summary["report"] = [str(p) for p in write_compare_report(out_dir, summary, results, galleries, command=command)]
    return summary
