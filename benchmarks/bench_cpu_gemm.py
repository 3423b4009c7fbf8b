"""loraplex's bf16 AMX GEMM against oneDNN's, in the engine: decode steps with and without
LoRA, and a prefill step, side by side.

Two bf16 engines on the embedded SmolLM2, identical but for `cpu_gemm` ("amx": kernels/
amx_gemm.cpp; "onednn"), each with 8 r=16 adapters on all 7 projections. Per engine:
  * base decode: a steady step of --requests requests on the base model;
  * LoRA decode: the same over k=8 adapters (the LoRA tax's issue figure), measured between
    two base phases (base, LoRA, base) so drift over the run cancels in the ratio;
  * prefill: one step prefilling --prefill-requests prompts of --prompt-len tokens.
The two engines' steps alternate, each timed step after an untimed one of the same engine.
On the Intel AMX VM identical engines built one after the other in a process run at different
speeds (probe_engine_order.py: the first-built slower), so the script runs itself twice, once
with each engine built first, and reports both runs and their mean.

    python benchmarks/bench_cpu_gemm.py [--rounds 20] [--requests 64] [--k 8]

Needs a CPU with AMX-BF16. Saves results/bench_cpu_gemm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import bench_prompts, start_decoding, stop_decoding

RESULTS = Path(__file__).resolve().parent / "results" / "bench_cpu_gemm.json"
GEMMS = ("amx", "onednn")


def child(args) -> dict:
    from loraplex import LLM, SamplingParams
    from loraplex.bench.adapters import write_adapter

    torch.set_num_threads(os.cpu_count() or 1)
    order = [args.first] + [g for g in GEMMS if g != args.first]
    llms = {}
    for g in order:
        llms[g] = LLM(dtype="bfloat16", cpu_gemm=g, enable_lora=True, max_loras=args.k,
                      max_lora_rank=16, max_num_seqs=max(64, args.requests),
                      max_num_batched_tokens=max(2048, args.prefill_requests * args.prompt_len))
        assert llms[g].engine.cpu_gemm == g
    cfg = llms["amx"].engine.model_config
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-gemm-"))
    for i in range(args.k):
        path = write_adapter(tmp / f"a{i}", cfg, 16, i)
        for llm in llms.values():
            llm.add_lora(f"a{i}", str(path))
    tok = llms["amx"].engine.tokenizer
    prompts = bench_prompts(tok, args.requests, 32)
    sp = SamplingParams(temperature=0, max_tokens=2 * args.rounds + 8, ignore_eos=True)

    def decode_phase(names) -> dict[str, list[float]]:
        runs = {g: start_decoding(llm.engine, prompts, names, sp) for g, llm in llms.items()}
        times = {g: [] for g in llms}
        for r in range(args.rounds):
            for g in order if r % 2 == 0 else order[::-1]:
                eng = llms[g].engine
                eng.step()
                t0 = time.perf_counter()
                eng.step()
                times[g].append(time.perf_counter() - t0)
        for g, rids in runs.items():
            stop_decoding(llms[g].engine, rids)
        return times

    lora_names = [f"a{i % args.k}" for i in range(args.requests)]
    base1 = decode_phase(None)
    lora = decode_phase(lora_names)
    base2 = decode_phase(None)

    long_prompts = bench_prompts(tok, args.prefill_requests, args.prompt_len)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefill = {g: [] for g in llms}
    for r in range(args.prefill_rounds):
        for g in order if r % 2 == 0 else order[::-1]:
            eng = llms[g].engine
            for p in long_prompts:
                eng.add_request(None, one, prompt_token_ids=p)
            t0 = time.perf_counter()
            eng.step()
            prefill[g].append(time.perf_counter() - t0)
            while eng.has_unfinished_requests:
                eng.step()
    med = statistics.median
    out = {}
    for g in llms:
        base = med(base1[g] + base2[g])
        out[g] = {"base_step_ms": 1e3 * base, "lora_step_ms": 1e3 * med(lora[g]),
                  "lora_ratio": base / med(lora[g]), "prefill_step_ms": 1e3 * med(prefill[g]),
                  "base_before_ms": 1e3 * med(base1[g]), "base_after_ms": 1e3 * med(base2[g])}
    return {"first": args.first, "engines": out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="distinct adapters in the LoRA phase")
    ap.add_argument("--prefill-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prefill-rounds", type=int, default=6)
    ap.add_argument("--first", choices=GEMMS, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.first:
        print(json.dumps(child(args)))
        return {}
    from loraplex.kernels import amx_gemm_supported

    if not amx_gemm_supported():
        raise SystemExit("no AMX-BF16 here: nothing to compare")
    runs = []
    for first in GEMMS:
        cmd = [sys.executable, __file__, "--first", first, "--rounds", str(args.rounds),
               "--requests", str(args.requests), "--k", str(args.k),
               "--prefill-requests", str(args.prefill_requests),
               "--prompt-len", str(args.prompt_len), "--prefill-rounds", str(args.prefill_rounds)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"the run with {first} built first failed:\n{res.stderr[-3000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"-- {first} built first", flush=True)
        for g, e in runs[-1]["engines"].items():
            print(f"  {g:6s}: base decode {e['base_step_ms']:6.1f} ms (before "
                  f"{e['base_before_ms']:.1f}, after {e['base_after_ms']:.1f}), k={args.k} "
                  f"LoRA decode "
                  f"{e['lora_step_ms']:6.1f} ms ({e['lora_ratio']:.3f}x base), prefill "
                  f"{args.prefill_requests}x{args.prompt_len} {e['prefill_step_ms']:7.1f} ms",
                  flush=True)
    mean = {g: {key: statistics.mean(r["engines"][g][key] for r in runs)
                for key in runs[0]["engines"][g]} for g in GEMMS}
    a, o = mean["amx"], mean["onednn"]
    print(f"mean of both orders: base decode amx/onednn {a['base_step_ms'] / o['base_step_ms']:.3f}"
          f", LoRA decode {a['lora_step_ms'] / o['lora_step_ms']:.3f}, prefill "
          f"{a['prefill_step_ms'] / o['prefill_step_ms']:.3f}; LoRA tax amx "
          f"{a['lora_ratio']:.3f}x, onednn {o['lora_ratio']:.3f}x; LoRA extra amx "
          f"{a['lora_step_ms'] - a['base_step_ms']:.1f} ms, onednn "
          f"{o['lora_step_ms'] - o['base_step_ms']:.1f} ms")
    out = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "first")},
           "runs": runs, "mean": mean}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
