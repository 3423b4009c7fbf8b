"""`loraplex bench`: the load generator against a loraplex process it did not start, and a
smoke run of the sweep on a tiny model (sane JSON fields and plots; no timing thresholds)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lora_helpers import make_peft_adapter
from server_harness import start_cli_server

from loraplex.bench.loadgen import BenchError, Lengths, Workload, plan, run


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def other_server(tiny, tmp_path_factory):
    """A second loraplex process on its own port, with three adapters."""
    tmp = tmp_path_factory.mktemp("bench-ads")
    specs = []
    for i in range(3):
        p = make_peft_adapter(tiny, tmp / f"t{i}", seed=20 + i, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])
        specs.append(f"t{i}={p}")
    proc, url = start_cli_server(["--model", str(tiny), "--max-model-len", "512",
                                  "--api-key", "bench-key", "--lora-modules", *specs])
    yield url
    proc.terminate()
    proc.wait(30)


def test_lengths_and_popularity_are_checked():
    assert Lengths.parse("12") == Lengths("fixed", 12)
    assert str(Lengths.parse("uniform:3:9")) == "uniform:3:9"
    for bad in ("0", "uniform:9:3", "exp:0.5", "normal:3", "x"):
        with pytest.raises(BenchError):
            Lengths.parse(bad)
    w = Workload("http://x/v1", ["a", "b"], popularity="zipf:0")
    with pytest.raises(BenchError, match="zipf"):
        w.check()
    w = Workload("http://x/v1", ["a", "b", "c"], num_requests=300, popularity="zipf:1.5",
                 prompt_len=Lengths.parse("uniform:2:6"), request_rate=10.0)
    p1, p2 = plan(w), plan(w)
    assert [(p.model, p.prompt, p.at) for p in p1] == [(p.model, p.prompt, p.at) for p in p2]
    counts = [sum(p.model == m for p in p1) for m in "abc"]
    assert counts[0] > counts[1] > counts[2]  # rank 1 most popular
    assert all(2 <= len(p.prompt.split()) <= 6 for p in p1)
    assert all(b.at > a.at for a, b in itertools.pairwise(p1))  # Poisson arrivals in order


def test_bench_serve_against_a_server_it_did_not_start(other_server, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-m", "loraplex.cli", "bench", "serve",
                        "--base-url", other_server + "/v1", "--api-key", "bench-key",
                        "--num-requests", "12", "--concurrency", "3", "--prompt-len", "6",
                        "--output-len", "5", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TTFT ms p50/p90/p99" in r.stdout
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["requests"] == s["completed"] == 12 and s["failed"] == 0, s["errors"]
    assert s["output_tokens"] == 12 * 5  # ignore_eos: every request ran to max_tokens
    assert s["prompt_tokens"] > 12 * 6  # the server's count (byte tokenizer: chars)
    assert set(s["per_model_completed"]) <= {"t0", "t1", "t2"}  # discovered adapters only
    assert sum(s["per_model_completed"].values()) == 12
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"]
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert "api_key" not in res["config"]  # never written out


def test_open_loop_chat_and_errors_are_counted(other_server):
    auth = "bench-key"
    w = Workload(other_server + "/v1", ["t0", "t1", "no-such-adapter"], num_requests=9,
                 request_rate=50.0, concurrency=4, endpoint="chat", api_key=auth,
                 prompt_len=Lengths.parse("uniform:2:5"), output_len=Lengths.parse("3"),
                 popularity="uniform", seed=3)
    res = asyncio.run(run(w, progress=False))
    s = res["summary"]
    missing = sum(p.model == "no-such-adapter" for p in plan(w))
    assert missing and s["errors"] == {"HTTP 404": missing}
    assert s["completed"] == 9 - missing and s["output_tokens"] == 3 * (9 - missing)
    w.stream = False  # non-streaming: TTFT is the whole request
    s = asyncio.run(run(w, progress=False))["summary"]
    assert s["completed"] == 9 - missing and s["ttft_ms"]["p50"] == s["e2e_ms"]["p50"]


def test_sweep_smoke_on_a_tiny_model(tiny, tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "loraplex.cli", "bench", "sweep", "--quick",
                        "--model", str(tiny), "--out", str(out), "--rank", "4",
                        "--targets", "q_proj,v_proj,down_proj", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "sweep.json").read_text())
    assert res["machine"]["gemm_peak_gflops"] > 0 and res["machine"]["read_bandwidth_gbps"] > 0
    pts = res["points"]
    assert {(p["concurrency"], p["adapters"]) for p in pts} == {(2, 0), (2, 1), (2, 4)}
    for p in pts:
        assert p["completed"] == p["requests"] == 4 and not p["errors"]
        assert p["output_tokens"] == 4 * 8
        assert p["vs_base"] > 0 and p["bandwidth_fraction"] > 0 and p["gemm_fraction"] > 0
    # the 4-adapter point reads three adapters from --lora-dir for the first time
    assert next(p for p in pts if p["adapters"] == 4)["adapter_loads"] >= 3
    m = res["memory"]
    assert m["resident_adapters"] == 4 and m["adapter_file_mb"] > 0  # --quick: 4 CPU copies
    b = res["baselines"]
    assert b["peft"]["tok_s"] > 0 and b["peft"]["ratio"] > 0
    assert b["merged"]["merged_mb_per_adapter"] > 0
    assert "gguf" in b["llama_cpp"]["skipped"]  # an HF folder: llama.cpp has nothing to load
    assert len(res["plots"]) == 3
    for f in res["plots"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
