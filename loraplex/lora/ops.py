"""Batched LoRA deltas for a step, plus the slow per-row reference the tests compare against.

Every LoRA-capable projection (a `Linear`, possibly fused: q/k/v or gate/up) owns a `LoRASlots`:
  a: [num_slots, n_shards * R, in]   the shards' A matrices stacked along the rank axis;
  b: [num_slots, out, n_shards * R]  block-diagonal: shard j's rows use columns j*R:(j+1)*R,
                                     with the adapter's scale folded in.
So a fused projection gets all its deltas from one shrink and one expand: y += (x Aᵀ) Bᵀ.
Slot `num_slots - 1` is never assigned (kept zero). R = max_lora_rank; smaller ranks are
zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.model.context import get_context


class LoRASlots(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.rank = max_rank
        n = len(output_sizes)
        self.a = torch.zeros(num_slots, n * max_rank, in_features, device=device, dtype=dtype)
        self.b = torch.zeros(num_slots, self.out_features, n * max_rank, device=device,
                             dtype=dtype)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def write(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor, scale: float
              ) -> None:
        r, big_r = a.shape[0], self.rank
        off = sum(self.output_sizes[:shard])
        self.a[slot, shard * big_r:shard * big_r + r].copy_(a)
        self.b[slot, off:off + b.shape[0], shard * big_r:shard * big_r + r].copy_(b * scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_context().lora
        if batch is None:
            return y
        return batch.apply(self, x, y)


@dataclass(slots=True)
class LoRABatch:
    """Per-step LoRA metadata (built once by the runner): tokens grouped by adapter slot.

    gather: [k, L] token index per (group, position), padded with T (a zero row);
    slots: [k] the device slot of each group; dest/src: where the valid (non-pad) entries of
    the flattened [k * L] result go in the [T] token axis. Base-model tokens are in no group.
    """

    gather: torch.Tensor
    slots: torch.Tensor
    dest: torch.Tensor
    src: torch.Tensor
    token_slots: torch.Tensor  # [T], -1 = base (reference path and tests)

    @staticmethod
    def build(token_slots: list[int], device: torch.device) -> LoRABatch | None:
        groups: dict[int, list[int]] = {}
        for t, s in enumerate(token_slots):
            if s >= 0:
                groups.setdefault(s, []).append(t)
        if not groups:
            return None
        n_tok = len(token_slots)
        width = max(len(g) for g in groups.values())
        gather, dest, src = [], [], []
        for i, toks in enumerate(groups.values()):
            gather.append(toks + [n_tok] * (width - len(toks)))
            dest.extend(toks)
            src.extend(range(i * width, i * width + len(toks)))

        def t(v: list) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long, device=device)

        return LoRABatch(t(gather), t(list(groups)), t(dest), t(src), t(token_slots))

    def apply(self, m: LoRASlots, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xz = torch.cat((x, x.new_zeros(1, x.shape[1])))  # row T = zeros for padding
        xs = xz[self.gather]  # [k, L, in]
        xa = torch.bmm(xs, m.a[self.slots].transpose(1, 2))  # [k, L, nR]
        d = torch.bmm(xa, m.b[self.slots].transpose(1, 2))  # [k, L, out]
        y.index_add_(0, self.dest, d.reshape(-1, d.shape[-1])[self.src])
        return y


def reference_delta(m: LoRASlots, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct per-row LoRA delta: [T, out]. For tests only."""
    out = torch.zeros(x.shape[0], m.out_features, dtype=x.dtype, device=x.device)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            out[t] = m.b[s] @ (m.a[s] @ x[t])
    return out
