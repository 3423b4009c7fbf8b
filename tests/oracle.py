"""Helpers comparing loraplex with HF transformers on the same weights (the oracle)."""

from __future__ import annotations

import pytest
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


def assert_bf16_as_close_as_hf(llm: LLM, fp32_model, hf16_model, prompts: list[list[int]],
                               n: int, min_effect: float, label: str = "") -> None:
    """Teacher-forced on our greedy tokens: our bf16 logits are no further from the fp32 model
    than transformers' own bf16 run (`hf16_model`) is, worst prompt within 1.5x and the sum
    within 1.25x (one prompt alone varies +-30% either way with bf16's noise). `min_effect`:
    bf16 must move HF's logits at least this much, so the bound is not vacuous."""
    ours, logits = ours_greedy_with_logits(llm, prompts, n)
    ours_err, hf_err = [], []
    for p, toks in zip(prompts, ours):
        start = len(p) - 1
        theirs = list(hf_logits(hf16_model, p + toks)[start:start + len(toks)])
        ours_err.append(max_logit_error(fp32_model, p, toks, logits[tuple(p)]))
        hf_err.append(max_logit_error(fp32_model, p, toks, theirs))
    assert min(hf_err) > min_effect, f"{label}: HF bf16 errors {hf_err}"
    assert max(ours_err) <= 1.5 * max(hf_err), f"{label}: ours {ours_err}, HF bf16 {hf_err}"
    assert sum(ours_err) <= 1.25 * sum(hf_err), f"{label}: ours {ours_err}, HF bf16 {hf_err}"


def _amx_gemm_here() -> bool:
    from loraplex.kernels import amx_gemm_supported

    return amx_gemm_supported()


# cpu_gemm "amx" tests: only where the CPU (and build, and OS) run AMX-BF16
needs_amx = pytest.mark.skipif(not _amx_gemm_here(), reason="no AMX-BF16 here")
