"""ModelRunner: turns a ScheduledBatch into tensors and a Context, runs the model, samples.

Owns the physical KV cache ([num_blocks, block_size, Hkv, D] per layer, for K and for V).
Inputs are built as Python lists and turned into one tensor per field.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.config import ModelConfig
from loraplex.engine.batch import SampledToken, ScheduledBatch, ScheduledRow
from loraplex.lora.ops import LoRABatch
from loraplex.model.context import Context, PrefillSegment, set_context
from loraplex.model.llama import LlamaForCausalLM
from loraplex.model.sampler import Sampler


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype,
                 sampler: Sampler, use_kernels: bool = True,
                 lora_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.window = cfg.sliding_window
        self.lora_enabled = lora_dtype is not None  # adapters' dtype, None = LoRA disabled
        self.decode_kernel = None
        from loraplex.kernels import kernels_for, lora_kernel_for

        ops = kernels_for(device, dtype, use_kernels)
        if ops is not None:
            self.decode_kernel = ops.paged_decode_attention
            model.use_cpu_kernels(ops)
            sampler.argmax = ops.argmax_rows  # logits are float32 whatever the model's dtype
        # C++ segmented LoRA delta (CPU, fp32/bf16 activations and adapters), else the torch path
        self.lora_kernel = (lora_kernel_for(device, dtype, lora_dtype, use_kernels)
                            if lora_dtype is not None else None)
        # Test hook: called with (sampled rows, their fp32 logits) before sampling.
        self.logits_hook: Callable[[list[ScheduledRow], torch.Tensor], None] | None = None
        shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device)
                         for _ in range(cfg.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device)
                         for _ in range(cfg.num_layers)]
        for layer, kc, vc in zip(model.model.layers, self.k_caches, self.v_caches):
            layer.self_attn.attn.k_cache = kc
            layer.self_attn.attn.v_cache = vc

    def _tensor(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _causal_mask(self, q_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        # q_pos: [q] absolute positions -> [1, 1, q, kv_len] bool, True = visible.
        keys = torch.arange(kv_len, device=self.device)
        mask = keys.unsqueeze(0) <= q_pos.unsqueeze(1)
        if self.window is not None:
            mask &= keys.unsqueeze(0) > q_pos.unsqueeze(1) - self.window
        return mask.view(1, 1, *mask.shape)

    def _forward_order(self, rows: list[ScheduledRow]) -> list[int]:
        """Indices of `rows` in the order the forward lays out their tokens: one-token (decode) rows
        first, as build_context expects, and within each kind the rows of one adapter next to
        each other (stable; base rows first). A row's result does not depend on where it sits.

        Why: the LoRA kernel's work items are runs of up to 8 tokens of one adapter, split
        between the threads in order, and it adds into the rows of y it owns. With one adapter's
        rows scattered (requests arrive in any order), each thread dirtied rows all over y, and
        the ops after it, which split rows in contiguous halves, found half of theirs dirty in
        the other core's cache (our reading of the timers that follow). Timers around each part
        of the step (benchmarks/probe_step_parts.py: SmolLM2 fp32, 64 decode rows over 8
        adapters round-robin, Zen 4 VM, two runs) put 1.4-3.8 ms of LoRA's extra a step outside
        the LoRA op: +0.3-1.3 in the base GEMMs, +0.3-0.6 in the norms, the rest in attention
        and the activations; with the rows grouped, 0.0-0.4 ms (GEMMs -0.5 to +0.1, norms ±0.1).
        benchmarks/ab_row_order.py, both layouts in one run: extra per step at k=8 fp32 10.1 ->
        7.4 ms (0.920x -> 0.939x the base), bf16 4.8 -> 4.5 ms; k=32 fp32 25.5 -> 23.3 ms; k=1
        (one layout either way) and a quarter of the rows on the base model: unchanged within
        noise."""
        if not self.lora_enabled:
            return list(range(len(rows)))
        return sorted(range(len(rows)),
                      key=lambda i: (len(rows[i].token_ids) != 1, rows[i].adapter_slot))

    def build_context(self, rows: list[ScheduledRow]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        bs = self.block_size
        hkv = self.cfg.num_kv_heads
        input_ids: list[int] = []
        positions: list[int] = []
        base_rows: list[int] = []  # row of (token, head 0); head h adds h * bs
        for r in rows:
            input_ids.extend(r.token_ids)
            table = r.block_table
            for pos in range(r.start_pos, r.start_pos + len(r.token_ids)):
                positions.append(pos)
                base_rows.append(table[pos // bs] * hkv * bs + pos % bs)
        head_off = torch.arange(hkv, device=self.device) * bs
        kv_rows = (self._tensor(base_rows).unsqueeze(1) + head_off).reshape(-1)  # [T * Hkv]
        ctx = Context(kv_rows=kv_rows)
        if self.lora_enabled:
            slots = [r.adapter_slot for r in rows for _ in range(len(r.token_ids))]
            ranks = (None if self.lora_kernel is not None  # only the torch path buckets ranks
                     else {r.adapter_slot: r.adapter_rank for r in rows if r.adapter_slot >= 0})
            ctx.lora = LoRABatch.build(slots, self.device, self.lora_kernel, ranks)
        decode = [r for r in rows if len(r.token_ids) == 1]
        nd = len(decode)
        ctx.num_decode = nd
        if nd:
            nblk = max((r.start_pos // bs) + 1 for r in decode)
            ctx.decode_block_tables = self._tensor(
                [r.block_table[:nblk] + [0] * (nblk - min(nblk, len(r.block_table)))
                 for r in decode])
            if self.decode_kernel is not None:
                ctx.decode_kernel = self.decode_kernel
                ctx.decode_context_lens = self._tensor([r.start_pos + 1 for r in decode])
                ctx.sliding_window = self.window or 0
            else:
                q_pos = self._tensor([r.start_pos for r in decode])  # [B]
                keys = torch.arange(nblk * bs, device=self.device).unsqueeze(0)
                mask = keys <= q_pos.unsqueeze(1)
                if self.window is not None:
                    mask &= keys > q_pos.unsqueeze(1) - self.window
                ctx.decode_mask = mask.view(nd, 1, 1, nblk * bs)
        t = nd
        for r in rows[nd:]:
            q = len(r.token_ids)
            kv_len = r.start_pos + q
            windowed = self.window is not None and kv_len > self.window
            if r.start_pos == 0 and not windowed:
                seg = PrefillSegment(t, t + q, 0, None, None)
            else:
                nblk = -(-kv_len // bs)
                q_pos = torch.arange(r.start_pos, kv_len, device=self.device)
                block_ids = self._tensor(r.block_table[:nblk]) if r.start_pos else None
                mask = self._causal_mask(q_pos, kv_len)
                seg = PrefillSegment(t, t + q, r.start_pos, block_ids, mask)
            ctx.prefills.append(seg)
            t += q
        return self._tensor(input_ids), self._tensor(positions), ctx

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        self.sampler.drop(batch.finished_seq_ids)
        if batch.is_empty:
            return []
        order = self._forward_order(batch.rows)
        rows = [batch.rows[i] for i in order]
        input_ids, positions, ctx = self.build_context(rows)
        last = [0] * len(rows)  # batch row -> index of its last token in the forward
        t = 0
        for i, r in zip(order, rows):
            t += len(r.token_ids)
            last[i] = t - 1
        # sampled in the scheduler's order, whatever the forward's layout
        sample = [i for i, r in enumerate(batch.rows) if r.sample]
        sample_rows = [batch.rows[i] for i in sample]
        last_idx = [last[i] for i in sample]
        set_context(ctx)
        try:
            hidden = self.model(input_ids, positions)  # [T, hidden]
        finally:
            set_context(None)
        if not sample_rows:
            return []
        logits = self.model.compute_logits(hidden[self._tensor(last_idx)])  # [R, vocab]
        if self.logits_hook is not None:
            self.logits_hook(sample_rows, logits)
        return self.sampler(logits, sample_rows)
