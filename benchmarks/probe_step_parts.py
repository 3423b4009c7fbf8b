"""Where a decode step's LoRA tax goes, part by part, on the embedded SmolLM2.

Two engines of one configuration decode the same `--requests` requests in steady state, one on
the base model and one over k adapters (assigned round-robin, as a server sees requests
arrive), their steps interleaved one by one in alternating order, the engines swapping roles
halfway. Timers wrap each part of the step in both engines: schedule, build_context, the model
forward, the attention and MLP blocks, the base GEMMs (`packed_linear`), the LoRA op
(`LoRASlots.forward`) and, inside it, the kernel call, the norms, the logits. Prints, per part,
the median time per step in each engine and the median of the per-step differences: LoRA's
extra outside the kernel shows up in the parts that should not change (GEMMs, norms, ...).
The timers cost both engines alike (~0.5 µs a call, a few hundred calls a step).

    python benchmarks/probe_step_parts.py [--k 8] [--dtype float32] [--steps 40]
        [--scheduler-order] [--prefill]

--scheduler-order keeps the LoRA engine's rows in the scheduler's order instead of the
runner's grouped layout (`ModelRunner._forward_order`), to see what the layout moves.
--prefill times the prefill step instead (all `--requests` prompts of `--prompt-len` tokens in
one step, as a whole run of bench_lora.py starts): each round, each engine (in alternating
order) takes the requests, prefills them and drops them; `--steps` rounds per engine role.
The step with the most time of the few that admit and prefill them is the prefill.
Saves benchmarks/results/probe_step_parts.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import bench_prompts, save_results, start_decoding, stop_decoding

from loraplex.bench.adapters import write_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "probe_step_parts.json"
PARTS = ["step", "schedule", "execute", "build_context", "model_forward", "attn_block",
         "mlp_block", "gemm", "lora_forward", "kernel", "norm", "logits", "update"]


def install_timers(acc: dict[str, float]) -> None:
    """Wrap the step's parts (class attributes and module functions) with timers adding into
    `acc`; for this process only."""
    from loraplex.engine import runner, scheduler
    from loraplex.lora import ops
    from loraplex.model import layers, llama

    def timed(owner, name: str, part: str) -> None:
        orig = getattr(owner, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                acc[part] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    # Linear.forward looks packed_linear up in the module at call time
    timed(layers, "packed_linear", "gemm")
    timed(ops.LoRASlots, "forward", "lora_forward")
    timed(llama.LlamaAttention, "forward", "attn_block")
    timed(llama.LlamaMLP, "forward", "mlp_block")
    timed(layers.RMSNorm, "forward", "norm")
    timed(llama.LlamaForCausalLM, "forward", "model_forward")
    timed(llama.LlamaForCausalLM, "compute_logits", "logits")
    timed(runner.ModelRunner, "execute", "execute")
    timed(runner.ModelRunner, "build_context", "build_context")
    timed(scheduler.Scheduler, "schedule", "schedule")
    timed(scheduler.Scheduler, "update", "update")


def timed_prefill(eng, prompts, names, sp, acc: dict[str, float]) -> dict:
    """Add one request per prompt, step until all are prefilled, drop them; the parts' times of
    the longest of those steps (the prefill)."""
    if eng.scheduler.cfg.max_num_batched_tokens < sum(map(len, prompts)):
        raise SystemExit("the prompts do not fit one step's token budget (max_num_batched_tokens)"
                         ": lower --requests or --prompt-len")
    rids = [eng.add_request(None, sp, prompt_token_ids=p, lora=names[i] if names else None)
            for i, p in enumerate(prompts)]
    longest: dict = {"step": 0.0}
    for _ in range(3):  # admission + prefill, as start_decoding
        acc.clear()
        t0 = time.perf_counter()
        eng.step()
        got = dict(acc, step=time.perf_counter() - t0)
        if got["step"] > longest["step"]:
            longest = got
    stop_decoding(eng, rids)
    eng.step()  # the aborts take effect
    return longest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=40, help="paired steps per engine role")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scheduler-order", action="store_true",
                    help="LoRA rows in the scheduler's order, not grouped by adapter")
    ap.add_argument("--prefill", action="store_true",
                    help="time prefill steps of all the prompts instead of decode steps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    from loraplex import LLM, SamplingParams
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    acc: dict[str, float] = collections.defaultdict(float)
    install_timers(acc)
    folder = converted_folder(embedded_gguf_path())
    llms = [LLM(str(folder), dtype=args.dtype, enable_lora=True, max_loras=max(args.k, 1),
                max_lora_rank=args.rank, max_num_seqs=max(64, args.requests))
            for _ in range(2)]
    for llm in llms:  # the kernel call itself, inside lora_forward
        kernel = llm.engine.runner.lora_kernel
        if kernel is None:
            raise SystemExit("the C++ LoRA kernel is not in use here")

        def timed_kernel(*a, _kernel=kernel):
            t0 = time.perf_counter()
            _kernel(*a)
            acc["kernel"] += time.perf_counter() - t0
        llm.engine.runner.lora_kernel = timed_kernel
    cfg = llms[0].engine.model_config
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-parts-"))
    paths = [write_adapter(tmp / f"a{i}", cfg, args.rank, i) for i in range(args.k)]
    for llm in llms:
        for i, p in enumerate(paths):
            llm.add_lora(f"a{i}", str(p))
    prompts = bench_prompts(llms[0].engine.tokenizer, args.requests, args.prompt_len)
    names = [f"a{i % args.k}" for i in range(args.requests)]
    sp = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    pairs: list[tuple[dict, dict]] = []
    for role in range(2):
        base, lora = (llms[0].engine, llms[1].engine)[::1 if role == 0 else -1]
        if args.scheduler_order:
            lora.runner._forward_order = lambda rows: list(range(len(rows)))
        if args.prefill:
            for s in range(args.steps):
                got: list[dict] = [{}, {}]
                for i in ((0, 1) if s % 2 == 0 else (1, 0)):
                    got[i] = timed_prefill((base, lora)[i], prompts, (None, names)[i], sp, acc)
                pairs.append((got[0], got[1]))
        else:
            rids = [start_decoding(base, prompts, None, sp),
                    start_decoding(lora, prompts, names, sp)]
            for s in range(args.steps):
                got = [{}, {}]
                for i in ((0, 1) if s % 2 == 0 else (1, 0)):
                    acc.clear()
                    t0 = time.perf_counter()
                    (base, lora)[i].step()
                    got[i] = dict(acc, step=time.perf_counter() - t0)
                pairs.append((got[0], got[1]))
            for eng, rs in zip((base, lora), rids):
                stop_decoding(eng, rs)
        if args.scheduler_order:
            del lora.runner._forward_order
    ratio = statistics.median(b["step"] / lo["step"] for b, lo in pairs)
    what = (f"prefill of {args.requests} x {args.prompt_len} tokens" if args.prefill
            else f"{args.requests} requests decoding")
    print(f"model {llms[0].engine.dtype}, k={args.k}, {what}, rows "
          f"{'in the scheduler order' if args.scheduler_order else 'grouped by adapter'}, "
          f"{len(pairs)} paired steps; ms per step: base, LoRA, median paired difference; "
          f"step ratio base / LoRA, median of pairs {ratio:.3f}")
    rows = []
    for part in PARTS:
        b = [p[0].get(part, 0.0) for p in pairs]
        lo = [p[1].get(part, 0.0) for p in pairs]
        row = {"part": part, "base_ms": 1e3 * statistics.median(b),
               "lora_ms": 1e3 * statistics.median(lo),
               "diff_ms": 1e3 * statistics.median(x - y for x, y in zip(lo, b))}
        rows.append(row)
        print(f"  {part:14s} {row['base_ms']:8.2f} {row['lora_ms']:8.2f} {row['diff_ms']:7.2f}")
    res = {"rows": rows, "step_ratio": ratio, "config": {k: str(v) for k, v in vars(args).items()}}
    return save_results(args.out, res)


if __name__ == "__main__":
    main()
