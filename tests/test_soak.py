"""Soak test (issue #6): many requests over many adapters on the tiny model, through the real
server on loopback, while clients walk away mid-stream and adapters are loaded, unloaded and
replaced underneath the traffic.

The CI version is short. The on-demand run is the issue's full size:

    LORAPLEX_SOAK_REQUESTS=10000 LORAPLEX_SOAK_ADAPTERS=100 \\
        .venv/bin/python -m pytest tests/test_soak.py -q -s

(-s shows the one-line summary the test prints.) `LORAPLEX_SOAK_SEED` varies the traffic.

What runs:
  * one server: the tiny llama, every adapter registered at start, `max_loras` (device slots)
    and `max_cpu_loras` (CPU copies) well below the adapter count, so slots are swapped and CPU
    copies are dropped and read back from disk all the time; a KV cache small enough that
    sequences are sometimes preempted; two tenants (no limits) plus the admin key (`api_key`);
  * `CLIENTS` client coroutines send the requests: chat and completions, mostly streamed,
    a random adapter (or the base) each, greedy or sampled, sometimes n=2 or two prompts.
    About 10% of the requests are streams the client closes after one or two events, and a
    few percent are non-streamed requests the client gives up on (cancelled mid-flight);
  * an admin coroutine keeps unloading, loading and replacing (`load_inplace` with other
    weights) the "churn" quarter of the adapters; the other adapters are "stable".

Every request must end as exactly one of: completed (non-streamed: 200, every choice with a
finish_reason; streamed: every choice's finish_reason, then `data: [DONE]`), cancelled by its
client, or refused because it named a churn adapter while that one was unloaded (an HTTP 404
"does not exist", also when the unload landed between the adapter's lookup and the engine
taking the request: a stream's 200 goes out only once the adapter is pinned). Anything else is
a failure: 5xx, a connection error, an error event inside a stream, a stream without its
finish, a short completion, a stable adapter refused, an admin call that did not succeed, or a
greedy answer of a stable adapter that differs from the same request's answer earlier in the
run (slot swaps must never mix adapters up).

At the end: the server is idle (no request, every KV block free, no adapter pin, no tenant
request in flight), the LoRA manager holds exactly the registered versions (no leftover
version of a replaced or unloaded adapter, no CPU copy beyond `max_cpu_loras`, slots
consistent), and the server answers as it did at the start.

Memory: process RSS (the server runs in this process) is read after the first thousand
requests (the first 10% in a shorter run) and again when only the last `CLIENTS` requests are
left, so both readings are taken under the same load; it may not grow by 5% or more. Before
the run, a warm-up (not counted) sends every adapter one request, runs a round of churn, then
sends `WARM_UP` requests of the soak's own mix `CLIENTS` at a time: the first touch of each code
path and batch shape (allocator arenas, oneDNN's GEMM primitives for each row count, each
adapter's first read) is start-up, not drift. Without the row-count padding of
`loraplex.model.layers.packed_linear`, oneDNN's per-shape caches alone drift ~15% here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from lora_helpers import make_peft_adapter
from safetensors.torch import load_file, save_file
from server_harness import LiveServer

from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig

N_REQUESTS = int(os.environ.get("LORAPLEX_SOAK_REQUESTS", "2000"))
N_ADAPTERS = int(os.environ.get("LORAPLEX_SOAK_ADAPTERS", "20"))
SEED = int(os.environ.get("LORAPLEX_SOAK_SEED", "0"))
CLIENTS = 24
WARM_UP = 20 * CLIENTS
MAX_LORAS = 8
MAX_CPU_LORAS = 16
ADMIN_KEY = "soak-admin-key"
TENANT_KEYS = {"alpha": "soak-alpha-key", "beta": "soak-beta-key"}
PROMPTS = ["hello", "The sky is", "Once upon a time", "abc", "1, 2, 3,", "Write a poem",
           "What is LoRA?", "zz top"]
RSS_DRIFT_LIMIT = 0.05


# ---- adapters -----------------------------------------------------------------------------------
def _derive(template: Path, out: Path, seed: int) -> Path:
    """A copy of a PEFT-written adapter with new random A and B (same config, same keys)."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_bytes((template / "adapter_config.json").read_bytes())
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(template / "adapter_model.safetensors"))
    new = {}
    for k, t in sorted(sd.items()):
        if "lora_A" in k:  # PEFT's init range for A (Kaiming uniform, a=sqrt(5))
            bound = 1.0 / t.shape[1] ** 0.5
            new[k] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        else:
            new[k] = torch.randn(t.shape, generator=g) * 0.1
    save_file(new, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@dataclass
class Adapters:
    names: list[str]
    stable: list[str]
    churn: list[str]
    path: dict[str, Path]  # the version registered at start
    variants: dict[str, list[Path]]  # churn adapters: other weights to swap in


@pytest.fixture(scope="module")
def adapters(tiny_model_factory, tmp_path_factory) -> Adapters:
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("soak-adapters")
    templates = [
        make_peft_adapter(base, root / "t-qv", seed=1, r=8, lora_alpha=16,
                          target_modules=["q_proj", "v_proj"]),
        make_peft_adapter(base, root / "t-all", seed=2, r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"]),
    ]
    names = [f"a{i:03d}" for i in range(N_ADAPTERS)]
    churn = [n for i, n in enumerate(names) if i % 4 == 3]
    path, variants = {}, {}
    for i, n in enumerate(names):
        path[n] = _derive(templates[i % 2], root / n, seed=1000 + i)
        if n in churn:
            variants[n] = [_derive(templates[(i + v) % 2], root / f"{n}-v{v}",
                                   seed=5000 + 10 * i + v) for v in (1, 2)]
    return Adapters(names, [n for n in names if n not in churn], churn, path, variants)


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_factory, adapters, tmp_path_factory):
    tenants = tmp_path_factory.mktemp("soak-tenants") / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {
        "alpha": {"keys": [TENANT_KEYS["alpha"]], "adapters": ["*"]},
        "beta": {"keys": [TENANT_KEYS["beta"]], "adapters": ["*"], "weight": 2}}}))
    cfg = ServerConfig(
        engine=EngineConfig(model=str(tiny_model_factory("llama")), dtype="float32",
                            max_model_len=256, max_num_seqs=16, num_kv_blocks=32,
                            enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=8,
                            max_cpu_loras=MAX_CPU_LORAS),
        lora_modules=[(n, str(adapters.path[n])) for n in adapters.names],
        enable_runtime_lora=True, api_key=ADMIN_KEY, tenants_file=str(tenants),
        max_queued_requests=256, demo_adapters=False)
    s = LiveServer(cfg)
    yield s
    s.stop()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---- one request --------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    chat: bool
    stream: bool
    body: dict
    choices: int  # choices the answer must carry (n x prompts)
    disconnect_after: int = 0  # streams: close after this many events (0 = read to the end)
    abandon_after: float = 0.0  # non-streamed: give up after this many seconds (0 = never)
    greedy_key: tuple | None = None  # greedy requests to stable adapters / the base


def plan(i: int, ads: Adapters, base: str) -> Plan:
    rng = random.Random(SEED * 1_000_003 + i)
    model = base if rng.random() < 0.1 else rng.choice(ads.names)
    chat = rng.random() < 0.5
    roll = rng.random()
    disconnect = roll < 0.10
    abandon = 0.10 <= roll < 0.13
    stream = disconnect or (not abandon and rng.random() < 0.8)
    greedy = not (disconnect or abandon) and rng.random() < 0.5
    n = 1 if greedy or rng.random() < 0.9 else 2
    prompt = rng.choice(PROMPTS)
    prompts = [prompt] if chat or greedy or rng.random() < 0.9 else [prompt, rng.choice(PROMPTS)]
    max_tokens = rng.choice((8, 16)) if greedy else rng.randint(4, 24)
    if disconnect:
        max_tokens = rng.randint(12, 24)
    body: dict = {"model": model, "max_tokens": max_tokens, "n": n,
                  "ignore_eos": disconnect or rng.random() < 0.5}
    if greedy:
        body["temperature"] = 0
    else:
        body.update(temperature=rng.choice((0.7, 1.0)), top_p=rng.choice((1.0, 0.9)),
                    seed=rng.randint(0, 1000) if rng.random() < 0.5 else None)
    if chat:
        body["messages"] = [{"role": "user", "content": prompts[0]}]
    else:
        body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    key = None
    if greedy and (model == base or model in ads.stable):
        key = (model, chat, prompt, max_tokens, body["ignore_eos"])
    return Plan(model, chat, stream, body, n * len(prompts),
                disconnect_after=rng.randint(1, 2) if disconnect else 0,
                abandon_after=rng.uniform(0.005, 0.2) if abandon else 0.0, greedy_key=key)


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    greedy: dict = field(default_factory=dict)  # greedy key -> first text seen

    def fail(self, p: Plan, why: str) -> None:
        self.outcomes["failed"] += 1
        if len(self.failures) < 50:
            self.failures.append((p.model, p.chat, p.stream, why[:300]))


def _is_not_found(err: dict, model: str) -> bool:
    return err.get("code") == 404 and err.get("message") == f"The model `{model}` does not exist."


def _check_text(t: Tally, p: Plan, text: str) -> bool:
    if p.greedy_key is None:
        return True
    seen = t.greedy.setdefault(p.greedy_key, text)
    if seen != text:
        t.fail(p, f"greedy answer changed: {seen!r} then {text!r}")
        return False
    return True


async def run_one(client: httpx.AsyncClient, p: Plan, key: str, ads: Adapters, t: Tally) -> None:
    path = "/v1/chat/completions" if p.chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {key}"}
    churn = p.model in ads.churn
    try:
        if not p.stream:
            req = client.post(path, json=p.body, headers=headers)
            if p.abandon_after:
                try:
                    r = await asyncio.wait_for(req, p.abandon_after)
                except TimeoutError:
                    t.outcomes["cancelled"] += 1
                    return
            else:
                r = await req
            _classify_plain(t, p, r, churn)
            return
        async with client.stream("POST", path, json=p.body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                _classify_plain(t, p, r, churn)
                return
            events, done, finished, texts, usage, error = 0, False, set(), {}, None, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                if done:
                    t.fail(p, f"event after [DONE]: {data[:100]}")
                    return
                ev = json.loads(data)
                events += 1
                if "error" in ev:
                    error = ev["error"]
                    continue
                for c in ev["choices"]:
                    delta = c["delta"].get("content", "") if p.chat else c["text"]
                    texts[c["index"]] = texts.get(c["index"], "") + (delta or "")
                    if c["finish_reason"] is not None:
                        finished.add(c["index"])
                if ev.get("usage"):
                    usage = ev["usage"]
                if p.disconnect_after and events >= p.disconnect_after:
                    t.outcomes["cancelled"] += 1  # leaving the block closes the connection
                    return
        if error is not None:
            # a stream's 200 goes out only once the engine has taken the request (its adapter
            # pinned), so even an adapter unloaded mid-admission is an HTTP 404, never an event
            t.fail(p, f"stream error event: {error}")
        elif not done or finished != set(range(p.choices)):
            t.fail(p, f"stream ended early: done={done} finished={sorted(finished)}")
        elif usage is None or (p.body["ignore_eos"] and usage["completion_tokens"]
                               != p.body["max_tokens"] * p.choices):
            t.fail(p, f"stream usage {usage} for max_tokens={p.body['max_tokens']}")
        elif _check_text(t, p, texts.get(0, "")):
            t.outcomes["completed"] += 1
    except httpx.HTTPError as e:
        t.fail(p, f"{type(e).__name__}: {e}")


def _classify_plain(t: Tally, p: Plan, r: httpx.Response, churn: bool) -> None:
    if r.status_code == 404 and churn and _is_not_found(r.json().get("error", {}), p.model):
        t.outcomes["refused_404"] += 1
        return
    if r.status_code != 200:
        t.fail(p, f"HTTP {r.status_code}: {r.text[:200]}")
        return
    body = r.json()
    choices = body["choices"]
    if len(choices) != p.choices or any(c["finish_reason"] not in ("stop", "length")
                                        for c in choices):
        t.fail(p, f"bad choices: {choices}")
    elif p.body["ignore_eos"] and body["usage"]["completion_tokens"] != \
            p.body["max_tokens"] * p.choices:
        t.fail(p, f"usage {body['usage']} for max_tokens={p.body['max_tokens']}")
    else:
        c = choices[0]
        if _check_text(t, p, c["message"]["content"] if p.chat else c["text"]):
            t.outcomes["completed"] += 1


# ---- adapter churn ------------------------------------------------------------------------------
@dataclass
class Churn:
    loaded: dict[str, bool]
    ops: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)


async def churn_once(client: httpx.AsyncClient, ads: Adapters, c: Churn, rng: random.Random
                     ) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    name = rng.choice(ads.churn)
    if c.loaded[name] and rng.random() < 0.4:
        op, r = "unload", await client.post("/v1/unload_lora_adapter", headers=headers,
                                            json={"lora_name": name})
        ok_state = False
    else:
        op = "replace" if c.loaded[name] else "load"
        folder = rng.choice([ads.path[name], *ads.variants[name]])
        r = await client.post("/v1/load_lora_adapter", headers=headers, json={
            "lora_name": name, "lora_path": str(folder), "load_inplace": c.loaded[name]})
        ok_state = True
    if r.status_code == 200:
        c.loaded[name] = ok_state
        c.ops[op] += 1
    else:
        c.failures.append((op, name, r.status_code, r.text[:200]))


# ---- the test -----------------------------------------------------------------------------------
def _eventually(cond, state, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, state()
        time.sleep(0.05)


def _greedy(server: LiveServer, model: str) -> str:
    r = httpx.post(server.base_url + "/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {TENANT_KEYS['alpha']}"},
                   json={"model": model, "messages": [{"role": "user", "content": "hello"}],
                         "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_soak(server, adapters):
    ads = adapters
    base = server.app.state.metrics.model_name
    probe = [base, ads.stable[0], ads.stable[-1]]
    before = {m: _greedy(server, m) for m in probe}
    keys = list(TENANT_KEYS.values())
    mark = min(1000, N_REQUESTS // 10)
    late_mark = N_REQUESTS - CLIENTS
    assert 0 < mark < late_mark
    tally, churn = Tally(), Churn({n: True for n in ads.churn})
    rss: dict[str, int] = {}

    async def warm_up(client: httpx.AsyncClient) -> None:
        warm = Tally()
        for i, name in enumerate(ads.names):  # every adapter read back once, one at a time
            await run_one(client, Plan(name, i % 2 == 0, True, {
                "model": name, "max_tokens": 8, "stream": True, "stream_options":
                {"include_usage": True}, "ignore_eos": True,
                **({"messages": [{"role": "user", "content": "warm"}]} if i % 2 == 0
                   else {"prompt": "warm"})}, 1), keys[i % 2], ads, warm)
        rng = random.Random(SEED)
        for _ in range(2 * len(ads.churn)):
            await churn_once(client, ads, churn, rng)
        # then WARM_UP requests of the soak's own mix (other ones: their indices follow the
        # soak's), CLIENTS at a time, so the batch shapes of full concurrency have been seen
        todo = iter(range(N_REQUESTS, N_REQUESTS + WARM_UP))

        async def worker(w: int) -> None:
            for i in todo:
                await run_one(client, plan(i, ads, base), keys[(i + w) % 2], ads, warm)

        await asyncio.gather(*[worker(w) for w in range(CLIENTS)])
        assert not warm.failures and not churn.failures, (warm.failures, churn.failures)
        assert sum(warm.outcomes.values()) == len(ads.names) + WARM_UP

    async def main() -> None:
        limits = httpx.Limits(max_connections=2 * CLIENTS, max_keepalive_connections=2 * CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            await warm_up(client)
            churn.ops.clear()
            times["warm-up"] = time.monotonic() - t0
            next_i = iter(range(N_REQUESTS))
            done = [0]
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                for i in next_i:
                    await run_one(client, plan(i, ads, base), keys[(i + w) % 2], ads, tally)
                    done[0] += 1
                    if done[0] in (mark, late_mark):
                        gc.collect()
                        rss["first" if done[0] == mark else "last"] = _rss_bytes()

            async def admin() -> None:
                rng = random.Random(SEED + 1)
                while not stop.is_set():
                    await churn_once(client, ads, churn, rng)
                    await asyncio.sleep(rng.uniform(0.0, 0.05))

            admin_task = asyncio.ensure_future(admin())
            try:
                await asyncio.gather(*[worker(w) for w in range(CLIENTS)])
            finally:
                stop.set()
                await admin_task

    t0, times = time.monotonic(), {}
    asyncio.run(main())
    seconds = time.monotonic() - t0 - times["warm-up"]
    server.wait_idle(timeout=60)
    gc.collect()
    rss["idle"] = _rss_bytes()
    eng = server.engine.engine
    lm = eng.lora
    o = tally.outcomes
    drift = (rss["last"] - rss["first"]) / rss["first"]
    mib = {k: v / 2**20 for k, v in rss.items()}
    print(f"\nsoak: {N_REQUESTS} requests, {N_ADAPTERS} adapters ({len(ads.churn)} churned), "
          f"{CLIENTS} clients, {seconds:.1f}s (+{times['warm-up']:.1f}s warm-up): "
          f"completed={o['completed']} "
          f"cancelled={o['cancelled']} refused_404={o['refused_404']} "
          f"failed={o['failed']}; admin {dict(churn.ops)}; "
          f"lora {dict(lm.stats)}; preemptions={eng.scheduler.num_preemptions}; RSS after "
          f"first {mark}: {mib['first']:.1f} MiB, with {CLIENTS} left: {mib['last']:.1f} MiB "
          f"(drift {drift:+.2%}), idle: {mib['idle']:.1f} MiB")

    # every request accounted for, none failed
    assert not tally.failures, tally.failures
    assert not churn.failures, churn.failures
    assert o["completed"] + o["cancelled"] + o["refused_404"] == N_REQUESTS, o
    assert o["completed"] > N_REQUESTS // 2 and o["cancelled"] >= N_REQUESTS // 20
    assert churn.ops["unload"] and churn.ops["replace"] and churn.ops["load"], churn.ops
    # the tiers really were exercised: slot swaps, CPU copies dropped and read back
    assert lm.stats["evictions"] and lm.stats["cpu_evictions"] and lm.stats["cpu_misses"]

    # nothing leaked: requests, KV blocks, pins, tenant in-flight counts
    assert server.engine.num_in_flight == 0 and not eng.has_unfinished_requests
    sch = eng.scheduler
    assert not sch.running and not sch.waiting and not sch.seqs
    bm = eng.block_manager
    bm.assert_consistent()
    assert bm.num_free == bm.num_blocks
    # the serving layer's counts are given back as each response ends (a stream's body may be
    # finalized a moment after its engine request was aborted)
    tenants, serving = server.app.state.tenants, server.app.state.serving
    _eventually(lambda: serving.tokens_in_flight == 0
                and all(tenants.in_flight(n) == 0 for n in TENANT_KEYS),
                lambda: (serving.tokens_in_flight, {n: tenants.in_flight(n) for n in TENANT_KEYS}))
    # the LoRA manager holds exactly the registered versions: nothing of a replaced or unloaded
    # adapter, no pin, no running count, CPU copies within the limit, slots consistent
    assert lm.num_pinned == 0 and not lm._users and not lm._running
    current = {(n, ad.version): ad for n, ad in lm._current.items()}
    assert set(lm._current) == {n for n in ads.names
                                if n in ads.stable or churn.loaded[n]}
    assert set(lm._versions) == set(current)
    assert all(lm._versions[k] is ad for k, ad in current.items())
    cpu = {k for k, ad in lm._versions.items() if ad.modules is not None}
    assert set(lm._cpu_lru) == cpu and len(cpu) <= MAX_CPU_LORAS
    used = list(lm._slot_of.values())
    assert set(lm._slot_of) <= set(current)
    assert sorted(used + lm._free_slots) == list(range(MAX_LORAS))

    # memory: no drift between the first thousand requests and the last ones
    assert drift < RSS_DRIFT_LIMIT, mib

    # and the server still answers as it did before the soak
    assert {m: _greedy(server, m) for m in probe} == before
    server.wait_idle()


def test_gemm_row_padding_bounds_shapes_and_changes_no_result():
    """The fix behind the memory check above: few distinct GEMM row counts, same results."""
    from loraplex.model.layers import can_pack, pack_weight, packed_linear, padded_rows

    sizes = [padded_rows(m) for m in range(1, 2049)]
    assert all(m <= s <= m + m // 8 for m, s in enumerate(sizes, 1))
    assert sizes == sorted(sizes) and len(set(sizes)) <= 72
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=g).to(dtype)
        if not can_pack(w):  # no oneDNN, or (bf16) a CPU without AVX-512: nothing packs
            continue
        packed = pack_weight(w, 16)
        x = torch.randn(300, 64, generator=g).to(dtype)
        for m in (1, 16, 17, 33, 65, 100, 129, 300):
            exact = torch.ops.mkldnn._linear_pointwise(x[:m], packed, None, "none", [], "")
            assert torch.equal(packed_linear(x[:m], packed, None), exact), (dtype, m)
