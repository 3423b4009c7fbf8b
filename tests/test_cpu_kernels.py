"""The C++ decode attention and SiLU*mul against their torch expressions, at shapes and values
the oracle tests do not reach: GQA groups of 1-7, sliding windows, contexts of 1 key to many
blocks, extreme gate values (the vector exp's clamps), and batch invariance bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import kernels

ops = kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="the C++ kernels cannot be built here")


def _reference_attention(q, kc, vc, tables, lens, scale, window):
    """Per row: gather its keys from the blocks, SDPA over the visible ones."""
    b, h, d = q.shape
    hkv, bs = kc.shape[1], kc.shape[2]
    out = torch.empty_like(q)
    for i in range(b):
        n = int(lens[i])
        blocks = tables[i, :-(-n // bs)]
        k = kc[blocks].transpose(0, 1).reshape(hkv, -1, d)[:, :n]  # [Hkv, n, D]
        v = vc[blocks].transpose(0, 1).reshape(hkv, -1, d)[:, :n]
        first = max(0, n - window) if window else 0
        k, v = k[:, first:], v[:, first:]
        qi = q[i].view(hkv, h // hkv, d)
        p = torch.softmax(qi @ k.transpose(1, 2) * scale, dim=-1)  # [Hkv, G, n]
        out[i] = (p @ v).reshape(h, d)
    return out


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 64), (14, 2, 64), (8, 2, 128),
                                              (6, 3, 40)])
@pytest.mark.parametrize("window", [0, 20])
def test_paged_decode_attention(heads, kv_heads, d, window):
    g = torch.Generator().manual_seed(heads * 100 + d + window)
    bs, nblocks = 16, 64
    lens = torch.tensor([1, 2, 15, 16, 17, 33, 100, 250], dtype=torch.long)
    kc = torch.randn(nblocks, kv_heads, bs, d, generator=g)
    vc = torch.randn(nblocks, kv_heads, bs, d, generator=g)
    max_blocks = 16
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:max_blocks] for _ in lens])
    # a strided view, as the model passes it (q's heads inside the fused qkv output)
    q = 3 * torch.randn(len(lens), heads + 2 * kv_heads, d, generator=g)[:, :heads]
    scale = d ** -0.5
    got = ops.paged_decode_attention(q, kc, vc, tables, lens, scale, window)
    want = _reference_attention(q, kc, vc, tables, lens, scale, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # each row alone gives the same bits as in the batch
    for i in (0, 3, len(lens) - 1):
        alone = ops.paged_decode_attention(q[i:i + 1].contiguous(), kc, vc,
                                           tables[i:i + 1].contiguous(), lens[i:i + 1].clone(),
                                           scale, window)
        assert torch.equal(alone[0], got[i])


def test_silu_mul_matches_torch():
    g = torch.Generator().manual_seed(0)
    gu = 6 * torch.randn(37, 2 * 1000, generator=g)  # 1000: vector body and a scalar tail
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 87.4, -87.4,
                            88.1, -88.1, 100.0, -100.0, 1e30, -1e30, float("inf"),
                            float("-inf")])
    gu[0, :len(special)] = special
    gu[1, 1000 - len(special):1000] = special  # in the tail
    got = ops.silu_mul(gu)
    want = F.silu(gu[:, :1000]) * gu[:, 1000:]
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, equal_nan=True)  # silu(-inf)
    nan = gu.clone()
    nan[2, 5] = float("nan")
    assert torch.isnan(ops.silu_mul(nan)[2, 5])
    assert torch.equal(ops.silu_mul(gu[5:6].contiguous())[0], got[5])
