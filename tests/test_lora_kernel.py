"""The C++ LoRA kernel's register tiles against the fp32 per-row reference, at shapes that reach
every tile and pass: groups of 1..21 tokens (every token tile: 8, 4, 2 and 1 tokens with
AVX-512, 6 down to 1 with AVX2; several work items per group), ranks whose padded width needs
one, two or three vectors (masked tails), a 40-column shard (a partial 32-column block),
unadapted shards, and every dtype mix (float16 adapters included); and, where the CPU has
AVX512-BF16, the pair layout of bf16 activations and adapters (odd ranks, whose last pair is
half zero; an odd max rank, rounded up to an even row count).

The same check runs on the kernel compiled for each instruction set it has a body for: the
native build (AVX-512 or AVX2, as the CPU has), AVX2 + FMA and portable scalar code, each built
in a subprocess (one process can register the op only once). The subprocess builds the
attention and fused ops too (one `Vec` trait serves them all) and runs test_cpu_kernels.py's
checks on them."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraplex.lora.ops import LoRABatch, LoRASlots, reference_delta

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MIXES = [(FP32, FP32), (FP32, BF16), (BF16, BF16), (BF16, FP32), (FP32, FP16), (BF16, FP16)]
KERNEL_SRC = Path(__file__).resolve().parents[1] / "loraplex" / "kernels" / "lora.cpp"


def check_kernel(kern, pairs: bool = False) -> None:
    """Every dtype mix: y + delta within fp32 rounding of the reference, base rows untouched,
    and each row's result independent of the batch around it (bit for bit). With `pairs`, also
    bf16 x and adapters in the pair layout, against its reference (z rounded to bf16)."""
    cases = [(act, wt, False, 40) for act, wt in MIXES]
    if pairs:
        cases += [(BF16, BF16, True, 40), (BF16, BF16, True, 39)]
    for act, wt, pair_layout, max_rank in cases:
        gen = torch.Generator().manual_seed(0)
        fin, sizes = 100, [64, 40, 96]  # 100: a partial shrink block
        m = LoRASlots(fin, sizes, num_slots=6, max_rank=max_rank, device=torch.device("cpu"),
                      dtype=wt, packed=True, pairs=pair_layout)
        assert m.pairs == pair_layout
        # slot -> rank per shard (0 = shard not adapted); 33 pads to 40 = 16 + 16 + 8 lanes
        ranks = {0: [33, 33, 33], 1: [16, 8, 0], 2: [max_rank, 1, 24], 3: [7, 0, 17],
                 4: [4, 4, 4]}
        for slot, rs in ranks.items():
            for shard, (out, r) in enumerate(zip(sizes, rs)):
                if r:
                    m.write(slot, shard, torch.randn(r, fin, generator=gen),
                            torch.randn(out, r, generator=gen), 0.25 + slot)
        counts = {0: 21, 1: 8, 2: 13, 3: 1, 4: 6, -1: 5}  # tokens per slot (-1 = base)
        slots = [s for s, n in counts.items() for _ in range(n)]
        order = torch.randperm(len(slots), generator=gen).tolist()
        slots = [slots[i] for i in order]
        x = torch.randn(len(slots), fin, generator=gen).to(act)
        y0 = (10 * torch.randn(len(slots), sum(sizes), generator=gen)).to(act)
        got = LoRABatch.build(slots, torch.device("cpu"), kern).apply(m, x, y0.clone())
        want = y0.float() + reference_delta(m, x, torch.tensor(slots))
        if act == FP32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        else:  # fp32 sums, one bf16 rounding of y + delta
            torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)
        for t, s in enumerate(slots):
            if s < 0:
                assert torch.equal(got[t], y0[t])
        # a row alone gives the same bits as in the batch
        for t in (0, len(slots) - 1, slots.index(3)):
            alone = LoRABatch.build([slots[t]], torch.device("cpu"), kern)
            row = y0[t:t + 1].clone()
            if alone is not None:
                row = alone.apply(m, x[t:t + 1].contiguous(), row)
            assert torch.equal(row[0], got[t]), (act, wt, pair_layout, t)


@pytest.mark.parametrize("pairs", [False, True], ids=["plain", "pairs"])
def test_shards_sit_back_to_back_at_the_real_rank(pairs):
    """In slots sized for rank 64, an r=8 (or odd r=7) adapter's shards fill the start of the
    slot's A^T and B rooms, back to back, and the rest stays zero, so a step streams each
    slot's A and B as two runs (benchmarks/bench_mixed_ranks.py); dense_bt reads B back as
    written. Shards written out of order are refused (each is placed after those before it)."""
    gen = torch.Generator().manual_seed(4)
    fin, sizes = 64, [64, 96]
    m = LoRASlots(fin, sizes, num_slots=2, max_rank=64, device=torch.device("cpu"),
                  dtype=BF16 if pairs else FP32, packed=True, pairs=pairs)
    assert m.pairs == pairs  # packed layouts exist on every CPU; no kernel needed
    for r in (64, 8, 7):
        m.clear(0)
        bs = [torch.randn(out, r, generator=gen) for out in sizes]
        for j, b in enumerate(bs):
            m.write(0, j, torch.randn(r, fin, generator=gen), b, 0.5)
        with pytest.raises(ValueError, match="in order"):  # shard 0 again, after shard 1
            m.write(0, 0, torch.randn(r, fin, generator=gen), bs[0], 0.5)
        rows = r + r % 2 if pairs else r
        a_used = len(sizes) * -(-r // 8) * 8 * fin  # rank rounded up to 8, each shard
        b_used = sum(m.blocks) * rows * 32
        a_room, b_room = m.ap[0].reshape(-1).float(), m.bp[0].reshape(-1).float()
        assert a_room[a_used - fin:a_used].any() and not a_room[a_used:].any()
        assert b_room[b_used - 32:b_used].any() and not b_room[b_used:].any()
        for j, (out, b) in enumerate(zip(sizes, bs)):
            want = (b.t() * 0.5).to(m.bp.dtype).float()
            got = m.dense_bt(0)[j * 64:j * 64 + r, sum(sizes[:j]):sum(sizes[:j]) + out]
            assert torch.equal(got.float(), want)


def test_decode_items_run_in_pairs_bit_for_bit():
    """Decode with several adapters: the fp32 kernel runs two groups' first chunks of 8 tokens
    side by side in the shrink (shrink_two, AVX-512). Groups of 8 tokens over mixed ranks
    (<= 8, 16, above 16, and unadapted shards, so a pair takes each shrink path), beside a short
    group and base rows, with 1 and 2 threads (other pairings): every row within fp32 rounding
    of the reference and bit for bit its result alone."""
    from loraplex.kernels import kernels

    ops = kernels()
    if ops is None:
        pytest.skip("the C++ kernels cannot be built here")
    gen = torch.Generator().manual_seed(1)
    fin, sizes = 100, [64, 40, 96]
    m = LoRASlots(fin, sizes, num_slots=9, max_rank=33, device=torch.device("cpu"), dtype=FP32,
                  packed=True)
    ranks = {0: [16, 16, 16], 1: [8, 4, 16], 2: [16, 0, 33], 3: [1, 16, 8], 4: [24, 8, 0],
             5: [16, 16, 16], 6: [3, 3, 3], 7: [16, 16, 16]}
    for slot, rs in ranks.items():
        for shard, (out, r) in enumerate(zip(sizes, rs)):
            if r:
                m.write(slot, shard, torch.randn(r, fin, generator=gen),
                        torch.randn(out, r, generator=gen), 0.25 + slot / 4)
    counts = {-1: 3, 0: 8, 1: 8, 2: 8, 6: 3, 3: 8, 4: 8, 5: 8, 7: 16}
    slots = sorted(s for s, n in counts.items() for _ in range(n))  # grouped, as the runner does
    x = torch.randn(len(slots), fin, generator=gen)
    y0 = 10 * torch.randn(len(slots), sum(sizes), generator=gen)
    want = y0 + reference_delta(m, x, torch.tensor(slots))
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            got = LoRABatch.build(slots, torch.device("cpu"), ops.lora_delta_).apply(
                m, x, y0.clone())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            for t, s in enumerate(slots):
                row = y0[t:t + 1].clone()
                if s >= 0:
                    row = LoRABatch.build([s], torch.device("cpu"), ops.lora_delta_).apply(
                        m, x[t:t + 1].contiguous(), row)
                assert torch.equal(row[0], got[t]), (n, t, s)
    finally:
        torch.set_num_threads(threads)


def _cpu_has_amx() -> bool:
    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    return "amx_bf16" in flags and "amx_tile" in flags


def _need_amx() -> None:
    """Skip where the kernel has no AMX tile path because the CPU has no AMX; fail where the
    CPU has it and the path is missing anyway (a compiler without AMX, or the OS refusing the
    tile state): that is a broken build here, not a reason to skip."""
    from loraplex.kernels import kernels, lora_amx_supported

    if kernels() is None:
        pytest.skip("the C++ kernels cannot be built here")
    if not lora_amx_supported():
        if _cpu_has_amx():
            pytest.fail("this CPU has AMX-BF16 but the LoRA kernel has no tile path")
        pytest.skip("no AMX tile path here (needs AMX-BF16)")


@contextlib.contextmanager
def _tiles(on: bool) -> Iterator[None]:
    """The AMX tile path on or off inside the block, as it was after (the switch is global)."""
    from loraplex.kernels import lora_amx_on, set_lora_amx

    was = lora_amx_on()
    assert set_lora_amx(on) == on
    try:
        yield
    finally:
        set_lora_amx(was)


def test_native_kernel_tiles():
    """The native build's register tiles. On AMX CPUs with the tile path off, so every group
    takes the vdpbf16ps path and a row's bits are its bits alone (the tile path, which a row
    alone never takes, is checked by test_amx_tile_path)."""
    from loraplex.kernels import kernels, lora_amx_supported, lora_pairs_supported

    ops = kernels()
    if ops is None:
        pytest.skip("the C++ kernels cannot be built here")
    with _tiles(False) if lora_amx_supported() else contextlib.nullcontext():
        check_kernel(ops.lora_delta_, pairs=lora_pairs_supported())


def _kernel():
    from loraplex.kernels import lora_kernel_for

    return lora_kernel_for(torch.device("cpu"), BF16, BF16)


def _amx_case(fin: int, sizes: list[int], ranks: dict[int, list[int]], max_rank: int,
              gen: torch.Generator) -> LoRASlots:
    """bf16 slots in the pair layout holding random adapters of these per-shard ranks."""
    m = LoRASlots(fin, sizes, num_slots=len(ranks) + 1, max_rank=max_rank,
                  device=torch.device("cpu"), dtype=BF16, packed=True, pairs=True)
    assert m.pairs
    for slot, rs in ranks.items():
        for shard, (out, r) in enumerate(zip(sizes, rs)):
            if r:
                m.write(slot, shard, torch.randn(r, fin, generator=gen),
                        torch.randn(out, r, generator=gen), 0.25 + slot)
    return m


# (input width, largest rank): in % 32 = 4, 2, 0 and 30 (below 32: only the tail tile); an
# odd largest rank (63, 39), whose expand's last pair row is half zero.
@pytest.mark.parametrize("fin,top", [(100, 64), (130, 63), (64, 64), (30, 39)])
def test_amx_tile_path(fin, top):
    """The AMX tile path (Intel CPUs with AMX-BF16; bf16 pair layout): groups of >= 4 tokens
    take it, smaller ones the vdpbf16ps path. Groups of 4 (the threshold), 5, 16, 17, 33 and
    40 tokens (whole and partial 16-row tiles) beside one of 3; ranks whose rank lanes end on
    16 or 8 (1, 7, 12, 17, 31, 33, up to 64) and whose expand takes one tile multiply (<= 32)
    or several (33 and up; 33, 40, 48 and 63 end on a shorter multiply, in a config of its
    own); partial 32-column blocks (56 and 70 columns: 24 and 6 in the last block); an
    unadapted shard; tokens scattered (gathered into a tile) or side by side (read in place);
    1 and 2 threads. Every row within bf16 rounding of the reference and of the vdpbf16ps
    path's result; base rows untouched; a row's bits the same in every batch where its group
    takes the tiles (other orders, other groups beside it, its group alone); and the tiles
    really ran: the kernel's count of tile work items grows by exactly the batch's items."""
    from loraplex.kernels import lora_amx_items

    _need_amx()
    gen = torch.Generator().manual_seed(fin)
    sizes = [64, 56, 70]
    ranks = {0: [64, 33, 1], 1: [16, 8, 0], 2: [40, 17, 7], 3: [48, 0, 16], 4: [4, 4, 4],
             5: [8, 24, 2], 6: [12, 16, 31]}
    ranks = {s: [min(r, top) for r in rs] for s, rs in ranks.items()}
    m = _amx_case(fin, sizes, ranks, top, gen)
    counts = {0: 40, 1: 16, 2: 17, 3: 33, 4: 3, 5: 5, 6: 4, -1: 5}  # slot 4: vdpbf16ps
    tile_items = 3 + 1 + 2 + 3 + 1 + 1  # 16 tokens an item, per group of >= 4
    grouped = sorted(s for s, n in counts.items() for _ in range(n))
    x = torch.randn(len(grouped), fin, generator=gen).to(BF16)
    y0 = (10 * torch.randn(len(grouped), sum(sizes), generator=gen)).to(BF16)
    want = y0.float() + reference_delta(m, x, torch.tensor(grouped))
    cpu = torch.device("cpu")

    def run(slots: list[int], rows: list[int]) -> torch.Tensor:
        return LoRABatch.build(slots, cpu, _kernel()).apply(
            m, x[rows].contiguous(), y0[rows].clone())

    threads = torch.get_num_threads()
    try:
        with _tiles(True):
            results = []
            for n in sorted({1, 2, threads}):
                torch.set_num_threads(n)
                order = torch.randperm(len(grouped), generator=gen).tolist()
                scattered = run([grouped[i] for i in order], order)
                before = lora_amx_items()
                side = run(grouped, list(range(len(grouped))))
                assert lora_amx_items() - before == tile_items, n
                got = torch.empty_like(side)
                got[order] = scattered
                torch.testing.assert_close(side.float(), want, rtol=2 ** -8, atol=1e-3)
                assert torch.equal(got, side), n  # gathered or in place, any split: same bits
                for t, s in enumerate(grouped):
                    if s < 0:
                        assert torch.equal(side[t], y0[t])
                for slot in (1, 2, 3, 5, 6):  # the group alone, still on the tiles: same bits
                    rows = [t for t, s in enumerate(grouped) if s == slot]
                    assert torch.equal(run([slot] * len(rows), rows), side[rows]), (n, slot)
                results.append(side)
            assert all(torch.equal(r, results[0]) for r in results)
        with _tiles(False):
            before = lora_amx_items()
            plain = run(grouped, list(range(len(grouped))))
            assert lora_amx_items() == before
        torch.testing.assert_close(results[0].float(), plain.float(), rtol=2 ** -7, atol=1e-3)
        small = [t for t, s in enumerate(grouped) if s == 4]  # 3 tokens: vdpbf16ps either way
        assert torch.equal(results[0][small], plain[small])
    finally:
        torch.set_num_threads(threads)


def test_amx_tile_path_runs():
    """At SmolLM2's q/k/v shapes (64 tokens of one adapter, r=16: four 16-row items) the tile
    path runs (the kernel counts its items) and its float32 sums run in another order than
    vdpbf16ps's, so some of y's bf16 roundings differ between the two paths (a few in 10^4;
    each path repeats itself bit for bit). benchmarks/bench_lora_amx.py times the two."""
    from loraplex.kernels import lora_amx_items

    _need_amx()
    gen = torch.Generator().manual_seed(0)
    fin, sizes = 576, [576, 192, 192]
    m = LoRASlots(fin, sizes, num_slots=2, max_rank=16, device=torch.device("cpu"), dtype=BF16,
                  packed=True, pairs=True)
    for j, out in enumerate(sizes):  # deltas about y's size, as trained adapters' are
        m.write(0, j, 0.05 * torch.randn(16, fin, generator=gen),
                0.05 * torch.randn(out, 16, generator=gen), 2.0)
    x = torch.randn(64, fin, generator=gen).to(BF16)
    y0 = torch.randn(64, sum(sizes), generator=gen).to(BF16)
    batch = LoRABatch.build([0] * 64, torch.device("cpu"), _kernel())
    out = {}
    for on in (True, False, True):
        with _tiles(on):
            before = lora_amx_items()
            got = batch.apply(m, x, y0.clone())
            assert lora_amx_items() - before == (4 if on else 0)
        if on in out:
            assert torch.equal(got, out[on])  # each path repeats itself bit for bit
        out[on] = got
    assert (out[True] != out[False]).any()
    torch.testing.assert_close(out[True].float(), out[False].float(), rtol=2 ** -7, atol=1e-3)


def test_pair_layout_is_used_where_it_is_built_and_refused_elsewhere():
    """The engine's bf16 slots take the pair layout exactly when the kernel has it; an odd input
    width keeps the plain layout; the kernel refuses pairs it cannot run, by name."""
    from loraplex.kernels import kernels, lora_pairs_supported

    ops = kernels()
    if ops is None:
        pytest.skip("the C++ kernels cannot be built here")
    cpu = torch.device("cpu")
    m = LoRASlots(64, [32], 2, 8, cpu, BF16, packed=True, pairs=lora_pairs_supported())
    assert m.pairs == lora_pairs_supported()
    assert not LoRASlots(63, [32], 2, 8, cpu, BF16, packed=True, pairs=True).pairs
    assert not LoRASlots(64, [32], 2, 8, cpu, FP32, packed=True, pairs=True).pairs
    b = LoRABatch.build([0], cpu, None)
    x32 = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="pair"):  # fp32 activations, or no pairs here
        ops.lora_delta_(torch.zeros(1, 32), x32, m.ap, m.bp, m.ranks, m.shard_sizes, b.tokens,
                        b.offsets, b.slots, True)


ISA_FLAGS = {
    "avx2": ["-march=haswell"],  # AVX2 + FMA, no AVX-512
    "scalar": ["-march=x86-64", "-mno-avx", "-mno-avx2", "-mno-fma"],
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
@pytest.mark.parametrize("isa", list(ISA_FLAGS))
def test_kernel_isa_variant(isa, tmp_path):
    if isa == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    proc = subprocess.run([sys.executable, __file__, isa, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "LORAPLEX_NO_KERNELS": "1",
                                                       "PYTHONPATH": str(
                              Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ok" in proc.stdout


def _build_and_check(isa: str, build: str) -> None:
    """All of loraplex's kernels built for `isa`: the LoRA kernel's checks here, the attention
    and fused ops' checks of test_cpu_kernels.py (the native build stays unloaded: the parent
    sets LORAPLEX_NO_KERNELS, and one process can register the `loraplex` ops only once)."""
    import test_cpu_kernels
    from torch.utils.cpp_extension import load

    srcs = [KERNEL_SRC, KERNEL_SRC.with_name("paged_attention.cpp"),
            KERNEL_SRC.with_name("fused_ops.cpp"), KERNEL_SRC.with_name("amx_gemm.cpp")]
    load(name=f"loraplex_kernels_{isa}", sources=[str(p) for p in srcs],
         extra_cflags=["-O2", "-fopenmp", *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"],
         build_directory=build, verbose=False, is_python_module=False)
    check_kernel(torch.ops.loraplex.lora_delta_)  # these flags have no AVX512-BF16: no pairs
    m = LoRASlots(64, [32], 2, 8, torch.device("cpu"), BF16, packed=True)
    b = LoRABatch.build([0], torch.device("cpu"), None)
    try:
        torch.ops.loraplex.lora_delta_(torch.zeros(1, 32, dtype=BF16),
                                       torch.randn(1, 64).to(BF16), m.ap, m.bp, m.ranks,
                                       m.shard_sizes, b.tokens, b.offsets, b.slots, True)
        raise AssertionError("a build without AVX512-BF16 ran the pair layout")
    except RuntimeError as e:
        assert "no pair layout" in str(e), e
    test_cpu_kernels.run_all(torch.ops.loraplex)
    print("ok")


def test_kernels_build_where_a_compiler_is():
    """The kernel tests skip where the C++ kernels cannot be built. With a C++ compiler on
    x86-64 they must build: a compile error would otherwise turn those tests into skips."""
    import shutil

    from loraplex.kernels import kernels

    if os.environ.get("LORAPLEX_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("kernels disabled, or not x86-64")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    assert kernels() is not None, "the C++ kernels failed to build (see the log's warning)"


def test_kernel_builds_are_kept_per_cpu():
    """torch's extension cache rebuilds on a source or flag change, not on a CPU change: a
    `-march=native` build from an AVX-512 machine, found in a home folder shared with an AVX2
    one, would die there of an illegal instruction. So each CPU kind builds in its own folder."""
    from loraplex.kernels import cpu_tag, kernels
    from loraplex.model.gguf_convert import cache_root

    zen4 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    zen2 = "processor\t: 0\nmodel name\t: AMD EPYC 7R32\nflags\t\t: fpu avx2\n"
    assert cpu_tag(zen4) != cpu_tag(zen2)
    assert cpu_tag(zen4) == cpu_tag(zen4.replace("fpu avx2 avx512f", "avx512f fpu avx2"))
    assert cpu_tag(zen4) != cpu_tag(zen4.replace("9R14", "9R15"))
    if os.environ.get("LORAPLEX_NO_KERNELS") or kernels() is None:
        pytest.skip("the C++ kernels are not built here")
    built = cache_root() / "kernels" / cpu_tag()
    assert list(built.glob("loraplex_kernels*.so")), f"no build in {built}"


if __name__ == "__main__":
    _build_and_check(sys.argv[1], sys.argv[2])

