"""`loraplex bench sweep`: start a loraplex server, make random adapters, and measure how
throughput and latency move with the number of distinct adapters and the concurrency, against
the same server on the base model alone (the LoRA tax), the machine's roofline and the
baselines a user would otherwise pick (baselines.py). Writes sweep.json and PNG plots.

Order of work, so that nothing competes for the 2 cores with what is being measured: roofline
first (nothing else running), then the server alone with the load generator, then the server
is stopped and the baselines run one after the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from loraplex.bench.loadgen import Lengths, Workload, print_summary, run


@dataclass(slots=True)
class SweepConfig:
    out: Path
    model: str | None = None  # None: the embedded SmolLM2
    dtype: str = "float32"  # the baselines run fp32; so does the server by default
    adapters: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 1000])
    concurrency: list[int] = field(default_factory=lambda: [8, 32])
    requests_per_client: int = 3  # each point sends concurrency x this many requests
    prompt_len: Lengths = field(default_factory=lambda: Lengths("fixed", 64))
    output_len: Lengths = field(default_factory=lambda: Lengths("fixed", 64))
    popularity: str = "uniform"
    rank: int = 16
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    distinct_weights: int = 128  # adapters beyond this share weight files (hard links)
    max_loras: int = 32
    max_cpu_loras: int = 128
    max_num_seqs: int = 64
    baselines: list[str] = field(default_factory=lambda: ["peft", "merged", "llama_cpp"])
    adapter_dir: Path | None = None  # default: the user cache (GBs: never next to the results)
    gemm_n: int = 2048
    bandwidth_mb: int = 768
    port: int | None = None
    progress: bool = True

    def check(self) -> None:
        from loraplex.bench.loadgen import BenchError

        if not self.adapters or min(self.adapters) < 1:
            raise BenchError("adapters: a list of counts >= 1")
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchError("concurrency: a list of counts >= 1")
        if max(self.concurrency) > self.max_num_seqs:
            raise BenchError(f"concurrency {max(self.concurrency)} > max_num_seqs "
                             f"{self.max_num_seqs}: requests would queue, not run")
        if self.max_cpu_loras < self.max_loras:
            raise BenchError("max_cpu_loras must be >= max_loras")
        unknown = set(self.baselines) - {"peft", "merged", "llama_cpp"}
        if unknown:
            raise BenchError(f"unknown baseline(s) {sorted(unknown)}: peft, merged, llama_cpp")


def model_folder(model: str | None) -> Path:
    from loraplex.model.loader import resolve_model_path

    return resolve_model_path(model)


class Server:
    """`loraplex serve` in a subprocess on loopback; its RSS read from /proc."""

    def __init__(self, cfg: SweepConfig, lora_dir: Path, log_path: Path) -> None:
        port = cfg.port or _free_port()
        args = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port),
                "--dtype", cfg.dtype, "--lora-dir", str(lora_dir),
                "--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras),
                "--max-lora-rank", str(cfg.rank), "--max-num-seqs", str(cfg.max_num_seqs),
                "--no-demo-adapters", "--log-level", "warning",
                "--max-queued-requests", str(4 * cfg.max_num_seqs)]
        if cfg.model:
            args += ["--model", cfg.model]
        self.log = open(log_path, "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"server did not come up in 600 s; see {log_path}")
        models = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
        self.base_name = next(m["id"] for m in models if not m.get("parent"))

    def rss_mb(self) -> float:
        from loraplex.bench.roofline import rss_mb

        return rss_mb(self.proc.pid)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter/gauge over its labels (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point(server: Server, cfg: SweepConfig, models: list[str], concurrency: int,
           warm: int, label: str) -> dict:
    w = Workload(base_url=server.url + "/v1", models=models,
                 num_requests=concurrency * cfg.requests_per_client, concurrency=concurrency,
                 popularity=cfg.popularity, prompt_len=cfg.prompt_len, output_len=cfg.output_len,
                 warmup=warm, seed=len(models) * 1000 + concurrency)
    loads0 = server.metric("loraplex_adapter_loads_total")
    res = asyncio.run(run(w, progress=cfg.progress))
    s = res["summary"]
    s["adapter_loads"] = server.metric("loraplex_adapter_loads_total") - loads0
    s["server_rss_mb"] = server.rss_mb()
    print(f"[{label}] ", end="")
    print_summary(s)
    return s


def run_sweep(cfg: SweepConfig) -> dict:
    from loraplex.bench import roofline
    from loraplex.bench.adapters import write_adapters
    from loraplex.config import ModelConfig

    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print("measuring the roofline (GEMM peak, memory read bandwidth) ...", flush=True)
    machine = roofline.machine_facts()
    # The GEMM ceiling is in the server's dtype: bf16 GEMMs peak ~2x fp32's here.
    gemm_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype,
                                                                             torch.float32)
    machine["gemm_dtype"] = str(gemm_dtype).removeprefix("torch.")
    machine["gemm_peak_gflops"] = roofline.measure_gemm_peak(cfg.gemm_n, dtype=gemm_dtype,
                                                             budget_s=4)
    machine["read_bandwidth_gbps"] = roofline.measure_mem_bandwidth(cfg.bandwidth_mb, budget_s=4)
    print(f"  {machine['gemm_dtype']} GEMM peak {machine['gemm_peak_gflops']:.0f} GFLOP/s, read "
          f"bandwidth "
          f"{machine['read_bandwidth_gbps']:.1f} GB/s")

    folder = model_folder(cfg.model)
    mcfg = ModelConfig.from_folder(folder)
    if cfg.adapter_dir is None:
        from loraplex.model.gguf_convert import cache_root

        adapter_dir = cache_root() / "bench-adapters" / folder.name
    else:
        adapter_dir = cfg.adapter_dir
    n_max = max(cfg.adapters)
    print(f"writing {n_max} adapters (r={cfg.rank}, {len(cfg.targets)} projections, "
          f"{min(n_max, cfg.distinct_weights)} distinct weight files) to {adapter_dir} ...",
          flush=True)
    names = write_adapters(adapter_dir, mcfg, n_max, cfg.rank, cfg.targets,
                           cfg.distinct_weights, progress=cfg.progress)
    adapter_bytes = (adapter_dir / names[0] / "adapter_model.safetensors").stat().st_size
    weight_bytes = _model_weight_bytes(mcfg, cfg.dtype)

    print("starting the server ...", flush=True)
    server = Server(cfg, adapter_dir, cfg.out / "server.log")
    points: list[dict] = []
    single: dict = {}
    try:
        _point(server, cfg, [server.base_name], 1, 1, "warm-up")
        rss_base = server.rss_mb()
        single["base"] = _point(server, cfg, [server.base_name], 1, 1, "1 stream, base")
        single["adapter"] = _point(server, cfg, [names[0]], 1, 1, "1 stream, 1 adapter")
        for c in cfg.concurrency:
            row = {"concurrency": c, "adapters": 0,
                   **_point(server, cfg, [server.base_name], c, 1, f"c={c} base")}
            points.append(row)
            for n in cfg.adapters:
                # warm as many as stay resident; beyond that the point measures cold loads
                warm = min(n, cfg.max_cpu_loras)
                row = {"concurrency": c, "adapters": n,
                       **_point(server, cfg, names[:n], c, warm, f"c={c} {n} adapters")}
                points.append(row)
        # CPU copies held now, as the server counts them (pinned copies may exceed the limit)
        resident = int(server.metric("loraplex_adapters_cpu_resident")) or \
            min(n_max, cfg.max_cpu_loras)
        rss_loaded = server.rss_mb()
    finally:
        server.stop()
    base_by_c = {p["concurrency"]: p for p in points if p["adapters"] == 0}
    for p in points:
        b = base_by_c[p["concurrency"]]
        p["vs_base"] = (p["output_throughput"] / b["output_throughput"]
                        if b["output_throughput"] else None)
        p.update(_roofline_fractions(p, machine, weight_bytes, adapter_bytes, mcfg, cfg))
    memory = {"server_rss_base_mb": rss_base, "server_rss_loaded_mb": rss_loaded,
              "resident_adapters": resident, "adapter_file_mb": adapter_bytes / 1e6,
              "rss_per_adapter_mb": (rss_loaded - rss_base) / resident}

    baselines = run_baselines(cfg, folder, adapter_dir, names, points, single)
    result = {"machine": machine, "config": _config_json(cfg), "model": str(folder),
              "model_weight_bytes": weight_bytes, "adapter_bytes": adapter_bytes,
              "single_stream": single, "points": points, "memory": memory,
              "baselines": baselines, "wall_s": time.perf_counter() - t_start}
    (cfg.out / "sweep.json").write_text(json.dumps(result, indent=2))
    try:
        from loraplex.bench.plots import plot_sweep

        result["plots"] = plot_sweep(result, cfg.out)
    except ImportError as e:
        print(f"plots skipped: {e} (pip install matplotlib)")
        result["plots"] = []
    (cfg.out / "sweep.json").write_text(json.dumps(result, indent=2))
    (cfg.out / "report.md").write_text(report_markdown(result))
    print_headline(result)
    print(f"wrote {cfg.out / 'sweep.json'} in {result['wall_s']:.0f} s")
    return result


def _model_weight_bytes(mcfg, dtype: str) -> int:
    """Bytes of the weights one decode step streams (every projection, norms, the head)."""
    h, i, v, n = mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size, mcfg.num_layers
    q, kv = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    size = 2 if dtype in ("bfloat16", "float16") else 4
    return (n * per_layer + v * h) * size


def _roofline_fractions(p: dict, machine: dict, weight_bytes: int, adapter_bytes: int,
                        mcfg, cfg: SweepConfig) -> dict:
    """Decode ceilings for this point: memory (each step streams the weights and each distinct
    adapter in it once; `concurrency` tokens per step) and compute (2 FLOP per weight per
    token at the GEMM peak), and the fraction of each that the measured output rate reaches."""
    c, n = p["concurrency"], p["adapters"]
    distinct = min(n, cfg.max_loras, c)
    step_bytes = weight_bytes + distinct * adapter_bytes
    bw_ceiling = c * machine["read_bandwidth_gbps"] * 1e9 / step_bytes
    flop_per_token = 2 * weight_bytes / (2 if cfg.dtype in ("bfloat16", "float16") else 4)
    if n:
        flop_per_token += 2 * adapter_bytes / 4
    gemm_ceiling = machine["gemm_peak_gflops"] * 1e9 / flop_per_token
    got = p["output_throughput"] or 0.0
    return {"bandwidth_ceiling_tok_s": bw_ceiling, "gemm_ceiling_tok_s": gemm_ceiling,
            "bandwidth_fraction": got / bw_ceiling, "gemm_fraction": got / gemm_ceiling}


def run_baselines(cfg: SweepConfig, folder: Path, adapter_dir: Path, names: list[str],
                  points: list[dict], single: dict) -> dict:
    from loraplex.bench import baselines

    out: dict = {}
    c_ref = max(cfg.concurrency)
    ref = next((p for p in points if p["concurrency"] == c_ref and p["adapters"] == 8), None) \
        or next(p for p in points if p["concurrency"] == c_ref and p["adapters"] > 0)
    k_ref = ref["adapters"]
    if "peft" in cfg.baselines:
        print(f"baseline: transformers + PEFT, {c_ref} requests over {min(k_ref, 8)} adapters "
              "...", flush=True)
        r = baselines.peft_mixed_batch(folder, [adapter_dir / n for n in names[:min(k_ref, 8)]],
                                       c_ref, cfg.prompt_len, cfg.output_len)
        if r.get("tok_s"):
            r["loraplex_tok_s"] = ref["output_throughput"]
            r["loraplex_point"] = {"concurrency": c_ref, "adapters": k_ref}
            r["ratio"] = ref["output_throughput"] / r["tok_s"]
        out["peft"] = r
        _say(r, "peft")
    if "merged" in cfg.baselines:
        print("baseline: one merged model per adapter (memory) ...", flush=True)
        r = baselines.merged_memory(folder, adapter_dir / names[0])
        out["merged"] = r
        _say(r, "merged")
    if "llama_cpp" in cfg.baselines:
        print("baseline: llama-cpp-python on the GGUF, single stream ...", flush=True)
        r = baselines.llama_cpp_single(cfg.model, adapter_dir / names[0], cfg.output_len,
                                       cfg.prompt_len)
        if r.get("tok_s"):
            r["loraplex_tok_s"] = _stream_rate(single["base"])
            r["ratio"] = r["loraplex_tok_s"] / r["tok_s"]
        if r.get("lora_tok_s"):
            r["loraplex_lora_tok_s"] = _stream_rate(single["adapter"])
            r["lora_ratio"] = r["loraplex_lora_tok_s"] / r["lora_tok_s"]
        out["llama_cpp"] = r
        _say(r, "llama_cpp")
    return out


def _stream_rate(s: dict) -> float | None:
    """Decode tokens/s of one stream: 1 / time per output token."""
    tpot = s["tpot_ms"]["p50"]
    return 1e3 / tpot if tpot else None


def _say(r: dict, name: str) -> None:
    if r.get("skipped"):
        print(f"  {name} skipped: {r['skipped']}")
    else:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if not isinstance(v, dict)}
        print(f"  {name}: {shown}")


def _config_json(cfg: SweepConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    d["adapter_dir"] = str(cfg.adapter_dir) if cfg.adapter_dir else None
    d["prompt_len"], d["output_len"] = str(cfg.prompt_len), str(cfg.output_len)
    return d


def print_headline(r: dict) -> None:
    pts = r["points"]
    c = max(p["concurrency"] for p in pts)
    print(f"\nLoRA tax at concurrency {c} (output tok/s vs the base alone):")
    for p in pts:
        if p["concurrency"] == c and p["adapters"]:
            print(f"  {p['adapters']:5d} adapters: {p['output_throughput']:.1f} tok/s = "
                  f"{p['vs_base']:.3f}x base | p99 TTFT {p['ttft_ms']['p99']:.0f} ms | "
                  f"{p['bandwidth_fraction']:.0%} of the bandwidth ceiling, "
                  f"{p['gemm_fraction']:.0%} of the GEMM ceiling")
    m = r["memory"]
    print(f"memory: +{m['rss_per_adapter_mb']:.1f} MB RSS per resident adapter "
          f"({m['adapter_file_mb']:.1f} MB file)")


def report_markdown(r: dict) -> str:
    """The sweep as Markdown tables (what benchmarks/RESULTS.md shows)."""
    m, mem, b = r["machine"], r["memory"], r["baselines"]
    cfg = r["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['logical_cpus']} CPUs, torch {m['torch_version']}; measured "
        f"now: {m.get('gemm_dtype', 'float32')} GEMM peak **{m['gemm_peak_gflops']:.0f} "
        f"GFLOP/s**, memory read bandwidth "
        f"**{m['read_bandwidth_gbps']:.1f} GB/s**.",
        f"Server: `--dtype {cfg['dtype']} --max-loras {cfg['max_loras']} --max-cpu-loras "
        f"{cfg['max_cpu_loras']} --max-num-seqs {cfg['max_num_seqs']}`; adapters r={cfg['rank']} "
        f"on {len(cfg['targets'])} projections ({r['adapter_bytes'] / 1e6:.1f} MB each), "
        f"served from `--lora-dir`; requests of {cfg['prompt_len']} prompt words and "
        f"{cfg['output_len']} output tokens, {cfg['requests_per_client']} per client, closed "
        f"loop, {cfg['popularity']} popularity. Sweep wall time {r['wall_s'] / 60:.1f} min.",
        "",
        "| concurrency | adapters | output tok/s | vs base | p50 / p99 TTFT ms | p50 ITL ms | "
        "adapter loads | bandwidth ceiling (fraction) | GEMM ceiling (fraction) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["points"]:
        lines.append(
            f"| {p['concurrency']} | {p['adapters'] or 'base'} | {p['output_throughput']:.1f} | "
            f"{p['vs_base']:.3f}x | {p['ttft_ms']['p50']:.0f} / {p['ttft_ms']['p99']:.0f} | "
            f"{p['itl_ms']['p50']:.1f} | {p['adapter_loads']:.0f} | "
            f"{p['bandwidth_ceiling_tok_s']:.0f} ({p['bandwidth_fraction']:.0%}) | "
            f"{p['gemm_ceiling_tok_s']:.0f} ({p['gemm_fraction']:.0%}) |")
    s = r["single_stream"]
    lines += ["", f"Single stream (time per output token, p50): base "
              f"{s['base']['tpot_ms']['p50']:.1f} ms, with an adapter "
              f"{s['adapter']['tpot_ms']['p50']:.1f} ms.",
              "", f"Memory: **{mem['rss_per_adapter_mb']:.1f} MB of server RSS per resident "
              f"adapter** ({mem['resident_adapters']} resident; file "
              f"{mem['adapter_file_mb']:.1f} MB).", ""]
    if "peft" in b:
        x = b["peft"]
        lines.append("- transformers + PEFT mixed-adapter batch: " + (
            f"skipped ({x['skipped']})" if x.get("skipped") else
            f"{x['tok_s']:.1f} tok/s ({x['requests']} requests over {x['adapters']} adapters, "
            f"{x['output_len']} tokens, one batch) vs loraplex {x['loraplex_tok_s']:.1f} tok/s "
            f"(concurrency {x['loraplex_point']['concurrency']}, "
            f"{x['loraplex_point']['adapters']} adapters) = **{x['ratio']:.1f}x**"))
    if "merged" in b:
        x = b["merged"]
        lines.append("- one merged model per adapter: " + (
            f"skipped ({x['skipped']})" if x.get("skipped") else
            f"{x['merged_mb_per_adapter']:.0f} MB RSS per adapter (the model's parameters are "
            f"{x['model_param_mb']:.0f} MB) vs loraplex {mem['rss_per_adapter_mb']:.1f} MB = "
            f"**{x['merged_mb_per_adapter'] / mem['rss_per_adapter_mb']:.0f}x less memory**"))
    if "llama_cpp" in b:
        x = b["llama_cpp"]
        if x.get("skipped"):
            lines.append(f"- llama-cpp-python: skipped ({x['skipped']})")
        else:
            t = (f"- llama-cpp-python on the GGUF (its Q4_1 weights, {x['threads']} threads), "
                 f"one stream: {x['tok_s']:.1f} tok/s vs loraplex (fp32 weights) "
                 f"{x['loraplex_tok_s']:.1f} tok/s = **{x['ratio']:.2f}x**")
            if x.get("lora_tok_s"):
                t += (f"; with a LoRA adapter: {x['lora_tok_s']:.1f} vs "
                      f"{x['loraplex_lora_tok_s']:.1f} tok/s = {x['lora_ratio']:.2f}x")
            elif x.get("lora_skipped"):
                t += f"; with a LoRA adapter: not run ({x['lora_skipped']})"
            lines.append(t)
    return "\n".join(lines) + "\n"
