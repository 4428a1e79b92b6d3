"""Distributed data parallel plumbing for runs started by ``torchrun``.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous variables; a plain
``leukodetect train`` sees none of them and runs as a world of one, with no process group and no
collective calls. Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``), gloo on CPU.
Only rank 0 writes files; the helpers here let the other ranks agree with its decisions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

from leukodetect.errors import LeukoError
from leukodetect.runtime.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run; the default is a single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable value), so all ranks take one decision."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (and may write); the others run it after, and may reuse it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:  # if rank 0 fails, the others run the block too and meet the same error
            if self.is_main:
                self.barrier()


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment, or return a world of one.

    Args:
        device: the run's ``--device``; on CUDA each process takes GPU ``LOCAL_RANK`` and NCCL,
            otherwise gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LeukoError(
                f"Process LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU with torchrun --nproc-per-node."
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, device=dev)


def destroy(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistContext]:
    """``init_from_env`` for the length of a ``with`` block, then leave the process group."""
    ctx = init_from_env(device)
    try:
        yield ctx
    finally:
        destroy(ctx)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch, for gloo on CPU.

    ``nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14: "expected input tensor to be on GPU",
    and ``aten::batch_norm_stats`` has no CPU kernel), so CPU runs use this: mean and variance are
    summed over ranks with the differentiable ``torch.distributed.nn.functional.all_reduce`` (two
    passes, like ``F.batch_norm``), which gives the single-process result on the same global batch.
    Parameters, buffers and state-dict keys are those of ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        # Statistics in float32 whatever autocast gave (bfloat16 on CPUs with AVX512-BF16), as
        # F.batch_norm computes them; the running buffers are float32 too.
        x = x.float()
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])])
        total = all_reduce(local)
        n = total[-1]
        mean = total[:-1] / n
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1), factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm statistics over the global batch: ``nn.SyncBatchNorm`` on GPU, GlobalBatchNorm2d on CPU.

    Without this, each rank would normalise by its own local batch and the run would no longer match
    a single-process run with the same global batch. State-dict keys are unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d  # same parameters and buffers, global statistics
    return model
