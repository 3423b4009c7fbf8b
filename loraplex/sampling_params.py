"""What a request asks of sampling. Field names and defaults follow vLLM's `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token; 0 = chosen only
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", self.n >= 1, "n must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "top_k must be -1, 0 (disabled) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0,
             "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0,
             "frequency_penalty must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0,
             "repetition_penalty must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1,
             "max_tokens must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "min_tokens must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must be <= max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20,
             "logprobs must be in [0, 20]"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64,
             "seed must fit in 64 bits"),
        ]
        for param, ok, msg in checks:
            if not ok:
                raise SamplingParamsError(param, msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
