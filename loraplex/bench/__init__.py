"""`loraplex bench`: serving benchmarks.

  loadgen.py   `bench serve`: load against any OpenAI-compatible endpoint (ours or another)
  sweep.py     `bench sweep`: starts a server, makes adapters, sweeps adapters x concurrency
  baselines.py transformers + PEFT, merged model per adapter, llama-cpp-python
  roofline.py  the machine's GEMM peak and memory read bandwidth
  plots.py     PNG plots of a sweep
  cli.py       argument parsing for both commands
"""
