"""The ``train`` and ``cv`` jobs: records -> split -> train -> predict held-out -> metrics.

Clean protocol (default): split first (stratified, whole groups, exact duplicates merged into one
group), augment only on the fly inside training. Paper protocol: expand the whole set to
``paper_total`` images first, then split image by image, as Shalini & Angel Viji (2022) did; its
figures are inflated because copies of one cell sit on both sides, and the run says how many.

Under ``torchrun`` every rank runs these jobs: rank 0 decides (is the folder free? which split?),
writes every file and scores the held-out images; the other ranks train with it and return its result.
Without torchrun, the folds of ``cv`` may instead train at the same time on several devices
(:mod:`.parallel`): the parent prepares the data and plans the folds, worker processes train them,
and the parent pools the ``predictions.json`` they write.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leukodetect.config import RunConfig
from leukodetect.data.augment import expand_dataset
from leukodetect.data.duplicates import effective_groups, hash_records
from leukodetect.data.indexers import detect_format, find_allidb1, index_dataset, refused_files
from leukodetect.data.records import Record
from leukodetect.data.sources import source_groups
from leukodetect.data.split import (
    holdout_indices,
    kfold_indices,
    train_val_test_indices,
)
from leukodetect.errors import LeukoError
from leukodetect.evaluation.intervals import binary_report, summarize_folds
from leukodetect.evaluation.labs import cell_rows, names_labs, per_lab
from leukodetect.jobs.cells import (
    DEFAULT_FIELD,
    LabSource,
    bank_summary,
    build_bank,
    is_bank,
    labs_of,
)
from leukodetect.jobs.evaluate import write_evaluation
from leukodetect.jobs.guard import add_guard
from leukodetect.runtime.base import REVIEW
from leukodetect.runtime.checkpoint import load_checkpoint, save_checkpoint
from leukodetect.runtime.classifier import Classifier
from leukodetect.runtime.images import GIF_RULE
from leukodetect.runtime.scale import CanonicalScale
from leukodetect.training import distributed, parallel
from leukodetect.training.fit import (
    check_resume_settings,
    local_batch_size,
    train_model,
)
from leukodetect.utils import atomic_write, write_json


@dataclass
class Prepared:
    records: list[Record]
    hashes: list[str]
    groups: list[str]  # split groups (duplicates merged; each file alone under the paper protocol)
    sources: list[str]  # the original image each record derives from (itself when not augmented)
    scale: CanonicalScale | None = None  # the records are canonical crops of a cell bank at this scale

    @property
    def declared_rbc(self) -> float | None:
        """The red-cell diameter to declare when predicting the records: a bank's crops are at the model's scale."""
        return self.scale.pixels_per_rbc if self.scale is not None else None

    def strata(self) -> np.ndarray:
        """What splits stratify on: the label, and the laboratory too where there are several."""
        return split_strata(self.records)


def split_strata(records: Sequence[Record], *, min_size: int = 10) -> np.ndarray:
    """One stratum per (laboratory, label) with at least ``min_size`` images; smaller ones join their label's."""
    keys = [(r.lab or None, r.label) for r in records]
    sizes = Counter(keys)
    keys = [k if sizes[k] >= min_size else (None, k[1]) for k in keys]
    codes = {k: i for i, k in enumerate(sorted(set(keys), key=lambda k: (k[1], k[0] or "")))}
    return np.array([codes[k] for k in keys], dtype=int)


def _index(cfg: RunConfig, out_dir: Path, *, log=print) -> tuple[list[Record], CanonicalScale | None]:
    """The records of a run: one data set, a cell bank, or several laboratories cut into a new cell bank."""
    if cfg.data.sources:
        scale = CanonicalScale(field=cfg.data.field_diameters or DEFAULT_FIELD, size=cfg.data.image_size)
        manifest = build_bank([LabSource.parse(s) for s in cfg.data.sources], Path(out_dir) / "cells", scale, log=log)
        records = index_dataset(manifest, "manifest")
    else:
        records = index_dataset(cfg.data.path, cfg.data.format)
        refused = refused_files(Path(cfg.data.path))
        if refused:
            log(f"Leaving out {len(refused)} GIF file(s), e.g. {refused[0]}: a GIF is {GIF_RULE}.")
        scale = None
        if is_bank(cfg.data.path):
            scale = CanonicalScale.from_dict(bank_summary(Path(cfg.data.path))["scale"])
            if scale.size != cfg.data.image_size:
                raise LeukoError(f"The cell bank {cfg.data.path} holds {scale.size}-pixel crops: train with --image-size {scale.size}.")
    if cfg.data.labs:
        unknown = sorted(set(cfg.data.labs) - {r.lab for r in records})
        if unknown:
            raise LeukoError(f"--labs names {', '.join(unknown)}, which the data does not hold (it holds "
                             f"{', '.join(sorted({str(r.lab) for r in records}))}).")
        records = [r for r in records if r.lab in cfg.data.labs]
    return records, scale


def prepare(cfg: RunConfig, out_dir: Path, *, log=print) -> Prepared:
    """Index the data, drop unreadable or unlabelled images (saying which), apply the protocol."""
    records, scale = _index(cfg, out_dir, log=log)
    unlabelled = [r for r in records if r.label is None]
    if unlabelled:
        log(f"Leaving out {len(unlabelled)} unlabelled images, e.g. {unlabelled[0].path}.")
    records = [r for r in records if r.label is not None]
    hashes = hash_records(records)
    bad = [r for r in records if hashes[r.path] is None]
    for r in bad:
        log(f"Leaving out unreadable image {r.path} (run 'leukodetect data check' for the reason).")
    records = [r for r in records if hashes[r.path] is not None]
    if not records:
        raise LeukoError(f"{cfg.data.path} has no readable labelled images: run 'leukodetect data check {cfg.data.path}'.")
    if cfg.data.protocol == "paper":
        expanded_dir = Path(out_dir) / "paper-expanded"
        manifest = expanded_dir / "manifest.csv"
        if manifest.exists():
            expanded = index_dataset(manifest, "manifest")
        else:
            log(f"Paper protocol: expanding {len(records)} images to {cfg.data.paper_total} before splitting.")
            expanded = expand_dataset(records, expanded_dir, total=cfg.data.paper_total, augment=cfg.augment, seed=cfg.train.seed)
        ex_hashes = hash_records(expanded)
        return Prepared(
            records=expanded,
            hashes=[ex_hashes[r.path] or "" for r in expanded],
            groups=[str(r.path) for r in expanded],  # the paper ignored which cell a copy came from
            sources=[r.group for r in expanded],
        )
    if cfg.data.group_by == "source":
        records = _group_by_source(cfg, records, log=log)
    groups = effective_groups(records, hashes)
    return Prepared(records=records, hashes=[hashes[r.path] for r in records], groups=groups, sources=groups, scale=scale)


def finish_checkpoint(cfg: RunConfig, best: Path, train: Sequence[Record], val: Sequence[Record], scale: CanonicalScale | None,
                      *, log=print) -> None:
    """Record in ``best`` what it was trained on (laboratories and counts) and its scale; fit its guard."""
    if scale is not None or any(r.lab for r in train):
        bundle = load_checkpoint(best)
        bundle["labs"] = labs_of([*train, *val])
        if scale is not None:
            bundle["scale"] = scale.to_dict()
        save_checkpoint(bundle, best)
    if cfg.train.guard:
        if not val:
            log(f"No guard for {best}: its threshold needs a validation part (--val-fraction above 0).")
        else:
            add_guard(best, train, val, device=cfg.train.device, log=log)


def _group_by_source(cfg: RunConfig, records: list[Record], *, log=print) -> list[Record]:
    """Give ALL-IDB2 crops cut from one ALL-IDB1 photograph (or from overlapping ones) one group."""

    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(cfg.data.path)
    if fmt != "allidb2":
        raise LeukoError(f"--group-by source needs ALL-IDB2 crops, but {cfg.data.path} is '{fmt}': drop the option.")
    root = Path(cfg.data.allidb1) if cfg.data.allidb1 else find_allidb1(Path(cfg.data.path))
    if root is None or not root.is_dir():
        raise LeukoError(f"--group-by source needs the ALL-IDB1 photographs: pass --allidb1 PATH (not found beside {cfg.data.path}).")
    groups = source_groups(records, root, progress=False)
    matched = sum(g.startswith("photo:") for g in groups)
    log(f"Grouped by source photograph: {matched} of {len(records)} crops matched, {len(set(groups))} groups.")
    return [dataclasses.replace(r, group=g) for r, g in zip(records, groups)]


def _labels(prep: Prepared) -> np.ndarray:
    return np.array([r.label for r in prep.records], dtype=int)


def leakage(prep: Prepared, train_idx, test_idx) -> int:
    """Number of held-out images whose source image also fed the training part."""
    train_sources = {prep.sources[i] for i in train_idx}
    return sum(prep.sources[i] in train_sources for i in test_idx)


def _split_from_file(prep: Prepared, split_file: Path):
    try:
        raw = json.loads(Path(split_file).read_text())
    except (OSError, ValueError) as exc:
        raise LeukoError(f"Cannot read split file {split_file} ({exc}): pass a split.json written by a previous run.") from exc
    where = {str(Path(r.path).resolve()): i for i, r in enumerate(prep.records)}
    parts = []
    for name in ("train", "val", "test"):
        paths = raw.get(name, [])
        missing = [p for p in paths if str(Path(p).resolve()) not in where]
        if missing:
            raise LeukoError(f"Split file {split_file} names {missing[0]}, which is not in the data: use the same data folder.")
        parts.append(np.array(sorted(where[str(Path(p).resolve())] for p in paths), dtype=int))
    return parts


def split_parts(cfg: RunConfig, prep: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``train``'s split of the prepared records (train, validation, test indices): whole groups, stratified, seeded."""
    return train_val_test_indices(prep.strata(), prep.groups, val_fraction=cfg.data.val_fraction,
                                  test_fraction=cfg.data.test_fraction, seed=cfg.train.seed)


def predict_rows(clf: Classifier, prep: Prepared, idx) -> tuple[np.ndarray, list[dict], dict]:
    """P(blast) of the images at ``idx``, their rows for predictions.csv, and the figures per laboratory
    where the records name theirs (else an empty dict)."""
    preds = clf.predict_paths([prep.records[i].path for i in idx], rbc_diameter=prep.declared_rbc)
    prob = np.array([p.prob_blast for p in preds], dtype=float)
    rows = [
        {"path": str(prep.records[i].path), "label": prep.records[i].label, "group": prep.groups[i],
         "prob_blast": float(pr), "predicted": int(pr >= clf.threshold)}
        for i, pr in zip(idx, prob)
    ]
    records = [prep.records[i] for i in idx]
    labs = {"labs": per_lab(cell_rows(records, prob, [p.label == REVIEW for p in preds]), clf.threshold)} if names_labs(records) else {}
    return prob, rows, labs


def refit_guard(checkpoint: Path, bank: Path, out: Path, *, log=print) -> dict:
    """Fit the guard of a trained model again on the split it was trained on, without retraining; write it to ``out``.

    For when the guard's statistics change and the model's run folder is gone. The split is made again
    from the checkpoint's own config on ``bank`` (the cells.csv it was trained on) and must match what the
    checkpoint recorded (its laboratories, the counts its guard was fitted and thresholded on), else nothing
    is written. The guard is fitted on the training part, thresholded on the validation part (as ``train
    --guard`` does, at the old guard's percentile) and the untouched test part is scored. The weights are
    copied unchanged. Returns the old and new thresholds and the test part's figures by laboratory.
    """
    out = Path(out)
    if out.exists():
        raise LeukoError(f"{out} exists: choose another --out (the guard is written to a new checkpoint).")
    bundle = load_checkpoint(checkpoint)
    old = bundle.get("guard")
    if not old or "fitted_on" not in old:
        raise LeukoError(f"{checkpoint} has no guard to refit (it was trained without --guard): train it again with --guard.")
    cfg = RunConfig.from_dict(bundle["config"])
    cfg.data.path, cfg.data.split_file = str(bank), None
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(cfg, Path(tmp), log=log)
    train, val, test = split_parts(cfg, prep)
    fit, held = [prep.records[i] for i in train], [prep.records[i] for i in val]
    seen = (labs_of([*fit, *held]), len(fit), len(held))
    recorded = (bundle.get("labs"), old["fitted_on"], old["threshold_on"])
    if seen != recorded:
        raise LeukoError(f"The split made again from {bank} does not match the one {checkpoint} records "
                         f"(laboratories and counts {seen} against {recorded}): pass the cell bank the model was trained on.")
    log(f"Split made again and matched: {len(fit)} train, {len(held)} validation, {len(test)} test cells.")
    stored: dict = {}

    def write(tmp: Path) -> None:  # linked to ``out`` only once the guard is in, and never over an existing file
        save_checkpoint(bundle, tmp)
        stored.update(add_guard(tmp, fit, held, percentile=old["percentile"], device="cpu", log=log))

    atomic_write(out, write, exclusive=True)
    clf = Classifier.from_checkpoint(out, backend="torch", precision="fp32")
    _, _, labs = predict_rows(clf, prep, test)
    return {"out": str(out), "before": {k: old[k] for k in ("feature_threshold", "pixel_threshold")},
            "after": {k: stored[k] for k in ("feature_threshold", "pixel_threshold")}, "test": labs.get("labs", {})}


def run_train(cfg: RunConfig, out_dir: Path, *, resume: bool = False, progress: bool = True, command: str = "", log=print) -> dict:
    """Split, train, select by validation loss, then score the untouched test part."""
    with distributed.session(cfg.train.device) as ctx:
        return _run_train(cfg, Path(out_dir), ctx, resume=resume, progress=progress, command=command, log=log if ctx.is_main else _quiet)


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


def _run_train(cfg: RunConfig, out_dir: Path, ctx: distributed.DistContext, *, resume: bool, progress: bool, command: str, log) -> dict:
    local_batch_size(cfg.train.batch_size, ctx)  # before anything is written
    if ctx.broadcast((out_dir / "last.pt").exists()) and not resume:
        raise LeukoError(f"{out_dir} already holds a training run: pass --resume to continue it or choose another --out.")
    if resume:  # before the data is prepared or split.json rewritten
        check_resume_settings(cfg, out_dir, ctx)
    with ctx.main_first():  # the paper protocol writes its expanded images once, on rank 0
        prep = prepare(cfg, out_dir, log=log)
    labels = _labels(prep)
    if ctx.is_main:
        if cfg.data.split_file:
            train, val, test = _split_from_file(prep, Path(cfg.data.split_file))
        elif resume and (out_dir / "split.json").exists():
            train, val, test = _split_from_file(prep, out_dir / "split.json")
        else:
            train, val, test = split_parts(cfg, prep)
        write_json(out_dir / "split.json", {k: [str(prep.records[i].path) for i in v] for k, v in (("train", train), ("val", val), ("test", test))})
    train, val, test = ctx.broadcast((train, val, test) if ctx.is_main else None)
    log(f"Split: {len(train)} train, {len(val)} validation, {len(test)} test images ({cfg.data.protocol} protocol).")
    result = train_model(
        cfg, [prep.records[i] for i in train], [prep.records[i] for i in val], out_dir,
        trained_on=[prep.hashes[i] for i in np.concatenate([train, val])], resume=resume, progress=progress, log=log, dist=ctx,
    )
    if not ctx.is_main:
        return ctx.broadcast(None)
    finish_checkpoint(cfg, result.best_path, [prep.records[i] for i in train], [prep.records[i] for i in val], prep.scale, log=log)
    clf = Classifier.from_checkpoint(result.best_path, backend="torch")  # one pass over the test split: an export would not pay
    prob, rows, labs = predict_rows(clf, prep, test)
    report = write_evaluation(
        out_dir / "test", title=f"{cfg.model.arch}: held-out test split ({cfg.data.protocol} protocol)",
        y_true=labels[test], prob=prob, threshold=clf.threshold, rows=rows, history=result.history,
        facts={"command": command, "data": cfg.data.path, "protocol": cfg.data.protocol, "best epoch": str(result.best_epoch)},
        extra={"protocol": cfg.data.protocol, "test_images_sharing_a_source_with_training": leakage(prep, np.concatenate([train, val]), test),
               **labs},
    )
    return ctx.broadcast({"out_dir": str(out_dir), "checkpoint": str(result.best_path), "test": report})


def run_cv(
    cfg: RunConfig, out_dir: Path, *, folds: int = 5, resume: bool = False, progress: bool = True, command: str = "",
    devices: str | None = "auto", log=print,
) -> dict:
    """Stratified group k-fold: every image is predicted exactly once, by a model that never saw it.

    Each fold's training part is split again (whole groups) into training and validation for
    model selection (``cfg.data.val_fraction``; with 0 the whole part trains and the last epoch is kept). Finished folds are kept: with ``resume`` an interrupted run continues.
    Under torchrun the folds run one after another, each on every rank.

    Args:
        devices: where the folds train (:func:`.parallel.parse_devices`): ``auto`` trains them at
            the same time, one per GPU, when several GPUs are visible; ``off`` one after another.
    """
    with distributed.session(cfg.train.device) as ctx:
        log = log if ctx.is_main else _quiet
        parallel_devices = parallel.parse_devices(devices, device=cfg.train.device)
        run = start_cv(cfg, Path(out_dir), ctx, folds=folds, resume=resume, log=log)
        if parallel_devices:
            train_folds_on_devices(run.todo, parallel_devices, hint="rerun with --resume to train only those", log=log)
        else:
            for job in run.todo:
                train_fold(job, ctx, progress=progress, log=log)
        return finish_cv(run, ctx, command=command)


@dataclass
class FoldJob:
    """One fold of a cross-validation run: train on ``train``, select on ``val``, score ``test``.

    Self-contained (records, not indices into a prepared data set), so a worker process can run it
    without indexing or expanding the data again. Its result is ``fold_dir/predictions.json``.
    """

    cfg: RunConfig
    fold_dir: Path
    fold: int
    folds: int
    train: list[Record]
    val: list[Record]
    test: list[Record]
    trained_on: list[str]  # pixel hashes of the training and validation images
    resume: bool
    scale: CanonicalScale | None = None  # the records are a cell bank's crops at this scale

    @property
    def name(self) -> str:
        return f"{self.fold_dir} ({self.cfg.model.arch}, {self.cfg.data.protocol} protocol)"


@dataclass
class CvRun:
    """A cross-validation run whose data is prepared and whose folds are planned."""

    cfg: RunConfig
    out_dir: Path
    folds: int
    prep: Prepared
    plan: list  # (train_all, test) index arrays per fold
    todo: list[FoldJob]  # the folds still to train


def start_cv(cfg: RunConfig, out_dir: Path, ctx: distributed.DistContext | None = None, *, folds: int, resume: bool, log=print) -> CvRun:
    """Prepare the data (the paper protocol's expansion too), plan the folds, list those not finished."""
    ctx = ctx or distributed.DistContext()
    local_batch_size(cfg.train.batch_size, ctx)
    if ctx.broadcast((out_dir / "cv_plan.json").exists()) and not resume:
        raise LeukoError(f"{out_dir} already holds a cross-validation run: pass --resume to continue it or choose another --out.")
    if resume:
        _check_cv_resume(cfg, out_dir, ctx, folds=folds)
    with ctx.main_first():
        prep = prepare(cfg, out_dir, log=log)
    strata = prep.strata()
    groups = np.array(prep.groups)
    plan = kfold_indices(strata, groups, folds=folds, seed=cfg.train.seed)
    if ctx.is_main:
        write_json(out_dir / "cv_plan.json", {"folds": folds, "protocol": cfg.data.protocol, "test": [[str(prep.records[i].path) for i in te] for _, te in plan]})
    todo = []
    for k, (train_all, test) in enumerate(plan):
        fold_dir = out_dir / f"fold_{k}"
        if resume and ctx.broadcast((fold_dir / "predictions.json").exists()):
            log(f"Fold {k}: already finished, reusing its predictions.")
            continue
        inner_train, inner_val = holdout_indices(strata[train_all], groups[train_all], fraction=cfg.data.val_fraction / (1 - 1 / folds), seed=cfg.train.seed + k)
        todo.append(FoldJob(
            cfg=cfg, fold_dir=fold_dir, fold=k, folds=folds,
            train=[prep.records[i] for i in train_all[inner_train]], val=[prep.records[i] for i in train_all[inner_val]],
            test=[prep.records[i] for i in test], trained_on=[prep.hashes[i] for i in train_all], resume=resume, scale=prep.scale,
        ))
    return CvRun(cfg=cfg, out_dir=out_dir, folds=folds, prep=prep, plan=plan, todo=todo)


def _check_cv_resume(cfg: RunConfig, out_dir: Path, ctx: distributed.DistContext, *, folds: int) -> None:
    """Refuse to resume a cross-validation with another number of folds, or folds trained with other settings."""
    plan = out_dir / "cv_plan.json"
    stored = ctx.broadcast(json.loads(plan.read_text()).get("folds") if ctx.is_main and plan.is_file() else None)
    if stored is not None and stored != folds:
        raise LeukoError(f"{out_dir} was cross-validated with --folds {stored}, not {folds}: resume it with --folds {stored} "
                         "or start a new run in another --out.")
    for k in range(folds):
        check_resume_settings(cfg, out_dir / f"fold_{k}", ctx)


def train_fold(job: FoldJob, ctx: distributed.DistContext | None = None, *, progress: bool = True, log=print) -> None:
    """Train one fold and write the held-out images' probabilities to ``fold_dir/predictions.json``."""
    ctx = ctx or distributed.DistContext()
    log(f"Fold {job.fold + 1}/{job.folds}: {len(job.train)} train, {len(job.val)} validation, {len(job.test)} test images.")
    result = train_model(job.cfg, job.train, job.val, job.fold_dir, trained_on=job.trained_on, resume=job.resume,
                         progress=progress, log=log, dist=ctx)
    if ctx.is_main:
        finish_checkpoint(job.cfg, result.best_path, job.train, job.val, job.scale, log=log)
        preds = Classifier.from_checkpoint(result.best_path, backend="torch").predict_paths(
            [r.path for r in job.test], rbc_diameter=job.scale.pixels_per_rbc if job.scale else None)
        prob = np.array([p.prob_blast for p in preds], dtype=float)
        found = {"test": [str(r.path) for r in job.test], "prob_blast": prob.tolist()}
        if any(p.ood_score is not None for p in preds):  # a guarded model: its scores and calls too
            found.update(ood_score=[p.ood_score for p in preds], call=[p.label for p in preds])
        write_json(job.fold_dir / "predictions.json", found)
    ctx.barrier()


def _train_fold_on(job: FoldJob, device: str) -> None:
    """A worker process's job: the fold on this worker's device, its log lines prefixed with its name."""
    cfg = RunConfig.from_dict(job.cfg.to_dict())
    cfg.train.device = device
    prefix = f"[{device}] {job.cfg.model.arch}, {job.cfg.data.protocol}, fold {job.fold}:"

    def log(message: str) -> None:  # one write per line, so the workers' lines do not interleave
        sys.stderr.write(f"{prefix} {message}\n")
        sys.stderr.flush()

    train_fold(dataclasses.replace(job, cfg=cfg), progress=False, log=log)


def train_folds_on_devices(jobs: list[FoldJob], devices: list[str], *, hint: str, log=print) -> None:
    """Train the folds at the same time, one worker process per device; raise naming any that failed.

    Finished folds keep their ``predictions.json`` whatever happens to the others, so ``hint``
    (how to rerun) trains only what is missing.
    """
    failed = parallel.run_on_devices(_train_fold_on, jobs, devices, names=[j.name for j in jobs], log=log)
    if failed:
        raise LeukoError(f"{len(failed)} of {len(jobs)} folds failed: {'; '.join(failed)}; the other folds are saved, so {hint}.")


def finish_cv(run: CvRun, ctx: distributed.DistContext | None = None, *, command: str = "") -> dict:
    """Pool every fold's predictions.json into out-of-fold metrics, the per-fold summary and the report."""
    ctx = ctx or distributed.DistContext()
    cfg, out_dir, folds, prep = run.cfg, run.out_dir, run.folds, run.prep
    labels = _labels(prep)
    oof = np.full(len(labels), np.nan)
    oof_fold = np.full(len(labels), -1)
    oof_flagged = np.zeros(len(labels), dtype=bool)  # by the fold model's guard, where it has one
    per_fold, fold_rows = [], []
    for k, (train_all, test) in enumerate(run.plan):
        done = out_dir / f"fold_{k}" / "predictions.json"
        stored = ctx.broadcast(json.loads(done.read_text()) if ctx.is_main else None)
        prob = np.array(stored["prob_blast"], dtype=float)
        oof[test], oof_fold[test] = prob, k
        if stored.get("call"):
            oof_flagged[test] = [call == REVIEW for call in stored["call"]]
        fold_report = binary_report(labels[test], prob, threshold=0.5)
        fold_report["leakage"] = leakage(prep, train_all, test)
        per_fold.append(fold_report)
        fold_rows.append({"fold": k, **{n: e["value"] for n, e in fold_report["metrics"].items()}})
    assert not np.isnan(oof).any(), "every image is predicted exactly once"
    rows = [
        {"path": str(r.path), "label": r.label, "group": g, "fold": int(f), "prob_blast": float(p), "predicted": int(p >= 0.5)}
        for r, g, f, p in zip(prep.records, prep.groups, oof_fold, oof)
    ]
    summary = summarize_folds(per_fold)
    labs = {"labs": per_lab(cell_rows(prep.records, oof, oof_flagged), 0.5)} if names_labs(prep.records) else {}
    if not ctx.is_main:
        return ctx.broadcast(None)
    report = write_evaluation(
        out_dir, title=f"{cfg.model.arch}: {folds}-fold cross-validation ({cfg.data.protocol} protocol), pooled out-of-fold",
        y_true=labels, prob=oof, threshold=0.5, rows=rows,
        facts={"command": command, "data": cfg.data.path, "protocol": cfg.data.protocol, "folds": str(folds),
               "epochs": str(cfg.train.epochs), "image size": str(cfg.data.image_size)},
        extra={"protocol": cfg.data.protocol, "per_fold": fold_rows,
               "held_out_images_sharing_a_source_with_training": int(sum(f["leakage"] for f in per_fold)), **labs},
        fold_summary=summary,
    )
    return ctx.broadcast({"out_dir": str(out_dir), "pooled": report, "folds": summary})
