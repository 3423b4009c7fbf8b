"""Machine roofline: fp32 GEMM peak (GFLOP/s) and memory READ bandwidth (GB/s), measured with torch.

Both use torch's current intra-op thread count (`torch.get_num_threads()`), so set it before
calling. Importable (`from loraplex.bench.roofline import measure_gemm_peak`) and runnable:

    python benchmarks/roofline.py [--threads N]     (or python -m loraplex.bench.roofline)

Units are decimal: 1 GFLOP = 1e9 FLOP, 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def _best_time(fn, repeats: int, budget_s: float) -> float:
    """Fastest of `repeats` timed calls (after one untimed warm-up), stopping early once the
    time budget is spent (at least one timed call always runs)."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def measure_gemm_peak(n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32,
                      budget_s: float = 8.0) -> float:
    """GFLOP/s of one n x n x n matmul (2*n^3 FLOP), best of `repeats`, torch's thread count.

    2048^3 is compute-bound (arithmetic intensity ~340 FLOP/byte), so this approximates the
    fp32 peak that torch's GEMM (oneDNN/MKL) reaches on this machine.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=g, dtype=torch.float32).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    with torch.inference_mode():
        t = _best_time(lambda: torch.mm(a, b, out=c), repeats, budget_s)
    return 2.0 * n ** 3 / t / 1e9


def measure_mem_bandwidth(size_mb: int = 768, repeats: int = 7, kind: str = "read",
                          budget_s: float = 8.0) -> float:
    """GB/s streaming a `size_mb` MB fp32 tensor from DRAM (far larger than any cache), best of
    `repeats`, torch's thread count.

    kind="read"  (default): `t.sum()`; bytes counted = the tensor once (pure READ bandwidth,
                  the access pattern of weight streaming in decode).
    kind="copy": `dst.copy_(src)`; bytes counted = read + write (2x the tensor). Write-allocate
                  traffic is not counted, so this understates the DRAM traffic somewhat.
    """
    numel = size_mb * 1_000_000 // 4
    src = torch.ones(numel, dtype=torch.float32)  # ones(): pages are touched before timing
    with torch.inference_mode():
        if kind == "read":
            t = _best_time(lambda: src.sum(), repeats, budget_s)
            nbytes = src.numel() * src.element_size()
        elif kind == "copy":
            dst = torch.zeros_like(src)
            t = _best_time(lambda: dst.copy_(src), repeats, budget_s)
            nbytes = 2 * src.numel() * src.element_size()
        else:
            raise ValueError(f"kind must be 'read' or 'copy', got {kind!r}")
    return nbytes / t / 1e9


def machine_facts() -> dict:
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), MiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs idle over `seconds` (from /proc/stat), before we start working:
    well below 1.0 means something else is running and every number here will be low."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    try:
        i0, t0 = snap()
        time.sleep(seconds)
        i1, t1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(1, t1 - t0)


class ForeignCpu:
    """CPU time other processes used between `start()` and `stop()`, as a fraction of all cores
    over that wall time (0.0 = the machine was ours; 0.5 on 2 cores = one core was taken)."""

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._own0 = 0.0

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> ForeignCpu:
        self._t0, self._own0 = time.monotonic(), self._own_s()
        try:
            self._busy0 = self._busy_s()
        except (OSError, ValueError):
            self._busy0 = float("nan")
        return self

    def stop(self) -> float | None:
        wall = time.monotonic() - self._t0
        try:
            busy = self._busy_s() - self._busy0
        except (OSError, ValueError):
            return None
        if wall <= 0 or busy != busy:
            return None
        foreign = max(0.0, busy - (self._own_s() - self._own0))
        return min(1.0, foreign / (wall * (os.cpu_count() or 1)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the usable core count)")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--mem-mb", type=int, default=768)
    args = ap.parse_args()
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    for k, v in machine_facts().items():
        print(f"{k:>14}: {v}")
    idle = cpu_idle_fraction()
    if idle is not None:
        print(f"{'cpu idle':>14}: {100 * idle:.0f}% before measuring"
              + ("  (WARNING: machine busy, numbers will be low)" if idle < 0.9 else ""))
    n = args.gemm_n
    print(f"{'gemm fp32':>14}: {measure_gemm_peak(n):8.1f} GFLOP/s  (torch.mm {n}x{n}x{n}, best)")
    mb = args.mem_mb
    print(f"{'mem read':>14}: {measure_mem_bandwidth(mb, kind='read'):8.1f} GB/s     "
          f"(t.sum() over {mb} MB fp32, read only, best)")
    print(f"{'mem copy':>14}: {measure_mem_bandwidth(mb, kind='copy'):8.1f} GB/s     "
          f"(dst.copy_(src) {mb} MB, read+write counted, best)")


if __name__ == "__main__":
    main()
