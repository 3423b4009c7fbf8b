"""One block of memory in transparent huge pages, carved into tensors: for weights a kernel
streams from memory every step (the AMX GEMM's packed weights, the LoRA kernel's slots).

Why: a decode step streams every weight once, 4 KiB page after 4 KiB page; each page costs a
TLB miss (a two-level walk in a VM) and stops the hardware prefetchers. With the AMX GEMM's
packed weights in 2 MiB pages its calls took 0.81-0.94x the time with the weights coming from
memory (Intel AMX VM, against 4 KiB pages allocated at the same time; RESULTS.md, session 19).

The block is an anonymous mmap advised MADV_HUGEPAGE (Linux; honoured when
/sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise"). Where that is not
available, or with LORAPLEX_NO_HUGE_PAGES=1 (for comparisons), the same code runs on ordinary
pages. The tensors are views of the block: the arena
must outlive them (the model keeps it).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

HUGE = 2 << 20  # bytes in an x86-64 huge page
ALIGN = 4096    # each tensor starts on a page: no two share a line or a page


class HugePageArena:
    def __init__(self, nbytes: int) -> None:
        """Room for `nbytes` of tensors (each rounded up to ALIGN), in huge pages if the OS
        gives them."""
        self.size = max(HUGE, -(-nbytes // HUGE) * HUGE)
        # One huge page more, so that the usable part can start on a huge-page boundary.
        self._map = mmap.mmap(-1, self.size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        start = -whole.data_ptr() % HUGE
        self._bytes = whole[start:start + self.size]
        self.advised = False
        wanted = not os.environ.get("LORAPLEX_NO_HUGE_PAGES")
        if wanted and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, start, self.size)
                self.advised = True
            except OSError as e:  # no THP in this kernel: ordinary pages, same results
                log.info("huge pages not available for packed weights (%s)", e)
        self.used = 0

    def contains(self, t: torch.Tensor) -> bool:
        """Whether all of `t`'s memory lies in the arena."""
        lo = self._bytes.data_ptr()
        return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + self.size

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype` in the arena."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        end = self.used + nbytes
        if end > self.size:
            raise ValueError(f"HugePageArena: {nbytes} bytes do not fit ({self.size - self.used} "
                             f"of {self.size} left)")
        t = self._bytes[self.used:end].view(dtype).view(tuple(shape))
        self.used = -(-end // ALIGN) * ALIGN
        return t

    @classmethod
    def for_tensors(cls, specs: Iterable[tuple[Sequence[int], torch.dtype]]) -> HugePageArena:
        """An arena with exactly the room for tensors of these (shape, dtype)."""
        return cls(sum(cls.room(math.prod(shape) * torch.empty((), dtype=dt).element_size())
                       for shape, dt in specs))

    @staticmethod
    def room(nbytes: int) -> int:
        """Arena bytes one tensor of `nbytes` takes (its size rounded up to ALIGN)."""
        return -(-nbytes // ALIGN) * ALIGN
