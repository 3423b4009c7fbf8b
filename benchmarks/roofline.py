"""The machine's roofline (fp32 GEMM peak, memory read bandwidth); the code lives in
loraplex/bench/roofline.py so that `loraplex bench` uses it too.

    python benchmarks/roofline.py [--threads N]
"""

from loraplex.bench.roofline import (  # noqa: F401  (re-exported for the benchmark scripts)
    ForeignCpu,
    cpu_idle_fraction,
    machine_facts,
    main,
    measure_gemm_peak,
    measure_mem_bandwidth,
)

if __name__ == "__main__":
    main()
