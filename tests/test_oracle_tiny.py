"""Tiny random-weight models of every family vs HF transformers: logits and greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex import LLM

from oracle import (
    assert_bf16_as_close_as_hf,
    hf_greedy,
    hf_load,
    max_logit_error,
    needs_amx,
    ours_greedy_with_logits,
)

FAMILIES = ["llama", "llama3_rope", "mistral", "mistral_window", "qwen2", "qwen3", "llama_bias",
            "qwen3_bias", "mistral_keys", "qwen2_keys"]
N_NEW = 24


def _prompts(k: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(3, 60))] for _ in range(k)]


@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpp-attn", "torch-attn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_hf(tiny_model_factory, family, use_kernels):
    path = tiny_model_factory(family)
    hf = hf_load(path)
    llm = LLM(str(path), dtype="float32", max_model_len=256, block_size=8, use_kernels=use_kernels)
    assert (llm.engine.runner.decode_kernel is not None) == use_kernels
    prompts = _prompts(5)
    ours, logits = ours_greedy_with_logits(llm, prompts, N_NEW)
    for p, toks in zip(prompts, ours):
        assert len(toks) == N_NEW
        err = max_logit_error(hf, p, toks, logits[tuple(p)])
        assert err < 1e-4, f"{family}: logits differ from HF by {err}"
        assert toks == hf_greedy(hf, p, N_NEW), f"{family}: greedy tokens differ from HF"


@pytest.mark.parametrize("use_kernels,gemm", [(True, "onednn"), (False, "onednn"),
                                               pytest.param(True, "amx", marks=needs_amx)],
                         ids=["cpp", "torch", "cpp-amx"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral_window"])
def test_bf16_as_close_to_fp32_as_transformers_bf16(tiny_model_factory, family, use_kernels,
                                                    gemm):
    """bf16 (what `--dtype auto` picks on CPUs with native bf16). Teacher-forced on our greedy
    tokens, our bf16 logits are no further from the fp32 model than transformers' own bf16 run
    of the same weights is: the bf16 path, C++ kernels or torch, oneDNN's GEMMs or the AMX one
    (cpu_gemm "amx"; qwen2's q/k/v have a bias), adds nothing beyond bf16's rounding. A wrong
    kernel (a dropped rounding, a misplaced key) is off by far more."""
    path = tiny_model_factory(family)
    fp32, hf16 = hf_load(path), hf_load(path, dtype=torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=256, block_size=8,
              use_kernels=use_kernels, cpu_gemm=gemm)
    assert (llm.engine.runner.decode_kernel is not None) == use_kernels
    assert llm.engine.cpu_gemm == gemm
    assert_bf16_as_close_as_hf(llm, fp32, hf16, _prompts(5, seed=3), N_NEW, min_effect=1e-3,
                               label=family)


def test_bf16_unpacked_weights_as_close_as_transformers_bf16(tiny_model_factory, monkeypatch):
    """On a CPU whose oneDNN cannot pack bf16 weights (AVX2 only: it refuses the reorder), bf16
    weights stay plain and run through F.linear. Forced here on any CPU: the model loads, no
    weight is packed, and the result is as close as transformers' bf16."""
    from loraplex.model import layers

    monkeypatch.setattr(layers, "onednn_packs_bf16", lambda: False)
    path = tiny_model_factory("llama")
    fp32, hf16 = hf_load(path), hf_load(path, dtype=torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=256, block_size=8)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, layers.Linear)]
    assert linears and all(m.packed is None and m.weight is not None for m in linears)
    assert model.lm_head_packed is None
    assert_bf16_as_close_as_hf(llm, fp32, hf16, _prompts(5, seed=3), N_NEW, min_effect=1e-3,
                               label="llama unpacked")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral_window"])
def test_chunked_prefill_and_preemption_match_hf(tiny_model_factory, family):
    """Prompts longer than the token budget are prefilled in chunks over cached KV blocks, and a
    KV pool too small for all rows forces preemption + recompute: logits must not change."""
    path = tiny_model_factory(family)
    hf = hf_load(path)
    llm = LLM(str(path), dtype="float32", max_model_len=128, block_size=4,
              max_num_batched_tokens=20, num_kv_blocks=40)
    prompts = _prompts(6, seed=7)
    prompts[0] = prompts[0] + prompts[1] + prompts[2]  # long: several chunks
    prompts[0] = prompts[0][:100]
    ours, logits = ours_greedy_with_logits(llm, prompts, N_NEW)
    assert llm.engine.scheduler.num_preemptions > 0, "the test must exercise preemption"
    for p, toks in zip(prompts, ours):
        err = max_logit_error(hf, p, toks, logits[tuple(p)][-N_NEW:])
        assert err < 1e-4, f"{family}: logits differ from HF by {err}"
        assert toks == hf_greedy(hf, p, N_NEW)
    llm.engine.block_manager.assert_consistent()
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks


def test_tied_embeddings(tiny_model_factory):
    path = tiny_model_factory("llama", seed=3, tie=True)
    hf = hf_load(path)
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    prompts = _prompts(2, seed=3)
    ours, logits = ours_greedy_with_logits(llm, prompts, 8)
    for p, toks in zip(prompts, ours):
        assert max_logit_error(hf, p, toks, logits[tuple(p)]) < 1e-4
