"""Multi-LoRA benchmarks on the embedded SmolLM2 (CPU, fp32), in one run:

(a) LoRA tax: `--requests` concurrent requests spread round-robin over k distinct r=16 adapters
    on all 7 projections vs the same requests on the base model, same engine, for each k, run
    alternately (`--run-pairs` pairs; the median ratio of a pair's runs, and the ratio of each
    side's fastest run). Beside each ratio, the physical floor: every decode step must read the
    weights of each distinct adapter it uses once, so LoRA's extra step time is at least
    (distinct adapters per step x adapter bytes) / memory read bandwidth, read beside that k's
    runs and steps (the median of those reads: this VM's read bandwidth swings 27-67 GB/s
    within minutes; steady decode reads it before every step pair).
    Steady decode is measured on two engines of the same configuration whose steps are
    interleaved one by one (one decodes the requests on the base, the other over the adapters,
    roles swapped every round): the median ratio of such pairs resists this machine's noise.
(b) vs transformers + PEFT mixed-adapter batches (`generate(adapter_names=...)`): `--peft-requests`
    requests over `--peft-adapters` adapters, same prompts, greedy, both fp32, alternated;
(c) cold adapter load time (disk -> validated CPU copy) p50/p99, into fresh memory (beside the
    cost of first-touching that much fresh memory alone) and with a full CPU tier (reused buffer),
    with the startup heap frozen out of the cyclic GC as `loraplex serve` does;
(d) memory: process RSS with 100 adapters loaded minus without, vs the sum of adapter sizes.

    python benchmarks/bench_lora.py [--quick] [--ks 1,8,32,128] [--requests 64]
        [--dtype float32] [--lora-dtype auto]

(a), (c) and (d) run in --dtype with adapters in --lora-dtype (auto = the model's); the floor
counts the adapters' bytes in that dtype. (b) is always fp32 on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loraplex.bench.adapters import write_adapter

from roofline import measure_gemm_peak, measure_mem_bandwidth

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_lora.json"


def save_results(path: Path, res: dict) -> dict:
    """Write a benchmark's results as JSON to `path` (creating its folder), say where, and
    return them: the end of every script here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"saved {path}")
    return res


def pcts(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"p50_ms": 1e3 * s[len(s) // 2], "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def window_bandwidth(quick: bool, repeats: int = 3) -> float:
    """Memory read bandwidth (GB/s) now: a short measurement to take between a k's runs or
    steps (256 MB, 8x this VM's L3; best of `repeats` after one untimed read)."""
    return measure_mem_bandwidth(64 if quick else 256, repeats=repeats, kind="read",
                                 budget_s=1.0)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else float("nan")


def first_touch(nbytes: int) -> bytearray:
    """Fresh memory of `nbytes`, every page written once (what reading a file into a new
    buffer costs beyond the copy itself)."""
    buf = bytearray(nbytes)
    torch.frombuffer(memoryview(buf), dtype=torch.uint8)[::4096] = 1
    return buf


def release_freed_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim), so RSS counts what is held.
    The first-touch buffers below are the benchmark's own, freed before (d) is measured; once
    glibc has raised its mmap threshold (it does when a large mapped block is freed, as the
    loader's buffer pool does when adapters are converted to another dtype) they come from the
    heap, and freed heap pages stay resident: 100 bf16 adapters read +2006 MB of RSS for 977 MB
    of weights, +442 MB for 391 MB (40 adapters) without the touches."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_once(llm, prompts, names, new_tokens: int) -> float:
    from loraplex import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora=names)
    return time.perf_counter() - t0


def start_decoding(eng, prompts, names, sp) -> list:
    """Add one request per prompt (adapter names[i], or the base when names is None), admit and
    prefill them all, so every later step decodes one token for each; returns their ids."""
    rids = [eng.add_request(None, sp, prompt_token_ids=p, lora=names[i] if names else None)
            for i, p in enumerate(prompts)]
    for _ in range(3):  # admission + prefill
        eng.step()
    assert len(eng.scheduler.running) == len(prompts), "not all requests decode together"
    return rids


def stop_decoding(eng, rids) -> None:
    """Abort the requests start_decoding added, so the engine is free for the next round."""
    for rid in rids:
        eng.abort_request(rid)


def bench_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` distinct prompts of `length` tokens, cut from one repeated English text."""
    text = "The quick brown fox jumps over the lazy dog while the river keeps flowing. " * 40
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[i:i + length] for i in range(n)]


def decode_paired(base_llm, lora_llm, prompts, names, steps: int,
                  probe=None) -> list[tuple[float, float, float | None]]:
    """Steady-state decode of the same requests on two engines of one configuration, one
    without adapters and one over `names`, their steps interleaved one by one (in alternating
    order): (base step, LoRA step, probe()) per pair, steps in seconds, each pair taken within
    ~0.2 s of machine time, so the ratio of a pair is immune to the noise that shifts whole runs
    here. `probe` (e.g. a read bandwidth) runs just before each pair, None without one. Every
    request is admitted and prefilled first; each timed step decodes one token for all."""
    from loraplex import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    runs = [(llm.engine, start_decoding(llm.engine, prompts, nm, sp))
            for llm, nm in ((base_llm, None), (lora_llm, names))]
    pairs = []
    for s in range(steps):
        probed = probe() if probe is not None else None
        t = [0.0, 0.0]
        for i in ((0, 1) if s % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            runs[i][0].step()
            t[i] = time.perf_counter() - t0
        pairs.append((t[0], t[1], probed))
    for eng, rids in runs:
        stop_decoding(eng, rids)
    return pairs


def bench_vs_peft(llm, folder: Path, paths: list[Path], prompts: list[list[int]],
                  n_adapters: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of loraplex and of transformers + PEFT on the same mixed-adapter batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [f"a{i % n_adapters}" for i in range(len(prompts))]
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    for i in range(1, n_adapters):
        model.load_adapter(str(paths[i]), adapter_name=f"a{i}")
    model.eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)

    def run_peft() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new_tokens
        return time.perf_counter() - t0

    def run_hf_base() -> float:  # the same transformers model with every adapter off
        with model.disable_adapter():
            return run_peft()

    ours, theirs, hf_base = [], [], []
    for rep in range(repeats):
        order = [(lambda: run_once(llm, prompts, names, new_tokens), ours), (run_peft, theirs),
                 (run_hf_base, hf_base)]
        for fn, acc in (order if rep % 2 == 0 else order[::-1]):
            acc.append(fn())
    n_tok = len(prompts) * new_tokens
    res = {"requests": len(prompts), "adapters": n_adapters, "new_tokens": new_tokens,
           "loraplex_tok_s": n_tok / min(ours), "peft_tok_s": n_tok / min(theirs),
           "hf_base_tok_s": n_tok / min(hf_base)}
    res["ratio"] = res["loraplex_tok_s"] / res["peft_tok_s"]
    res["peft_vs_hf_base"] = res["peft_tok_s"] / res["hf_base_tok_s"]
    # Ceiling: every token's matmuls (2 FLOP per weight; the vocabulary head only for
    # generated tokens) at the GEMM peak measured now, and nothing else (no attention, no
    # sampling, no LoRA): no engine can beat it on this machine.
    peak = measure_gemm_peak() * 1e9
    body = sum(p.numel() for n, p in base.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n)
    head = base.config.vocab_size * base.config.hidden_size
    flop = 2 * len(prompts) * (body * (len(prompts[0]) + new_tokens) + head * new_tokens)
    res["gemm_peak_gflops"] = peak / 1e9
    res["ceiling_tok_s"] = n_tok / (flop / peak)
    res["ceiling_ratio"] = res["ceiling_tok_s"] / res["peft_tok_s"]
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,8,32,128")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="(b): runs of each side")
    ap.add_argument("--run-pairs", type=int, default=4,
                    help="(a): whole runs of each side, base and LoRA back to back")
    ap.add_argument("--decode-rounds", type=int, default=6)
    ap.add_argument("--decode-steps", type=int, default=12)
    ap.add_argument("--peft-requests", type=int, default=32)
    ap.add_argument("--peft-adapters", type=int, default=8)
    ap.add_argument("--skip-peft", action="store_true", help="skip (b), the PEFT baseline")
    ap.add_argument("--dtype", default="float32", help="model dtype for (a), (c), (d)")
    ap.add_argument("--cpu-gemm", default="onednn", choices=["onednn", "mkl", "amx"],
                    help="the engines' CPU GEMMs (amx: bf16 on AMX CPUs)")
    ap.add_argument("--lora-dtype", default="auto", help="adapter dtype (auto = model's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.requests, args.new_tokens, args.repeats = "1,4", 8, 8, 1
        args.run_pairs = 1
        args.peft_requests, args.peft_adapters = 4, 2
        args.decode_rounds, args.decode_steps = 2, 3
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)

    from loraplex import LLM
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    bw = measure_mem_bandwidth(256 if args.quick else 768, kind="read")
    # (a)'s compute floor: the deltas' FLOPs at the GEMM peak, since no code multiplies faster
    # on this machine than its best GEMM library. The kernel multiplies in float32, except in
    # its pair layout (bf16 model and adapters on AVX512-BF16), where it multiplies bf16 pairs
    # (vdpbf16ps, or AMX tiles) as a bf16 GEMM does: then the floor takes the faster of the
    # fp32 and the bf16 peak (measured below, once the engine has chosen its layout; until
    # session 20 it took the fp32 peak alone, which overstated a bf16 floor ~2.3x on Zen 4).
    peak = measure_gemm_peak(budget_s=2.0 if args.quick else 8.0)
    rss0 = rss_bytes()
    def make_llm(dtype: str, lora_dtype: str):
        return LLM(str(folder), dtype=dtype, lora_dtype=lora_dtype, enable_lora=True,
                   max_loras=args.max_loras, max_lora_rank=args.rank,
                   max_num_seqs=max(64, args.requests),
                   cpu_gemm=args.cpu_gemm if dtype == args.dtype else "onednn")

    llm = make_llm(args.dtype, args.lora_dtype)
    pairs = any(m.pairs for m in llm.engine.lora.slots.values())
    # As `loraplex serve` does once started: the startup heap leaves the cyclic GC's reach, so a
    # full collection triggered by a load scans only what came after (see launch.py).
    from loraplex.server.launch import freeze_startup_heap

    freeze_startup_heap()
    rss_engine = rss_bytes()
    peak_dtype = "float32"
    if pairs:  # measured after rss_engine: its temporaries stay out of the slots' RSS
        peak_bf16 = measure_gemm_peak(dtype=torch.bfloat16, budget_s=2.0 if args.quick else 8.0)
        if peak_bf16 > peak:
            peak, peak_dtype = peak_bf16, "bfloat16"
    cfg = llm.engine.model_config
    n_adapters = max(max(ks), 100 if not args.quick else 4)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    paths = [write_adapter(tmp / f"a{i}", cfg, args.rank, i) for i in range(n_adapters)]

    # (c) cold load + (d) memory: load every adapter from disk into an empty CPU tier. Each
    # load needs fresh memory for its copy, and first-touching fresh pages is the dominant cost
    # on this VM, so beside every load (alternated) time the same first touch alone: that is
    # the floor no loader can beat without recycling memory.
    load_s, touch_s, held = [], [], []
    for i, p in enumerate(paths):
        t = time.perf_counter()
        ad = llm.add_lora(f"a{i}", str(p))
        load_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        held.append(first_touch(ad.nbytes))
        touch_s.append(time.perf_counter() - t)
    del held
    release_freed_heap()
    adapter_bytes = ad.nbytes
    # shrink + expand: 2 * r * (in + out) FLOP per token and adapted projection
    lora_flops_per_token = sum(2 * m.rank * (m.a.shape[1] + m.b.shape[0])
                               for m in ad.modules.values())
    n_mem = min(100, n_adapters)
    rss_loaded = rss_bytes()
    # (c') the steady state of a server at its CPU-tier limit: a copy is dropped for each one
    # loaded, and the next load reads into the dropped copy's buffer.
    n_reload = min(32, n_adapters)
    reload_s = []
    for i in range(n_reload):
        llm.remove_lora(f"a{i}")
        t = time.perf_counter()
        llm.add_lora(f"a{i}", str(paths[i]))
        reload_s.append(time.perf_counter() - t)
    cold = {**pcts(load_s), "n": len(load_s),
            "first_touch_floor": pcts(touch_s),
            "recycled": {**pcts(reload_s), "n": n_reload}}
    mem = {"adapters": n_adapters, "rss_delta_mb": (rss_loaded - rss_engine) / 1e6,
           "sum_adapter_mb": n_adapters * adapter_bytes / 1e6,
           "device_slots_mb": (rss_engine - rss0) / 1e6}
    print(f"model {llm.engine.dtype}, adapters {llm.engine.lora_dtype}: r={args.rank} on all 7 "
          f"projections x {cfg.num_layers} layers = {adapter_bytes / 1e6:.1f} MB each; read "
          f"bandwidth {bw:.1f} GB/s")
    print(f"(c) cold load from disk into fresh memory, {cold['n']} adapters: p50 "
          f"{cold['p50_ms']:.1f} ms, p99 {cold['p99_ms']:.1f} ms | first touch of as much fresh "
          f"memory alone (the floor): p50 {cold['first_touch_floor']['p50_ms']:.1f} ms, p99 "
          f"{cold['first_touch_floor']['p99_ms']:.1f} ms")
    print(f"    with a full CPU tier (the buffer of a dropped copy reused), {n_reload} loads: "
          f"p50 {cold['recycled']['p50_ms']:.1f} ms, p99 {cold['recycled']['p99_ms']:.1f} ms")
    print(f"(d) memory: RSS +{mem['rss_delta_mb']:.0f} MB with {n_adapters} adapters loaded vs "
          f"their total size {mem['sum_adapter_mb']:.0f} MB (n_mem={n_mem})")

    prompts = bench_prompts(llm.engine.tokenizer, args.requests, args.prompt_len)
    warm = run_once(llm, prompts[:4], None, 4)
    del warm
    steps = args.new_tokens  # decode steps carry the requests' tokens
    rows = []
    twin = None  # the second engine of the steady-decode pairs, made on first use
    for k in ks:
        names = [f"a{i % k}" for i in range(args.requests)]
        run_once(llm, prompts[:min(len(prompts), 2 * k)], names[:min(len(prompts), 2 * k)], 2)
        # The floor's yardstick, read again beside this k's runs and steps: one read of the
        # whole buffer measured 29 and 45 GB/s minutes apart on the Zen 4 VM, and 27-67 GB/s
        # within one k's runs, so a floor from the start of the run can be off by 2x by the
        # time k=32 decodes. The median of the reads beside the runs (or steps) a figure comes
        # from sets its floor; steady decode also gives the median, over its step pairs, of
        # each pair's extra over the floor at the read just before it.
        bw_runs = []
        base_t, lora_t = [], []
        for rep in range(args.run_pairs):
            bw_runs.append(window_bandwidth(args.quick))
            order = [(None, base_t), (names, lora_t)]
            for nm, acc in (order if rep % 2 == 0 else order[::-1]):
                acc.append(run_once(llm, prompts, nm, args.new_tokens))
        bw_runs.append(window_bandwidth(args.quick))
        tb, tl = min(base_t), min(lora_t)
        # The machine's speed drifts by up to ~20% within minutes (bf16 base runs of 5.7 and
        # 7.0 s two minutes apart), so besides the fastest run of each side, the median ratio
        # of runs made back to back: a pair shares the drift.
        run_paired = median([b / lo for b, lo in zip(base_t, lora_t)])
        # Steady-state decode on two engines of the same configuration, their steps
        # interleaved one by one (see decode_paired); the engines swap roles every round, so
        # neither's memory placement favours a side. Only when every request can decode in the
        # same step (distinct adapters <= slots).
        pairs = []
        steady = min(k, args.requests) <= args.max_loras
        for rnd in range(args.decode_rounds if steady else 0):
            if twin is None:
                twin = make_llm(args.dtype, args.lora_dtype)
                for i in range(min(max(ks), args.max_loras)):
                    twin.add_lora(f"a{i}", str(paths[i]))
            a, b = (llm, twin) if rnd % 2 == 0 else (twin, llm)
            pairs.extend(decode_paired(a, b, prompts, names, args.decode_steps,
                                       probe=lambda: window_bandwidth(args.quick, repeats=1)))
        step_b = median([p[0] for p in pairs])
        step_l = median([p[1] for p in pairs])
        paired_ratio = median([p[0] / p[1] for p in pairs])
        distinct_per_step = min(k, args.max_loras, args.requests)
        step_bytes = distinct_per_step * adapter_bytes
        bw_floor = median(bw_runs)
        floor_step = step_bytes / (bw_floor * 1e9)
        bw_steps = [p[2] for p in pairs]
        bw_decode = median(bw_steps)
        decode_floor = step_bytes / (bw_decode * 1e9)
        over_floor_paired = median([(p[1] - p[0]) / (step_bytes / (p[2] * 1e9)) for p in pairs])
        extra_step = (tl - tb) / steps
        # A decode step computes every request's delta: at the GEMM peak, with no overlap of
        # its arithmetic and its adapter reads, LoRA adds compute + bytes; perfectly overlapped,
        # the larger of the two.
        compute_step = args.requests * lora_flops_per_token / (peak * 1e9)
        row = {"k": k, "base_s": tb, "lora_s": tl, "throughput_ratio": tb / tl,
               "throughput_ratio_paired": run_paired, "base_runs_s": base_t,
               "lora_runs_s": lora_t,
               "distinct_adapters_per_step": distinct_per_step,
               "bandwidth_gbps": bw_floor, "bandwidth_runs_gbps": bw_runs,
               "floor_at_start_bandwidth_ms": 1e3 * step_bytes / (bw * 1e9),
               "floor_extra_ms_per_step": 1e3 * floor_step,
               "extra_ms_per_step": 1e3 * extra_step,
               "extra_over_floor": extra_step / floor_step if floor_step else None,
               "floor_ratio": (tb / steps) / (tb / steps + floor_step),
               "decode_step_base_ms": 1e3 * step_b, "decode_step_lora_ms": 1e3 * step_l,
               "decode_ratio": step_b / step_l, "decode_paired_ratio": paired_ratio,
               "decode_extra_ms_per_step": 1e3 * (step_l - step_b),
               "decode_bandwidth_gbps": bw_decode, "decode_bandwidth_steps_gbps": bw_steps,
               "decode_floor_ms_per_step": 1e3 * decode_floor,
               "decode_extra_over_floor": (step_l - step_b) / decode_floor,
               "decode_extra_over_floor_paired": over_floor_paired,
               "decode_floor_ratio": step_b / (step_b + decode_floor),
               "compute_floor_ms_per_step": 1e3 * compute_step,
               "decode_floor_ratio_overlapped": step_b / (step_b + max(decode_floor,
                                                                       compute_step)),
               "decode_floor_ratio_serial": step_b / (step_b + decode_floor + compute_step)}
        if not steady:  # no step decodes every request: no steady-state figure
            row.update({key: None for key in row if key.startswith("decode_")})
        rows.append(row)
        print(f"(a) k={k:4d}: base {tb:6.2f}s  lora {tl:6.2f}s  -> {row['throughput_ratio']:.3f}x "
              f"base throughput | LoRA extra {row['extra_ms_per_step']:6.1f} ms/step vs floor "
              f"{row['floor_extra_ms_per_step']:5.1f} ms/step ({distinct_per_step} adapters x "
              f"{adapter_bytes / 1e6:.1f} MB / {bw_floor:.0f} GB/s, the median of "
              f"{len(bw_runs)} reads between the runs, {min(bw_runs):.0f}-{max(bw_runs):.0f} "
              f"GB/s) = "
              f"{row['extra_over_floor']:.1f}x floor; best possible ratio "
              f"{row['floor_ratio']:.3f}x", flush=True)
        print(f"    whole runs back to back ({args.run_pairs} pairs): median ratio "
              f"{run_paired:.3f}x (each side's fastest run: {row['throughput_ratio']:.3f}x)",
              flush=True)
        if steady:
            print(f"    steady decode: base {row['decode_step_base_ms']:6.1f} ms/step, lora "
                  f"{row['decode_step_lora_ms']:6.1f} ms/step -> {row['decode_ratio']:.3f}x "
                  f"(median of paired steps {row['decode_paired_ratio']:.3f}x) | "
                  f"extra {row['decode_extra_ms_per_step']:5.1f} ms = "
                  f"{row['decode_extra_over_floor']:.2f}x its floor of "
                  f"{row['decode_floor_ms_per_step']:.1f} ms (at {bw_decode:.0f} GB/s, the "
                  f"median of a read before each step pair, {min(bw_steps):.0f}-"
                  f"{max(bw_steps):.0f} GB/s; pair by pair, the median extra is "
                  f"{over_floor_paired:.2f}x the floor at its read); best possible "
                  f"{row['decode_floor_ratio']:.3f}x", flush=True)
            print(f"    with the deltas' arithmetic ({args.requests} tokens x "
                  f"{lora_flops_per_token / 1e6:.1f} MFLOP at the {peak:.0f} GFLOP/s "
                  f"{peak_dtype} GEMM peak = "
                  f"{row['compute_floor_ms_per_step']:.1f} ms/step) besides the bytes: best "
                  f"possible {row['decode_floor_ratio_overlapped']:.3f}x if it hides under the "
                  f"reads, {row['decode_floor_ratio_serial']:.3f}x if not", flush=True)
    twin = None  # frees its memory before (b)
    peft_res = None
    if not args.skip_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("(b) skipped: the peft package is not installed")
        else:
            if llm.engine.dtype != torch.float32 or llm.engine.lora_dtype != torch.float32:
                del llm  # (b) compares fp32 with fp32
                llm = make_llm("float32", "float32")
                for i in range(args.peft_adapters):
                    llm.add_lora(f"a{i}", str(paths[i]))
            peft_res = bench_vs_peft(llm, folder, paths, prompts[:args.peft_requests],
                                     args.peft_adapters, args.new_tokens, args.repeats)
            print(f"(b) {peft_res['requests']} requests over {peft_res['adapters']} adapters, "
                  f"{args.new_tokens} new tokens: loraplex {peft_res['loraplex_tok_s']:.1f} "
                  f"tok/s vs transformers+PEFT {peft_res['peft_tok_s']:.1f} tok/s = "
                  f"{peft_res['ratio']:.1f}x (transformers without adapters: "
                  f"{peft_res['hf_base_tok_s']:.1f} tok/s; ceiling, every matmul at the GEMM "
                  f"peak of {peft_res['gemm_peak_gflops']:.0f} GFLOP/s: "
                  f"{peft_res['ceiling_tok_s']:.0f} tok/s = {peft_res['ceiling_ratio']:.1f}x)",
                  flush=True)
    out = {"bandwidth_gbps": bw, "gemm_peak_gflops": peak, "gemm_peak_dtype": peak_dtype,
           "lora_flops_per_token": lora_flops_per_token, "adapter_bytes": adapter_bytes,
           "cold_load": cold, "memory": mem, "tax": rows, "vs_peft": peft_res,
           "config": vars(args) | {"out": str(args.out)}}
    return save_results(args.out, out)


if __name__ == "__main__":
    main()
