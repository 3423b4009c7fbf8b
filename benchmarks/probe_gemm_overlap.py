"""Would running the LoRA deltas beside the base GEMM, on the other core, hide their reads?

At k=8 a decode step's LoRA kernel costs what a read-only op of the same bytes costs in bf16
(`bench_lora_read_floor.py`): the step is bound by reading the adapters between the base GEMMs.
The one way below that bar is to read them *while* a GEMM computes, so this probe builds that
and measures it, one decode step's 120 projections at SmolLM2's shapes (64 tokens over k
adapters, each layer with its own weights and slots):

  base      the base GEMMs alone (oneDNN, pre-packed as the engine runs them);
  seq       each GEMM, then the LoRA kernel on both threads: what the engine does;
  split     each GEMM cut in two column slices (W[:n1], W[n1:], packed apart), no LoRA: what
            the cut alone costs (a second GEMM call and the concatenation);
  split+seq the cut GEMMs, then the kernel on both threads;
  overlap   thread 0 runs the kernel single-threaded (into a zeroed buffer) while thread 1 runs
            the head slice single-threaded; then both threads run the tail slice, and the
            delta is added. With the head slice sized so both threads finish together, the
            step saves the kernel's two-thread time minus half its one-thread time, if the two
            do not slow each other down.
  kernel 1t / 2t: the kernel alone on one thread / two (its 2t time is seq's extra).

With --halves (instead of the column cuts), the batch is cut by rows instead: each thread
runs half the rows (laid out as the runner lays them out, so each half holds about half the
adapters) through single-threaded ops, the weights packed for the half's row count:

  halves base        each thread its half's GEMMs, no LoRA;
  halves seq         each thread its GEMM, then its LoRA kernel call;
  halves lora-first  thread 0 so, thread 1 its LoRA call first (into a zeroed delta), then its
                     GEMM adding the delta (oneDNN's binary post-op), so that the threads'
                     adapter reads can fall in the other thread's GEMM.

In a decode step every row is its own sequence, so a whole forward could run this way, each
half apart, with no joins between the projections.

`--fractions` sets the head slice's share of each projection's columns (rounded to 32).
Sides alternate in rotating order; each row prints the median step and the median of the
per-step ratios to seq, and to base. Saves benchmarks/results/probe_gemm_overlap.json.

    python benchmarks/probe_gemm_overlap.py [--dtype bfloat16|float32] [--k 8]
        [--fractions 0.05,0.1,0.15 | --halves] [--reps 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_lora_kernel import source
from bench_lora import save_results
from bench_lora_kernel import SHAPES, build

RESULTS = Path(__file__).resolve().parent / "results" / "probe_gemm_overlap.json"

# Appended to a copy of lora.cpp (whose lora_delta_ it calls): the sides that need the kernel
# and oneDNN's linear in one parallel region. Inside at::parallel_for, torch's OpenMP region,
# both run single-threaded (at::parallel_for and oneDNN see they are in a parallel region).
OVERLAP_CPP = r"""
#include <ATen/core/dispatch/Dispatcher.h>

// oneDNN's linear on a pre-packed weight, as loraplex.model.layers.packed_linear calls it.
static at::Tensor boxed(const c10::OperatorHandle& op, torch::jit::Stack st) {
  op.callBoxed(&st);
  return st[0].toTensor();
}

static at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return boxed(op, {x, w, c10::IValue(), std::string("none"),
                    c10::List<std::optional<at::Scalar>>(), std::string("")});
}

// side: 0 base (w_head = the whole weight), 1 seq (same), 2 split, 3 split+seq, 4 overlap,
// 5 kernel alone on one thread, 6 kernel alone on all threads.
at::Tensor probe(int64_t side, at::Tensor x, at::Tensor w_head, at::Tensor w_tail,
                 int64_t out, at::Tensor ap, at::Tensor bp, at::Tensor ranks,
                 at::Tensor shard_sizes, at::Tensor tokens, at::Tensor offsets,
                 at::Tensor slots, bool pairs) {
  auto lora = [&](at::Tensor y) {
    lora_delta_(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots, pairs);
  };
  if (side == 0 || side == 1) {
    at::Tensor y = packed_linear(x, w_head);
    if (side == 1) lora(y);
    return y;
  }
  if (side == 2 || side == 3) {
    at::Tensor y = at::cat({packed_linear(x, w_head), packed_linear(x, w_tail)}, 1);
    if (side == 3) lora(y);
    return y;
  }
  at::Tensor d = at::zeros({x.size(0), out}, x.options());
  if (side == 6) {
    lora(d);
    return d;
  }
  at::Tensor head;
  // (every index of the chunk: with one thread both run here, one after the other)
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (b == 0)
        lora(d);
      else if (side == 4)
        head = packed_linear(x, w_head);
    }
  });
  if (side == 5) return d;
  at::Tensor y = at::cat({head, packed_linear(x, w_tail)}, 1);
  y.add_(d);
  return y;
}

// oneDNN's linear plus `other` (its binary "add" post-op), on a pre-packed weight.
static at::Tensor packed_linear_add(const at::Tensor& x, const at::Tensor& other,
                                    const at::Tensor& w) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  return boxed(op, {x, other, w, c10::IValue(), std::string("add")});
}

// The batch as two halves of rows, each on its own thread with single-threaded ops: rows
// [0, h) and [h, T) (x0, x1), each with its own LoRA metadata (t*, o*, s*). side: 0 the GEMMs
// alone; 1 each thread its GEMM, then its LoRA; 2 thread 0 so, thread 1 its LoRA first (into
// a zeroed delta) and then its GEMM adding the delta, so that one thread's adapter reads fall
// in the other's GEMM. Returns the two halves' outputs (a real engine would keep them apart).
std::vector<at::Tensor> halves(int64_t side, at::Tensor x0, at::Tensor x1, at::Tensor w,
                               int64_t out, at::Tensor ap, at::Tensor bp, at::Tensor ranks,
                               at::Tensor shard_sizes, at::Tensor t0, at::Tensor o0,
                               at::Tensor s0, at::Tensor t1, at::Tensor o1, at::Tensor s1,
                               bool pairs) {
  std::vector<at::Tensor> y(2);
  auto half = [&](int64_t b) {
    const at::Tensor& x = b == 0 ? x0 : x1;
    const at::Tensor& tk = b == 0 ? t0 : t1;
    const at::Tensor& of = b == 0 ? o0 : o1;
    const at::Tensor& sl = b == 0 ? s0 : s1;
    if (side == 2 && b == 1) {
      at::Tensor d = at::zeros({x.size(0), out}, x.options());
      lora_delta_(d, x, ap, bp, ranks, shard_sizes, tk, of, sl, pairs);
      y[b] = packed_linear_add(x, d, w);
      return;
    }
    y[b] = packed_linear(x, w);
    if (side != 0) lora_delta_(y[b], x, ap, bp, ranks, shard_sizes, tk, of, sl, pairs);
  };
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) half(b);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("probe", &probe);
  m.def("halves", &halves);
}
"""


def build_probe(workdir: Path):
    from torch.utils.cpp_extension import load

    for name in ("vec.h", "vec_math.h", "amx_tiles.h"):
        (workdir / name).write_text(source("WORKTREE", name))
    src = source("WORKTREE", "lora.cpp")
    src = src.replace("TORCH_LIBRARY_FRAGMENT(loraplex,", "TORCH_LIBRARY_FRAGMENT(probe_ovl,")
    src = src.replace("TORCH_LIBRARY_IMPL(loraplex,", "TORCH_LIBRARY_IMPL(probe_ovl,")
    src = src[:src.index("PYBIND11_MODULE(")] + OVERLAP_CPP
    (workdir / "lora.cpp").write_text(src)
    return load(name="probe_gemm_overlap", sources=[str(workdir / "lora.cpp")],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=str(workdir), verbose=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--fractions", default="0.05,0.1,0.15")
    ap.add_argument("--reps", type=int, default=16)
    ap.add_argument("--halves", action="store_true",
                    help="add the half-batch sides (each thread half the rows) and skip the "
                         "column cuts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)  # the probe is about two cores: one for LoRA, one for the GEMM
    from loraplex.kernels import lora_pairs_supported
    from loraplex.lora.ops import LoRABatch
    from loraplex.model.layers import can_pack, pack_weight

    dt = getattr(torch, args.dtype)
    if not can_pack(torch.empty(1, 1, dtype=dt)):
        raise SystemExit(f"oneDNN cannot pre-pack {args.dtype} weights here")
    pairs = dt == torch.bfloat16 and lora_pairs_supported()  # as the engine chooses
    with tempfile.TemporaryDirectory(prefix="loraplex-probe-") as tmp:
        ext = build_probe(Path(tmp))
    mods = build(args.k, args.rank, dt, pairs)
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(m.out_features, m.in_features, generator=g).to(dt) for m in mods]
    whole = [pack_weight(w, args.tokens) for w in full]
    fractions = [float(f) for f in args.fractions.split(",")]

    def cut(f: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pieces = []
        for w in full:
            n1 = min(w.shape[0] - 32, max(32, round(w.shape[0] * f / 32) * 32))
            pieces.append((pack_weight(w[:n1].contiguous(), args.tokens),
                           pack_weight(w[n1:].contiguous(), args.tokens)))
        return pieces

    if args.halves:
        fractions = []
    cuts = {f: cut(f) for f in fractions}
    xs = {fin: torch.randn(args.tokens, fin).to(dt) for fin, _ in SHAPES}
    batch = LoRABatch.build([i % args.k for i in range(args.tokens)], torch.device("cpu"))

    def run(side: int, f: float | None) -> torch.Tensor | None:
        ws = cuts[f] if f is not None else [(w, w) for w in whole]
        y = None
        for m, (wh, wt) in zip(mods, ws):
            y = ext.probe(side, xs[m.in_features], wh, wt, m.out_features, m.ap, m.bp, m.ranks,
                          m.shard_sizes, batch.tokens, batch.offsets, batch.slots, pairs)
        return y

    # Half batches: rows in the runner's layout (one adapter's rows side by side), so each
    # half holds about half the adapters; weights packed for the half's row count.
    h = args.tokens // 2
    # order[j]: the row (of seq's, adapter i % k for row i) placed at j
    order = sorted(range(args.tokens), key=lambda i: i % args.k)
    layout = [i % args.k for i in order]
    b0 = LoRABatch.build(layout[:h], torch.device("cpu"))
    b1 = LoRABatch.build(layout[h:], torch.device("cpu"))
    whole_h = [pack_weight(w, h) for w in full] if args.halves else []
    x_half = {fin: (x[order[:h]].contiguous(), x[order[h:]].contiguous())
              for fin, x in xs.items()}

    def run_halves(side: int) -> list[torch.Tensor]:
        y = []
        for m, w in zip(mods, whole_h):
            x0, x1 = x_half[m.in_features]
            y = ext.halves(side, x0, x1, w, m.out_features, m.ap, m.bp, m.ranks,
                           m.shard_sizes, b0.tokens, b0.offsets, b0.slots, b1.tokens,
                           b1.offsets, b1.slots, pairs)
        return y

    # the sides compute the same thing: the last projection's output, seq against overlap
    ref = run(1, None).float()
    tol = 1e-3 if dt == torch.float32 else 2 ** -7 * ref.abs().max().item()
    err = 0.0
    for name, got in ([("overlap", run(4, f).float()) for f in fractions[:1]]
                      + [(f"halves side {s}", torch.cat(run_halves(s)).float())
                         for s in ((1, 2) if args.halves else ())]):
        # the halves hold seq's rows in `order`
        e = ((ref[order] if name.startswith("halves") else ref) - got).abs().max().item()
        if e > tol:
            raise SystemExit(f"{name} differs from seq by {e} (> {tol})")
        err = max(err, e)
    sides: list[tuple[str, int, float | None]] = [
        ("base", 0, None), ("seq", 1, None), ("kernel 1t", 5, None), ("kernel 2t", 6, None)]
    for f in fractions:
        sides += [(f"split {f}", 2, f), (f"split+seq {f}", 3, f), (f"overlap {f}", 4, f)]
    if args.halves:
        sides += [("halves base", 10, None), ("halves seq", 11, None),
                  ("halves lora-first", 12, None)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for rep in range(args.reps):
        r = rep % len(sides)
        for name, side, f in sides[r:] + sides[:r]:
            t0 = time.perf_counter()
            if side >= 10:
                run_halves(side - 10)
            else:
                run(side, f)
            times[name].append(time.perf_counter() - t0)

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    rows = []
    print(f"{args.dtype}, k={args.k}, {args.tokens} tokens, r={args.rank}, pairs={pairs}: "
          f"one decode step's 120 projections, {args.reps} rounds")
    for name, _, _ in sides:
        v = times[name]
        row = {"side": name, "ms": 1e3 * median(v),
               "vs_seq": median([a / b for a, b in zip(v, times["seq"])]),
               "base_over_this": median([b / a for a, b in zip(v, times["base"])])}
        rows.append(row)
        print(f"  {name:18s} {row['ms']:7.2f} ms | / seq {row['vs_seq']:.3f} | base / this "
              f"{row['base_over_this']:.3f}")
    ms = {row["side"]: row["ms"] for row in rows}
    # With no interference and the head slice sized so both threads finish together, the
    # overlap turns the kernel's two-thread time into half its one-thread time.
    best = ms["kernel 2t"] - ms["kernel 1t"] / 2
    cut = (min(ms[f"split {f}"] for f in fractions) - ms["base"]) if fractions else None
    print(f"  best case for the overlap: kernel 2t - kernel 1t / 2 = {best:.2f} ms a step"
          + (f"; cutting the GEMMs costs {cut:.2f} ms (cheapest cut)" if cut is not None else ""))
    if args.halves:
        print(f"  halves: GEMMs {ms['halves base'] - ms['base']:+.2f} ms against base; LoRA's "
              f"extra {ms['halves seq'] - ms['halves base']:.2f} (GEMM first on both threads), "
              f"{ms['halves lora-first'] - ms['halves base']:.2f} (one thread LoRA first) "
              f"against seq's {ms['seq'] - ms['base']:.2f}")
    res = {"dtype": args.dtype, "k": args.k, "tokens": args.tokens, "rank": args.rank,
           "pairs": pairs, "reps": args.reps, "max_abs_err_overlap_vs_seq": err,
           "best_case_saving_ms": best, "cut_cost_ms": cut, "rows": rows}
    return save_results(args.out, res)


if __name__ == "__main__":
    main()
