"""The C++ decode attention and fused ops against their torch expressions, at shapes and values
the oracle tests do not reach: GQA groups of 1-7, sliding windows, contexts of 1 key to many
blocks, extreme gate values (the vector exp's clamps), batch invariance bit for bit, and the
bfloat16 versions against the model's torch expressions in bfloat16 (same roundings)."""

from __future__ import annotations

from pathlib import Path

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


HEADS = [(9, 3, 64), (4, 4, 64), (14, 2, 64), (8, 2, 128), (6, 3, 40)]
HEADS_BF16 = [(9, 3, 64), (8, 2, 128), (6, 3, 40)]
WINDOWS = [0, 20]


@pytest.mark.parametrize("heads,kv_heads,d", HEADS)
@pytest.mark.parametrize("window", WINDOWS)
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


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between two bf16 tensors of finite values (same sign order)."""
    def key(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)  # monotone in the value
    return (key(got) - key(want)).abs()


def _assert_bf16_close(got, want, name, max_ulps=1, max_frac=0.01):
    """Equal but for one-step rounding flips on a few elements (sums in another order land a
    hair to the other side of a bf16 rounding boundary now and then)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    ulps = _bf16_ulps(got, want)
    frac = (ulps > 0).float().mean().item()
    assert ulps.max().item() <= max_ulps and frac <= max_frac, (
        f"{name}: {ulps.max().item()} bf16 steps off, {100 * frac:.2f}% of elements differ")


@pytest.mark.parametrize("heads,kv_heads,d", HEADS_BF16)
@pytest.mark.parametrize("window", WINDOWS)
def test_paged_decode_attention_bf16(heads, kv_heads, d, window):
    """bf16 q and caches: float32 arithmetic inside, the output rounded once."""
    g = torch.Generator().manual_seed(7 + heads + d + window)
    bs, nblocks = 16, 64
    lens = torch.tensor([1, 3, 16, 17, 40, 250], dtype=torch.long)
    kc = torch.randn(nblocks, kv_heads, bs, d, generator=g).bfloat16()
    vc = torch.randn(nblocks, kv_heads, bs, d, generator=g).bfloat16()
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:16] for _ in lens])
    q = (3 * torch.randn(len(lens), heads + 2 * kv_heads, d, generator=g)).bfloat16()[:, :heads]
    scale = d ** -0.5
    got = ops.paged_decode_attention(q, kc, vc, tables, lens, scale, window)
    want = _reference_attention(q.float(), kc.float(), vc.float(), tables, lens, scale, window)
    _assert_bf16_close(got, want.bfloat16(), "attention")
    alone = ops.paged_decode_attention(q[-1:].contiguous(), kc, vc, tables[-1:].contiguous(),
                                       lens[-1:].clone(), scale, window)
    assert torch.equal(alone[0], got[-1])


def test_fused_ops_bf16_match_torch_bf16():
    """add_rms_norm, silu_mul and rope_ in bf16 vs the model's torch path in bf16, which
    rounds every intermediate tensor to bf16: the kernels round at the same places."""
    from loraplex.model.layers import RMSNorm

    g = torch.Generator().manual_seed(3)
    # add_rms_norm: 570 = 35 vectors of 16 and a tail of 10
    x = (2 * torch.randn(33, 570, generator=g)).bfloat16()
    res = (4 * torch.randn(33, 570, generator=g)).bfloat16()
    norm = RMSNorm(570, 1e-5)
    norm.weight.data = (1 + torch.randn(570, generator=g)).bfloat16()
    want, want_res = norm(x, res.clone())  # norm.fused is None: the torch expression
    got_res = res.clone()
    got = ops.add_rms_norm(x, got_res, norm.weight.data, 1e-5)
    assert torch.equal(got_res, want_res)  # x + residual: one bf16 rounding either way
    _assert_bf16_close(got, want, "add_rms_norm")
    # silu_mul: 1000 = vector body and a scalar tail
    gu = (6 * torch.randn(21, 2000, generator=g)).bfloat16()
    want = F.silu(gu[:, :1000]) * gu[:, 1000:]
    _assert_bf16_close(ops.silu_mul(gu), want, "silu_mul")
    # rope_ on a strided view of q|k heads, D = 64 and 40 (half not a multiple of the width)
    for d in (64, 40):
        t, nh = 7, 5
        full = torch.randn(t, nh + 3, d, generator=g).bfloat16()
        xs = full[:, :nh]
        ang = torch.rand(t, 1, d // 2, generator=g) * 6
        cos = torch.cat((ang.cos(), ang.cos()), -1).bfloat16()
        sin = torch.cat((ang.sin(), ang.sin()), -1).bfloat16()
        rotated = torch.cat((-xs[..., d // 2:], xs[..., :d // 2]), dim=-1)
        want = xs * cos + rotated * sin
        got = full.clone()[:, :nh]  # strided, as the model passes it
        ops.rope_(got, cos, sin)
        _assert_bf16_close(got, want, f"rope_ D={d}")


def test_argmax_rows_matches_torch():
    """torch.argmax's answer on every row: the first of tied maxima (also across the kernel's
    512-value blocks), NaN as the maximum (the first NaN), infinities, -0.0 == 0.0, widths
    that are not a multiple of the vector or the block, and strided rows."""
    g = torch.Generator().manual_seed(11)
    for width in (1, 7, 16, 511, 512, 513, 49152 + 5):
        x = torch.randn(12, width + 3, generator=g)[:, :width]  # strided rows
        if width > 1:
            x[1] = 0.0  # all tied: index 0
            x[2, width // 2] = x[2, -1] = x[2].max() + 1  # tie: the first one
            x[3, -1] = float("nan")
            x[4, 0] = float("-inf")
            x[5, width // 3] = float("inf")
            x[5, -1] = float("inf")
            x[6, :] = float("-inf")
            x[7, width // 2] = float("nan")
            x[7, -1] = float("inf")
            x[8, :] = -0.0
            x[8, -1] = 0.0
            x[9, :] = -1.0
        got = ops.argmax_rows(x)
        assert torch.equal(got, x.argmax(dim=-1)), (width, got, x.argmax(dim=-1))
    big = torch.randn(3, 4096, generator=g)
    big[0, 100] = big[0, 3000] = 50.0  # the same max in two blocks: the first block's
    assert ops.argmax_rows(big).tolist() == big.argmax(dim=-1).tolist() == [
        100, *big[1:].argmax(dim=-1).tolist()]


def run_all(built) -> None:
    """Every check above against `built` (the same kernels compiled for another ISA:
    tests/test_lora_kernel.py builds them for AVX2 and for plain C++ in a subprocess)."""
    global ops
    ops = built
    for window in WINDOWS:
        for h, hkv, d in HEADS:
            test_paged_decode_attention(h, hkv, d, window)
        for h, hkv, d in HEADS_BF16:
            test_paged_decode_attention_bf16(h, hkv, d, window)
    test_silu_mul_matches_torch()
    test_fused_ops_bf16_match_torch_bf16()
    test_argmax_rows_matches_torch()


_HOLD_LOCK = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
from loraplex.kernels import build_lock
with build_lock(Path(sys.argv[1]), wait_note_s=0.3):
    print("IN", flush=True)
"""


def _start_holder(folder):
    """A fresh process that takes the build folder's lock (as kernels() does around torch's
    build) and exits; returns it and a list its stderr lines land in."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], text: str, timeout: float = 60) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(text in line for line in lines):
            return True
        time.sleep(0.05)
    return False


def test_a_stale_build_lock_is_cleared_and_a_live_build_waited_for(tmp_path):
    """A kernel build killed mid-way leaves torch's `lock` file in the build folder, on which
    every later start used to wait forever. Here a stale `lock` sits in a build folder while
    this process holds the folder's flock, as a live builder would: a fresh process must say
    it waits and leave the `lock` alone, then, once the flock is free, clear it and go on."""
    fcntl = pytest.importorskip("fcntl")
    stale = tmp_path / "lock"
    with open(tmp_path / "build.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale.touch()
        proc, lines = _start_holder(tmp_path)
        with proc:
            try:
                assert _wait_for(lines, "waiting for another process"), lines
                assert proc.poll() is None, "the process did not wait for the live holder"
                assert stale.exists(), "the lock was removed while a live holder held the folder"
                fcntl.flock(held, fcntl.LOCK_UN)
                proc.wait(60)  # not communicate(): the reader thread owns stderr
                out = proc.stdout.read()
            finally:
                proc.kill()
    assert proc.returncode == 0, "".join(lines)
    assert out.strip() == "IN"
    assert _wait_for(lines, "removing a stale kernel build lock", 5), lines
    assert not stale.exists()


def test_a_stale_build_lock_waits_for_an_orphaned_compiler(tmp_path):
    """A build whose Python process was killed can leave its compiler running in the folder:
    the stale `lock` is cleared only once that process is gone (a second ninja beside it could
    tear the library). A copy of `sleep` named `ninja` plays the orphan."""
    import shutil
    import subprocess
    import time

    pytest.importorskip("fcntl")
    if not Path("/proc/self/cwd").exists():
        pytest.skip("no /proc here")
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no sleep binary")
    fake = tmp_path / "tools" / "ninja"
    fake.parent.mkdir()
    shutil.copy(sleep, fake)
    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").touch()
    with subprocess.Popen([str(fake), "3"], cwd=build) as orphan:
        t0 = time.monotonic()
        proc, lines = _start_holder(build)
        with proc:
            try:
                assert _wait_for(lines, "still work in that folder"), lines
                assert (build / "lock").exists()
                proc.wait(60)
            finally:
                proc.kill()
        assert orphan.poll() is not None, "the lock was cleared while the orphan still ran"
    assert proc.returncode == 0, "".join(lines)
    assert time.monotonic() - t0 >= 2.5
    assert not (build / "lock").exists()
