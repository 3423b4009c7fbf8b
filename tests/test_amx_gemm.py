"""loraplex's bf16 AMX GEMM (kernels/amx_gemm.cpp, cpu_gemm "amx"): exact to one bf16 rounding
of a float32 reference, rows bit-for-bit independent of the batch, in the engine for every
projection and lm_head, and refused with a reason where it cannot run. Skipped where the CPU
(or build, or OS) has no AMX-BF16. (test_oracle_tiny and test_lora_oracle compare its bf16
engines with transformers and PEFT.)"""

from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.config import ConfigError
from loraplex.kernels import amx_linear_op
from loraplex.model.huge_pages import HugePageArena
from loraplex.model.layers import Linear, amx_linear, pack_amx

from oracle import needs_amx

# (N, K): SmolLM2's qkv and down, and ragged ones (N not a multiple of 16 or 32, K not of 32)
SHAPES = [(960, 576), (576, 1536), (100, 70), (20, 40), (49, 33), (16, 2)]


def _gemm(x, wp, bias, n):
    return amx_linear(amx_linear_op(), x, wp, bias, n)


def _within_one_rounding(got: torch.Tensor, ref32: torch.Tensor, absum: torch.Tensor,
                         k: int) -> None:
    """got (bf16) is ref32 (float32) rounded to bf16, give or take one unit in the last place
    plus the float32 summation error any order may make (at most 2 K 2^-24 sum |x w|: a tile
    multiply rounds twice per pair of products). A wrong layout or a lost chunk is off by far
    more."""
    ref = ref32.to(torch.bfloat16).float()
    ulp = ref.abs() * 2.0 ** -7
    tol = ulp * 1.01 + 2 * k * 2.0 ** -24 * absum
    err = (got.float() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} outputs off by more than one bf16 rounding, "
                           f"worst excess {(err - tol).max().item():.3g}")


@needs_amx
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_a_float32_reference_to_one_rounding(n, k, bias):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    wp = pack_amx(w)
    for m in (1, 5, 16, 17, 33, 64, 65, 600):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        ref = x.float() @ w.float().t() + (b.float() if bias else 0.0)
        absum = x.float().abs() @ w.float().abs().t() + (b.float().abs() if bias else 0.0)
        _within_one_rounding(_gemm(x, wp, b, n), ref, absum, k)


@needs_amx
def test_large_outputs_streamed_past_the_caches_and_a_misaligned_y():
    """A y over 2 MB with whole 64-byte rows is written with streaming stores; a y that is
    not 64-byte aligned is not. Both give the reference's values."""
    g = torch.Generator().manual_seed(3)
    n, k, m = 1024, 96, 2048
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    wp = pack_amx(w)
    ref = x.float() @ w.float().t() + b.float()
    absum = x.float().abs() @ w.float().abs().t() + b.float().abs()
    y = _gemm(x, wp, b, n)
    _within_one_rounding(y, ref, absum, k)
    odd = torch.empty(m * n + 1, dtype=torch.bfloat16)[1:].view(m, n)  # 2 bytes off a line
    amx_linear_op()(odd, x, wp, b)
    assert torch.equal(odd, y)


@needs_amx
@pytest.mark.parametrize("n,k", [(960, 576), (100, 70)])
def test_a_row_is_the_same_alone_and_in_any_batch(n, k):
    """Bit for bit, through the row-chunk loop (> 512 rows) and the streamed stores of a large
    y (1100 x 960 bf16 is over 2 MB)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    wp = pack_amx(w)
    x = torch.randn(1100, k, generator=g).to(torch.bfloat16)
    full = _gemm(x, wp, b, n)
    for m in (1, 3, 16, 64, 65, 513):
        assert torch.equal(_gemm(x[:m], wp, b, n), full[:m]), f"batch of {m}"
    for i in (0, 15, 16, 511, 512, 1099):
        assert torch.equal(_gemm(x[i:i + 1], wp, b, n), full[i:i + 1]), f"row {i} alone"


@needs_amx
def test_refuses_mismatched_shapes_and_dtypes():
    op = amx_linear_op()
    w = pack_amx(torch.randn(64, 64).to(torch.bfloat16))
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(torch.empty(4, 48, dtype=torch.bfloat16), x, w, None)
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.empty(4, 64), x.float(), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.empty(4, 64, dtype=torch.bfloat16), x, w, torch.zeros(63, dtype=torch.bfloat16))


@needs_amx
def test_engine_runs_every_projection_on_it_and_greedy_output_is_batch_invariant(smollm2_dir):
    """SmolLM2 in bf16 with cpu_gemm "amx": every projection and lm_head run on it, and each
    request's greedy tokens alone equal its tokens in a batch of 12 mixed-length requests,
    with chunked prefill putting prefill and decode rows in the same GEMMs."""
    llm = LLM(str(smollm2_dir), dtype="bfloat16", cpu_gemm="amx", max_model_len=512,
              max_num_batched_tokens=96)
    eng = llm.engine
    assert eng.cpu_gemm == "amx"
    assert eng.model.lm_head_amx is not None
    linears = [m for m in eng.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * eng.model_config.num_layers
    assert all(m.amx_op is not None and m.packed is None and m.weight is None for m in linears)
    # every packed weight lives in the model's huge-page arena
    arena = eng.model.packed_arena
    assert all(arena.contains(t) for t in [m.amx_packed for m in linears]
               + [eng.model.lm_head_amx])
    topics = ["the moon", "bread", "rivers", "chess", "owls", "jazz", "glass", "tides", "maps",
              "bees", "snow", "ink"]
    prompts = [f"Tell me about {t}." + " Be precise." * (i % 4) * 4 for i, t in enumerate(topics)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    for p, toks in zip(prompts, batched):
        assert llm.generate([p], params)[0].outputs[0].token_ids == toks, p


def test_amx_is_refused_where_it_cannot_run(smollm2_dir):
    with pytest.raises(ConfigError, match="bf16 models only"):
        LLM(str(smollm2_dir), dtype="float32", cpu_gemm="amx", max_model_len=256)
    with pytest.raises(ConfigError, match="kernels are off"):
        LLM(str(smollm2_dir), dtype="bfloat16", cpu_gemm="amx", use_kernels=False,
            max_model_len=256)
    with pytest.raises(ConfigError, match="cpu_gemm must be"):
        LLM(str(smollm2_dir), dtype="bfloat16", cpu_gemm="avx", max_model_len=256)


@needs_amx
def test_tied_lm_head_on_it_as_close_to_fp32_as_transformers_bf16(tiny_model_factory):
    """A tiny Llama with tied embeddings: lm_head runs on the kernel from the embedding matrix,
    and the logits are no further from the fp32 model than transformers' bf16 run."""
    from oracle import assert_bf16_as_close_as_hf, hf_load

    path = tiny_model_factory("llama", tie=True)
    fp32, hf16 = hf_load(path), hf_load(path, dtype=torch.bfloat16)
    llm = LLM(str(path), dtype="bfloat16", cpu_gemm="amx", max_model_len=256, block_size=8)
    assert llm.engine.model.lm_head_amx is not None and llm.engine.model.lm_head is None
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(5 + 3 * i)] for i in range(5)]
    assert_bf16_as_close_as_hf(llm, fp32, hf16, prompts, 8, min_effect=1e-3, label="tied")


def test_huge_page_arena_carves_aligned_disjoint_tensors():
    arena = HugePageArena(3 * 4096 + 10)
    assert arena.size == 2 << 20
    a = arena.take((100, 3), torch.bfloat16)
    b = arena.take((5000,), torch.float32)
    c = arena.take((7,), torch.int64)
    assert a.data_ptr() % (2 << 20) == 0  # the block starts on a huge page
    assert b.data_ptr() - a.data_ptr() == 4096 and c.data_ptr() - b.data_ptr() == 20480
    a.fill_(1)
    b.fill_(2)
    c.fill_(3)
    assert a.float().sum() == 300 and b.sum() == 10000 and c.sum() == 21
    assert HugePageArena.room(1) == 4096 and HugePageArena.room(8192) == 8192
    assert arena.contains(a) and arena.contains(c) and not arena.contains(torch.zeros(3))
    with pytest.raises(ValueError, match="do not fit"):
        arena.take((2 << 20,), torch.uint8)
