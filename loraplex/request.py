"""A sequence's state as the scheduler sees it, and the outputs handed back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.sampling_params import SamplingParams
    from loraplex.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion being generated. A request with `n` > 1 owns n sequences.

    Invariants: `token_ids` = prompt + generated tokens; `num_computed_tokens` tokens of it have
    their K/V in the blocks of `block_table`; while RUNNING the table covers every computed token.
    After a preemption the table is empty and `num_computed_tokens` is 0 (recompute).
    """

    __slots__ = (
        "adapter",
        "adapter_slot",
        "arrival_time",
        "block_table",
        "bypassed",
        "cumulative_logprob",
        "detok",
        "finish_reason",
        "first_token_time",
        "index",
        "logprobs",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "params",
        "prompt_token_ids",
        "request_id",
        "seed",
        "seq_id",
        "status",
        "stop_reason",
        "tenant",
        "tenant_weight",
        "text",
        "token_ids",
    )

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int | None, arrival_time: float | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.status = SeqStatus.WAITING
        self.params = params
        self.seed = seed
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.detok: IncrementalDetokenizer | None = None
        self.text = ""
        # LoRA: (name, version) pinned for the sequence's whole life; device slot while RUNNING.
        self.adapter: tuple[str, str] | None = None
        self.adapter_slot = -1
        self.bypassed = 0  # steps it waited while later requests were admitted before it
        # Fair sharing: who the request is for (None = the default tenant) and their weight.
        self.tenant: str | None = None
        self.tenant_weight = 1.0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # One dict per generated token: token id -> logprob (the chosen token always included).
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, Any] = field(default_factory=dict)
