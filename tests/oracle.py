"""Helpers comparing loraplex with HF transformers on the same weights (the oracle)."""

from __future__ import annotations

import torch

from loraplex import LLM, SamplingParams


def hf_load(path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                             attn_implementation="eager")
    m.generation_config.eos_token_id = None
    return m.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


def ours_greedy_with_logits(llm: LLM, prompts: list[list[int]], n: int
                            ) -> tuple[list[list[int]], dict[tuple, list[torch.Tensor]]]:
    """Greedy outputs, plus the logits each sampled step saw, keyed by prompt tuple."""
    captured: dict[tuple, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits):
            captured.setdefault(tuple(r.prompt_token_ids), []).append(lg.clone())

    llm.engine.runner.logits_hook = hook
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    finally:
        llm.engine.runner.logits_hook = None
    return [o.outputs[0].token_ids for o in outs], captured


def max_logit_error(hf_model, prompt: list[int], generated: list[int],
                    ours: list[torch.Tensor]) -> float:
    """Our per-step logits vs HF's full-sequence forward at the same positions."""
    ref = hf_logits(hf_model, prompt + generated)
    start = len(prompt) - 1
    assert len(ours) == len(generated)
    return max((ours[j] - ref[start + j]).abs().max().item() for j in range(len(generated)))
