"""Independent jobs (folds, architectures) spread over several devices, one worker process per device.

Cross-validation folds and the runs of a comparison do not depend on each other, so on a machine
with several GPUs each can train on its own GPU at the same time. Every worker is a fresh "spawn"
process (CUDA cannot be used in a forked child) that pins itself to one device and then takes jobs
one at a time. A job writes its results into its own folder, so nothing but its duration comes back
to the parent; a job that raises is reported and the others go on.

Under ``torchrun`` the GPUs already belong to the data-parallel ranks, so jobs run one after another.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import torch

from leukodetect.errors import LeukoError

_device: str | None = None  # the device of this worker process, set once by _pin_worker


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def parse_devices(spec: str | None, *, device: str = "auto") -> list[str]:
    """The devices to run jobs on in parallel, or ``[]`` to run them one after another.

    Args:
        spec: ``auto`` (every visible GPU when there are at least two, the run's ``device`` allows
            them and this is not a torchrun launch), ``off``, or a comma-separated list such as
            ``cuda:0,cuda:1`` or ``cpu,cpu`` (one worker process per entry). A GPU named twice gets
            two workers: small models at batch 16 leave a large GPU mostly idle, and several
            jobs sharing it keep it busy.
        device: the run's ``--device``; ``auto`` finds no parallel GPUs when it names one device.
    """
    spec = (spec or "auto").strip()
    if spec == "off":
        return []
    if spec == "auto":
        if under_torchrun() or device not in ("auto", "cuda"):
            return []
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n > 1 else []
    if under_torchrun():
        raise LeukoError(f"--devices {spec} cannot be combined with torchrun, whose processes already use the GPUs: drop --devices.")
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise LeukoError(f"--devices '{spec}' names no device: use auto, off, or a list such as cuda:0,cuda:1.")
    out = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise LeukoError(f"--devices names an unknown device '{name}': use cpu or cuda:N, e.g. cuda:0,cuda:1.") from None
        if dev.type == "cuda":
            visible = torch.cuda.device_count()
            if dev.index is None:
                raise LeukoError(f"--devices needs a GPU number in '{name}': write cuda:0,cuda:1.")
            if dev.index >= visible:
                raise LeukoError(f"--devices names {name}, but {visible} CUDA GPU(s) are visible: use cuda:0 to cuda:{visible - 1}." if visible
                                 else f"--devices names {name}, but no CUDA GPU is visible: use --devices off.")
        elif dev.type != "cpu":
            raise LeukoError(f"--devices names '{name}': only cpu and cuda:N devices are supported.")
        out.append(str(dev))
    return out


def _pin_worker(devices, threads: int) -> None:
    """Pool initializer: take one device from the shared queue, keep it for the worker's life."""
    global _device
    _device = devices.get()
    torch.set_num_threads(threads)
    if _device.startswith("cuda"):
        torch.cuda.set_device(torch.device(_device))


def _call(fn: Callable, job) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        fn(job, _device)
    except LeukoError:
        raise  # a user error: its sentence, reported by the parent, is enough
    except Exception:
        # The parent reports the exception; the worker's stderr gets where it came from.
        sys.stderr.write(f"[{_device}] failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise
    return _device, time.perf_counter() - t0


def run_on_devices(fn: Callable, jobs: Sequence, devices: Sequence[str], *, names: Sequence[str], log=print) -> list[str]:
    """Run ``fn(job, device)`` for every job, one worker process per device, and wait for all.

    ``fn`` must be a module-level function (it is pickled into the workers); each worker runs one
    job at a time. PyTorch's CPU threads are shared out: each worker gets this process's thread
    count divided by the number of workers (at least one).

    Returns:
        one line per failed job, ``"<name> (<error>)"``; an empty list when every job finished.
    """
    if not jobs:
        return []
    n = min(len(devices), len(jobs))
    ctx = get_context("spawn")
    queue = ctx.Queue()
    for d in devices[:n]:
        queue.put(d)
    threads = max(1, torch.get_num_threads() // n)
    log(f"Running {len(jobs)} jobs on {n} devices in parallel ({', '.join(devices[:n])}; {threads} CPU thread(s) each).")
    failed = []
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_pin_worker, initargs=(queue, threads))
    try:
        futures = {pool.submit(_call, fn, job): name for job, name in zip(jobs, names)}
        for future in as_completed(futures):
            name = futures[future]
            try:
                device, seconds = future.result()
            except BrokenProcessPool:
                failed.append(f"{name} (a worker process died, e.g. killed for memory)")
                log(f"{name}: not finished, a worker process died.")
            except Exception as exc:  # noqa: BLE001 - any job error is reported, the others go on
                reason = str(exc).rstrip(".") if isinstance(exc, LeukoError) else f"{type(exc).__name__}: {exc}"
                failed.append(f"{name} ({reason})")
                log(f"{name}: failed ({reason}).")
            else:
                log(f"{name}: finished on {device} in {seconds:.0f} s.")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed
