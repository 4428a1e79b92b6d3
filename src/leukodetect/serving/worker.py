"""One inference thread: requests queue for the model instead of competing for the CPU.

The event loop only reads uploads and writes answers; decoding, preprocessing, the forward pass and
Grad-CAM run in a single worker thread, one request at a time. That keeps the process from
oversubscribing a small machine (N requests each running a multi-threaded forward pass would fight
over the same cores and all get slower), lets PyTorch use every core for the one batch it is
working on, and makes Grad-CAM safe: it hooks the model's layers, which two concurrent calls would
tangle.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class Busy(Exception):
    """More requests are waiting than the queue holds."""


class InferenceWorker:
    """Run functions in one dedicated thread, in arrival order, from async code.

    Args:
        torch_threads: intra-op threads for PyTorch, set once when the thread starts (None: leave
            PyTorch's setting alone, as tests do). The setting is process-wide; the server passes the
            number of available cores, since only this one thread computes.
        max_pending: requests allowed to wait or run at once; one more gets :class:`Busy` (HTTP
            503) rather than holding its upload in memory for minutes.
    """

    def __init__(self, *, torch_threads: int | None = None, max_pending: int = 64) -> None:
        self.torch_threads = torch_threads
        self.max_pending = max_pending
        self.pending = 0
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _init_thread(self) -> None:
        if self.torch_threads:

            torch.set_num_threads(self.torch_threads)

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:  # started on first use, again after close()
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="leukodetect-inference", initializer=self._init_thread
                )
            return self._executor

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Queue ``fn(*args)`` for the worker thread and wait for its result without blocking the loop."""
        if self.pending >= self.max_pending:
            raise Busy(f"{self.pending} requests are already waiting for the model")
        self.pending += 1  # only touched from the event loop thread
        try:
            return await asyncio.get_running_loop().run_in_executor(self._get_executor(), fn, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        """Stop the thread after the work already queued (called when the app shuts down)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
