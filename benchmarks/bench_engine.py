"""loraplex vs transformers `generate()` on the embedded SmolLM2-135M-Instruct, CPU, in one
dtype on both sides: --dtype float32 (default; results/bench_engine.json) or bfloat16 (what
`--dtype auto` picks on CPUs with native bf16; results/bench_engine_bf16.json).

Fairness rules (both sides):
  * the same weights: the converted HF folder loraplex itself loads (`converted_folder(...)`);
  * the same dtype on both sides, the same torch thread count (the usable core count), same
    process;
  * greedy, EOS ignored, so every request produces exactly --new-tokens tokens (checked);
  * the same prompts: --prompt-len token ids each, a different window of a fixed text per request;
  * both warmed up at the measured shapes, then measured alternately
    (loraplex, HF, loraplex, HF, ...) --repeats times; the table reports the best run of each
    (noise on a shared 2-core machine only ever slows a run down), the JSON keeps every run.

Scenarios: (a) one request; (b) --concurrency requests: loraplex gets all of them in one
`llm.generate` call, HF one batched `generate` (left padding + attention mask; its best case).

Throughput is generated tokens / wall time of the call (prefill included). The decode phase is
timed from the moment the last request got its first token (loraplex: RequestOutput metrics;
HF: a no-op logits processor's first call) to the end; it carries (new_tokens - 1) tokens per
request. The roofline fractions use the decode phase:
  * concurrent decode: 2 x (matmul params incl. lm_head) x tokens / time vs the GEMM peak
    measured in the run's dtype;
  * single stream: weight bytes read per step (all matmul weights, in the run's dtype) x
    steps/s vs the measured memory READ bandwidth.

    python benchmarks/bench_engine.py [--quick] [--skip-hf] [--repeats N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import save_results

from roofline import (
    ForeignCpu,
    cpu_idle_fraction,
    machine_facts,
    measure_gemm_peak,
    measure_mem_bandwidth,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Fixed, varied source text for the prompts (each request takes a different window of it).
TEXT = """\
The river delta was mapped in 1843 by a surveyor who walked its banks for three winters.
def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a
Photosynthesis converts light energy into chemical energy stored in glucose molecules.
Q: What is the capital of Australia? A: Canberra, not Sydney, as many people assume.
In chess, the Sicilian Defence begins 1.e4 c5 and leads to sharp, asymmetrical positions.
The recipe calls for 250 g of flour, two eggs, a pinch of salt and 300 ml of milk.
SELECT name, COUNT(*) FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY 2 DESC;
Jupiter's Great Red Spot is a storm larger than Earth that has raged for centuries.
La bibliothèque ouvre à neuf heures; les étudiants attendent déjà devant la porte.
Compound interest: an amount P grows to P(1 + r/n)^(nt) after t years at rate r.
The orchestra tuned to an A of 440 Hz before the conductor raised her baton.
Error 503: the upstream server is temporarily unavailable; retry after 30 seconds.
Migratory birds navigate using the Earth's magnetic field, the sun and the stars.
She wrote the letter in pencil, erased it twice, and finally sent it unsigned.
The TCP three-way handshake exchanges SYN, SYN-ACK and ACK before any data flows.
Volcanic soil is rich in minerals, which is why vineyards often thrive on old lava.
"""


# ---------------------------------------------------------------------------------------------
# Model arithmetic
# ---------------------------------------------------------------------------------------------
def model_arith(cfg: dict[str, Any], elem_bytes: int = 4) -> dict[str, Any]:
    """Matmul parameter counts and bytes (weights and KV stored with `elem_bytes` per value)
    from an HF config.json dict."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers, nh = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    per_layer = (h * nh * hd + 2 * h * nkv * hd + nh * hd * h  # q, k, v, o
                 + 3 * h * i)  # gate, up, down
    lm_head = v * h  # tied to the embedding for SmolLM2, but still a full matmul per token
    matmul = layers * per_layer + lm_head
    norms = layers * 2 * h + h
    return {
        "layers": layers, "hidden": h, "heads": nh, "kv_heads": nkv, "head_dim": hd,
        "matmul_params_per_layer": per_layer, "lm_head_params": lm_head,
        "matmul_params": matmul, "norm_params": norms,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        # what one decode step must stream from memory (embedding gather = 1 row, ignored)
        "weight_bytes_per_step": elem_bytes * (matmul + norms),
        "kv_bytes_per_token": 2 * layers * nkv * hd * elem_bytes,  # K and V, per position
        "attn_flops_per_token_per_ctx": 4 * layers * nh * hd,  # QK^T + PV per context position
    }


def check_params_against_hf(arith: dict[str, Any], hf_model) -> int:
    """Matmul params as counted from the loaded HF model's Linear layers (lm_head included)."""
    n = sum(m.weight.numel() for m in hf_model.modules() if isinstance(m, torch.nn.Linear))
    if n != arith["matmul_params"]:
        print(f"WARNING: config-derived matmul params {arith['matmul_params']:,} != "
              f"HF Linear params {n:,}", file=sys.stderr)
    return n


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def build_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = ids * (1 + (length + 37 * n) // len(ids))  # repeat the text as needed
    prompts = [stream[37 * k: 37 * k + length] for k in range(n)]
    assert all(len(p) == length for p in prompts)
    assert len({tuple(p) for p in prompts}) == n, "prompts must differ per request"
    return prompts


# ---------------------------------------------------------------------------------------------
# The two runners
# ---------------------------------------------------------------------------------------------
class LoraplexRunner:
    name = "loraplex"

    def __init__(self, folder: Path, dtype: str) -> None:
        from loraplex import LLM

        # Same folder HF loads (model=None would resolve to this very folder too).
        self.llm = LLM(model=str(folder), dtype=dtype)
        self.dtype = self.llm.engine.dtype

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        from loraplex import SamplingParams

        sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        t0 = time.monotonic()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        t1 = time.monotonic()
        tokens = [o.outputs[0].token_ids for o in outs]
        firsts = [o.metrics.get("first_token_time") for o in outs
                  if isinstance(getattr(o, "metrics", None), dict)]
        first = max(firsts) if firsts and None not in firsts else None
        return _result(tokens, t0, t1, first, new_tokens)


class _FirstCallTimer:
    """No-op logits processor that notes when generation first asks for logits processing,
    i.e. when the prefill forward of the whole batch is done."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.monotonic()
        return scores


class HFRunner:
    name = "hf"

    def __init__(self, folder: Path, pad_id: int, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(folder),
                                                          dtype=DTYPES[dtype]).eval()
        gc = self.model.generation_config
        gc.eos_token_id = None  # ignore EOS: always exactly max_new_tokens
        gc.pad_token_id = pad_id
        gc.do_sample = False
        gc.temperature = gc.top_p = gc.top_k = None
        self.pad_id = pad_id
        self.dtype = next(self.model.parameters()).dtype
        self.attn_impl = getattr(self.model.config, "_attn_implementation", None)

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding (a no-op when all prompts are equal)
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        timer = _FirstCallTimer()
        t0 = time.monotonic()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([timer]))
        t1 = time.monotonic()
        tokens = [row[width:].tolist() for row in out]
        return _result(tokens, t0, t1, timer.first, new_tokens)


def _result(tokens: list[list[int]], t0: float, t1: float, first: float | None,
            new_tokens: int) -> dict[str, Any]:
    lengths = [len(t) for t in tokens]
    if any(n != new_tokens for n in lengths):
        raise RuntimeError(f"expected {new_tokens} new tokens per request, "
                           f"got lengths {sorted(set(lengths))}")
    total = t1 - t0
    res: dict[str, Any] = {"seconds": total, "generated_tokens": sum(lengths),
                           "tok_per_s": sum(lengths) / total, "tokens": tokens}
    if first is not None and new_tokens > 1 and t1 > first:
        decode_s = t1 - first
        res.update(prefill_s=first - t0, decode_s=decode_s,
                   decode_steps_per_s=(new_tokens - 1) / decode_s,
                   decode_tok_per_s=len(tokens) * (new_tokens - 1) / decode_s)
    return res


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def gemm_floor(llm, prompt_len: int, new_tokens: int, concurrency: int) -> dict[str, Any]:
    """The physical floor of the concurrent workload on this machine: the time the model's own
    projections and lm_head take alone (same packed weights and kernels the engine uses, no
    attention, no elementwise ops, no Python), at the exact GEMM shapes of the run: prefill in
    chunks of the engine's token budget, then (new_tokens - 1) decode steps of `concurrency` rows.
    Any engine doing these matmuls in the run's dtype here needs at least this long."""
    from loraplex.model.layers import Linear

    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    budget = llm.engine.sched_config.max_num_batched_tokens
    hidden = model.config.hidden_size
    dtype = llm.engine.dtype

    def timed(rows: int, logit_rows: int) -> float:
        xs = {m.in_features: torch.randn(rows, m.in_features).to(dtype) for m in linears}
        h = torch.randn(logit_rows, hidden).to(dtype)

        def once() -> None:
            with torch.inference_mode():
                for m in linears:
                    m(xs[m.in_features])
                model.compute_logits(h)

        once()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            once()
            best = min(best, time.perf_counter() - t)
        return best

    total_prompt = prompt_len * concurrency
    per_chunk = min(max(1, budget // prompt_len) * prompt_len, total_prompt)  # per prefill step
    n_chunks = -(-total_prompt // per_chunk)
    t_prefill = timed(per_chunk, per_chunk // prompt_len) * n_chunks
    t_decode_step = timed(concurrency, concurrency)
    floor = t_prefill + (new_tokens - 1) * t_decode_step
    return {"prefill_s": t_prefill, "decode_step_s": t_decode_step,
            "decode_s": (new_tokens - 1) * t_decode_step, "total_s": floor,
            "tok_per_s_ceiling": concurrency * new_tokens / floor}


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="loraplex vs HF transformers generate() on SmolLM2")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2,
                    help="measured runs per engine per scenario, interleaved (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="default: usable core count")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: prompt 16, 8 new tokens, concurrency 4, 1 repeat")
    ap.add_argument("--skip-hf", action="store_true", help="measure loraplex only")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="both engines' dtype (default float32)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/bench_engine.json, or bench_engine_bf16.json")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("bench_engine.json" if args.dtype == "float32"
                              else "bench_engine_bf16.json")
    if args.quick:
        args.prompt_len, args.new_tokens, args.concurrency, args.repeats = 16, 8, 4, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()

    from transformers import AutoTokenizer

    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    cfg = json.loads((folder / "config.json").read_text())
    dtype = DTYPES[args.dtype]
    arith = model_arith(cfg, elem_bytes=dtype.itemsize)

    machine = machine_facts()
    machine["loadavg_at_start"] = load_before
    machine["cpu_idle_at_start"] = cpu_idle_fraction()
    print("== machine ==")
    for k, v in machine.items():
        print(f"  {k:>18}: {v}")
    print(f"  {'transformers':>18}: {__import__('transformers').__version__}")
    print(f"  {'model':>18}: {folder}")
    idle = machine["cpu_idle_at_start"]
    if idle is not None and idle < 0.9:
        print(f"  WARNING: only {100 * idle:.0f}% of the CPU was idle before starting; another "
              f"process is running and all numbers below will be depressed", file=sys.stderr)

    print("== roofline (measured now, same threads) ==")
    gemm = measure_gemm_peak(1024 if args.quick else 2048, dtype=dtype)
    bw = measure_mem_bandwidth(256 if args.quick else 768, kind="read")
    label = "fp32" if dtype == torch.float32 else "bf16"
    print(f"  {label} GEMM peak   : {gemm:8.1f} GFLOP/s  (torch.mm, best of several)")
    print(f"  memory READ bw   : {bw:8.1f} GB/s     (t.sum() over a large fp32 tensor)")

    tok = AutoTokenizer.from_pretrained(str(folder))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    L, N, B = args.prompt_len, args.new_tokens, args.concurrency
    single = build_prompts(tok, 1, L)
    # Different text for the single stream than for request 0 of the batch.
    batch = build_prompts(tok, B + 1, L)[1:]

    runners: list[Any] = [LoraplexRunner(folder, args.dtype)]
    if not args.skip_hf:
        hf = HFRunner(folder, pad_id, args.dtype)
        check_params_against_hf(arith, hf.model)
        runners.append(hf)
    dtypes = {r.name: str(r.dtype) for r in runners}
    print(f"  {'dtype':>18}: {dtypes}   torch threads: {torch.get_num_threads()}")
    if not args.skip_hf:
        print(f"  {'hf attention':>18}: {runners[1].attn_impl}")
    print(f"== workload: prompt {L} tokens, {N} new tokens, greedy, EOS ignored; "
          f"scenarios: 1 request and {B} concurrent; {args.repeats} repeats ==")

    scenarios = {"single": single, f"concurrent_{B}": batch}
    t_start = time.monotonic()
    # Warm-up: every engine at both measured shapes (full prompt, a few new tokens).
    for r in runners:
        for prompts in scenarios.values():
            r.run(prompts, min(N, 8))
    print(f"  warm-up done in {time.monotonic() - t_start:.1f}s")

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {r.name: [] for r in runners} for s in scenarios}
    for rep in range(args.repeats):
        for s, prompts in scenarios.items():
            order = runners if rep % 2 == 0 else runners[::-1]  # alternate who goes first
            for r in order:
                mon = ForeignCpu().start()
                res = r.run(prompts, N)
                res["foreign_cpu"] = mon.stop()
                runs[s][r.name].append(res)
                fc = res["foreign_cpu"]
                print(f"  rep {rep + 1}/{args.repeats} {s:>14} {r.name:>8}: "
                      f"{res['tok_per_s']:8.1f} tok/s ({res['seconds']:.2f}s)"
                      + ("" if fc is None else f"  other processes used {100 * fc:.0f}% CPU"),
                      flush=True)
    bench_s = time.monotonic() - t_start
    busy = [(s, n, x["foreign_cpu"]) for s, by in runs.items() for n, xs in by.items()
            for x in xs if x["foreign_cpu"] is not None and x["foreign_cpu"] > 0.1]
    if busy:
        print(f"  WARNING: other processes took >10% of the CPU during {len(busy)} measured "
              f"run(s); compare best-of numbers, or re-run on a quiet machine", file=sys.stderr)

    summary = summarize(runs, runners, arith, gemm, bw, L, N)
    parity = token_parity(runs, runners)
    print_table(summary, runners, scenarios, arith, gemm, bw, parity, label)
    floor = gemm_floor(runners[0].llm, L, N, B)
    conc = f"concurrent_{B}"
    print(f"\n== GEMM-only floor of the {B}-concurrent run (loraplex's packed {label} weights, "
          f"exact shapes, nothing else) ==")
    print(f"  prefill {floor['prefill_s']:.2f}s + decode {N - 1} x "
          f"{1e3 * floor['decode_step_s']:.1f} ms = {floor['total_s']:.2f}s -> at most "
          f"{floor['tok_per_s_ceiling']:.1f} tok/s for any {label} engine on this machine")
    lp_best = summary[conc]["loraplex"]["tok_per_s_best"]
    print(f"  loraplex reaches {100 * lp_best / floor['tok_per_s_ceiling']:.0f}% of that ceiling")
    if "hf" in summary[conc]:
        hf_best = summary[conc]["hf"]["tok_per_s_best"]
        print(f"  ceiling / transformers = {floor['tok_per_s_ceiling'] / hf_best:.2f}x "
              f"(the largest ratio physically possible vs this HF run)")

    out = {
        "machine": machine | {"loadavg_at_end": os.getloadavg(),
                              "transformers": __import__("transformers").__version__},
        "config": {"prompt_len": L, "new_tokens": N, "concurrency": B, "repeats": args.repeats,
                   "threads": torch.get_num_threads(), "dtypes": dtypes, "quick": args.quick,
                   "model_folder": str(folder), "python": platform.python_version()},
        "roofline": {f"gemm_{label}_gflops": gemm, "mem_read_gbps": bw},
        "model": arith,
        "summary": summary,
        "greedy_token_parity": parity,
        "gemm_floor_concurrent": floor,
        "runs": {s: {name: [{k: v for k, v in r.items() if k != "tokens"} for r in rs]
                     for name, rs in by.items()} for s, by in runs.items()},
        "bench_seconds": bench_s,
    }
    return save_results(args.out, out)


def summarize(runs, runners, arith, gemm, bw, L, N) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for s, by in runs.items():
        summary[s] = {}
        for r in runners:
            rs = by[r.name]
            best = max(rs, key=lambda x: x["tok_per_s"])
            e: dict[str, Any] = {
                "tok_per_s_best": best["tok_per_s"],
                "tok_per_s_median": statistics.median(x["tok_per_s"] for x in rs),
                "seconds_best": best["seconds"],
            }
            if "decode_tok_per_s" in best:
                nreq = len(best["tokens"])
                e["prefill_s"] = best["prefill_s"]
                e["decode_tok_per_s"] = best["decode_tok_per_s"]
                # FLOP-based: matmuls only (attention score/PV FLOPs reported separately).
                dec_flops = 2 * arith["matmul_params"] * best["decode_tok_per_s"]
                e["decode_gflops"] = dec_flops / 1e9
                e["decode_frac_gemm_peak"] = dec_flops / 1e9 / gemm
                avg_ctx = L + N / 2
                attn = arith["attn_flops_per_token_per_ctx"] * avg_ctx * best["decode_tok_per_s"]
                e["decode_gflops_incl_attention"] = (dec_flops + attn) / 1e9
                # Whole call, counting the prompt tokens' matmul work too (prefill included;
                # lm_head only where a token is sampled: prompt tokens skip it on both sides).
                layer_params = arith["matmul_params"] - arith["lm_head_params"]
                all_flops = 2 * nreq * (layer_params * (L + N) + arith["lm_head_params"] * N
                                        ) / best["seconds"]
                e["whole_run_gflops"] = all_flops / 1e9
                e["whole_run_frac_gemm_peak"] = all_flops / 1e9 / gemm
                # Byte-based: every decode step streams all weights once (shared by the batch).
                steps = best["decode_steps_per_s"]
                wbytes = arith["weight_bytes_per_step"] * steps
                kv = arith["kv_bytes_per_token"] * avg_ctx * nreq * steps
                e["decode_steps_per_s"] = steps
                e["decode_weight_gbps"] = wbytes / 1e9
                e["decode_frac_mem_bw"] = wbytes / 1e9 / bw
                e["decode_weight_plus_kv_gbps"] = (wbytes + kv) / 1e9
            summary[s][r.name] = e
        if len(runners) > 1:
            a, b = summary[s][runners[0].name], summary[s][runners[1].name]
            summary[s]["ratio_loraplex_over_hf_best"] = a["tok_per_s_best"] / b["tok_per_s_best"]
            summary[s]["ratio_loraplex_over_hf_median"] = (a["tok_per_s_median"]
                                                           / b["tok_per_s_median"])
            if "decode_tok_per_s" in a and "decode_tok_per_s" in b:
                summary[s]["decode_ratio_loraplex_over_hf"] = (a["decode_tok_per_s"]
                                                               / b["decode_tok_per_s"])
    return summary


def token_parity(runs, runners) -> dict[str, Any]:
    """Sanity check that both sides run the same model: greedy fp32 outputs should agree
    (a late divergence on a near-tie is possible and not an error). In bf16 each side's
    rounding differs (oneDNN vs ATen GEMMs), so the outputs part after some tokens."""
    if len(runners) < 2:
        return {}
    res = {}
    for s, by in runs.items():
        ours = by[runners[0].name][0]["tokens"]
        ref = by[runners[1].name][0]["tokens"]
        prefix = []
        for a, b in zip(ours, ref):
            k = 0
            while k < len(a) and a[k] == b[k]:
                k += 1
            prefix.append(k)
        res[s] = {"requests_identical": sum(p == len(a) for p, a in zip(prefix, ours)),
                  "requests": len(ours), "min_common_prefix": min(prefix),
                  "mean_common_prefix": sum(prefix) / len(prefix)}
    return res


def print_table(summary, runners, scenarios, arith, gemm, bw, parity, label) -> None:
    names = [r.name for r in runners]
    print()
    print("== throughput (generated tokens / wall time of the call, prefill included; best) ==")
    hdr = f"  {'scenario':<16}" + "".join(f"{n + ' tok/s':>16}" for n in names)
    if len(names) > 1:
        hdr += f"{'ratio lp/hf':>13}{'(median)':>10}"
    hdr += "".join(f"{n + ' decode tok/s':>22}" for n in names)
    print(hdr)
    for s in scenarios:
        row = f"  {s:<16}" + "".join(f"{summary[s][n]['tok_per_s_best']:16.1f}" for n in names)
        if len(names) > 1:
            row += (f"{summary[s]['ratio_loraplex_over_hf_best']:13.2f}"
                    f"{summary[s]['ratio_loraplex_over_hf_median']:10.2f}")
        row += "".join(f"{summary[s][n].get('decode_tok_per_s', float('nan')):22.1f}"
                       for n in names)
        print(row)
    print()
    mp = arith["matmul_params"]
    print(f"== roofline (matmul params incl. lm_head: {mp / 1e6:.1f} M -> {2 * mp / 1e6:.0f} "
          f"MFLOP/token; {label} weights read per decode step: "
          f"{arith['weight_bytes_per_step'] / 1e6:.0f} MB) ==")
    print(f"  GEMM peak {gemm:.1f} GFLOP/s, READ bandwidth {bw:.1f} GB/s")
    conc = next(s for s in scenarios if s != "single")
    for n in names:
        c = summary[conc][n]
        if "decode_gflops" in c:
            print(f"  {n:>8} {conc} decode: {c['decode_gflops']:6.1f} GFLOP/s = "
                  f"{100 * c['decode_frac_gemm_peak']:5.1f}% of GEMM peak "
                  f"(incl. attention {c['decode_gflops_incl_attention']:.1f}); whole call incl. "
                  f"prefill: {c['whole_run_gflops']:.1f} GFLOP/s = "
                  f"{100 * c['whole_run_frac_gemm_peak']:.1f}%")
        o = summary["single"][n]
        if "decode_weight_gbps" in o:
            print(f"  {n:>8} single decode: {o['decode_steps_per_s']:6.1f} steps/s x "
                  f"{arith['weight_bytes_per_step'] / 1e6:.0f} MB = {o['decode_weight_gbps']:5.1f} "
                  f"GB/s = {100 * o['decode_frac_mem_bw']:5.1f}% of READ bandwidth "
                  f"(weights + KV: {o['decode_weight_plus_kv_gbps']:.1f} GB/s)")
    if parity:
        print()
        print("== greedy token parity loraplex vs HF (first measured run) ==")
        for s, p in parity.items():
            print(f"  {s:<16} identical {p['requests_identical']}/{p['requests']}, "
                  f"common prefix min {p['min_common_prefix']} mean "
                  f"{p['mean_common_prefix']:.1f} tokens")


if __name__ == "__main__":
    main()
