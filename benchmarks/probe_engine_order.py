"""Do identical engines in one process run their base GEMMs equally fast?

Builds `--engines` identical engines on the embedded SmolLM2 (bf16 by default), one after the
other, and times each engine's packed base GEMMs (the 120 projections, then lm_head) on the same
random activations, engines in rotating order, `--reps` rounds. Prints each engine's median and
its round-by-round ratio to the first-built engine. First, as a yardstick, the read bandwidth of
eight 256 MB buffers allocated one after the other (is memory obtained earlier slower?).
Benchmarks that compare two engines (the steady-decode pairs of bench_lora.py,
bench_lora_read_floor.py) swap their roles to cancel such differences; a third engine that
never swaps (bench_lora_read_floor.py --plain) is not protected by that.

    python benchmarks/probe_engine_order.py [--engines 3] [--reps 30] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import save_results

RESULTS = Path(__file__).resolve().parent / "results" / "probe_engine_order.json"


def gemms(llm) -> tuple[list, torch.Tensor]:
    """An engine's packed projections (LoRA hooks off) and its packed lm_head."""
    model = llm.engine.runner.model
    mods = [m for m in model.modules() if getattr(m, "packed", None) is not None]
    for m in mods:
        m.lora = None  # the base GEMM alone
    return mods, model.lm_head_packed


def time_engine(mods: list, head: torch.Tensor, xs: dict, hidden: int) -> tuple[float, float]:
    """Seconds for the 120 projections and for lm_head, on `tokens` rows each."""
    from loraplex.model.layers import packed_linear

    t0 = time.perf_counter()
    for m in mods:
        m.forward(xs[m.in_features])
    t1 = time.perf_counter()
    packed_linear(xs[hidden], head, None)
    return t1 - t0, time.perf_counter() - t1


def buffer_bandwidths(n: int = 8, mb: int = 256, rounds: int = 12) -> list[float]:
    """Read bandwidth (GB/s, median of rounds) of `n` float32 buffers of `mb` MB each,
    allocated one after the other and summed in rotating order: whether memory obtained at
    different times reads at the same speed."""
    bufs = [torch.ones(mb << 18) for _ in range(n)]
    times: list[list[float]] = [[] for _ in bufs]
    for r in range(rounds):
        for i in [(r + j) % n for j in range(n)]:
            t0 = time.perf_counter()
            bufs[i].sum()
            times[i].append(time.perf_counter() - t0)
    return [mb * 1.048576e-3 / statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ballast-gb", type=float, default=0.0,
                    help="first allocate and touch this much memory, kept to the end (does "
                         "memory obtained later read faster?)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from loraplex import LLM
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    ballast = torch.ones(int(args.ballast_gb * (1 << 28))) if args.ballast_gb else None
    bw = buffer_bandwidths()
    print("read GB/s of 8 x 256 MB buffers, by allocation order: "
          + " ".join(f"{b:.1f}" for b in bw), flush=True)
    llms = [LLM(str(folder), dtype=args.dtype, enable_lora=True, max_loras=32,
                max_lora_rank=16, max_num_seqs=64) for _ in range(args.engines)]
    sets = [gemms(llm) for llm in llms]
    if any(head is None for _, head in sets):
        sys.exit("lm_head is not packed here (no oneDNN CPU packing): nothing to compare")
    dt = llms[0].engine.dtype
    hidden = llms[0].engine.model_config.hidden_size
    widths = {m.in_features for m in sets[0][0]} | {hidden}
    xs = {w: torch.randn(args.tokens, w).to(dt) for w in widths}
    n = len(llms)
    proj: list[list[float]] = [[] for _ in llms]
    head: list[list[float]] = [[] for _ in llms]
    for i in range(n):  # warm-up
        time_engine(*sets[i], xs, hidden)
    for rep in range(args.reps):
        for i in [(rep + j) % n for j in range(n)]:
            p, h = time_engine(*sets[i], xs, hidden)
            proj[i].append(p)
            head[i].append(h)
    rows = []
    for i in range(n):
        row = {"engine": i, "projections_ms": 1e3 * statistics.median(proj[i]),
               "lm_head_ms": 1e3 * statistics.median(head[i]),
               "projections_vs_first": statistics.median(a / b for a, b in zip(proj[i], proj[0])),
               "lm_head_vs_first": statistics.median(a / b for a, b in zip(head[i], head[0]))}
        rows.append(row)
        print(f"engine {i} (built #{i + 1}): 120 projections "
              f"{row['projections_ms']:.2f} ms ({row['projections_vs_first']:.3f}x the first), "
              f"lm_head {row['lm_head_ms']:.2f} ms ({row['lm_head_vs_first']:.3f}x)", flush=True)
    del ballast
    huge_kb = anon_huge_kb()
    print(f"process AnonHugePages: {huge_kb} kB", flush=True)
    return save_results(args.out, {"rows": rows, "anon_huge_pages_kb": huge_kb,
                                   "buffer_read_gbps_by_allocation_order": bw,
                                   "config": vars(args) | {"out": str(args.out)}})


def anon_huge_kb() -> int | None:
    """This process's memory in transparent huge pages (Linux), or None."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
