"""Batched LoRA deltas for a step, plus the slow per-row reference the tests compare against.

Every LoRA-capable projection (a `Linear`, possibly fused: q/k/v or gate/up) owns a `LoRASlots`:
  a:     [num_slots, n_shards * R, in]   (torch path) the shards' A matrices stacked along the
                                         rank axis;
  bt:    [num_slots, n_shards * R, out]  (torch path) each shard's B transposed, scale folded
                                         in, placed in that shard's output columns;
  ap:    [num_slots, n_shards, RP * in]  (C++ path) each shard's A transposed, [in, rp], with
                                         rp = its rank rounded up to 8 (zero columns) and RP = R
                                         rounded up to 8: the kernel streams one rank vector per
                                         input feature;
  bp:    [num_slots, NB, R, 32]          (C++ path) B^T packed in blocks of 32 output columns,
                                         [nb_j, r_j, 32] per shard;
  In both, a slot's shards sit back to back at their real ranks from the start of the slot's
  room (shard j after the adapted shards before it; the shapes above are capacities), so a
  step streams each used slot's A and B as two contiguous runs whatever R is: with R-sized
  places, r=8 adapters in slots of max rank 64 cost 1.5x the same adapters in slots of 8
  (benchmarks/bench_mixed_ranks.py). Hence a slot's shards are written in order after clear().
  ranks: [num_slots, n_shards]           the adapter's real rank per shard (0 = not adapted).
With `pairs` (bf16 activations and adapters on CPUs with AVX512-BF16, see lora.cpp) ap and bp
hold the C++ path's pair layout: A^T as [in/2, rp, 2] and each B block as [re/2, 32, 2], pairs
along the summed axis, re = r_j rounded up to even (a zero row past an odd rank).
So one shrink and one expand give all the deltas of a fused projection: y += (x Aᵀ) Bt.
Slot `num_slots - 1` is never assigned (kept zero). R = max_lora_rank; smaller ranks sit in
the first r rows: the C++ kernel computes only those, the torch path the first rows of its
rank bucket.

Two paths, chosen once per step by the runner (`LoRABatch.build`): the C++ segmented kernel
(CPU, fp32 or bf16 activations, fp32, bf16 or fp16 adapters, fp32 arithmetic: one call per
projection, tokens grouped by adapter, only real ranks computed) and a pure-torch gather + bmm
path (any device/dtype; one gather + bmm pair per rank bucket, each bucket's ranks zero-padded
to its top, a multiple of 8). The adapters' dtype (`lora_dtype`) may differ from the
activations'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.model.context import get_context


def _round8(r: int) -> int:
    return -(-r // 8) * 8


class LoRASlots(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, packed: bool = False,
                 pairs: bool = False, arena=None) -> None:
        """arena: a HugePageArena (CPU) to take the packed layout's ap and bp from, sized with
        packed_shapes (see LoRAManager)."""
        super().__init__()
        self.pairs, ap_shape, bp_shape = self.packed_shapes(in_features, output_sizes, num_slots,
                                                            max_rank, dtype, pairs)
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.rank = max_rank
        n = len(output_sizes)
        self.blocks = [-(-o // 32) for o in output_sizes]  # 32-column blocks per shard
        self.a: torch.Tensor | None = None
        self.bt: torch.Tensor | None = None
        self.ap: torch.Tensor | None = None
        self.bp: torch.Tensor | None = None
        if packed and arena is not None:
            self.ap = arena.take(ap_shape, dtype).zero_()
            self.bp = arena.take(bp_shape, dtype).zero_()
        elif packed:
            self.ap = torch.zeros(ap_shape, device=device, dtype=dtype)
            self.bp = torch.zeros(bp_shape, device=device, dtype=dtype)
        else:
            self.pairs = False
            self.a = torch.zeros(num_slots, n * max_rank, in_features, device=device,
                                 dtype=dtype)
            self.bt = torch.zeros(num_slots, n * max_rank, self.out_features, device=device,
                                  dtype=dtype)
        self.ranks = torch.zeros(num_slots, n, dtype=torch.long)
        self.shard_sizes = torch.tensor(self.output_sizes, dtype=torch.long)

    @staticmethod
    def packed_shapes(in_features: int, output_sizes: list[int], num_slots: int,
                      max_rank: int, dtype: torch.dtype, pairs: bool
                      ) -> tuple[bool, tuple[int, ...], tuple[int, ...]]:
        """(pair layout?, ap's shape, bp's shape) of the C++ path's slots. The pair layout needs
        bf16 and whole pairs along the input axis; else the plain packed one."""
        pairs = pairs and dtype == torch.bfloat16 and in_features % 2 == 0
        r_rows = max_rank + max_rank % 2 if pairs else max_rank
        n, blocks = len(output_sizes), sum(-(-o // 32) for o in output_sizes)
        return (pairs, (num_slots, n, _round8(max_rank) * in_features),
                (num_slots, blocks, r_rows, 32))

    def slot_nbytes(self) -> int:
        """Bytes of one slot's weights (A and B, every shard, padding included)."""
        a, b = (self.ap, self.bp) if self.ap is not None else (self.a, self.bt)
        return (a[0].numel() + b[0].numel()) * a.element_size()

    def clear(self, slot: int) -> None:
        for t in (self.a, self.bt, self.ap, self.bp):
            if t is not None:
                t[slot].zero_()
        self.ranks[slot].zero_()

    def write(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor, scale: float
              ) -> None:
        r, big_r = a.shape[0], self.rank
        rows = slice(shard * big_r, shard * big_r + r)
        a_off = b_off = 0
        if self.ap is not None:
            if bool(self.ranks[slot, shard + 1:].any()):
                raise ValueError("LoRASlots.write: a slot's shards are packed in order, so "
                                 "they must be written in order after clear()")
            a_off, b_off = self._shard_offsets(slot, shard)
            rp, fin = _round8(r), self.in_features
            flat = self.ap[slot].view(-1)[a_off:a_off + rp * fin]
            flat.zero_()
            if self.pairs:  # [in/2, rp, 2]: (A[c][2p], A[c][2p+1]) in lane c of pair row p
                flat.view(fin // 2, rp, 2)[:, :r].copy_(a.t().reshape(fin // 2, 2, r)
                                                        .transpose(1, 2))
            else:
                flat.view(fin, rp)[:, :r].copy_(a.t())
        else:
            self.a[slot, rows].copy_(a)
        bt = b.t() * scale  # [r, out_j]
        if self.bp is not None:
            nb, rows_b = self.blocks[shard], self._b_rows(r)
            padded = bt.new_zeros(rows_b, nb * 32)
            padded[:r, :bt.shape[1]] = bt
            dst = self.bp[slot].view(-1)[b_off:b_off + nb * rows_b * 32]
            if self.pairs:  # each block [re/2, 32, 2]: (Bt[2q][c], Bt[2q+1][c]) in lane c
                dst.view(nb, rows_b // 2, 32, 2).copy_(
                    padded.view(rows_b // 2, 2, nb, 32).permute(2, 0, 3, 1))
            else:
                dst.view(nb, rows_b, 32).copy_(padded.view(rows_b, nb, 32).transpose(0, 1))
        else:
            off = sum(self.output_sizes[:shard])
            self.bt[slot, rows, off:off + bt.shape[1]].copy_(bt)
        self.ranks[slot, shard] = r

    def _shard_offsets(self, slot: int, shard: int) -> tuple[int, int]:
        """Where `shard` starts in the slot's flat A^T and B rooms (elements): after the
        adapted shards before it, each at its real rank (as the kernel computes it)."""
        a_off = b_off = 0
        for j in range(shard):
            r = int(self.ranks[slot, j])
            if r:
                a_off += _round8(r) * self.in_features
                b_off += self.blocks[j] * self._b_rows(r) * 32
        return a_off, b_off

    def _b_rows(self, r: int) -> int:
        """Rows of one packed B block at rank r: r, or r rounded up to even in the pair
        layout."""
        return r + r % 2 if self.pairs else r

    def dense_a(self, slot: int) -> torch.Tensor:
        """[n_shards * R, in] A of a slot, whichever layout holds it (reference and tests)."""
        if self.a is not None:
            return self.a[slot]
        big_r, fin = self.rank, self.in_features
        out = self.ap.new_zeros(len(self.output_sizes) * big_r, fin)
        for j in range(len(self.output_sizes)):
            r = int(self.ranks[slot, j])
            if r == 0:
                continue
            rp, a_off = _round8(r), self._shard_offsets(slot, j)[0]
            flat = self.ap[slot].view(-1)[a_off:a_off + rp * fin]
            at = (flat.view(fin // 2, rp, 2).transpose(1, 2).reshape(fin, rp) if self.pairs
                  else flat.view(fin, rp))
            out[j * big_r:j * big_r + r] = at[:, :r].t()
        return out

    def dense_bt(self, slot: int) -> torch.Tensor:
        """[n_shards * R, out] B^T of a slot, whichever layout holds it (reference and tests)."""
        if self.bt is not None:
            return self.bt[slot]
        big_r = self.rank
        out = self.bp.new_zeros(len(self.output_sizes) * big_r, self.out_features)
        for j, (nb, size) in enumerate(zip(self.blocks, self.output_sizes)):
            r = int(self.ranks[slot, j])
            if r == 0:
                continue
            off, rows_b = sum(self.output_sizes[:j]), self._b_rows(r)
            b_off = self._shard_offsets(slot, j)[1]
            region = self.bp[slot].view(-1)[b_off:b_off + nb * rows_b * 32]
            if self.pairs:
                blk = (region.view(nb, rows_b // 2, 32, 2)
                       .permute(1, 3, 0, 2).reshape(rows_b, nb * 32))
            else:
                blk = region.view(nb, rows_b, 32).transpose(0, 1).reshape(rows_b, nb * 32)
            out[j * big_r:j * big_r + r, off:off + size] = blk[:r, :size]
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_context().lora
        if batch is None:
            return y
        return batch.apply(self, x, y)


@dataclass(slots=True)
class TorchBucket:
    """Groups of one rank bucket on the torch path: `rank` rows of each shard are used (None:
    all R), gather [k, L] (padded with T, a zero row), dest/src: where the valid entries of
    the flattened [k * L] result go in the [T] token axis."""

    rank: int | None
    slots: torch.Tensor
    gather: torch.Tensor
    dest: torch.Tensor
    src: torch.Tensor


@dataclass(slots=True)
class LoRABatch:
    """Per-step LoRA metadata (built once by the runner): tokens grouped by adapter slot.

    tokens/offsets/slots: group g's tokens are tokens[offsets[g]:offsets[g+1]], its slot
    slots[g] (kernel path). buckets: the torch path's groups, bucketed by their adapter's rank
    when the runner gives it (one gather + two bmm per bucket, each at its bucket's rank, so
    an r=8 adapter beside an r=64 one does not pay rank 64). Base-model tokens belong to no
    group.
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    slots: torch.Tensor
    token_slots: torch.Tensor  # [T], -1 = base (reference path and tests)
    kernel: object | None = None
    buckets: list[TorchBucket] | None = None

    @staticmethod
    def build(token_slots: list[int], device: torch.device, kernel: object | None = None,
              slot_ranks: dict[int, int] | None = None) -> LoRABatch | None:
        """slot_ranks: the largest rank of the adapter in each used slot (torch path: rank
        buckets; without it every row pays max_lora_rank)."""
        groups: dict[int, list[int]] = {}
        for t, s in enumerate(token_slots):
            if s >= 0:
                groups.setdefault(s, []).append(t)
        if not groups:
            return None

        def t(v: list) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long, device=device)

        flat = [tok for g in groups.values() for tok in g]
        offsets = [0]
        for g in groups.values():
            offsets.append(offsets[-1] + len(g))
        batch = LoRABatch(t(flat), t(offsets), t(list(groups)), t(token_slots), kernel)
        if kernel is None:
            by_rank: dict[int | None, list[int]] = {}  # rank rounded up to 8 -> slots
            for s in groups:
                r = slot_ranks.get(s) if slot_ranks is not None else None
                by_rank.setdefault(None if r is None else _round8(r), []).append(s)
            n_tok, batch.buckets = len(token_slots), []
            for rank, slots in sorted(by_rank.items(), key=lambda kv: kv[0] or 0):
                width = max(len(groups[s]) for s in slots)
                gather, src, dest = [], [], []
                for i, s in enumerate(slots):
                    toks = groups[s]
                    gather.append(toks + [n_tok] * (width - len(toks)))
                    src.extend(range(i * width, i * width + len(toks)))
                    dest.extend(toks)
                batch.buckets.append(TorchBucket(rank, t(slots), t(gather), t(dest), t(src)))
        return batch

    def apply(self, m: LoRASlots, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            self.kernel(y, x.contiguous(), m.ap, m.bp, m.ranks, m.shard_sizes, self.tokens,
                        self.offsets, self.slots, m.pairs)
            return y
        dt = torch.promote_types(x.dtype, m.a.dtype)  # mixed dtypes: the wider one
        xz = torch.cat((x, x.new_zeros(1, x.shape[1]))).to(dt)  # row T = zero padding
        n_slots, big_r, nsh = m.a.shape[0], m.rank, len(m.output_sizes)
        for b in self.buckets:
            if b.rank is None or b.rank >= big_r:
                a, bt = m.a[b.slots], m.bt[b.slots]  # [k, nsh * R, in], [k, nsh * R, out]
            else:  # only each shard's first `rank` rows are gathered (and read)
                k, r = b.slots.shape[0], b.rank
                a = m.a.view(n_slots, nsh, big_r, -1)[b.slots, :, :r].reshape(k, nsh * r, -1)
                bt = m.bt.view(n_slots, nsh, big_r, -1)[b.slots, :, :r].reshape(k, nsh * r, -1)
            xa = torch.bmm(xz[b.gather], a.transpose(1, 2).to(dt))  # [k, L, nsh * rank]
            d = torch.bmm(xa, bt.to(dt))  # [k, L, out]
            y.index_add_(0, b.dest, d.reshape(-1, d.shape[-1])[b.src].to(y.dtype))
        return y


def reference_delta(m: LoRASlots, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct per-row LoRA delta in float32: [T, out]. For tests only. With
    the pair layout, z = A x is rounded to bf16 before the expand, as that kernel does (and as
    PEFT's bf16 lora_A output is); z itself is summed in float64 here."""
    out = torch.zeros(x.shape[0], m.out_features, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            if m.pairs:
                z = (m.dense_a(s).double() @ x[t].double()).to(torch.bfloat16).float()
            else:
                z = m.dense_a(s).float() @ x[t].float()
            out[t] = z @ m.dense_bt(s).float()
    return out
