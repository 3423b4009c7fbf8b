"""Continuous batching: which sequences run this step and how many tokens each computes.

Policy (FCFS with recompute preemption, chunked prefill):
1. Running sequences first, in admission order. Each computes all its pending tokens up to the
   step's token budget (a decode row is 1 token; a prompt that does not fit is chunked). When the
   KV pool is out of blocks, the most recently admitted running sequence is preempted: its blocks
   are freed and it goes back to the front of the waiting queue to be recomputed later.
2. If nothing was preempted, waiting sequences are admitted in arrival order while the budget,
   `max_num_seqs` and free blocks allow.
Prefill and decode rows share one step, so a long prompt never stalls running streams.

With LoRA, a waiting sequence also needs its adapter in a device slot; at most `max_loras`
distinct adapters run at once. A sequence whose adapter cannot get a slot is passed over, and
later requests whose adapters are resident go first, but only for `max_bypass` steps: after
that nothing behind it is admitted until a slot frees up, so every request is admitted within
a bounded number of steps.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING

from loraplex.config import SchedulerConfig
from loraplex.engine.batch import SampledToken, ScheduledBatch, ScheduledRow
from loraplex.engine.block_manager import BlockManager
from loraplex.request import SeqStatus, Sequence

if TYPE_CHECKING:
    from loraplex.lora.manager import LoRAManager


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: tuple[int, ...] = (), lora: LoRAManager | None = None,
                 max_bypass: int = 32) -> None:
        self.cfg = cfg
        self.bm = block_manager
        self.lora = lora
        self.max_bypass = max_bypass
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._finished_since_last: list[int] = []
        self.num_preemptions = 0
        self.vtc: dict[str | None, float] = {}  # tenant -> tokens served / weight
        self._live: Counter[str | None] = Counter()  # tenant -> sequences waiting or running

    # ---- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_needed(seq, min(seq.num_tokens + 1, self.cfg.max_model_len))
        if need > self.bm.num_blocks:
            raise ValueError(f"sequence of {seq.num_tokens} tokens needs {need} KV blocks but the "
                             f"cache has only {self.bm.num_blocks}")
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)
        t = seq.tenant
        if self._live[t] == 0:  # (re)joining: no credit banked while idle
            busy = [self.vtc.get(u, 0.0) for u, n in self._live.items() if n > 0]
            self.vtc[t] = max(self.vtc.get(t, 0.0), min(busy)) if busy else \
                self.vtc.get(t, 0.0)
        self._live[t] += 1

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End `seq` (stop, length or abort): frees its blocks at once. Idempotent."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release_slot(seq)
        else:
            self.waiting.remove(seq)
        self.bm.free(seq)
        if seq.adapter is not None and self.lora is not None:
            self.lora.unpin(seq.adapter)
        self._live[seq.tenant] -= 1
        if self._live[seq.tenant] <= 0:
            del self._live[seq.tenant]
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        del self.seqs[seq.seq_id]
        self._finished_since_last.append(seq.seq_id)

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------
    def _release_slot(self, seq: Sequence) -> None:
        if seq.adapter is not None and self.lora is not None:
            self.lora.deactivate(seq.adapter)
        seq.adapter_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_slot(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        planned: list[tuple[Sequence, int]] = []
        preempted: list[int] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                planned.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `seq` preempted itself: nothing later in `running` can fit either

        for seq in self._admission_order() if not preempted else []:
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            if seq.adapter is not None and self.lora is not None \
                    and not self.lora.can_activate(seq.adapter):
                seq.bypassed += 1
                if seq.bypassed > self.max_bypass:
                    break  # starvation guard: admit nobody behind it until a slot frees up
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, seq.num_computed_tokens + num_new):
                break
            if seq.adapter is not None and self.lora is not None:
                slot = self.lora.activate(seq.adapter)
                assert slot is not None  # can_activate said so, and nothing ran in between
                seq.adapter_slot = slot
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            planned.append((seq, num_new))
            budget -= num_new

        rows = [self._row(seq, n) for seq, n in planned]
        # Decode rows (one token) first: the runner's attention handles them as one batch.
        rows.sort(key=lambda r: len(r.token_ids) != 1)
        finished, self._finished_since_last = self._finished_since_last, []
        return ScheduledBatch(rows=rows, finished_seq_ids=finished, preempted_seq_ids=preempted)

    def _admission_order(self) -> list[Sequence]:
        """Preempted sequences first, then lowest tenant counter, then arrival (stable sort)."""
        if len(self._live) <= 1:
            return list(self.waiting)  # one tenant: the queue order is already right
        vtc = self.vtc
        return sorted(self.waiting, key=lambda s: (s.num_preemptions == 0, vtc.get(s.tenant, 0.0)))

    def _row(self, seq: Sequence, num_new: int) -> ScheduledRow:
        start = seq.num_computed_tokens
        return ScheduledRow(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids[start:start + num_new],
            start_pos=start,
            block_table=seq.block_table,
            sample=start + num_new == seq.num_tokens,
            params=seq.params,
            seed=seq.seed,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            adapter_slot=seq.adapter_slot,
            adapter_rank=(self.lora.rank_of(seq.adapter)
                          if seq.adapter_slot >= 0 and self.lora is not None else 0),
        )

    def update(self, batch: ScheduledBatch, sampled: list[SampledToken]) -> list[Sequence]:
        """Account computed tokens, append sampled ones, finish sequences on stop/length.

        Returns the sequences that received a new token (finished ones included).
        """
        for row in batch.rows:
            seq = self.seqs.get(row.seq_id)
            if seq is not None:
                seq.num_computed_tokens += len(row.token_ids)
                self.vtc[seq.tenant] = self.vtc.get(seq.tenant, 0.0) \
                    + len(row.token_ids) / seq.tenant_weight
        touched: list[Sequence] = []
        for s in sampled:
            seq = self.seqs.get(s.seq_id)
            if seq is None:  # aborted while the step ran
                continue
            self.vtc[seq.tenant] = self.vtc.get(seq.tenant, 0.0) + 2.0 / seq.tenant_weight
            seq.token_ids.append(s.token_id)
            if seq.logprobs is not None:
                entry = dict(s.top_logprobs or {})
                entry[s.token_id] = s.logprob if s.logprob is not None else 0.0
                seq.logprobs.append(entry)
            if s.logprob is not None:
                seq.cumulative_logprob += s.logprob
            touched.append(seq)
            self._check_stop(seq, s.token_id)
        return touched

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                self.finish(seq, "stop", token)
                return
            if not p.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop", None)
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or \
                seq.num_tokens >= self.cfg.max_model_len:
            self.finish(seq, "length")
