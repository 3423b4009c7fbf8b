"""Heterogeneous multi-LoRA batches vs transformers + PEFT: every row's logits and tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch
from lora_helpers import PeftOracle, make_peft_adapter

from loraplex import LLM, SamplingParams
from loraplex.kernels import lora_pairs_supported
from loraplex.lora.ops import LoRABatch, LoRASlots, reference_delta

from oracle import needs_amx

N_NEW = 16
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = [*ATTN, "gate_proj", "up_proj", "down_proj"]


def _adapters(base, tmp, std: float = 0.1):
    specs = {
        "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "r16rs": dict(r=16, lora_alpha=8, target_modules=ALL7, use_rslora=True,
                      rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 32}),
        "r64": dict(r=64, lora_alpha=32, target_modules=["gate_proj", "down_proj"],
                    layers_to_transform=[0, 2]),
        # a regex that names lm_head only to exclude it: not an lm_head adapter
        "regex": dict(r=8, lora_alpha=8, target_modules=r"^(?!.*lm_head).*\.(k_proj|up_proj)$"),
    }
    return {n: make_peft_adapter(base, tmp / n, seed=i + 1, std=std, **kw)
            for i, (n, kw) in enumerate(specs.items())}


def _check(llm, oracle, prompts, names, tol: float = 1e-4, same_tokens: bool = True,
           min_effect: float = 0.05) -> dict[str | None, float]:
    """Teacher-forced: every row's logits at every generated position vs PEFT's on the same
    tokens (within tol), and (same_tokens) greedy tokens equal to PEFT's. Returns the worst
    error per adapter."""
    captured: dict[tuple, list[torch.Tensor]] = {}

    def hook(rows, logits):
        for r, lg in zip(rows, logits):
            captured.setdefault(tuple(r.prompt_token_ids), []).append(lg.clone())

    llm.engine.runner.logits_hook = hook
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True),
                        lora=names)
    llm.engine.runner.logits_hook = None
    worst: dict[str | None, float] = {}
    for p, name, o in zip(prompts, names, outs):
        toks = o.outputs[0].token_ids
        ref = oracle.logits(name, p + toks)
        ours = captured[tuple(p)]
        err = max((ours[j] - ref[len(p) - 1 + j]).abs().max().item() for j in range(N_NEW))
        worst[name] = max(err, worst.get(name, 0.0))
        assert err < tol, f"adapter {name}: logits differ from PEFT by {err}"
        if name is not None:  # the adapter really changes the model (the test is not vacuous)
            assert (ref - oracle.logits(None, p + toks)).abs().max() > min_effect
        if same_tokens:
            assert toks == oracle.greedy(name, p, N_NEW), f"adapter {name}: tokens differ"
    return worst


@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "llama_bias", "qwen3_bias"])
def test_mixed_adapter_batch_matches_peft(tiny_model_factory, tmp_path, family, use_kernels):
    base = tiny_model_factory(family)
    paths = _adapters(base, tmp_path)
    oracle = PeftOracle(base, paths)
    llm = LLM(str(base), dtype="float32", max_model_len=256, enable_lora=True, max_loras=5,
              max_lora_rank=64, use_kernels=use_kernels)
    assert (llm.engine.runner.lora_kernel is not None) == use_kernels
    for n, p in paths.items():
        llm.add_lora(n, str(p))
    rng = random.Random(3)
    names = ["r4", "r8", None, "r16rs", "r64", "r8", None, "regex"]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 40))] for _ in names]
    _check(llm, oracle, prompts, names)
    assert llm.engine.lora.num_pinned == 0 and llm.engine.lora.num_running == 0


def _exact_adapters(base, tmp, dtype: torch.dtype = torch.bfloat16):
    # Power-of-two scales (alpha / r) and weights that are values of `dtype`: a copy in that
    # dtype is lossless.
    specs = {"r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
             "r16": dict(r=16, lora_alpha=16, target_modules=ALL7, rank_pattern={"down_proj": 4},
                         alpha_pattern={"down_proj": 8})}
    return {n: make_peft_adapter(base, tmp / n, seed=i + 1, exact_in=dtype, **kw)
            for i, (n, kw) in enumerate(specs.items())}


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpp", "torch"])
def test_16bit_adapters_on_fp32_model_match_peft(tiny_model_factory, tmp_path, use_kernels,
                                                 lora_dtype):
    """--lora-dtype bfloat16 / float16 on an fp32 model: adapters stored and read as 16-bit,
    arithmetic in fp32 (the C++ kernel takes both). On adapters whose values are numbers of
    that dtype the result is PEFT's fp32 one (1e-4)."""
    base = tiny_model_factory("llama")
    dt = getattr(torch, lora_dtype)
    paths = _exact_adapters(base, tmp_path, dt)
    oracle = PeftOracle(base, paths)
    llm = LLM(str(base), dtype="float32", lora_dtype=lora_dtype, max_model_len=256,
              enable_lora=True, max_loras=3, max_lora_rank=16, use_kernels=use_kernels)
    assert llm.engine.lora_dtype == dt
    assert (llm.engine.runner.lora_kernel is not None) == use_kernels
    for n, p in paths.items():
        ad = llm.add_lora(n, str(p))
        assert all(m.a.dtype == dt for m in ad.modules.values())
    rng = random.Random(7)
    names = ["r4", None, "r8", "r16", "r8", None, "r16"]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 40))] for _ in names]
    _check(llm, oracle, prompts, names)


@pytest.mark.parametrize("use_kernels,gemm", [(True, "onednn"), (False, "onednn"),
                                               pytest.param(True, "amx", marks=needs_amx)],
                         ids=["cpp", "torch", "cpp-amx"])
def test_bf16_model_with_adapters_tracks_peft(tiny_model_factory, tmp_path, use_kernels, gemm):
    """A bf16 model with bf16 adapters (what `auto` picks on CPUs with native bf16) vs PEFT in
    fp32, teacher-forced: LoRA rows are no further from PEFT than base rows are from the fp32
    base, i.e. the LoRA path adds no error beyond bf16's own (with oneDNN's base GEMMs or the
    AMX one's, cpu_gemm "amx")."""
    base = tiny_model_factory("llama")
    paths = _exact_adapters(base, tmp_path)
    oracle = PeftOracle(base, paths)
    llm = LLM(str(base), dtype="bfloat16", max_model_len=256, enable_lora=True, max_loras=3,
              max_lora_rank=16, use_kernels=use_kernels, cpu_gemm=gemm)
    assert llm.engine.lora_dtype == torch.bfloat16
    assert (llm.engine.runner.lora_kernel is not None) == use_kernels
    # with the kernel on an AVX512-BF16 CPU: the pair layout (bf16 dot products, z rounded to
    # bf16 as PEFT's bf16 lora_A output is)
    assert {s.pairs for s in llm.engine.lora.slots.values()} == {
        use_kernels and lora_pairs_supported()}
    for n, p in paths.items():
        llm.add_lora(n, str(p))
    rng = random.Random(8)
    names = ["r4", None, "r8", "r16", "r8", None, "r16", None]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 40))] for _ in names]
    # bf16 rounding puts every row ~0.04 from the fp32 oracle here; the adapters move the
    # logits by far more than that (min_effect), so the comparison is not vacuous.
    worst = _check(llm, oracle, prompts, names, tol=0.1, same_tokens=False, min_effect=0.5)
    assert max(v for k, v in worst.items() if k is not None) <= 1.5 * worst[None], worst


def test_float16_adapters_round_finer_than_bfloat16(tiny_model_factory, tmp_path):
    """Adapters whose weights are no 16-bit numbers (PEFT's A, B ~ N(0, 0.1)) on an fp32 model:
    stored as float16 (11-bit significand) they stay several times closer to PEFT's fp32 logits
    than stored as bfloat16 (8 bits), both through the C++ kernel. Each adapter moves the
    logits by > 0.05 (min_effect), so neither error is vacuous."""
    base = tiny_model_factory("llama")
    paths = {n: make_peft_adapter(base, tmp_path / n, seed=i + 11, r=16, lora_alpha=32,
                                  target_modules=tm)
             for i, (n, tm) in enumerate([("qv", ["q_proj", "v_proj"]), ("all", ALL7)])}
    oracle = PeftOracle(base, paths)
    rng = random.Random(9)
    names = ["qv", "all", None, "all", "qv"]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 40))] for _ in names]
    worst = {}
    for dt in ("float16", "bfloat16"):
        llm = LLM(str(base), dtype="float32", lora_dtype=dt, max_model_len=256,
                  enable_lora=True, max_loras=2, max_lora_rank=16)
        assert llm.engine.runner.lora_kernel is not None
        for n, p in paths.items():
            llm.add_lora(n, str(p))
        w = _check(llm, oracle, prompts, names, tol=1.0, same_tokens=False)
        worst[dt] = max(v for k, v in w.items() if k is not None)
        assert w[None] < 1e-4  # base rows: no adapter, fp32 as PEFT's
    print("worst LoRA-row logit error vs PEFT fp32:", worst)
    assert 0 < worst["float16"] < worst["bfloat16"] / 4, worst


def test_config_without_target_modules_matches_peft(tiny_model_factory, tmp_path):
    """An adapter_config.json without target_modules: PEFT targets its default modules for the
    architecture (q_proj and v_proj), and so does loraplex (adapter.PEFT_DEFAULT_TARGETS)."""
    base = tiny_model_factory("qwen2")
    d = make_peft_adapter(base, tmp_path / "qv", seed=5, r=8, lora_alpha=16,
                          target_modules=["q_proj", "v_proj"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["target_modules"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    oracle = PeftOracle(base, {"qv": d})
    llm = LLM(str(base), dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=8)
    llm.add_lora("qv", str(d))
    rng = random.Random(5)
    names = ["qv", None, "qv"]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 30))] for _ in names]
    _check(llm, oracle, prompts, names)


def test_more_adapters_than_slots_matches_peft(tiny_model_factory, tmp_path):
    """4 adapters through 2 slots: rows wait for a slot, slots are reused, results stay exact."""
    base = tiny_model_factory("llama")
    paths = _adapters(base, tmp_path)
    oracle = PeftOracle(base, paths)
    llm = LLM(str(base), dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
              max_lora_rank=64)
    for n, p in paths.items():
        llm.add_lora(n, str(p))
    rng = random.Random(5)
    names = ["r4", "r8", "r16rs", "r64", None, "r64", "r4", "r16rs"]
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 30))] for _ in names]
    _check(llm, oracle, prompts, names)
    assert llm.engine.lora.stats["evictions"] > 0


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("act,wt", [(FP32, FP32), (FP32, BF16), (BF16, BF16), (BF16, FP32),
                                    (FP32, FP16), (BF16, FP16)],
                         ids=["x32-w32", "x32-w16", "x16-w16", "x16-w32", "x32-wh", "x16-wh"])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpp", "torch"])
def test_batched_op_equals_reference(use_kernel, act, wt):
    """Both paths, every mix of activation and adapter dtype, against the fp32 reference on the
    same (already rounded) weights: y += delta, base rows untouched. Ranks 2, 8 and 13 under
    max rank 24: the torch path runs rank buckets 8 (two adapters) and 16 (sliced below R)."""
    from loraplex.kernels import kernels

    torch.manual_seed(0)
    sizes = [64, 40, 32]  # 40: a shard that is not a whole number of 32-column blocks
    m = LoRASlots(32, sizes, num_slots=4, max_rank=24, device=torch.device("cpu"),
                  dtype=wt, packed=use_kernel)
    ranks = {0: 2, 1: 8, 2: 13}
    for slot, r in ranks.items():
        for shard, out in enumerate(sizes):
            m.write(slot, shard, torch.randn(r, 32), torch.randn(out, r), 0.5 + slot)
    slots = [1, -1, 0, 0, 2, 1, -1, 2, 2, 0]
    x = torch.randn(len(slots), 32).to(act)
    y0 = (10 * torch.randn(len(slots), sum(sizes))).to(act)  # the base projection's output
    batch = LoRABatch.build(slots, torch.device("cpu"),
                            kernels().lora_delta_ if use_kernel else None, ranks)
    if not use_kernel:
        assert [b.rank for b in batch.buckets] == [8, 16]
    got = batch.apply(m, x, y0.clone())
    assert got.dtype == act
    delta = reference_delta(m, x, torch.tensor(slots))
    want = y0.float() + delta
    if act == FP32:  # deltas here are up to ~100 in size: fp32 rounding of the sums is ~1e-5
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    elif use_kernel:  # fp32 sums, then one bf16 rounding of y + delta (half an ulp, 2^-9)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)
    else:  # torch's bf16 bmm rounds x.A, the delta and y + delta: a few ulps of the delta
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8,
                                   atol=2 ** -6 * float(delta.abs().max()))
    assert torch.equal(got[1], y0[1]) and torch.equal(got[6], y0[6])  # base rows untouched


def test_smollm2_adapters_match_peft(smollm2_dir, tmp_path):
    """The real SmolLM2 with the tiny models' adapter set in one batch (ranks 4, 8, 16 and 64,
    rslora with rank_pattern/alpha_pattern, "all-linear", a regex, layers_to_transform, subset
    targets) plus an r=16 adapter on all 7 projections, base rows mixed in. A as PEFT
    initializes it, B ~ N(0, 0.02) (trained adapters' B entries are ~1e-3..1e-2).

    The oracle is PEFT evaluated in fp64 on the same fp32 weights: the exact logits. On this
    30-layer model fp32 rounding alone reaches 1e-4. Measured against the fp64 logits (this
    batch, worst row), loraplex is 0.36-0.62e-4 off and PEFT's own fp32 run 0.46-1.53e-4 off
    (its rslora row, whose scales reach 8), so loraplex vs PEFT fp32 gave 1.03e-4 on that row:
    PEFT's rounding, not ours. Held to 1e-4 of the exact logits, the test still fails on any
    real LoRA error: a delta missing from one projection of one layer moves logits by > 1e-2."""
    paths = _adapters(smollm2_dir, tmp_path, std=0.02)
    paths["all7"] = make_peft_adapter(smollm2_dir, tmp_path / "all7", seed=9, std=0.02, r=16,
                                      lora_alpha=32, target_modules=ALL7)
    oracle = PeftOracle(smollm2_dir, paths, dtype=torch.float64)
    # mkl GEMMs, as in test_oracle_smollm2: oneDNN's fp32 rounding alone reaches ~1e-4 here
    # (README "Accuracy"), which would leave no room for the LoRA path's own error.
    llm = LLM(str(smollm2_dir), dtype="float32", cpu_gemm="mkl", max_model_len=512,
              enable_lora=True, max_loras=len(paths), max_lora_rank=64)
    assert llm.engine.runner.lora_kernel is not None  # the C++ kernel, the CPU default
    for n, p in paths.items():
        llm.add_lora(n, str(p))
    tok = llm.engine.tokenizer
    texts = ["What is a LoRA adapter?", "Name a color.", "Count to five.", "Say hello.",
             "Why is the sky blue?", "Write a haiku.", "Spell cat.", "Add 2 and 3."]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    names = ["r4", "all7", None, "r16rs", "r64", "r8", "regex", None]
    worst = _check(llm, oracle, prompts, names)
    print("worst logit error per adapter:", worst)
