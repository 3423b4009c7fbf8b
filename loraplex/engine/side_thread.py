"""Threads that run torch ops beside the step thread without slowing it down.

Why this exists (measured on the 2-core CPU): a second thread that runs a single OpenMP-parallel
torch op (an adapter load's dtype conversion or NaN check) gets its own OpenMP team from
libgomp. While that thread lives, idle or not, libgomp manages more threads than there are
cores and throttles spin-waiting for every team, so the step thread's team falls asleep between
parallel regions and is woken by a syscall for each of the ~300 regions of a decode step. One
stream went from 18 to 26-32 ms per token (to 18 again once the side thread exited); in the
server this hit every request after the first `--lora-dir` load, which ran on asyncio's default
executor. A side thread whose OpenMP team size is 1 never builds a team: its torch ops run
inline on that thread, and the step thread keeps its speed.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

log = logging.getLogger(__name__)


@cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp, or Intel's / LLVM's), if any (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libiomp", "libomp")):
            try:
                return ctypes.CDLL(path)  # the already loaded library, not a second copy
            except OSError:
                continue
    return None


def single_threaded_torch() -> bool:
    """Make the calling thread's torch ops run without an OpenMP team (this thread only; the
    step thread keeps its threads). Returns False if no OpenMP runtime was found."""
    torch.get_num_threads()  # ATen's per-thread lazy init first, so it cannot undo the next line
    omp = _openmp_runtime()
    if omp is None:
        return False
    omp.omp_set_num_threads(1)  # this thread's ICV: ATen's parallel_for then runs inline
    return True


def side_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread for work beside the step thread (adapter reads and checks), whose
    torch ops never start an OpenMP team."""

    def init() -> None:
        if not single_threaded_torch():
            log.debug("no OpenMP runtime found; %s threads use torch's defaults", name)

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=init)
