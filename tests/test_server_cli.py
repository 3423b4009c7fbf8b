"""`loraplex serve` as users run it: flags, YAML config, SIGTERM drain, queue bound (tiny model)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from lora_helpers import make_peft_adapter
from server_harness import LiveServer, start_cli_server

from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory):
    return make_peft_adapter(tiny, tmp_path_factory.mktemp("tiny-ad") / "a1", seed=3, r=4,
                             lora_alpha=8, target_modules=["q_proj", "down_proj"])


def test_yaml_config_both_lora_module_forms_and_sigterm_drain(tiny, tiny_adapter, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"model: {tiny}\n"
        "served-model-name: [tiny-base, tiny-alias]\n"
        "max_loras: 2\n"
        "max-model-len: 512\n"
        "lora-modules:\n"
        f"  - '{{\"name\": \"json-form\", \"path\": \"{tiny_adapter}\"}}'\n"
        "log-level: warning\n")
    proc, url = start_cli_server(["--config", str(cfg), "--lora-modules",
                                  f"cli-form={tiny_adapter}",
                                  json.dumps({"name": "cli-json", "path": str(tiny_adapter),
                                              "base_model_name": "tiny-alias"}),
                                  "--max-num-seqs", "4"])
    try:
        ids = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        # the command line replaced the file's list: nargs flags override, not merge
        assert set(ids) == {"tiny-base", "tiny-alias", "cli-form", "cli-json"}
        assert ids["cli-form"]["parent"] == "tiny-base"
        assert ids["cli-json"]["parent"] == "tiny-alias"  # vLLM's base_model_name
        for model in ("tiny-alias", "cli-form"):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "ab",
                                                          "max_tokens": 3})
            assert r.status_code == 200, r.text
        # A long stream is in flight when SIGTERM arrives: it completes, then the process exits.
        body = {"model": "cli-form", "prompt": "hello", "max_tokens": 300, "ignore_eos": True,
                "stream": True, "temperature": 0}
        events: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        n_text = sum(1 for e in events[:-1] if json.loads(e)["choices"])
        assert n_text >= 2
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--lora-modules", "no-equals-sign"], "expected name=path"),
    (["--lora-modules", "{bad json"], "invalid JSON"),
    (["--lora-dir", "/no/such/folder"], "is not a folder"),
    (["--max-loras", "0"], "max_loras must be >= 1"),
])
def test_bad_flags_exit_2_with_a_reason(tiny, args, message):
    p = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny),
                        *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_adapter_flags_exit_2_with_a_reason(tiny, tiny_adapter):
    """An adapter named as the base's default served name (the model folder's name) could
    never be reached; vLLM's JSON form takes name, path and base_model_name only, and the
    last must name a served model."""
    cases = [
        ([f"{tiny.name}={tiny_adapter}"], f"adapter name {tiny.name} clashes with the served"),
        ([json.dumps({"name": "j", "path": str(tiny_adapter), "bogus": 1})],
         "unknown key(s) bogus"),
        ([json.dumps({"name": "j", "path": str(tiny_adapter), "base_model_name": "nope"})],
         "base_model_name 'nope' is not a served model name"),
    ]
    for modules, message in cases:
        p = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny),
                            "--lora-modules", *modules], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, \
            p.stderr


@pytest.mark.parametrize("yaml_text, message", [
    ("max-loras: 2.5\n", "max-loras: invalid int value 2.5"),
    ("max-lora-rank: null\n", "max-lora-rank: null is not a value"),
    ("enable-lora: 'false'\n", "enable-lora: expected true or false, got 'false'"),
    ("dtype: float64\n", "'float64' is not one of"),
])
def test_yaml_values_are_checked_as_the_flags_are(tiny, tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    p = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_unknown_yaml_key_is_refused(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-lora: 3\n")
    p = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown setting 'max-lora'" in p.stderr, p.stderr


def test_queue_full_gets_429_and_admitted_requests_complete(tiny, tiny_adapter):
    cfg = ServerConfig(engine=EngineConfig(model=str(tiny), max_num_seqs=2, max_model_len=512,
                                           enable_lora=True),
                       lora_modules=[("a1", str(tiny_adapter))], max_queued_requests=2)
    server = LiveServer(cfg)
    try:
        async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/completions", json={
                "model": "a1" if i % 2 else server.app.state.metrics.model_name,
                "prompt": f"p{i}", "max_tokens": 64, "ignore_eos": True})

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*[one(c, i) for i in range(20)])

        rs = asyncio.run(burst())
        ok = [r for r in rs if r.status_code == 200]
        full = [r for r in rs if r.status_code == 429]
        assert len(ok) + len(full) == 20 and full and ok
        assert len(ok) >= 4  # 2 running + 2 queued at the least
        for r in full:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "RateLimitError"
        for r in ok:
            assert r.json()["usage"]["completion_tokens"] == 64
        server.wait_idle()
        text = httpx.get(server.url + "/metrics").text
        assert f'loraplex_requests_rejected_total{{reason="queue_full"}} {float(len(full))}' \
            in text
    finally:
        server.stop()


def test_queue_is_bounded_in_tokens_too(tiny):
    # KV cache: 8 blocks x 16 = 128 tokens. Each request is 2 prompt + 100 new tokens = 102
    # tokens of work; 150 tokens may queue beyond the cache, so at most 2 requests are in
    # flight however many requests the request bound would still let in.
    cfg = ServerConfig(engine=EngineConfig(model=str(tiny), max_num_seqs=4, max_model_len=128,
                                           num_kv_blocks=8, enable_lora=False),
                       max_queued_requests=64, max_queued_tokens=150)
    server = LiveServer(cfg)
    try:
        assert server.app.state.serving.kv_tokens == 128

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "model": server.app.state.metrics.model_name, "prompt": f"p{i}",
                    "max_tokens": 100, "ignore_eos": True}) for i in range(10)])

        rs = asyncio.run(burst())
        ok = [r for r in rs if r.status_code == 200]
        full = [r for r in rs if r.status_code == 429]
        assert len(ok) + len(full) == 10 and 2 <= len(ok) < 10
        for r in ok:
            assert r.json()["usage"]["completion_tokens"] == 100
        for r in full:
            assert r.headers["Retry-After"] == "1" and "tokens of work" in \
                r.json()["error"]["message"]
        server.wait_idle()
        assert server.app.state.serving.tokens_in_flight == 0  # every ticket gave its share back
        text = httpx.get(server.url + "/metrics").text
        assert f'loraplex_requests_rejected_total{{reason="queue_tokens"}} {float(len(full))}' \
            in text
    finally:
        server.stop()


def test_health_and_metrics_names(tiny, tiny_adapter):
    server = LiveServer(ServerConfig(engine=EngineConfig(model=str(tiny), max_model_len=512,
                                                         enable_lora=True),
                                     lora_modules=[("a1", str(tiny_adapter))]))
    try:
        done = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                    "model": "a1", "prompt": "x", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}) as r:
                for _ in r.iter_lines():
                    if done.is_set():
                        break

        t = threading.Thread(target=stream)
        t.start()
        seen = ""
        for _ in range(200):
            seen = httpx.get(server.url + "/metrics").text
            if 'running_lora_adapters="a1"' in seen:
                break
        done.set()
        t.join()
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                     "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket",
                     "vllm:inter_token_latency_seconds_bucket", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", "loraplex_adapter_loads_total",
                     "loraplex_adapter_load_seconds_bucket",
                     'loraplex_adapter_cache_hits_total{tier="device"}',
                     'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a1"'):
            assert name in seen, name
        # the start-up load is in the load histogram too (its count is the loads counter)
        for metric in ("loraplex_adapter_loads_total", "loraplex_adapter_load_seconds_count"):
            assert re.search(rf"^{metric}(\{{[^}}]*\}})? 1\.0$", seen, re.M), metric
        server.wait_idle()
    finally:
        server.stop()
