"""Paged KV cache bookkeeping: fixed-size blocks, a free list, one block table per sequence.

The physical KV tensors live in the runner; this class only hands out block ids. Invariant: a
block id is either in the free list or owned by exactly one sequence's block table, never both,
so `num_free + sum(len(table))` is always `num_blocks` (checked by `assert_consistent`).
"""

from __future__ import annotations

from collections import deque

from loraplex.config import cdiv
from loraplex.request import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: list[int | None] = [None] * num_blocks  # block id -> seq_id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s table to cover `num_tokens` tokens; all or nothing."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            b = self._free.popleft()
            self._owner[b] = seq.seq_id
            seq.block_table.append(b)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` to the free list. Idempotent."""
        for b in seq.block_table:
            if self._owner[b] != seq.seq_id:
                raise RuntimeError(f"block {b} freed by seq {seq.seq_id} but owned by "
                                   f"{self._owner[b]}")
            self._owner[b] = None
            self._free.append(b)
        seq.block_table = []

    def assert_consistent(self) -> None:
        owned = sum(o is not None for o in self._owner)
        if owned + len(self._free) != self.num_blocks or len(set(self._free)) != len(self._free):
            raise AssertionError(f"block leak: {owned} owned + {len(self._free)} free != "
                                 f"{self.num_blocks}")
