"""The LoRA tax against what merely reading the adapters costs, inside the engine.

bench_lora.py's floor for LoRA's extra decode-step time is arithmetic: the bytes of the distinct
adapters a step uses over the memory read bandwidth (one long `sum()` over 768 MB). This
measures the same thing physically, in the engine, on the embedded SmolLM2: a step whose LoRA
op reads exactly the bytes the kernel reads (every used slot's A^T and B, each shard's real
rank, in the same per-projection calls, both threads) and computes nothing. No kernel, however
fast its arithmetic, adds less than that read. The read also costs the base GEMMs that follow
each call (on the Zen 2 dev VM: ~5% on the GEMMs when 32 adapters' 624 MB stream between
them, for our kernel and a plain torch read alike), which the bandwidth floor does not count.

Four sides, each a steady decode step of `--requests` requests, interleaved step by step in
rotating order: the base (an engine decoding them without adapters), the kernel (a second
engine decoding them over k adapters), read-only (that second engine with its LoRA op swapped
for the read) and no-op (its LoRA op swapped for a call that does nothing). Each timed step
follows an untimed one of the same side, as a serving engine's steps follow each other (see
decode_sides). Prints per k the
median step times, each LoRA side's extra over the base, that extra over the bandwidth floor,
and kernel extra / read-only extra.

    python benchmarks/bench_lora_read_floor.py [--ks 1,8,32] [--requests 64] [--steps 30]
        [--passes 4] [--dtype bfloat16 --lora-dtype auto] [--before REV | --plain] [--amx]

--before REV adds a fifth side: the LoRA kernel as it was at git revision REV (built beside
the working tree's as benchmarks/ab_lora_kernel.py builds it), so a kernel change is measured
in the engine, paired step by step with the current kernel.

--plain (bf16 model and adapters on a CPU with AVX512-BF16, where the engine uses the kernel's
pair layout) adds a third engine built with the plain layout (LORAPLEX_NO_LORA_PAIRS) as a
fifth side, so the two layouts are measured in the engine, step by step. Its engine decodes
its own copy of the requests, taking as many steps a round as the others. Caution (session
18): the third engine is built last and never swaps roles, and on the Intel AMX VM the
last-built of identical engines ran its GEMMs up to 13% faster (probe_engine_order.py); an
A/A third engine came out 6-17% faster than the kernel side. Its figures favour it.

--amx (bf16 on a CPU with AMX-BF16) adds a side running the same kernel with its AMX tile path
off (lora.cpp's namespace amx), switched call by call, so the tile path is measured in the
engine, step by step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import bench_prompts, save_results, start_decoding, stop_decoding

from loraplex.bench.adapters import write_adapter

from roofline import measure_mem_bandwidth

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_lora_read_floor.json"

# The kernel's signature, its bytes, none of its arithmetic. Items are (group, shard) pairs as
# in the kernel; each reads its slot's A^T (in x rp, rp = rank rounded up to 8) and the first r
# rows of each of its B blocks (r x 32), as 64-bit words summed with integer adds (vectorized
# without reassociating floats). The sums land in a buffer the compiler cannot drop; a counter
# of the bytes read lets the benchmark check them against the adapters' size.
READ_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <vector>

static std::atomic<int64_t> bytes_read{0};

static uint64_t sum_words(const char* p, int64_t nbytes) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  const int64_t n = nbytes / 8;
  uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += w[i + j];
  for (; i < n; ++i) s[0] += w[i];
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

void lora_read_(at::Tensor y, at::Tensor x, at::Tensor ap, at::Tensor bp, at::Tensor ranks,
                at::Tensor shard_sizes, at::Tensor tokens, at::Tensor offsets,
                at::Tensor slots, bool pairs) {
  // the pair layout (bool pairs) holds the same bytes at the same places (its B blocks have
  // an even number of rows)
  const int64_t nsh = shard_sizes.size(0), in = x.size(1), es = ap.element_size();
  const int64_t ng = slots.size(0), R = bp.size(2);
  const int64_t* sz = shard_sizes.data_ptr<int64_t>();
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  std::vector<int64_t> b0(nsh + 1, 0);
  for (int64_t j = 0; j < nsh; ++j) b0[j + 1] = b0[j] + (sz[j] + 31) / 32;
  const char* a = static_cast<const char*>(ap.data_ptr());
  const char* b = static_cast<const char*>(bp.data_ptr());
  static std::vector<uint64_t> sink(4096);
  at::parallel_for(0, ng * nsh, 1, [&](int64_t begin, int64_t end) {
    uint64_t s = 0;
    int64_t nbytes = 0;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = it / nsh, j = it % nsh, slot = sl[g], r = rk[slot * nsh + j];
      if (r == 0) continue;
      // shard j sits after the slot's shards before it, each at its real rank (ops.py)
      int64_t ao = slot * nsh * ap.size(2), bo = slot * bp.size(1) * R * 32;
      for (int64_t i = 0; i < j; ++i) {
        const int64_t ri = rk[slot * nsh + i];
        ao += (ri + 7) / 8 * 8 * in;
        bo += (b0[i + 1] - b0[i]) * (pairs ? ri + ri % 2 : ri) * 32;
      }
      const int64_t rp = (r + 7) / 8 * 8;
      s += sum_words(a + ao * es, in * rp * es);
      nbytes += in * rp * es;
      const int64_t rb = pairs ? r + r % 2 : r, nb = b0[j + 1] - b0[j];
      s += sum_words(b + bo * es, nb * rb * 32 * es);
      nbytes += nb * rb * 32 * es;
    }
    sink[(begin * 8) % 4096] += s;
    bytes_read += nbytes;
  });
}

int64_t take_bytes_read() { return bytes_read.exchange(0); }

// The same call with no work: what the LoRA path costs per call before any byte is read.
void lora_noop_(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                at::Tensor, at::Tensor, at::Tensor, bool) {}
"""


def median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def floor_ops():
    """The read-only and no-op LoRA ops, compiled here as the engine compiles its kernel and
    bound as it binds it (pybind11), and the read counter."""
    from torch.utils.cpp_extension import load_inline

    mod = load_inline(name="loraplex_read_floor", cpp_sources=[READ_SRC],
                      functions=["lora_read_", "lora_noop_", "take_bytes_read"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    return {"read": mod.lora_read_, "noop": mod.lora_noop_}, mod.take_bytes_read


def decode_sides(base_llm, lora_llm, ops: dict, prompts, names, steps: int,
                 take_bytes_read, expect_bytes: int, plain_llm=None) -> dict:
    """Steady decode: the base engine on the requests, the LoRA engine on them over `names`
    with each of `ops` (side name -> LoRA op) in turn, and `plain_llm` (if given: the "plain"
    side) on its own copy of them over `names`: `steps` rounds of one timed step per side, in
    rotating order. Returns side -> step times (s), round by round.

    Each timed step follows an untimed step of the same engine with the same op, as a serving
    engine's steps follow each other: the caches then hold what that side's previous step left.
    (Until session 18 each side was timed right after the previous side's step: the kernel side
    always after the base engine's step, the read, no-op and --before/--amx sides after a step
    of the LoRA engine itself, which favoured them by 1-3 ms a step; the no-op side came out
    faster than the base. An A/A run, --before HEAD on an unchanged tree, gave now / then
    1.022 and 1.049 on the Intel AMX VM.)"""
    from loraplex import SamplingParams

    n_lora = len(ops)
    sp = SamplingParams(temperature=0, max_tokens=2 * n_lora * steps + 8, ignore_eos=True)
    own = [("base", base_llm, None), ("lora", lora_llm, names)]
    if plain_llm is not None:
        own.append(("plain", plain_llm, names))
    runs = {side: (llm.engine, start_decoding(llm.engine, prompts, nm, sp))
            for side, llm, nm in own}
    runner = runs["lora"][0].runner
    kernel = runner.lora_kernel
    # The read side reads what the kernel reads: each distinct adapter's A and B once a step
    # (rank 16 pads nothing, SmolLM2's widths are multiples of 32), so one step's bytes are
    # the adapters' total size.
    runner.lora_kernel = ops["read"]
    take_bytes_read()
    runs["lora"][0].step()
    got = take_bytes_read()
    if got != expect_bytes:
        raise SystemExit(f"the read-only op read {got} bytes in a step, expected {expect_bytes}")
    sides = ["base", *ops, *(["plain"] if plain_llm is not None else [])]
    times = {side: [] for side in sides}
    # Every LoRA side decodes one token per request a step (the read and no-op sides' tokens
    # differ: no deltas), so they share the LoRA engine's requests, and it takes 2 n_lora steps
    # a round (a warm-up and a timed one per side). The base (and plain) engines take
    # 2 (n_lora - 1) untimed steps after their timed one, so every engine's sequences (and
    # their attention cost) grow alike.
    for s in range(steps):
        for side in sides[s % len(sides):] + sides[:s % len(sides)]:
            alone = side in ("base", "plain")  # an engine of its own
            eng = runs[side if alone else "lora"][0]
            if not alone:
                runner.lora_kernel = ops[side]
            eng.step()  # the step before the timed one: the same engine and op
            t0 = time.perf_counter()
            eng.step()
            times[side].append(time.perf_counter() - t0)
            for _ in range(2 * (n_lora - 1) if alone else 0):
                eng.step()
    runner.lora_kernel = kernel
    for side, (eng, rids) in runs.items():
        # a preempted request recomputes its prefill inside a timed step: the KV cache must
        # hold every request to the end (more --steps or sides need more of it)
        if eng.scheduler.num_preemptions:
            raise SystemExit(f"the {side} engine preempted requests mid-measurement; use "
                             "fewer --steps")
        stop_decoding(eng, rids)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30,
                    help="rounds per engine pass: one timed step per side, each after an "
                         "untimed one")
    ap.add_argument("--passes", type=int, default=4,
                    help="engine passes per k, the two engines swapping roles")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cpu-gemm", default="onednn", choices=["onednn", "mkl", "amx"],
                    help="the engines' CPU GEMMs (amx: bf16 on AMX CPUs)")
    ap.add_argument("--lora-dtype", default="auto")
    ap.add_argument("--before", help="also time the LoRA kernel of this git revision")
    ap.add_argument("--plain", action="store_true",
                    help="also time an engine on the kernel's plain layout (bf16, see above)")
    ap.add_argument("--amx", action="store_true",
                    help="also time the kernel with its AMX tile path off (bf16, AMX CPUs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.passes < 2 or args.passes % 2:
        ap.error("--passes must be even (each engine is the base engine in half of them)")
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)

    from loraplex import LLM
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    bw = measure_mem_bandwidth(768, kind="read")
    floor_lora_ops, take_bytes_read = floor_ops()
    old_has_pairs = False
    if args.before:
        from ab_lora_kernel import build_op, source

        with tempfile.TemporaryDirectory(prefix="loraplex-ab-") as d:
            old = build_op(args.before, "ab_before", Path(d), direct=True)
        old_has_pairs = "bool pairs" in source(args.before, "lora.cpp")
        # the engine passes a tenth argument (pairs, False in a plain-layout engine), which
        # revisions before the pair layout do not take
        floor_lora_ops["before"] = old if old_has_pairs else (lambda *a: old(*a[:9]))

    def make_llm():
        return LLM(str(folder), dtype=args.dtype, lora_dtype=args.lora_dtype, enable_lora=True,
                   max_loras=max(ks), max_lora_rank=args.rank,
                   max_num_seqs=max(64, args.requests), cpu_gemm=args.cpu_gemm)

    llms = [make_llm(), make_llm()]
    if llms[0].engine.runner.lora_kernel is None:
        raise SystemExit("the C++ LoRA kernel is not in use here: nothing to compare")
    pairs = any(m.pairs for m in llms[0].engine.lora.slots.values())
    if args.before and pairs and not old_has_pairs:
        raise SystemExit("--before: the engine holds adapters in the pair layout, which kernels "
                         "before it cannot read; --plain compares the layouts")
    if args.plain and not pairs:
        raise SystemExit("--plain: this engine does not use the pair layout (it takes a bf16 "
                         "model and adapters on a CPU with AVX512-BF16)")
    if args.amx:
        from loraplex.kernels import lora_amx_supported

        if not (pairs and lora_amx_supported()):
            raise SystemExit("--amx: no AMX tile path here (a bf16 model and adapters in the "
                             "pair layout, on a CPU with AMX-BF16)")
    plain = None
    if args.plain:
        os.environ["LORAPLEX_NO_LORA_PAIRS"] = "1"
        plain = make_llm()
        del os.environ["LORAPLEX_NO_LORA_PAIRS"]
        assert not any(m.pairs for m in plain.engine.lora.slots.values())
    cfg = llms[0].engine.model_config
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-readfloor-"))
    paths = [write_adapter(tmp / f"a{i}", cfg, args.rank, i) for i in range(max(ks))]
    for llm in llms + ([plain] if plain else []):
        for i, p in enumerate(paths):
            ad = llm.add_lora(f"a{i}", str(p))
    adapter_bytes = ad.nbytes
    prompts = bench_prompts(llms[0].engine.tokenizer, args.requests, args.prompt_len)
    print(f"model {llms[0].engine.dtype}, adapters {llms[0].engine.lora_dtype}: r={args.rank} "
          f"on all 7 projections = {adapter_bytes / 1e6:.1f} MB each; read bandwidth "
          f"{bw:.1f} GB/s", flush=True)
    rows = []
    for k in ks:
        names = [f"a{i % k}" for i in range(args.requests)]
        ops = {"kernel": llms[0].engine.runner.lora_kernel, **floor_lora_ops}
        if args.amx:  # one kernel, its tile path switched per call (both sides pay the switch)
            from loraplex.kernels import set_lora_amx

            def switched(on: bool, kern: Callable = ops["kernel"]) -> Callable:
                def call(*call_args: object) -> None:
                    set_lora_amx(on)
                    kern(*call_args)
                return call

            ops["kernel"], ops["tiles_off"] = switched(True), switched(False)
        distinct = min(k, args.requests)
        passes = []
        for rnd in range(args.passes):  # the engines swap roles: neither's placement favours
            a, b = (llms[0], llms[1]) if rnd % 2 == 0 else (llms[1], llms[0])
            passes.append(decode_sides(a, b, ops, prompts, names, args.steps,
                                       take_bytes_read, distinct * adapter_bytes, plain))
        times = {side: [t for p in passes for t in p[side]] for side in passes[0]}
        floor = distinct * adapter_bytes / (bw * 1e9)
        # Each side's extra over the base: per pass, the median of its per-round differences
        # (a round's steps are 1-2 s apart, so its difference is immune to slower drifts), then
        # the mean over passes, in which each engine is the base engine as often as the LoRA
        # one (a pass's difference carries the two engines' placement).
        extra = {side: sum(median([t - b for t, b in zip(p[side], p["base"])]) for p in passes)
                 / len(passes) for side in passes[0] if side != "base"}
        base = median(times["base"])
        row = {"k": k, "distinct_adapters_per_step": distinct, "base_step_ms": 1e3 * base,
               "bandwidth_floor_ms": 1e3 * floor,
               **{f"{side}_extra_ms": 1e3 * e for side, e in extra.items()},
               **{f"{side}_ratio": base / (base + e) for side, e in extra.items()},
               **{f"{side}_extra_over_floor": e / floor for side, e in extra.items()},
               # reading the bytes, beyond the call itself, against the bandwidth floor
               "read_cost_ms": 1e3 * (extra["read"] - extra["noop"]),
               "read_cost_over_floor": (extra["read"] - extra["noop"]) / floor,
               "kernel_over_read": extra["kernel"] / extra["read"]}
        rows.append(row)
        print(f"k={k:3d}: base {1e3 * base:6.1f} ms/step; extra per step: kernel "
              f"{1e3 * extra['kernel']:5.1f} ms ({row['kernel_ratio']:.3f}x base), read only "
              f"{1e3 * extra['read']:5.1f} ms ({row['read_ratio']:.3f}x), no-op "
              f"{1e3 * extra['noop']:4.1f} ms | bandwidth floor {1e3 * floor:5.1f} ms: "
              f"kernel {row['kernel_extra_over_floor']:.2f}x, read only "
              f"{row['read_extra_over_floor']:.2f}x, the read beyond the no-op "
              f"{row['read_cost_over_floor']:.2f}x | kernel / read only "
              f"{row['kernel_over_read']:.2f}", flush=True)
        for side, label, pair in (("plain", "plain layout (a third engine)", "pairs / plain"),
                                  ("before", f"kernel at {args.before}", "now / then"),
                                  ("tiles_off", "kernel, AMX tile path off", "on / off")):
            if side in extra:  # the kernel's steps against this side's, round by round
                ratio = median([t / b for p in passes for t, b in zip(p["kernel"], p[side])])
                row[f"kernel_over_{side}"] = ratio
                print(f"       {label}: extra {1e3 * extra[side]:5.1f} ms "
                      f"({row[f'{side}_ratio']:.3f}x base); steps {pair}, median of rounds "
                      f"{ratio:.3f}", flush=True)
    res = {"bandwidth_gbps": bw, "adapter_bytes": adapter_bytes, "rows": rows,
           "config": {k: str(v) for k, v in vars(args).items()}}
    return save_results(args.out, res)


if __name__ == "__main__":
    main()
