"""Fuzzing the real server over loopback HTTP.

schemathesis draws requests from the app's own OpenAPI schema, for every operation: schema-valid
ones (positive: real generations, adapter loads, ...) and schema-breaking ones (negative: wrong
types, missing fields, out-of-range values). Whatever arrives, the server must answer below 500,
never crash, and afterwards still serve correctly, with no KV block, adapter pin or request left
behind. Hypothesis runs derandomized, so CI sees the same >= 2,000 requests every time.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from lora_helpers import make_peft_adapter
from schemathesis import GenerationMode
from server_harness import LiveServer

from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Examples per operation and mode; operations whose inputs are few (GET /health) stop earlier.
BUDGET = {("POST", GenerationMode.POSITIVE): 320, ("POST", GenerationMode.NEGATIVE): 220,
          ("GET", GenerationMode.POSITIVE): 60, ("GET", GenerationMode.NEGATIVE): 40}


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("fuzz")
    adapter = make_peft_adapter(base, tmp / "tenant", seed=3, r=8, lora_alpha=16,
                                target_modules=["q_proj", "v_proj"])
    (tmp / "dir").mkdir()
    # A short context keeps each generated request cheap (max_tokens beyond it is a 400).
    cfg = ServerConfig(engine=EngineConfig(model=str(base), max_model_len=96, max_num_seqs=8,
                                           enable_lora=True, max_lora_rank=8),
                       lora_modules=[("tenant", str(adapter))], lora_dir=str(tmp / "dir"),
                       api_key=KEY, enable_runtime_lora=True, demo_adapters=False)
    s = LiveServer(cfg)
    yield s
    s.stop()


def _answer(server, model: str) -> str:
    r = httpx.post(server.base_url + "/chat/completions", headers=AUTH, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
        "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _fuzz(server, op, mode, statuses: Counter, per_op: Counter, models: list[str]) -> None:
    label = f"{op.method.upper()} {op.path}"
    generates = op.path in ("/v1/chat/completions", "/v1/completions")

    @settings(max_examples=BUDGET[(op.method.upper(), mode)], deadline=None, database=None,
              derandomize=True, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(mode))
    def run(case):
        n = per_op[label]
        if generates and isinstance(case.body, dict) and n % 4 != 3:
            # Random model names are all 404s: aim most cases at real models (the base and
            # the adapter) so the fuzzed fields reach sampling and generation.
            case.body["model"] = models[n % len(models)]
        r = case.call(base_url=server.url, headers=AUTH, timeout=120)
        statuses[r.status_code] += 1
        per_op[label] += 1
        assert r.status_code < 500, (label, case.query, case.body, r.text[:500])

    try:
        run()
    except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid form
        assert mode is GenerationMode.NEGATIVE, label


def test_fuzz_every_operation_no_5xx_and_healthy_after(server):
    models = sorted(m["id"] for m in httpx.get(server.base_url + "/models", headers=AUTH,
                                               timeout=10).json()["data"])
    assert "tenant" in models and len(models) == 2
    before = {m: _answer(server, m) for m in models}
    adapter_path = next(a.path for a in server.engine.list_loras() if a.name == "tenant")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    ops = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter", "/health", "/metrics"} <= paths, paths
    statuses: Counter[int] = Counter()
    per_op: Counter[str] = Counter()
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(server, op, mode, statuses, per_op, models)
    total = sum(statuses.values())
    print(f"fuzz: {total} requests; statuses {dict(statuses)}; per operation {dict(per_op)}")
    assert total >= 2000, dict(per_op)
    assert statuses[200] > 100  # valid requests really were served, not all refused
    # Healthy after: nothing left in flight, and the same answers. The fuzzer holds the admin
    # key, so it may legitimately have unloaded the adapter: then it is loaded again first.
    server.wait_idle()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    if "tenant" not in {a.name for a in server.engine.list_loras()}:
        r = httpx.post(server.url + "/v1/load_lora_adapter", headers=AUTH, timeout=60,
                       json={"lora_name": "tenant", "lora_path": adapter_path})
        assert r.status_code == 200, r.text
    assert {m: _answer(server, m) for m in models} == before
    server.wait_idle()
