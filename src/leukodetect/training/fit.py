"""``train_model``: fit one model on given training and validation records, resumably.

The run folder holds ``last.pt`` (full training state, rewritten atomically after every epoch),
``best.pt`` (the self-describing checkpoint with the lowest validation loss), ``history.json``
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
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from leukodetect.config import RunConfig, save_config
from leukodetect.data.dataset import ImageDataset
from leukodetect.data.records import Record
from leukodetect.data.transforms import TrainPreset, channel_stats
from leukodetect.errors import LeukoError
from leukodetect.models import create_model
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
    """This rank's share of the epoch: one global permutation seeded by (seed, epoch), strided by rank."""
    local_batch = local_batch_size(cfg.train.batch_size, ctx)
    # drop_last trims the permutation to a multiple of the world size (a no-op for one process);
    # the default, padding with repeated images, would count some images twice.
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
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    # Rank 0's view of the folder decides for every rank, before any rank writes.
    has_run, has_best = ctx.broadcast((last_path.exists(), best_path.exists()))
    if (has_run or has_best) and not resume:
        raise LeukoError(f"{out_dir} already holds a training run: pass --resume to continue it or choose another --out.")
    if resume and has_best and not has_run:
        log(f"{out_dir} was stopped before its first resume point (--checkpoint-every): training starts again at epoch 1.")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        log = _quiet
    torch.manual_seed(cfg.train.seed)

    device = ctx.device if ctx.distributed else resolve_device(cfg.train.device)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    use_cl = channels_last(device)
    size = cfg.data.image_size

    if has_run and resume and not last_path.exists():
        raise LeukoError(f"Rank {ctx.rank} cannot see {last_path}: put the run folder on storage every node shares to resume.")
    state = load_checkpoint(last_path) if resume and has_run else None
    base = ImageDataset(train_records, EvalPreset(image_size=size))
    if state is None:
        mean, std = channel_stats(base.base_image(i) for i in range(len(base)))
    else:
        mean, std = tuple(state["mean"]), tuple(state["std"])
    train_ds = ImageDataset(train_records, TrainPreset(image_size=size, mean=mean, std=std, augment=cfg.augment), seed=cfg.train.seed)
    train_ds._cache = base._cache  # decoded once for the statistics, reused for training
    val_ds = ImageDataset(val_records, EvalPreset(image_size=size, mean=mean, std=std))

    model = create_model(cfg.model.arch, num_classes=2, weights=cfg.model.weights).to(device)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    if ctx.distributed:
        model = sync_batch_norm(model, device)
    # With --ema the running average (batch-norm statistics included) is what is validated and saved.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True) if cfg.train.ema else None
    scored = ema.module if ema is not None else model
    optimizer = _make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    mix = batch_mixer(cfg.train.mixup, cfg.train.cutmix)

    history: list[dict] = []
    best_loss, best_epoch, start = float("inf"), 0, 1
    if state is not None:
        # With EMA, "state_dict" holds the averaged weights and "raw_state_dict" the trained ones.
        model.load_state_dict(state.get("raw_state_dict", state["state_dict"]))
        if ema is not None and "raw_state_dict" in state:
            ema.module.load_state_dict(state["state_dict"])
            ema.n_averaged.fill_(state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_loss, best_epoch = state["history"], state["best_val_loss"], state["best_epoch"]
        start = state["epoch"] + 1
        best_loss, best_epoch = _kept_best(best_path, state["epoch"], best_loss, best_epoch)
        if start <= cfg.train.epochs:
            log(f"Resuming {out_dir} at epoch {start} of {cfg.train.epochs}.")
    # ``model`` stays the plain module: it is what is evaluated and saved (no "module." prefix).
    # DDP broadcasts rank 0's weights at construction and averages gradients over ranks.
    ddp = model if not ctx.distributed else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    if ctx.is_main:
        save_config(cfg, out_dir / "config.yaml")
    bundle_for = partial(
        make_bundle, arch=cfg.model.arch, image_size=size, mean=mean, std=std,
        config=cfg.to_dict(), trained_on=list(trained_on),
    )

    for epoch in range(start, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        train_ds.set_epoch(epoch)
        train_loss, train_acc = train_one_epoch(
            ddp, _train_loader(train_ds, cfg, ctx, epoch), optimizer, loss_fn,
            device=device, amp_dtype=amp_dtype, scaler=scaler, channels_last=use_cl,
            desc=f"epoch {epoch}/{cfg.train.epochs}", progress=progress and ctx.is_main,
            reduce_sum=ctx.all_reduce_sum if ctx.distributed else None,
            after_step=(lambda: ema.update_parameters(model)) if ema is not None else None, mix=mix,
        )
        scheduler.step()
        # The plain module, not the DDP wrapper: evaluation issues no collective calls.
        logits, labels = predict_logits(scored, _eval_loader(val_ds, cfg), device=device, amp_dtype=amp_dtype, channels_last=use_cl)
        val_loss, val_acc = loss_and_accuracy(logits, labels)
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": None if val_loss != val_loss else val_loss,
            "val_acc": None if val_acc != val_acc else val_acc,
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        # With no validation images, the last epoch is kept.
        score = val_loss if val_loss == val_loss else -epoch
        if score <= best_loss:
            best_loss, best_epoch = score, epoch
            # Without validation images every epoch is the new best: write it only where last.pt is written.
            if ctx.is_main and (len(val_ds) or epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs):
                save_checkpoint(bundle_for(scored, history=history, extra={"epoch": epoch}), best_path)
        if not ctx.is_main:
            continue
        write_json(out_dir / "history.json", history)
        if epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs:
            resume_state = {
                "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best_val_loss": best_loss, "best_epoch": best_epoch,
            }
            if ema is not None:
                resume_state["raw_state_dict"] = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
                resume_state["ema_updates"] = int(ema.n_averaged)
            save_checkpoint(bundle_for(scored, history=history, extra=resume_state), last_path)
        log(_epoch_line(row))
    if start <= cfg.train.epochs and ctx.is_main:
        # best.pt was written mid-run; give it the whole history so its training curves are complete.
        best = load_checkpoint(best_path)
        best["history"] = history
        save_checkpoint(best, best_path)
    ctx.barrier()  # best.pt is complete before any rank goes on to use it
    return TrainResult(out_dir=out_dir, best_path=best_path, history=history, best_epoch=best_epoch)
