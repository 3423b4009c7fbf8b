"""Overload test (issue #6): a burst of five times the server's capacity gets 429s for the
excess, every admitted request completes in full, requests admitted before the burst are not
disturbed by it, nothing is lost and nothing hangs.

Capacity is what the server admits at once: `max_num_seqs` running plus `max_queued_requests`
waiting. The burst goes out over connections opened beforehand, so it reaches the server as one
burst. Completeness is counted in tokens (`ignore_eos`, so every admitted request must produce
all of its `max_tokens`), never timed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from lora_helpers import make_peft_adapter
from server_harness import LiveServer

from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig

KEY = "overload-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_NUM_SEQS = 4
MAX_QUEUED = 4
CAPACITY = MAX_NUM_SEQS + MAX_QUEUED
BURST = 5 * CAPACITY
BURST_TOKENS = 256  # long enough that the admitted requests are still in flight when the burst
EARLY_TOKENS = 400  # ends (so the excess meets a full server), short enough for CI
TIMEOUT = 300  # generous: only there so that a hang fails instead of blocking the suite


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    adapter = make_peft_adapter(base, tmp_path_factory.mktemp("overload") / "ad", seed=7, r=4,
                                lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    cfg = ServerConfig(engine=EngineConfig(model=str(base), dtype="float32", max_model_len=512,
                                           max_num_seqs=MAX_NUM_SEQS, enable_lora=True,
                                           max_loras=2, max_lora_rank=8),
                       lora_modules=[("ad", str(adapter))], api_key=KEY,
                       max_queued_requests=MAX_QUEUED, demo_adapters=False)
    s = LiveServer(cfg)
    yield s
    s.stop()


def _rejected(server: LiveServer) -> dict[str, float]:
    """loraplex_requests_rejected_total by reason."""
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^loraplex_requests_rejected_total\{reason="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def _rejected_since(server: LiveServer, before: dict[str, float]) -> dict[str, float]:
    after = _rejected(server)
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def _idle(server: LiveServer) -> None:
    """Idle: no request, KV block or pin held, and every admission count given back."""
    server.wait_idle()
    serving = server.app.state.serving
    deadline = time.monotonic() + 30
    while serving.tokens_in_flight:  # released as each response ends, a moment after the engine
        assert time.monotonic() < deadline, serving.tokens_in_flight
        time.sleep(0.05)


def _body(server: LiveServer, i: int, max_tokens: int) -> tuple[str, dict]:
    """Request i of a mix: chat / completions, base / adapter, streamed / not."""
    chat, stream = i % 2 == 0, i % 4 < 2
    body: dict = {"model": "ad" if i % 3 else server.app.state.metrics.model_name,
                  "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"request {i}"}]
    else:
        body["prompt"] = f"request {i}"
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


async def _send(client: httpx.AsyncClient, path: str, body: dict,
                admitted: asyncio.Event | None = None) -> dict:
    """One request to its end: status, headers, and for a 200 the finish reasons, the completion
    tokens the server reports and whether a stream ended with [DONE]. `admitted` is set once a
    stream has delivered its first generated token."""
    if not body.get("stream"):
        r = await client.post(path, json=body, headers=AUTH)
        out = {"status": r.status_code, "headers": r.headers, "json": r.json()}
        if r.status_code == 200:
            j = out["json"]
            out.update(finish=[c["finish_reason"] for c in j["choices"]],
                       tokens=j["usage"]["completion_tokens"], done=True)
        return out
    async with client.stream("POST", path, json=body, headers=AUTH) as r:
        out = {"status": r.status_code, "headers": r.headers}
        if r.status_code != 200:
            await r.aread()
            out["json"] = r.json()
            return out
        out.update(finish=[], tokens=None, done=False, errors=[])
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                out["errors"].append(ev["error"])
                continue
            for c in ev["choices"]:
                out["finish"] += [c["finish_reason"]] if c["finish_reason"] else []
                text = c["delta"].get("content") if "delta" in c else c["text"]
                if text and admitted is not None:
                    admitted.set()
            if ev.get("usage"):
                out["tokens"] = ev["usage"]["completion_tokens"]
        return out


def _check_burst(results: list[dict], max_tokens: int) -> tuple[int, int]:
    """Every answer is a 200 that ran to the end or a clean 429; returns (200s, 429s)."""
    ok = [r for r in results if r["status"] == 200]
    full = [r for r in results if r["status"] == 429]
    assert len(ok) + len(full) == len(results), [r["status"] for r in results]
    for r in full:
        assert r["headers"]["Retry-After"] == "1"
        err = r["json"]["error"]
        assert err["type"] == "RateLimitError" and err["code"] == 429, err
        assert "capacity" in err["message"], err
    for r in ok:
        assert r["done"] and not r.get("errors"), r
        assert r["finish"] == ["length"] and r["tokens"] == max_tokens, r
    return len(ok), len(full)


async def _open_connections(client: httpx.AsyncClient, n: int) -> None:
    """Open n keep-alive connections, so the burst does not wait for TCP handshakes."""
    rs = await asyncio.gather(*[client.get("/health") for _ in range(n)])
    assert all(r.status_code == 200 for r in rs)


def _client(server: LiveServer) -> httpx.AsyncClient:
    n = BURST + 8
    return httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=httpx.Limits(
        max_connections=n, max_keepalive_connections=n))


def _normal_request_works(server: LiveServer) -> None:
    r = httpx.post(server.base_url + "/chat/completions", headers=AUTH, timeout=60, json={
        "model": "ad", "messages": [{"role": "user", "content": "after"}], "max_tokens": 16,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16


def test_burst_of_five_times_capacity_gets_429_for_the_excess(server):
    rejected_before = _rejected(server)

    async def main() -> list[dict]:
        async with _client(server) as client:
            await _open_connections(client, BURST)
            burst = [_send(client, *_body(server, i, BURST_TOKENS)) for i in range(BURST)]
            return await asyncio.wait_for(asyncio.gather(*burst), TIMEOUT)

    n_ok, n_full = _check_burst(asyncio.run(main()), BURST_TOKENS)
    print(f"\nburst of {BURST} (capacity {CAPACITY}): {n_ok} admitted, {n_full} refused")
    # the first CAPACITY to arrive are admitted whatever the timing; the rest meet a full server
    assert n_ok >= CAPACITY and n_full > 0 and n_ok + n_full == BURST
    assert _rejected_since(server, rejected_before) == {"queue_full": n_full}
    _idle(server)
    _normal_request_works(server)
    _idle(server)


def test_requests_admitted_before_a_burst_run_to_the_end(server):
    rejected_before = _rejected(server)
    n_early = 2

    async def main() -> tuple[list[dict], list[dict]]:
        async with _client(server) as client:
            await _open_connections(client, BURST + n_early)
            admitted = [asyncio.Event() for _ in range(n_early)]
            early = [asyncio.ensure_future(_send(client, *_body(server, i, EARLY_TOKENS),
                                                 admitted[i]))
                     for i in range(n_early)]  # i < 2: streamed, chat and completions
            waits = [asyncio.ensure_future(e.wait()) for e in admitted]
            await asyncio.wait_for(asyncio.gather(*waits), TIMEOUT)  # both are generating
            burst = [_send(client, *_body(server, i, BURST_TOKENS)) for i in range(BURST)]
            burst_results = await asyncio.wait_for(asyncio.gather(*burst), TIMEOUT)
            return await asyncio.wait_for(asyncio.gather(*early), TIMEOUT), burst_results

    early, burst = asyncio.run(main())
    for r in early:  # the early streams were neither cut nor starved: every token arrived
        assert r["status"] == 200 and r["done"] and not r["errors"], r
        assert r["finish"] == ["length"] and r["tokens"] == EARLY_TOKENS, r
    n_ok, n_full = _check_burst(burst, BURST_TOKENS)
    print(f"\n{n_early} early streams complete; burst of {BURST} (capacity {CAPACITY}): "
          f"{n_ok} admitted, {n_full} refused")
    assert n_ok >= CAPACITY - n_early and n_full > 0 and n_ok + n_full == BURST
    assert _rejected_since(server, rejected_before) == {"queue_full": n_full}
    _idle(server)
    _normal_request_works(server)
    _idle(server)
