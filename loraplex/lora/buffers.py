"""Recycled byte buffers for adapter files.

A CPU copy of an adapter is one flat tensor viewing a buffer (adapter.ModuleTable): the one its
safetensors file was read into, or, when its weights were converted to another dtype, the one
they were converted into. Fresh anonymous memory is expensive to touch for the first time:
every 4 KiB page faults, and on a VM the hypervisor backs each never-used guest page on that
first fault (measured on the 2-core dev VM: 20 MB cost ~54 ms of page faults on never-touched
guest memory and ~10 ms on recycled guest memory, against ~1 ms to read the same file into a
buffer the process already holds). A server with a full CPU tier drops one copy for each one it
loads, so handing the dropped copy's buffer to the next load takes page faults off the
cold-load path.

Invariant: a buffer goes back to the pool only when nothing views it any more. The adapter
reader makes every tensor through one `memoryview` of the bytearray; `torch.frombuffer` keeps
that memoryview alive while any tensor (or view of one) lives, and a live memoryview is a buffer
export, which makes CPython refuse to resize the bytearray. So a resize attempt is an exact test,
not a refcount guess. (frombuffer on the bytearray itself would not do: it holds a reference but
no export, and resizing would move memory under the tensors.)"""

from __future__ import annotations

import threading


def _unexported(buf: bytearray) -> bool:
    """True when no memoryview of `buf` lives (so no tensor made through one); CPython refuses
    to resize an exported bytearray. The one-byte round trip moves no data."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class BufferPool:
    """At most `max_buffers` idle buffers, handed out best-fit. Thread-safe: adapters are read
    on worker threads while the step thread drops copies."""

    def __init__(self, max_buffers: int = 4, slack: float = 1.25) -> None:
        self.max_buffers = max_buffers
        self.slack = slack  # take a pooled buffer only if at most this much larger than asked
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        """A buffer of at least `size` bytes (its tail beyond `size` is garbage)."""
        with self._lock:
            fits = [b for b in self._idle if size <= len(b) <= self.slack * size + 65536]
            if fits:
                best = min(fits, key=len)
                self._idle.remove(best)
                self.reused += 1
                return best
            self.allocated += 1
        return bytearray(size)

    def give(self, buf: bytearray | None) -> bool:
        """Offer a buffer back; kept only if nothing views it and the pool has room."""
        if buf is None or not isinstance(buf, bytearray) or not _unexported(buf):
            return False
        with self._lock:
            if len(self._idle) >= self.max_buffers:
                self._idle.remove(min(self._idle, key=len))  # keep the larger ones
            self._idle.append(buf)
        return True

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._idle)
