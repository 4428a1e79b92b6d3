"""``train_model``: fit one model on given training and validation records, resumably.

The run folder holds ``last.pt`` (full training state, rewritten atomically after every epoch),
``best.pt`` (the self-describing checkpoint with the lowest validation loss; the last epoch's with
``select="last"`` or without a validation part), ``history.json``
and ``config.yaml``. Each epoch's shuffling and augmentation are seeded from ``(seed, epoch)``, so
a resumed run continues exactly as the uninterrupted run would have.

Under ``torchrun`` (see :mod:`.distributed`) the model is wrapped in DistributedDataParallel and
``batch_size`` stays the *global* batch: each of the W ranks takes ``batch_size // W`` images. The
shuffle is one global permutation per epoch (a ``DistributedSampler`` also with W = 1), rank r
takes positions r, r+W, ..., so the union of the ranks' k-th batches is the single-process k-th
batch; gradients are averaged over ranks and batch norm uses global-batch statistics, so a run on
W ranks follows the single-process run up to float rounding. The one difference: when the training
set is not a multiple of W, the last ``len % W`` images of each epoch's permutation are left out
(padding with repeats would count them twice). Every rank scores the whole (small) validation set
with identical weights, so all agree on the best epoch without communicating; only rank 0 writes.

``train_model`` reads top to bottom: check the run folder, prepare what stays fixed (:class:`_Run`),
build the training state (:class:`_TrainingState`) and restore it from last.pt when resuming
(:func:`_restore`, the counterpart of :func:`_save_resume_point`), then run the epochs (:func:`_epoch`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from leukodetect.config import RunConfig, config_changes, load_config, save_config
from leukodetect.data.dataset import ImageDataset
from leukodetect.data.records import Record
from leukodetect.data.sampling import WeightedEpochSampler, lab_balanced_weights
from leukodetect.data.transforms import TrainPreset, channel_stats
from leukodetect.errors import LeukoError
from leukodetect.models import create_model, get_spec
from leukodetect.runtime.checkpoint import load_checkpoint, make_bundle, save_checkpoint
from leukodetect.runtime.device import autocast_dtype, channels_last, resolve_device
from leukodetect.runtime.preprocess import EvalPreset
from leukodetect.training.distributed import DistContext, sync_batch_norm
from leukodetect.training.engine import (
    batch_mixer,
    loss_and_accuracy,
    predict_logits,
    train_one_epoch,
)
from leukodetect.training.mixstyle import MixStyle
from leukodetect.utils import write_json

OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
}


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one report per run, not one per process."""


@dataclass
class TrainResult:
    out_dir: Path
    best_path: Path
    history: list[dict]
    best_epoch: int


def _make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        make = OPTIMIZERS[cfg.train.optimizer]
    except KeyError:
        raise LeukoError(f"Unknown optimizer '{cfg.train.optimizer}': use one of {sorted(OPTIMIZERS)}.") from None
    return make(model.parameters(), cfg.train.lr, cfg.train.weight_decay)


def local_batch_size(batch_size: int, ctx: DistContext) -> int:
    """Each rank's share of the global ``--batch-size``."""
    if batch_size % ctx.world_size:
        raise LeukoError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over "
            f"{ctx.world_size} processes: choose a multiple of {ctx.world_size}."
        )
    return batch_size // ctx.world_size


def _train_loader(ds, cfg: RunConfig, ctx: DistContext, epoch: int) -> DataLoader:
    """This rank's share of the epoch: one global permutation (or, with ``--balance labs``, one weighted draw)
    seeded by (seed, epoch), strided by rank."""
    local_batch = local_batch_size(cfg.train.batch_size, ctx)
    # drop_last trims the permutation to a multiple of the world size (a no-op for one process);
    # the default, padding with repeated images, would count some images twice.
    if cfg.train.balance == "labs":
        sampler = WeightedEpochSampler(lab_balanced_weights(ds.records), seed=cfg.train.seed, epoch=epoch,
                                       rank=ctx.rank, world_size=ctx.world_size)
    else:
        sampler = DistributedSampler(
            ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.train.seed * 7919, drop_last=True
        )
        sampler.set_epoch(epoch)
    used = len(sampler) * ctx.world_size
    return DataLoader(
        ds,
        batch_size=local_batch,
        sampler=sampler,
        # A last global batch of one image breaks batch norm; with shuffling each image still gets used.
        drop_last=used % cfg.train.batch_size == 1,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        multiprocessing_context=_worker_context(cfg.data.num_workers),
    )


def _epoch_line(row: dict) -> str:
    nan = float("nan")
    return (
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
        f"val loss {row['val_loss'] if row['val_loss'] is not None else nan:.4f} "
        f"acc {row['val_acc'] if row['val_acc'] is not None else nan:.3f}  ({row['seconds']:.1f}s)"
    )


def _kept_best(best_path: Path, resume_epoch: int, best_loss: float, best_epoch: int) -> tuple[float, int]:
    """The selection state on resuming: with ``checkpoint_every`` > 1, best.pt may come from an epoch after
    the resume point; it stays the best unless a resumed epoch beats it."""
    if not best_path.exists():
        return best_loss, best_epoch
    kept = load_checkpoint(best_path)
    epoch = int(kept.get("epoch", 0))
    if epoch <= resume_epoch or not kept.get("history"):
        return best_loss, best_epoch
    row = kept["history"][epoch - 1]
    score = row["val_loss"] if row["val_loss"] is not None else -epoch
    return (score, epoch) if score < best_loss else (best_loss, best_epoch)


def _worker_context(num_workers: int):
    """Fork DataLoader workers where the platform can: a fold trained in a ``--devices`` worker process
    (itself spawned) would otherwise spawn its loader workers too, re-importing torch and pickling the
    decoded images every epoch (seen on an H200: 31 s per ResNet-50 epoch instead of about 1 s). The
    workers only augment images on the CPU, so forking a process that holds a CUDA context is safe.
    Linux only: macOS offers fork but its system libraries are not fork-safe."""
    if num_workers and sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return None


def _eval_loader(ds, cfg: RunConfig) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      multiprocessing_context=_worker_context(cfg.data.num_workers))


def train_model(
    cfg: RunConfig,
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    out_dir: Path,
    *,
    trained_on: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    log=print,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train ``cfg.model.arch`` on ``train_records``, select the epoch by validation loss.

    Args:
        trained_on: pixel hashes of the training and validation images, stored in the checkpoint.
        resume: continue from ``out_dir/last.pt``; without it an existing run is an error, so a
            finished run is never overwritten by accident.
        dist: this process's place in a torchrun launch (:func:`.distributed.init_from_env`);
            None for a single process. Every rank must call ``train_model`` with the same arguments.
    """
    cfg = cfg.resolved()  # the learning rate actually used is what config.yaml and the checkpoint record
    ctx = dist or DistContext()
    local_batch_size(cfg.train.batch_size, ctx)
    out_dir = Path(out_dir)
    has_run = _check_run_folder(cfg, out_dir, ctx, resume=resume, log=log)
    if not ctx.is_main:
        log = _quiet
    torch.manual_seed(cfg.train.seed)
    run, saved = _prepare(cfg, ctx, out_dir, train_records, val_records, trained_on, has_run=has_run)
    state = _new_state(run)
    if saved is not None:
        _restore(state, saved, run.best_path)
        if state.start <= cfg.train.epochs:
            log(f"Resuming {out_dir} at epoch {state.start} of {cfg.train.epochs}.")
    # ``state.model`` stays the plain module: it is what is evaluated and saved (no "module." prefix).
    # DDP broadcasts rank 0's weights at construction and averages gradients over ranks.
    stepped = state.model if not ctx.distributed else DistributedDataParallel(
        state.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    )
    if ctx.is_main:
        save_config(cfg, out_dir / "config.yaml")

    for epoch in range(state.start, cfg.train.epochs + 1):
        row, improved = _epoch(run, state, stepped, epoch, progress=progress)
        # Without validation images, or with --select last, every epoch is the new best: write it only where
        # last.pt is written (always after the last epoch).
        if improved and ctx.is_main and ((len(run.val_ds) and cfg.train.select == "best") or run.is_resume_point(epoch)):
            save_checkpoint(run.bundle(state.scored, history=state.history, extra={"epoch": epoch}), run.best_path)
        if ctx.is_main:
            write_json(out_dir / "history.json", state.history)
            if run.is_resume_point(epoch):
                _save_resume_point(run, state, epoch)
            log(_epoch_line(row))
    if state.start <= cfg.train.epochs and ctx.is_main:
        _complete_best_history(run.best_path, state.history)
    ctx.barrier()  # best.pt is complete before any rank goes on to use it
    return TrainResult(out_dir=out_dir, best_path=run.best_path, history=state.history, best_epoch=state.best_epoch)


# ---- before the first epoch: the run folder, the data, the model ----


@dataclass(frozen=True)
class _Run:
    """What stays fixed through one call: the resolved config, this process's place, how it computes,
    the data sets and the run folder."""

    cfg: RunConfig
    ctx: DistContext
    out_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    train_ds: ImageDataset
    val_ds: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    trained_on: list[str]
    loss_fn: nn.Module
    mix: Callable | None  # MixUp / CutMix of each batch (None without --mixup / --cutmix)
    scaler: torch.amp.GradScaler | None  # float16 on CUDA only; not carried by last.pt

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def is_resume_point(self, epoch: int) -> bool:
        """Whether last.pt is written after ``epoch``: every ``checkpoint_every`` epochs, and after the last."""
        return epoch % self.cfg.train.checkpoint_every == 0 or epoch == self.cfg.train.epochs

    def bundle(self, model: nn.Module, *, history: list[dict], extra: dict) -> dict:
        """The self-describing checkpoint of ``model``: architecture, preprocessing, config, image hashes."""
        return make_bundle(
            model, arch=self.cfg.model.arch, image_size=self.cfg.data.image_size, mean=self.mean, std=self.std,
            config=self.cfg.to_dict(), trained_on=self.trained_on, history=history, extra=extra,
        )


@dataclass
class _TrainingState:
    """What the epochs change. last.pt saves it (:func:`_save_resume_point`) and a resumed run
    restores it (:func:`_restore`), so it continues exactly as the uninterrupted run would have."""

    model: nn.Module  # the plain module, never the DDP wrapper
    ema: AveragedModel | None  # with --ema the running average (batch-norm statistics included) is validated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    style: MixStyle | None = None  # with --mixstyle, the hooks on ``model``'s stages (training mode only)
    history: list[dict] = field(default_factory=list)
    best_loss: float = float("inf")  # the selection score of best_epoch (see ``record``)
    best_epoch: int = 0
    start: int = 1  # the first epoch still to train

    @property
    def scored(self) -> nn.Module:
        """The weights that are validated and saved: the running average with --ema, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, row: dict, val_loss: float, epoch: int, *, keep_last: bool = False) -> bool:
        """Add an epoch's row to the history; True when it is the best epoch so far."""
        self.history.append(row)
        # With no validation images (a NaN loss), or with ``keep_last`` (--select last), the last epoch is kept.
        score = val_loss if val_loss == val_loss and not keep_last else -epoch
        if score <= self.best_loss:
            self.best_loss, self.best_epoch = score, epoch
            return True
        return False


def _check_run_folder(cfg: RunConfig, out_dir: Path, ctx: DistContext, *, resume: bool, log) -> bool:
    """Refuse to overwrite a run unless resuming, or to resume it with other settings; create the folder.
    True when there is a last.pt to resume from.

    Rank 0's view of the folder decides for every rank, before any rank writes.
    """
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    has_run, has_best = ctx.broadcast((last_path.exists(), best_path.exists()))
    if (has_run or has_best) and not resume:
        raise LeukoError(f"{out_dir} already holds a training run: pass --resume to continue it or choose another --out.")
    if resume:
        check_resume_settings(cfg, out_dir, ctx)
    if resume and has_best and not has_run:
        log(f"{out_dir} was stopped before its first resume point (--checkpoint-every): training starts again at epoch 1.")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    return has_run


#: Settings that change how a run computes, not what it computes: a resumed run may change them. The device
#: may change so that a run can continue on another machine (its rounding differs, and with --precision
#: auto so may the precision it picks). Every other setting shapes the result, --precision and --epochs
#: included: the cosine schedule spans the epoch count, so more epochs would change the learning rate of
#: the epochs already trained; a longer run is a new run.
RESUMABLE_SETTINGS = frozenset({"train.device", "data.num_workers", "train.checkpoint_every"})


def check_resume_settings(cfg: RunConfig, out_dir: Path, ctx: DistContext | None = None) -> None:
    """Refuse to resume the run in ``out_dir`` with settings that differ from its ``config.yaml``.

    Only a folder holding a trained epoch (last.pt or best.pt) is compared, and only the settings
    that shape the result (all but :data:`RESUMABLE_SETTINGS`). Rank 0 compares; every rank raises alike.

    Raises:
        LeukoError: one sentence naming each difference and what to do.
    """
    ctx = ctx or DistContext()
    out_dir = Path(out_dir)
    changes = ctx.broadcast(_resume_changes(cfg, out_dir) if ctx.is_main else None)
    if not changes:
        return
    why = ""
    if any(change.startswith("train.epochs ") for change in changes):
        why = " (the cosine schedule spans the epochs, so changing them would change the epochs already trained)"
    raise LeukoError(
        f"{out_dir} was trained with other settings than these: {', '.join(changes)}{why}; resume it with the settings "
        f"in {out_dir / 'config.yaml'} (--config reads that file) or start a new run in another --out."
    )


def _resume_changes(cfg: RunConfig, out_dir: Path) -> list[str]:
    """The result-shaping settings of ``cfg`` that differ from the stored run's (none without a trained epoch)."""
    stored = out_dir / "config.yaml"
    if not stored.is_file() or not ((out_dir / "last.pt").exists() or (out_dir / "best.pt").exists()):
        return []
    return config_changes(load_config(stored), cfg.resolved(), ignore=RESUMABLE_SETTINGS)


def _prepare(
    cfg: RunConfig, ctx: DistContext, out_dir: Path, train_records: Sequence[Record], val_records: Sequence[Record],
    trained_on: Sequence[str], *, has_run: bool,
) -> tuple[_Run, dict | None]:
    """The fixed parts of the run, and the saved training state when resuming (None for a fresh run).

    A resumed run keeps the mean and std of its first start rather than measuring them again.
    """
    device = ctx.device if ctx.distributed else resolve_device(cfg.train.device)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    last_path = out_dir / "last.pt"
    if has_run and not last_path.exists():
        raise LeukoError(f"Rank {ctx.rank} cannot see {last_path}: put the run folder on storage every node shares to resume.")
    saved = load_checkpoint(last_path) if has_run else None

    size = cfg.data.image_size
    base = ImageDataset(train_records, EvalPreset(image_size=size))
    if saved is None:
        mean, std = channel_stats(base.base_image(i) for i in range(len(base)))
    else:
        mean, std = tuple(saved["mean"]), tuple(saved["std"])
    train_ds = ImageDataset(train_records, TrainPreset(image_size=size, mean=mean, std=std, augment=cfg.augment), seed=cfg.train.seed)
    train_ds._cache = base._cache  # decoded once for the statistics, reused for training
    val_ds = ImageDataset(val_records, EvalPreset(image_size=size, mean=mean, std=std))

    run = _Run(
        cfg=cfg, ctx=ctx, out_dir=out_dir, device=device, amp_dtype=amp_dtype, channels_last=channels_last(device),
        train_ds=train_ds, val_ds=val_ds, mean=mean, std=std, trained_on=list(trained_on),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        mix=batch_mixer(cfg.train.mixup, cfg.train.cutmix),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None,
    )
    return run, saved


def _new_state(run: _Run) -> _TrainingState:
    """A freshly initialised model (and its EMA), optimizer and cosine schedule, before any epoch."""
    cfg = run.cfg
    model = create_model(cfg.model.arch, num_classes=2, weights=cfg.model.weights).to(run.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.ctx.distributed:
        model = sync_batch_norm(model, run.device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True) if cfg.train.ema else None
    # After the EMA copy, which never trains.
    style = MixStyle(model, cfg.train.mixstyle, get_spec(cfg.model.arch).style_stages) if cfg.train.mixstyle else None
    optimizer = _make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return _TrainingState(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, style=style)


# ---- resume points: what last.pt holds beyond the checkpoint, written and read in one place ----


def _save_resume_point(run: _Run, state: _TrainingState, epoch: int) -> None:
    """Write last.pt: the checkpoint of the scored weights plus everything :func:`_restore` needs.

    With EMA, ``state_dict`` holds the averaged weights and ``raw_state_dict`` the trained ones.
    """
    extra = {
        "epoch": epoch, "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "best_val_loss": state.best_loss, "best_epoch": state.best_epoch,
    }
    if state.ema is not None:
        extra["raw_state_dict"] = {k: v.detach().to("cpu") for k, v in state.model.state_dict().items()}
        extra["ema_updates"] = int(state.ema.n_averaged)
    save_checkpoint(run.bundle(state.scored, history=state.history, extra=extra), run.last_path)


def _restore(state: _TrainingState, saved: dict, best_path: Path) -> None:
    """Put a fresh state where last.pt left off: weights (and EMA), optimizer, schedule, history, selection."""
    state.model.load_state_dict(saved.get("raw_state_dict", saved["state_dict"]))
    if state.ema is not None and "raw_state_dict" in saved:
        state.ema.module.load_state_dict(saved["state_dict"])
        state.ema.n_averaged.fill_(saved["ema_updates"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.history = saved["history"]
    state.start = saved["epoch"] + 1
    state.best_loss, state.best_epoch = _kept_best(best_path, saved["epoch"], saved["best_val_loss"], saved["best_epoch"])


# ---- one epoch ----


def _epoch(run: _Run, state: _TrainingState, stepped: nn.Module, epoch: int, *, progress: bool) -> tuple[dict, bool]:
    """Train one epoch through ``stepped`` (the DDP wrapper under torchrun), step the schedule, validate.

    Returns:
        The epoch's history row, and whether it is the best epoch so far.
    """
    cfg, ctx = run.cfg, run.ctx
    t0 = time.perf_counter()
    run.train_ds.set_epoch(epoch)
    if state.style is not None:
        state.style.set_epoch(cfg.train.seed, epoch)
    train_loss, train_acc = train_one_epoch(
        stepped, _train_loader(run.train_ds, cfg, ctx, epoch), state.optimizer, run.loss_fn,
        device=run.device, amp_dtype=run.amp_dtype, scaler=run.scaler, channels_last=run.channels_last,
        desc=f"epoch {epoch}/{cfg.train.epochs}", progress=progress and ctx.is_main,
        reduce_sum=ctx.all_reduce_sum if ctx.distributed else None,
        after_step=(lambda: state.ema.update_parameters(state.model)) if state.ema is not None else None, mix=run.mix,
    )
    state.scheduler.step()
    # The plain module, not the DDP wrapper: evaluation issues no collective calls.
    logits, labels = predict_logits(state.scored, _eval_loader(run.val_ds, cfg), device=run.device,
                                    amp_dtype=run.amp_dtype, channels_last=run.channels_last)
    val_loss, val_acc = loss_and_accuracy(logits, labels)
    row = {
        "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
        "val_loss": None if val_loss != val_loss else val_loss,
        "val_acc": None if val_acc != val_acc else val_acc,
        "lr": state.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
    }
    return row, state.record(row, val_loss, epoch, keep_last=cfg.train.select == "last")


def _complete_best_history(best_path: Path, history: list[dict]) -> None:
    """best.pt was written mid-run; give it the whole history so its training curves are complete."""
    best = load_checkpoint(best_path)
    best["history"] = history
    save_checkpoint(best, best_path)
