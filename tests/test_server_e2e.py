"""The real server on loopback, driven by the official `openai` SDK (and httpx / LangChain where
the SDK has no call): SmolLM2 with PEFT adapters, checked against the offline engine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from lora_helpers import make_peft_adapter
from server_harness import LiveServer

from loraplex import LLM, SamplingParams
from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig

pytestmark = pytest.mark.slow
KEY = "sk-test-key"
BASE = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "Name a color of the sky."}]


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol-adapters")
    return {
        "alpha": make_peft_adapter(smollm2_dir, root / "alpha", seed=1, std=0.1, r=8,
                                   lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "beta": make_peft_adapter(smollm2_dir, root / "beta", seed=2, std=0.1, r=4,
                                  lora_alpha=8, target_modules=["o_proj", "up_proj"]),
    }


@pytest.fixture(scope="module")
def lora_dir(adapters, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora-dir")
    shutil.copytree(adapters["beta"], d / "gamma")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapters["alpha"], outside / "secret")
    os.symlink(outside / "secret", d / "escape")  # a symlink pointing outside the lora dir
    return d


def engine_cfg(**kw) -> EngineConfig:
    # fp32: a row's result is then independent of the batch (see README), which the exact
    # server-vs-offline comparisons below rely on.
    return EngineConfig(dtype="float32", enable_lora=True, max_loras=4, max_lora_rank=16,
                        max_model_len=512, max_num_seqs=16, **kw)


@pytest.fixture(scope="module")
def server(adapters, lora_dir):
    cfg = ServerConfig(engine=engine_cfg(), lora_modules=[(n, str(p)) for n, p in
                                                          adapters.items()],
                       lora_dir=str(lora_dir), api_key=KEY, enable_runtime_lora=True,
                       demo_adapters=False)
    s = LiveServer(cfg)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def http(server, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def metric(server, name: str) -> float:
    text = http(server).get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---- models -------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(client, adapters):
    models = {m.id: m for m in client.models.list().data}
    assert BASE in models and {"alpha", "beta"} <= set(models)
    assert models["alpha"].model_extra["parent"] == BASE
    assert models["alpha"].model_extra["root"] == str(adapters["alpha"])
    assert models[BASE].model_extra["parent"] is None
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ---- generation matches the offline engine -----------------------------------------------------
@pytest.fixture(scope="module")
def offline(adapters):
    llm = LLM.from_config(engine_cfg())
    for n, p in adapters.items():
        llm.add_lora(n, str(p))
    return llm


def test_concurrent_adapters_match_offline_engine(server, offline):
    """Two adapters and the base, streamed and not, concurrently: the same tokens as the offline
    engine with the same seeds (and the adapters really change the output)."""
    cases = [("alpha", 11, True), ("beta", 12, False), ("alpha", 13, False), ("beta", 14, True),
             (BASE, 15, True)]
    expected = {}
    for model, seed, _ in cases:
        out = offline.chat(Q, SamplingParams(temperature=0.8, max_tokens=24, seed=seed),
                           lora=None if model == BASE else model)
        expected[(model, seed)] = out[0].outputs[0].text

    async def one(aclient, model, seed, stream):
        kw = dict(model=model, messages=Q, temperature=0.8, max_tokens=24, seed=seed)
        if not stream:
            r = await aclient.chat.completions.create(**kw)
            assert r.usage.completion_tokens > 0
            return r.choices[0].message.content
        text, finish = "", None
        async for ch in await aclient.chat.completions.create(stream=True, **kw):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
        assert finish in ("stop", "length")
        return text

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY) as ac:
            return await asyncio.gather(*[one(ac, m, s, st) for m, s, st in cases])

    got = asyncio.run(run())
    for (model, seed, _), text in zip(cases, got):
        assert text == expected[(model, seed)], (model, seed)
    # Greedy: the adapters change what the model says.
    greedy = {m: offline.chat(Q, SamplingParams(temperature=0, max_tokens=16),
                              lora=None if m == BASE else m)[0].outputs[0].token_ids
              for m in ("alpha", "beta", BASE)}
    assert greedy["alpha"] != greedy[BASE] and greedy["beta"] != greedy[BASE]
    server.wait_idle()


def test_completions_and_logprobs(client, offline):
    r = client.completions.create(model="alpha", prompt=["The sky is", "One, two,"],
                                  max_tokens=6, temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    exp = offline.generate(["The sky is", "One, two,"],
                           SamplingParams(temperature=0, max_tokens=6), lora="alpha")
    for c, e in zip(r.choices, exp):
        assert c.text == e.outputs[0].text
        assert len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs[0]) >= 1
    chat = client.chat.completions.create(model="beta", messages=Q, max_completion_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == \
        chat.choices[1].message.content  # greedy: n copies agree
    lp = chat.choices[0].logprobs.content
    assert len(lp) == 5 and len(lp[0].top_logprobs) == 3
    assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[1].logprob


def test_content_parts_stop_and_vllm_fields(client):
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Count: one, two,"}]}]
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"min_tokens": 4, "ignore_eos": True,
                                                   "top_k": 5, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=BASE, messages=Q, max_tokens=30, temperature=0,
                                       stop=["sky", "blue"])
    text = r.choices[0].message.content
    assert "sky" not in text and "blue" not in text


def test_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model="beta", messages=Q, max_tokens=7,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_text_with_unicode_line_separators(server):
    """Text holding U+2028, U+2029, NEL (U+0085), VT and the C0 separators, echoed in a
    stream and read with httpx's aiter_lines, which splits lines as str.splitlines() does
    (found by the soak test: a generated token holding one cut its event in two): every
    `data:` line is whole JSON, and the echoed text comes back exactly."""
    text = "a\u2028b\u2029c\x85d\x0be\x1cf\x1eg"
    body = {"model": "beta", "prompt": text, "max_tokens": 2, "temperature": 0,
            "stream": True, "echo": True}
    with http(server) as h, h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    got = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert got.startswith(text) and len(got) > len(text)


# ---- runtime adapters ---------------------------------------------------------------------------
def test_runtime_load_use_unload(server, client, adapters):
    h = http(server)
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "delta",
                                              "lora_path": str(adapters["alpha"])})
    assert r.status_code == 200, r.text
    assert "delta" in {m.id for m in client.models.list().data}
    a = client.chat.completions.create(model="delta", messages=Q, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model="alpha", messages=Q, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content  # same weights
    again = h.post("/v1/load_lora_adapter", json={"lora_name": "delta",
                                                  "lora_path": str(adapters["alpha"])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="delta", messages=Q, max_tokens=4)
    r = h.post("/v1/unload_lora_adapter", json={"lora_name": "delta"})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    server.wait_idle()


def test_concurrent_loads_of_one_new_name_add_it_once(server, client, adapters):
    """Without load_inplace, two loads of one new name racing each other: one 200, one 400
    "already loaded" (the check is made when the adapter is registered, not before its read),
    and the name serves the weights of the load that answered 200."""
    from concurrent.futures import ThreadPoolExecutor

    def load(which: str) -> int:
        return http(server).post("/v1/load_lora_adapter", json={
            "lora_name": "twice", "lora_path": str(adapters[which])}).status_code

    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(load, ["alpha", "beta"]))
        assert sorted(codes) == [200, 400], codes
        winner = "alpha" if codes[0] == 200 else "beta"
        got, want = (client.chat.completions.create(model=m, messages=Q, max_tokens=8,
                                                    temperature=0).choices[0].message.content
                     for m in ("twice", winner))
        assert got == want
        assert http(server).post("/v1/unload_lora_adapter",
                                 json={"lora_name": "twice"}).status_code == 200
    server.wait_idle()


def test_runtime_load_errors(server, tmp_path, adapters):
    h = http(server)
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/no/such/dir"})
    assert r.status_code == 404 and "/no/such/dir" in r.json()["error"]["message"]
    bad = tmp_path / "bad"
    shutil.copytree(adapters["alpha"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"], cfg["lora_alpha"] = 64, 128  # the weights are rank 8: a shape misfit
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(bad)})
    body = r.json()["error"]
    assert r.status_code == 400 and body["type"] == "BadRequestError" and "64" in body["message"]
    r = h.post("/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": str(bad)})
    assert r.status_code == 400
    # without the key, the admin routes are closed like every other
    assert http(server, key=None).post("/v1/unload_lora_adapter",
                                       json={"lora_name": "alpha"}).status_code == 401


# ---- errors -------------------------------------------------------------------------------------
def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_error_statuses_and_bodies(server, client):
    h = http(server)
    chat = "/v1/chat/completions"
    _err(h.post(chat, json={"model": "nope", "messages": Q}), 404)
    _err(h.post(chat, json={"model": BASE, "messages": Q, "max_tokens": 0}), 400)
    e = _err(h.post(chat, json={"model": BASE, "messages": Q, "max_tokens": 10**6}), 400)
    assert "maximum context length" in e["message"]
    e = _err(h.post(chat, json={"model": BASE,
                                "messages": [{"role": "user", "content": "hi " * 600}]}), 400)
    assert "maximum context length" in e["message"]
    e = _err(h.post(chat, json={"model": BASE, "messages": Q, "temperature": "hot"}), 400)
    assert e["param"] == "temperature"
    _err(h.post(chat, json={"model": BASE, "messages": Q, "temperature": 500}), 400)
    _err(h.post(chat, json={"model": BASE, "messages": "hi"}), 400)
    _err(h.post(chat, json={"model": BASE}), 400)
    _err(h.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _err(h.post(chat, json={"model": BASE, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    _err(h.post("/v1/completions", json={"model": BASE, "prompt": [10**9]}), 400)
    _err(h.post("/v1/completions", json={"model": BASE, "prompt": []}), 400)
    _err(http(server, key=None).post(chat, json={"model": BASE, "messages": Q}), 401)
    _err(http(server, key="wrong").get("/v1/models"), 401)
    assert http(server, key=None).get("/health").status_code == 200
    _err(h.get("/v1/nothing-here"), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="bad", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=Q, max_tokens=-3)
    # The server still serves.
    assert client.chat.completions.create(model="alpha", messages=Q, max_tokens=3).choices
    server.wait_idle()


# ---- disconnects --------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_resources(server):
    body = {"model": "alpha", "messages": Q, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines == 3:  # still reading: the request runs and holds its adapter pin
                assert metric(server, "vllm:num_requests_running") == 1
                assert metric(server, "loraplex_adapter_pins") == 1
                assert metric(server, "vllm:kv_cache_usage_perc") > 0
                break  # leaving the body unread closes the connection (httpcore)
    server.wait_idle(timeout=10)  # the close aborted it: no blocks, no pin left
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    # non-streamed: the client times out and leaves; the request is aborted too
    body["stream"] = False
    with http(server) as h, pytest.raises(httpx.ReadTimeout):
        h.post("/v1/chat/completions", json=body, timeout=1.5)
    server.wait_idle(timeout=10)


# ---- --lora-dir ---------------------------------------------------------------------------------
def test_lora_dir_loads_on_first_use_and_contains_names(server, client):
    r = client.chat.completions.create(model="gamma", messages=Q, max_tokens=4)
    assert r.choices and "gamma" in {m.id for m in client.models.list().data}
    h = http(server)
    # other spellings of gamma's folder ("./gamma", "gamma/", ...) are not its name: each
    # would be loaded and registered as one more adapter
    for name in ["../x", "/etc", "escape", "gamma/../../x", "..", ".", "%2e%2e/x", "a\\b",
                 "./gamma", "gamma/", "gamma/.", ".//gamma", "gamma//"]:
        e = _err(h.post("/v1/chat/completions", json={"model": name, "messages": Q}), 404)
        assert e["message"] == f"The model `{name}` does not exist."
    ids = {m.id for m in client.models.list().data}
    assert "escape" not in ids and not any(i != "gamma" and "gamma" in i for i in ids)


# ---- LangChain ----------------------------------------------------------------------------------
def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(model="alpha", base_url=server.base_url, api_key=KEY, temperature=0,
                     max_tokens=8, max_retries=0)
    msg = llm.invoke("Say hi.")
    assert isinstance(msg.content, str) and msg.content
    chunks = list(llm.stream("Say hi."))
    assert "".join(c.content for c in chunks) == msg.content

    class Answer(BaseModel):
        text: str

    with pytest.raises(openai.BadRequestError) as ei:
        llm.with_structured_output(Answer).invoke("Say hi.")
    assert "not supported" in str(ei.value)
