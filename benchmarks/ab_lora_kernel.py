"""Before/after for the LoRA kernel: the kernel source at a git revision against the working
tree's (or two revisions), built side by side in one process and timed alternately, step by
step, so this machine's noise hits both alike. A step is one decode step's 120 calls (30 layers
x 4 fused projections at SmolLM2's shapes) for T tokens over k adapters, each layer in its own
slot memory, with the caches flushed between steps (a 64 MB write), as in the engine where a
step's adapter weights do not stay cached from the step before.

With --with-base, each LoRA call follows its projection's base GEMM (random weights at
SmolLM2's shapes, pre-packed for oneDNN as the engine runs them) and a third side runs the GEMMs
alone, interleaved with the other two: then a step's time includes what the adapter reads cost
the base GEMMs that follow them (on the Zen 2 dev VM, streaming 32 adapters' 624 MB between the
GEMMs made the GEMMs ~5% slower, and so did a plain read of the same bytes), and "extra" is a
side's step time minus the GEMMs-alone step, the LoRA tax as the engine sees it.
--read-only (with --with-base) adds a fourth side whose LoRA op reads exactly the kernel's bytes
and computes nothing (benchmarks/bench_lora_read_floor.py's op): the bar no kernel that reads
its adapters between the GEMMs goes under. It also prints the LoRA calls' own time per step
(timed apart from the GEMMs), which is steadier than the difference of two step times.
A step's tokens are laid out as the runner lays them out, one adapter's rows side by side.

    python benchmarks/ab_lora_kernel.py --before HEAD~1 [--after WORKTREE] [--ks 1,8,32]
        [--tokens 64] [--reps 40] [--dtype float32|bfloat16] [--lora-dtype float32|bfloat16|float16]
        [--with-base [--read-only]] [--pairs [--pairs-before]]

--dtype is the activations' (the model's) dtype. --pairs gives the after side the kernel's pair
layout (bf16 activations and adapters on AVX512-BF16 CPUs, as the engine runs them there; the
before side keeps the plain layout), so `--before WORKTREE --dtype bfloat16 --lora-dtype
bfloat16 --pairs` compares the two layouts of one kernel. --pairs-before gives the before side
the pair layout too (two revisions that both have it).

Prints, per k, each side's median step time and the median of the per-step ratios after/before;
saves them to benchmarks/results/ab_lora_kernel.json (or --out).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import save_results
from bench_lora_kernel import SHAPES, build  # the same step: SmolLM2's 30 x 4 calls

ROOT = Path(__file__).resolve().parents[1]
KDIR = "loraplex/kernels"
RESULTS = ROOT / "benchmarks" / "results" / "ab_lora_kernel.json"


def source(rev: str, name: str) -> str:
    """A kernel source file at `rev` ("WORKTREE" = the file on disk)."""
    if rev == "WORKTREE":
        return (ROOT / KDIR / name).read_text()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{KDIR}/{name}"],
                          check=True, capture_output=True, text=True).stdout


def has_source(rev: str, name: str) -> bool:
    """Whether `rev` has the kernel source file `name`."""
    if rev == "WORKTREE":
        return (ROOT / KDIR / name).exists()
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}:{KDIR}/{name}"],
                          capture_output=True).returncode == 0


def build_op(rev: str, tag: str, workdir: Path, direct: bool = False):
    """lora.cpp at `rev`, its op renamed to torch.ops.<tag>.lora_delta_ (one process can register
    a namespace once), compiled as the engine compiles it; returns the op, or with `direct` its
    pybind11 binding where that revision has one (the engine's call path, see
    loraplex/kernels/__init__.py; here both sides go through the dispatcher by default, so only
    the kernels differ)."""
    from torch.utils.cpp_extension import load

    d = workdir / tag
    d.mkdir(parents=True)
    for name in ("vec.h", "vec_math.h", "amx_tiles.h"):
        if has_source(rev, name):
            (d / name).write_text(source(rev, name))
    # Since session 19 lora.cpp's pybind11 module also binds amx_gemm.cpp's functions.
    extra = []
    if has_source(rev, "amx_gemm.cpp"):
        (d / "amx_gemm.cpp").write_text(source(rev, "amx_gemm.cpp"))
        extra.append(str(d / "amx_gemm.cpp"))
    src = source(rev, "lora.cpp")
    for macro in ("TORCH_LIBRARY_FRAGMENT", "TORCH_LIBRARY_IMPL"):
        if f"{macro}(loraplex," not in src:
            raise SystemExit(f"{rev}: lora.cpp has no {macro}(loraplex, ...)")
        src = src.replace(f"{macro}(loraplex,", f"{macro}({tag},")
    (d / "lora.cpp").write_text(src)
    bound = direct and "PYBIND11_MODULE(" in src
    module = load(name=f"ab_{tag}", sources=[str(d / "lora.cpp"), *extra],
                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                  build_directory=str(d), verbose=False, is_python_module=bound)
    return module.lora_delta_ if bound else getattr(torch.ops, tag).lora_delta_


def base_gemms(mods, tokens: int, dtype: torch.dtype = torch.float32) -> list:
    """One base projection per LoRA module, [out, in] random weights packed as the engine packs
    them (oneDNN where it can), each a callable x -> x W^T."""
    from loraplex.model.layers import can_pack, pack_weight, packed_linear

    fns = []
    for m in mods:
        w = torch.randn(m.out_features, m.in_features).to(dtype)
        if can_pack(w):
            packed = pack_weight(w, tokens)
            fns.append(lambda x, p=packed: packed_linear(x, p, None))
        else:
            fns.append(lambda x, w=w: torch.nn.functional.linear(x, w))
    return fns


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="git revision of the baseline kernel")
    ap.add_argument("--after", default="WORKTREE", help="git revision, or WORKTREE (default)")
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--pairs", action="store_true",
                    help="the after side takes the pair layout (bf16 x and adapters)")
    ap.add_argument("--pairs-before", action="store_true",
                    help="with --pairs: the before side takes it too")
    ap.add_argument("--with-base", action="store_true",
                    help="run each projection's base GEMM before its LoRA call, and the GEMMs "
                         "alone as a third side")
    ap.add_argument("--read-only", action="store_true",
                    help="with --with-base: a fourth side that only reads the kernel's bytes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from loraplex.lora.ops import LoRABatch

    ks = [int(k) for k in args.ks.split(",")]
    wdtype, act = getattr(torch, args.lora_dtype), getattr(torch, args.dtype)
    if args.pairs_before and not args.pairs:
        raise SystemExit("--pairs-before goes with --pairs")
    if args.read_only and not args.with_base:
        raise SystemExit("--read-only goes with --with-base")
    if args.pairs and not (act == wdtype == torch.bfloat16):
        raise SystemExit("--pairs takes --dtype bfloat16 --lora-dtype bfloat16")
    with tempfile.TemporaryDirectory(prefix="loraplex-ab-") as tmp:
        ops = {"before": build_op(args.before, "ab_before", Path(tmp)),
               "after": build_op(args.after, "ab_after", Path(tmp))}
    if args.pairs:
        from loraplex.kernels import lora_pairs_supported

        if not lora_pairs_supported():
            raise SystemExit("--pairs: this CPU's kernel build has no pair layout")
        after_op, before_op = ops["after"], ops["before"]
        ops["after"] = lambda *a: after_op(*a, True)
        if args.pairs_before:
            ops["before"] = lambda *a: before_op(*a, True)
    if args.read_only:
        from bench_lora_read_floor import floor_ops

        read_op = floor_ops()[0]["read"]  # the pair layout holds the same bytes in place
        ops["read"] = lambda *a: read_op(*a, False)
    mods = build(max(ks), args.rank, wdtype, args.pairs_before)  # every layer's own slots
    # With --pairs alone, the after side's own copy of the same weights in the pair layout.
    # Otherwise both sides read the same copy: with a copy each, the second copy's side ran
    # 0.4-1.7 ms a step faster whichever kernel it had (bf16, k=8 and 32, session 15), so
    # comparing two revisions on two copies measured where their weights sat in memory.
    mods_of = {"before": mods, "after": build(max(ks), args.rank, wdtype, True)
               if args.pairs and not args.pairs_before else mods}
    xs = {fin: torch.randn(args.tokens, fin).to(act) for fin, _ in SHAPES}
    ys = {sum(outs): torch.zeros(args.tokens, sum(outs), dtype=act) for _, outs in SHAPES}
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    base = base_gemms(mods, args.tokens, act) if args.with_base else None
    sides = ["before", "after"] + (["base"] if base else []) + (["read"] if args.read_only else [])
    rows = []
    for k in ks:
        # one adapter's rows side by side, as ModelRunner._forward_order lays them out
        b = LoRABatch.build(sorted(i % k for i in range(args.tokens)), torch.device("cpu"), None)
        times = {side: [] for side in sides}
        op_times = {side: [] for side in sides}
        for rep in range(args.reps):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                op = ops.get(side)
                if base is None:
                    flush.add_(1)  # with base GEMMs, their weights flush the caches
                in_op = 0.0  # the LoRA calls' own time, apart from the GEMMs'
                t0 = time.perf_counter()
                for i, m in enumerate(mods_of.get(side, mods)):
                    x = xs[m.in_features]
                    y = base[i](x) if base else ys[m.out_features]
                    if op is not None:
                        t1 = time.perf_counter()
                        op(y, x, m.ap, m.bp, m.ranks, m.shard_sizes, b.tokens, b.offsets,
                           b.slots)
                        in_op += time.perf_counter() - t1
                times[side].append(time.perf_counter() - t0)
                op_times[side].append(in_op)
        ratios = sorted(a / b for a, b in zip(times["after"], times["before"]))
        med = {side: sorted(v)[len(v) // 2] * 1e3 for side, v in times.items()}
        row = {"k": k, "before_ms": med["before"], "after_ms": med["after"],
               "ratio": ratios[len(ratios) // 2]}
        line = (f"k={k:3d}: before ({args.before}) {med['before']:6.2f} ms | after ({args.after}) "
                f"{med['after']:6.2f} ms | after/before, median of paired steps {row['ratio']:.3f}")
        if base:
            row["base_ms"] = med["base"]
            for side in ("before", "after") + (("read",) if args.read_only else ()):
                row[f"{side}_extra_ms"] = med[side] - med["base"]
            line += (f" | GEMMs alone {med['base']:6.2f} ms, extra before "
                     f"{row['before_extra_ms']:5.2f} after {row['after_extra_ms']:5.2f}")
            if args.read_only:
                line += (f", read-only {row['read_extra_ms']:5.2f} (after / read-only "
                         f"{row['after_extra_ms'] / row['read_extra_ms']:.2f})")
                for side in ("before", "after", "read"):
                    v = sorted(op_times[side])
                    row[f"{side}_calls_ms"] = v[len(v) // 2] * 1e3
                line += (f" | the LoRA calls alone: before {row['before_calls_ms']:5.2f}, after "
                         f"{row['after_calls_ms']:5.2f}, read-only {row['read_calls_ms']:5.2f} ms")
        rows.append(row)
        print(line, flush=True)
    res = {"before": args.before, "after": args.after, "tokens": args.tokens, "rank": args.rank,
           "dtype": args.dtype, "lora_dtype": args.lora_dtype, "pairs": args.pairs,
           "pairs_before": args.pairs_before,
           "reps": args.reps, "with_base": args.with_base, "read_only": args.read_only,
           "rows": rows}
    return save_results(args.out, res)


if __name__ == "__main__":
    main()
