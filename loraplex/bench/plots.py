"""PNG plots of a sweep (matplotlib, headless): throughput and p99 TTFT against the number of
distinct adapters, and the LoRA tax (throughput relative to the base alone), each with the
machine's roofline: the decode ceilings set by memory bandwidth and by the GEMM peak."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = r["points"]
    cs = sorted({p["concurrency"] for p in pts})
    m = r["machine"]
    files = []

    def series(c: int, key: str):
        rows = sorted((p for p in pts if p["concurrency"] == c and p["adapters"]),
                      key=lambda p: p["adapters"])
        return [p["adapters"] for p in rows], [p[key] for p in rows], rows

    # 1. throughput vs adapters, base as a dashed line, roofline ceilings dotted
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(cs):
        color = f"C{i}"
        xs, ys, rows = series(c, "output_throughput")
        ax.plot(xs, ys, "o-", color=color, label=f"loraplex, {c} concurrent")
        base = next(p for p in pts if p["concurrency"] == c and not p["adapters"])
        ax.axhline(base["output_throughput"], color=color, ls="--", lw=1,
                   label=f"base model alone, {c} concurrent")
        ax.plot(xs, [p["bandwidth_ceiling_tok_s"] for p in rows], ":", color=color, lw=1,
                label=f"memory-bandwidth ceiling ({m['read_bandwidth_gbps']:.0f} GB/s), {c}")
    top_rows = series(cs[-1], "output_throughput")[2]
    ax.plot([p["adapters"] for p in top_rows], [p["gemm_ceiling_tok_s"] for p in top_rows],
            "-.", color="gray", lw=1,
            label=f"GEMM-peak ceiling ({m['gemm_peak_gflops']:.0f} GFLOP/s)")
    files.append(_finish(fig, ax, "output tokens/s", "Throughput vs number of adapters",
                         out / "throughput_vs_adapters.png"))

    # 2. p99 TTFT vs adapters
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(cs):
        rows = sorted((p for p in pts if p["concurrency"] == c and p["adapters"]),
                      key=lambda p: p["adapters"])
        ax.plot([p["adapters"] for p in rows], [p["ttft_ms"]["p99"] for p in rows], "o-",
                color=f"C{i}", label=f"p99 TTFT, {c} concurrent")
        ax.plot([p["adapters"] for p in rows], [p["ttft_ms"]["p50"] for p in rows], "x--",
                color=f"C{i}", lw=1, label=f"p50 TTFT, {c} concurrent")
    files.append(_finish(fig, ax, "time to first token (ms)",
                         f"TTFT vs number of adapters ({r['config']['max_loras']} device slots, "
                         f"{r['config']['max_cpu_loras']} CPU copies)",
                         out / "ttft_vs_adapters.png"))

    # 3. LoRA tax: throughput relative to the base, beside the best ratio the floor allows
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(cs):
        rows = sorted((p for p in pts if p["concurrency"] == c and p["adapters"]),
                      key=lambda p: p["adapters"])
        base = next(p for p in pts if p["concurrency"] == c and not p["adapters"])
        xs = [p["adapters"] for p in rows]
        ax.plot(xs, [p["vs_base"] for p in rows], "o-", color=f"C{i}",
                label=f"loraplex / base, {c} concurrent")
        # the base's measured step plus reading each step's distinct adapters once
        ax.plot(xs, [best_ratio(r, p, base) for p in rows], ":", color=f"C{i}", lw=1,
                label=f"best possible: base + adapter bytes / bandwidth, {c}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0, 1.1)
    files.append(_finish(fig, ax, "throughput relative to the base model alone", "LoRA tax",
                         out / "lora_tax.png", log_y=False))
    return files


def best_ratio(r: dict, p: dict, base: dict) -> float:
    """Throughput ratio if LoRA cost only its floor: each decode step (concurrency tokens at
    the base's measured rate) plus the distinct adapters' bytes at the measured bandwidth."""
    c = p["concurrency"]
    step = c / base["output_throughput"]
    distinct = min(p["adapters"], r["config"]["max_loras"], c)
    floor = distinct * r["adapter_bytes"] / (r["machine"]["read_bandwidth_gbps"] * 1e9)
    return step / (step + floor)


def _finish(fig, ax, ylabel: str, title: str, path: Path, log_y: bool = True) -> str:
    """Shared axes (adapters on a log x axis with plain numbers), labels, legend; save."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("distinct adapters in the workload")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)
