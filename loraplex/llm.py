"""Offline API, as vLLM users know it: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.request import RequestOutput
from loraplex.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu",
                 **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, device=device, **kwargs))

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = Engine(cfg)
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer.hf

    def add_lora(self, name: str, path: str):
        return self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> bool:
        return self.engine.remove_lora(name)

    def list_loras(self):
        return self.engine.list_loras()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora: str | Seq[str | None] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given. Prompts are strings, token id lists
        or dicts with `prompt` or `prompt_token_ids`. `lora`: one adapter name for all prompts,
        or one per prompt (None = base model)."""
        if isinstance(prompts, str | dict) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        loras = list(lora) if isinstance(lora, list | tuple) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(loras)} adapter names")
        return self._run([self._prepare(p, sp, lo) for p, sp, lo in zip(prompts, params, loras)],
                         use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False,
             lora: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        return self.generate([{"prompt_token_ids": tok.encode_chat(c)} for c in convs],
                             sampling_params, use_tqdm, lora=lora)

    def _prepare(self, prompt: PromptType, params: SamplingParams, lora: str | None):
        if isinstance(prompt, dict):
            return self.engine.prepare(prompt.get("prompt"), params,
                                       prompt_token_ids=prompt.get("prompt_token_ids"), lora=lora)
        return self.engine.prepare(prompt, params, lora=lora)

    def _run(self, prepared, use_tqdm: bool) -> list[RequestOutput]:
        order = {p.request_id: i for i, p in enumerate(prepared)}
        for p in prepared:
            self.engine.add_prepared(p)
        results: list[RequestOutput | None] = [None] * len(prepared)
        bar = tqdm(total=len(prepared), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                if out.finished:
                    results[order[out.request_id]] = out
                    bar.update(1)
        bar.close()
        return [r for r in results if r is not None]
