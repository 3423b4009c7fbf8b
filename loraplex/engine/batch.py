"""`ScheduledBatch`: the only contract between the scheduler and the runner.

The runner reads nothing else of the scheduler's state. Lists referenced here (token ids, block
tables) belong to the scheduler and are read-only for the runner during `execute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledRow:
    seq_id: int
    # Tokens whose K/V this step computes: seq.token_ids[start_pos : start_pos + len(token_ids)].
    token_ids: list[int]
    # Absolute position of token_ids[0]; equals the number of tokens already in the KV cache.
    start_pos: int
    # Physical block ids covering positions [0, start_pos + len(token_ids)).
    block_table: list[int]
    # True when the row's last token is the sequence's last token: its logits are sampled.
    sample: bool
    params: SamplingParams
    # Per-sequence seed (request seed + completion index) or None for the engine's generator.
    seed: int | None
    # Prompt and generated tokens so far (penalties, min_tokens); read-only.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Device adapter slot for this row; -1 = base model only (filled by the LoRA scheduler).
    adapter_slot: int = -1
    # The largest rank of that adapter's modules (0 for the base): the torch LoRA path
    # buckets rows by it.
    adapter_rank: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class ScheduledBatch:
    rows: list[ScheduledRow]
    # Sequences that finished or were aborted since the previous batch: the runner drops any
    # per-sequence state it keeps (seeded generators).
    finished_seq_ids: list[int] = field(default_factory=list)
    # Preempted this step (their KV is gone; they will be recomputed).
    preempted_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


@dataclass(slots=True)
class SampledToken:
    """What the runner returns for one sampled row."""

    seq_id: int
    token_id: int
    logprob: float | None = None  # logprob of token_id under the model (raw, before processing)
    top_logprobs: dict[int, float] | None = None
