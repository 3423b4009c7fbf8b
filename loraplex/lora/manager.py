"""Adapters at run time: the registry (name -> current version), the CPU copies, and the
device slots that one step's rows index.

Tiers: disk (the PEFT folder, read and validated by `add_lora`) -> CPU (`LoRAAdapter.modules`,
at most `max_cpu_loras` of them, least recently used dropped first and reloaded from disk on
next use; more only while more are pinned, trimmed back on the next use or when the last pin
is released) -> device slots (`max_loras` of them, shared by every projection's `LoRASlots`).
Invariants:
  * a version is pinned (`_users`) from the moment a request is admitted to the engine until it
    finishes or aborts: its CPU copy is never dropped while pinned (not by the CPU LRU, not by
    `remove_lora`, not by a re-add of the same name: in-flight requests finish on their
    version), so a pinned version can always be put into a device slot;
  * a device slot holds one version; it is reassigned only when no RUNNING sequence uses it
    (`_running`), least recently used first. So a step never has more than `max_loras`
    distinct adapters, and a running sequence's slot never changes under it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.config import ConfigError, ModelConfig
from loraplex.lora.adapter import (
    PROJECTIONS,
    AdapterExistsError,
    LoRAAdapter,
    LoRAError,
    load_adapter,
)
from loraplex.lora.buffers import BufferPool
from loraplex.lora.ops import LoRASlots
from loraplex.model.huge_pages import HugePageArena
from loraplex.model.layers import Linear

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str]  # (name, version)


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int = 4  # distinct adapters per step (device slots)
    max_lora_rank: int = 16
    allow_pickle: bool = False
    max_cpu_loras: int | None = None  # CPU copies kept; None = every registered adapter

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                              f"({self.max_loras})")
        if not 1 <= self.max_lora_rank <= 512:
            raise ConfigError(f"max_lora_rank must be in [1, 512], got {self.max_lora_rank}")


class LoRAManager:
    def __init__(self, model: torch.nn.Module, base: ModelConfig, cfg: LoRAConfig,
                 device: torch.device, dtype: torch.dtype, packed: bool = False,
                 pairs: bool = False) -> None:
        self.base, self.cfg, self.device, self.dtype = base, cfg, device, dtype
        num_slots = cfg.max_loras + 1  # the last slot stays zero
        fused_names = sorted({f for f, _ in PROJECTIONS.values()})
        # The C++ path's slots in one block of huge pages (CPU): a step streams every used
        # slot's bytes once, and in 4 KiB pages each page is a TLB miss and a prefetcher stop.
        self.arena: HugePageArena | None = None
        if packed and device.type == "cpu":
            shapes = [LoRASlots.packed_shapes(lin.in_features, lin.output_sizes, num_slots,
                                              cfg.max_lora_rank, dtype, pairs)[1:]
                      for layer in model.model.layers
                      for lin in (layer.get_submodule(f) for f in fused_names)]
            self.arena = HugePageArena.for_tensors((sh, dtype) for pair in shapes for sh in pair)
        # (layer, fused module name) -> LoRASlots attached to that Linear
        self.slots: dict[tuple[int, str], LoRASlots] = {}
        for i, layer in enumerate(model.model.layers):
            for fused in fused_names:
                lin = layer.get_submodule(fused)
                assert isinstance(lin, Linear)
                s = LoRASlots(lin.in_features, lin.output_sizes, num_slots, cfg.max_lora_rank,
                              device, dtype, packed, pairs, self.arena)
                lin.lora = s
                self.slots[(i, fused)] = s
        self._current: dict[str, LoRAAdapter] = {}  # registry: name -> current version
        self._versions: dict[AdapterKey, LoRAAdapter] = {}  # every version still needed
        self._users: Counter[AdapterKey] = Counter()  # live requests' sequences per version
        self._running: Counter[AdapterKey] = Counter()  # RUNNING sequences per version
        self._slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order, oldest first
        self._free_slots = list(range(cfg.max_loras))
        self._cpu_lru: OrderedDict[AdapterKey, None] = OrderedDict()  # CPU copies, oldest first
        self.stats = Counter()
        self.load_seconds: deque[float] = deque(maxlen=4096)  # the latest cold loads
        self.on_load: Callable[[float], None] | None = None  # e.g. a metrics histogram
        # copies read back off the step path (install_copy) whose pin has not come yet: that
        # pin is the lookup already counted as a miss
        self._prefetched: set[AdapterKey] = set()
        self.buffers = BufferPool()  # file buffers of dropped CPU copies, for the next load

    # ---- registry ---------------------------------------------------------------------------
    def add_lora(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load and validate from disk; replaces the current version of `name` for new requests."""
        return self.register(self.load(name, path))

    def load(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read and validate an adapter without registering it. Touches no manager state but
        the counters, so a server runs it on a worker thread, off the step path."""
        return self._load(name, path)

    def register(self, ad: LoRAAdapter, replace: bool = True) -> LoRAAdapter:
        """Make a loaded adapter the current version of its name (step thread only). With
        replace=False a name already registered raises AdapterExistsError: the check and the
        registration are one step-thread call, so two loads of one new name racing through
        their reads cannot both be told they added it."""
        name = ad.name
        old = self._current.get(name)
        if old is not None and not replace:
            self._drop_copy(ad)  # its buffer to the pool (the read still counts as a load)
            raise AdapterExistsError(f"adapter {name!r} is already registered")
        self._current[name] = ad
        self._versions[(name, ad.version)] = ad
        self._cpu_touch((name, ad.version))
        if old is not None and old.version != ad.version:
            self._maybe_drop((name, old.version))
        return ad

    def _load(self, name: str, path: str | Path) -> LoRAAdapter:
        t0 = time.perf_counter()
        ad = load_adapter(name, path, self.base, self.cfg.max_lora_rank, self.dtype,
                          self.cfg.allow_pickle, self.buffers.take, self.buffers.give)
        self.load_seconds.append(time.perf_counter() - t0)
        self.stats["loads"] += 1
        if self.on_load is not None:
            self.on_load(self.load_seconds[-1])
        return ad

    def _cpu_touch(self, key: AdapterKey) -> None:
        """Mark `key`'s CPU copy most recently used; drop the oldest unpinned copies beyond
        max_cpu_loras (pinned ones stay, so the tier may exceed the limit while all are used)."""
        self._cpu_lru[key] = None
        self._cpu_lru.move_to_end(key)
        self._trim_cpu(keep=key)

    def _trim_cpu(self, keep: AdapterKey | None = None) -> None:
        """Drop the oldest unpinned CPU copies (but `keep`'s) while the tier is over
        max_cpu_loras."""
        limit = self.cfg.max_cpu_loras
        if limit is None or len(self._cpu_lru) <= limit:
            return
        for k in list(self._cpu_lru):
            if len(self._cpu_lru) <= limit:
                break
            if self._users[k] == 0 and k != keep:
                del self._cpu_lru[k]
                self._drop_copy(self._versions[k])
                self.stats["cpu_evictions"] += 1

    @property
    def num_cpu_copies(self) -> int:
        return len(self._cpu_lru)

    def remove_lora(self, name: str) -> bool:
        """Unregister `name`: new requests are refused; in-flight ones finish on their version."""
        ad = self._current.pop(name, None)
        if ad is None:
            return False
        self._maybe_drop((name, ad.version))
        return True

    def list_loras(self) -> list[LoRAAdapter]:
        return list(self._current.values())

    def get(self, name: str) -> LoRAAdapter | None:
        return self._current.get(name)

    def _maybe_drop(self, key: AdapterKey) -> None:
        if self._users[key] > 0 or (self._current.get(key[0], None) is not None and \
                self._current[key[0]].version == key[1]):
            return
        ad = self._versions.pop(key, None)
        self._cpu_lru.pop(key, None)
        self._prefetched.discard(key)
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self._clear_slot(slot)
            self._free_slots.append(slot)
        if ad is not None:
            self._drop_copy(ad)

    def _drop_copy(self, ad: LoRAAdapter) -> None:
        """Forget a CPU copy; its file buffer goes to the pool if nothing views it any more
        (a caller still holding a module keeps the buffer alive, and it is simply not reused)."""
        ad.modules = None
        if self._versions.get((ad.name, ad.version)) is ad:  # the registered copy itself
            self._prefetched.discard((ad.name, ad.version))
        raw, ad.raw = ad.raw, None
        self.buffers.give(raw)

    def needs_reload(self, name: str) -> LoRAAdapter | None:
        """The current version of `name` if its CPU copy was dropped (a pin would read disk)."""
        ad = self._current.get(name)
        return ad if ad is not None and ad.modules is None else None

    def install_copy(self, fresh: LoRAAdapter) -> None:
        """Give a dropped CPU copy back its weights, read off the step path by the caller. A
        copy of another version (the name was re-added meanwhile) is ignored."""
        ad = self._current.get(fresh.name)
        if ad is not None and ad.modules is None and ad.version == fresh.version:
            ad.modules, ad.raw = fresh.modules, fresh.raw
            self.stats["cpu_misses"] += 1  # a miss served off the step path
            self._cpu_touch((ad.name, ad.version))  # counted in the tier, as the newest
            self._prefetched.add((ad.name, ad.version))  # its pin is this miss, not a hit
        else:
            self._drop_copy(fresh)

    # ---- request lifetime -------------------------------------------------------------------
    def pin(self, name: str) -> AdapterKey:
        ad = self._current.get(name)
        if ad is None:
            raise LoRAError(f"adapter {name!r} is not loaded")
        if ad.modules is None:  # evicted from the CPU tier: back from disk
            self.stats["cpu_misses"] += 1
            fresh = self._load(name, ad.path)
            if fresh.version != ad.version:
                log.warning("adapter %r changed on disk since it was added; serving the new "
                            "version %s", name, fresh.version)
                self._current[name] = fresh
                self._versions[(name, fresh.version)] = fresh
                self._maybe_drop((name, ad.version))
                ad = fresh
            else:
                ad.modules, ad.raw = fresh.modules, fresh.raw
        elif (name, ad.version) in self._prefetched:
            self._prefetched.discard((name, ad.version))  # counted as a miss when read back
        else:
            self.stats["cpu_hits"] += 1
        key = (name, ad.version)
        self._users[key] += 1
        self._cpu_touch(key)
        return key

    def unpin(self, key: AdapterKey) -> None:
        self._users[key] -= 1
        if self._users[key] <= 0:
            del self._users[key]
            self._maybe_drop(key)
            if not self._users:
                # Idle: a tier that grew past the limit while more adapters were in use
                # shrinks back now, not at some next use. Only when nothing is pinned: a trim
                # under load could drop a copy that a server's prefetch just read back for a
                # request not yet admitted, whose pin would then read the file on the step
                # thread. (Prefetched copies are the most recently used: this trim drops them
                # last, and only if more of them wait than the limit holds.)
                self._trim_cpu()

    # ---- device slots (called by the scheduler) ---------------------------------------------
    def activate(self, key: AdapterKey) -> int | None:
        """Slot of `key` for a sequence about to run, loading it into a slot if needed; None
        when every slot is held by running sequences of other adapters."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            self.stats["slot_hits"] += 1
        else:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                victim = next((k for k in self._slot_of if self._running[k] == 0), None)
                if victim is None:
                    return None
                slot = self._slot_of.pop(victim)
                self.stats["evictions"] += 1
            self._load_slot(slot, self._versions[key])
            self._slot_of[key] = slot
            self.stats["slot_misses"] += 1
        self._running[key] += 1
        return slot

    def rank_of(self, key: AdapterKey) -> int:
        """The largest rank among the modules of a registered version."""
        return self._versions[key].max_rank

    def deactivate(self, key: AdapterKey) -> None:
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]

    def can_activate(self, key: AdapterKey) -> bool:
        return key in self._slot_of or bool(self._free_slots) or any(
            self._running[k] == 0 for k in self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(self._users.values())

    @property
    def num_running(self) -> int:
        return sum(self._running.values())

    def _clear_slot(self, slot: int) -> None:
        for s in self.slots.values():
            s.clear(slot)

    def _load_slot(self, slot: int, ad: LoRAAdapter) -> None:
        self._clear_slot(slot)
        # each fused projection's shards in order: LoRASlots packs them back to back
        for (layer, proj), m in sorted(ad.modules.items(), key=lambda kv: PROJECTIONS[kv[0][1]][1]):
            fused, shard = PROJECTIONS[proj]
            self.slots[(layer, fused)].write(slot, shard, m.a, m.b, m.scale)
