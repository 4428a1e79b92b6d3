"""One training epoch and one inference pass, written to be read top to bottom."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from leukodetect.runtime.device import autocast


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_mixer(mixup: float, cutmix: float, num_classes: int = 2):
    """MixUp and/or CutMix (torchvision.transforms.v2) with these Beta parameters; None when both are 0."""
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    channels_last: bool,
    desc: str = "train",
    progress: bool = True,
    reduce_sum=None,
    after_step=None,
    mix=None,
) -> tuple[float, float]:
    """Returns mean loss and accuracy over the epoch's training images.

    Args:
        after_step: called after every optimizer step (e.g. to update a weight average).
        mix: a batch transform ``(images, labels) -> (images, soft targets)`` such as
            :func:`batch_mixer`'s; the accuracy is then counted against each image's larger share.
        reduce_sum: in a distributed run, sums ``[loss * n, correct, n]`` over ranks so the figures
            cover every rank's images (``DistContext.all_reduce_sum``); None for a single process.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = _to_device(x, device, channels_last), y.to(device)
        target = y
        if mix is not None:
            x, target = mix(x, y)
            y = target.argmax(1)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # float16 on CUDA needs loss scaling; bfloat16 does not
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    if reduce_sum is not None:
        total_loss, correct, seen = reduce_sum([total_loss, correct, seen])
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    desc: str = "predict",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits (N, C) and labels (N,) for every item of ``loader``, in order."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        with autocast(device, amp_dtype):
            logits = model(_to_device(x, device, channels_last))
        all_logits.append(logits.float().cpu())
        all_labels.append(y)
    if not all_logits:
        return np.zeros((0, 2), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    t = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    return nn.functional.cross_entropy(t, y).item(), (t.argmax(1) == y).float().mean().item()
