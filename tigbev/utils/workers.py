"""DataLoader worker processes that never outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["exit_with_parent", "stopping_workers"]

_T = TypeVar("_T")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` after which every worker dies with the process that started it, even when that
    process is killed with SIGKILL and runs no clean-up of its own (a worker whose queue's feeder thread is blocked
    writing a large sample into the pipe would otherwise live on, reparented to init, holding its memory).

    Linux: each worker asks the kernel for a SIGKILL on its parent's death, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``
    through libc (ctypes), then checks that its parent is still the process that built the loader, so a parent that
    died before the request took effect is caught too. The kernel sends the signal when the *thread* that started
    the worker ends: iterate the loader from a thread that lives as long as the run (the stages use the main thread).
    Other systems: nothing is done (torch's own watchdog still ends a worker whose parent is gone once it is idle).
    """
    return functools.partial(_die_with, os.getpid())


def _die_with(parent: int, worker_id: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc symbols to reach: leave the worker as torch made it
        return
    if prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
             ctypes.c_ulong(0)) == 0 and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def stopping_workers(loader: Iterable[_T]) -> Iterator[Iterator[_T]]:
    """``iter(loader)``, whose worker processes are stopped as the block is left, an error included.

    torch stops a loader's workers when its iterator is collected; an error's traceback keeps the iterator alive,
    and when the garbage collector takes the cycle later, the queues that tell the workers to exit may be finalised
    first: each worker is then waited for 5 s before it is killed (in a long-lived process: a test, a pipeline
    that runs several stages)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        stop = getattr(batches, "_shutdown_workers", None)  # torch's shutdown of a multi-process iterator
        if stop is not None:
            stop()
