"""Tenants over real HTTP: each API key reaches only its tenant's adapters, every cross-tenant
attempt is answered exactly like a model that does not exist, admin operations need the admin
key, per-tenant limits give 429 with Retry-After, and keys never reach the logs."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil

import httpx
import pytest
import yaml
from lora_helpers import make_peft_adapter
from server_harness import LiveServer

from loraplex.config import ConfigError, EngineConfig
from loraplex.server.launch import ServerConfig
from loraplex.server.tenants import Tenants

ADMIN, ACME, GLOBEX = "admin-key-0001", "acme-key-0001", "globex-key-0001"
NARROW, RATED, TOKENS = "narrow-key-0001", "rated-key-0001", "tokens-key-0001"
ALL_KEYS = [ADMIN, ACME, GLOBEX, NARROW, RATED, TOKENS]
TENANTS = {
    "admin_keys": [ADMIN],
    "tenants": {
        "acme": {"keys": [ACME, "acme-key-0002"], "adapters": ["acme-*", "shared"]},
        "globex": {"keys": [GLOBEX], "adapters": ["globex-*", "shared"], "base": False},
        "narrow": {"keys": [NARROW], "adapters": [], "max_concurrent": 2},
        "rated": {"keys": [RATED], "adapters": [], "requests_per_minute": 3},
        "tokens": {"keys": [TOKENS], "adapters": [], "tokens_per_minute": 40},
    },
}


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("tenants")
    good = make_peft_adapter(base, tmp / "good", seed=1, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])
    lora_dir = tmp / "dir"
    lora_dir.mkdir()
    for n in ("acme-lazy", "globex-lazy"):
        shutil.copytree(good, lora_dir / n)
    (tmp / "tenants.yaml").write_text(yaml.safe_dump(TENANTS))
    cfg = ServerConfig(
        engine=EngineConfig(model=str(base), max_model_len=128, max_num_seqs=8,
                            enable_lora=True, max_lora_rank=8),
        lora_modules=[(n, str(good)) for n in ("acme-a", "acme-b", "globex-x", "shared")],
        lora_dir=str(lora_dir), tenants_file=str(tmp / "tenants.yaml"),
        enable_runtime_lora=True, demo_adapters=False)
    server = LiveServer(cfg)
    yield server, good
    server.stop()


def h(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(server, key, model, max_tokens=4, **kw) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", headers=h(key), timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": max_tokens, "temperature": 0, **kw})


def models(server, key) -> set[str]:
    r = httpx.get(server.base_url + "/models", headers=h(key), timeout=10)
    assert r.status_code == 200
    return {m["id"] for m in r.json()["data"]}


def same_as_missing(r: httpx.Response, missing: httpx.Response, name: str, other: str) -> None:
    """Status, headers that matter and body equal once the two names are swapped."""
    assert r.status_code == missing.status_code == 404
    assert r.headers["content-type"] == missing.headers["content-type"]
    assert r.json() == json.loads(missing.text.replace(other, name))


def test_each_key_lists_only_its_tenants_models(env):
    server, _ = env
    base = models(server, ADMIN) - {"acme-a", "acme-b", "globex-x", "shared"}
    assert len(base) == 1
    assert models(server, ACME) == base | {"acme-a", "acme-b", "shared"}
    assert models(server, "acme-key-0002") == models(server, ACME)
    assert models(server, GLOBEX) == {"globex-x", "shared"}  # base: false
    assert models(server, NARROW) == base
    for bad in (None, "wrong-key-0001", ACME + "x", ACME[:-1]):
        assert httpx.get(server.base_url + "/models", headers=h(bad), timeout=10
                         ).status_code == 401


def test_cross_tenant_use_is_indistinguishable_from_missing(env):
    server, _ = env
    assert chat(server, ACME, "acme-a").status_code == 200
    assert chat(server, ACME, "shared").status_code == 200
    assert chat(server, GLOBEX, "shared").status_code == 200
    for key, other_tenants, nothere in [(ACME, ["globex-x", "globex-lazy"], "acme-nothere"),
                                        (GLOBEX, ["acme-a", "acme-lazy"], "globex-nothere")]:
        missing = chat(server, key, nothere)
        for name in other_tenants:
            same_as_missing(chat(server, key, name), missing, name, nothere)
            r = httpx.get(f"{server.base_url}/models/{name}", headers=h(key), timeout=10)
            m = httpx.get(f"{server.base_url}/models/{nothere}", headers=h(key), timeout=10)
            same_as_missing(r, m, name, nothere)
    # the base model, for a tenant without it
    base = next(iter(models(server, ACME) - {"acme-a", "acme-b", "shared"}))
    same_as_missing(chat(server, GLOBEX, base), chat(server, GLOBEX, "globex-nothere"),
                    base, "globex-nothere")
    # another tenant's --lora-dir adapter was never loaded on the asker's behalf
    loaded = {a.name for a in server.engine.list_loras()}
    assert "globex-lazy" not in loaded and "acme-lazy" not in loaded
    assert chat(server, ACME, "acme-lazy").status_code == 200  # its owner loads it on first use
    assert "acme-lazy" in {a.name for a in server.engine.list_loras()}
    assert "acme-lazy" not in models(server, GLOBEX)
    server.wait_idle()


def test_load_and_unload_need_the_admin_key(env):
    server, good = env

    def post(key, route, body):
        return httpx.post(f"{server.url}/v1/{route}", headers=h(key), json=body, timeout=60)

    # A tenant gets the same 403 whatever the name: its own, another's, or none at all.
    answers = [post(ACME, "unload_lora_adapter", {"lora_name": n})
               for n in ("acme-a", "globex-x", "does-not-exist")]
    answers += [post(ACME, "load_lora_adapter", {"lora_name": n, "lora_path": str(good)})
                for n in ("acme-new", "globex-x")]
    assert {(r.status_code, r.text) for r in answers} == {(answers[0].status_code,
                                                           answers[0].text)}
    assert answers[0].status_code == 403 and "admin key" in answers[0].text
    assert {"acme-a", "globex-x"} <= {a.name for a in server.engine.list_loras()}
    assert "acme-new" not in {a.name for a in server.engine.list_loras()}
    # The admin key may.
    assert post(ADMIN, "load_lora_adapter", {"lora_name": "acme-new",
                                             "lora_path": str(good)}).status_code == 200
    assert "acme-new" in models(server, ACME) and "acme-new" not in models(server, GLOBEX)
    assert post(ADMIN, "unload_lora_adapter", {"lora_name": "acme-new"}).status_code == 200
    assert "acme-new" not in models(server, ACME)


def test_concurrency_limit(env):
    server, _ = env
    base = next(iter(models(server, NARROW)))

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            async def one():
                return await c.post(server.base_url + "/chat/completions", headers=h(NARROW),
                                    json={"model": base, "max_tokens": 60, "temperature": 0,
                                          "ignore_eos": True,
                                          "messages": [{"role": "user", "content": "hi"}]})
            return await asyncio.gather(*[one() for _ in range(6)])

    rs = asyncio.run(run())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and "concurrency" in r.text
    server.wait_idle()
    assert server.app.state.tenants.in_flight("narrow") == 0  # every ticket released
    assert chat(server, NARROW, base).status_code == 200  # and the tenant is served again


def test_request_and_token_rate_limits(env):
    server, _ = env
    base = next(iter(models(server, RATED)))
    assert [chat(server, RATED, base).status_code for _ in range(3)] == [200, 200, 200]
    r = chat(server, RATED, base)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert "request rate" in r.json()["error"]["message"]
    assert chat(server, ACME, base).status_code == 200  # other tenants unaffected
    # tokens: 40 per minute; each request here uses ~30 (prompt + 8 generated)
    first = chat(server, TOKENS, base, max_tokens=8, ignore_eos=True)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    codes = [chat(server, TOKENS, base, max_tokens=8, ignore_eos=True).status_code
             for _ in range(40 // used + 1)]
    admitted = math.ceil(40 / used) - 1  # while the minute's total is under 40
    assert codes == [200] * admitted + [429] * (len(codes) - admitted), (used, codes)
    server.wait_idle()


def test_keys_never_reach_the_logs(env, caplog):
    server, _ = env
    with caplog.at_level(logging.DEBUG):
        for key in [*ALL_KEYS, "wrong-key-0001"]:
            chat(server, key, "acme-a")
            models(server, key) if key != "wrong-key-0001" else None
    text = caplog.text
    assert not any(k in text for k in [*ALL_KEYS, "wrong-key-0001"])


@pytest.mark.parametrize("bad,message", [
    ({"tenants": {"a": {"keys": ["short"]}}}, "at least 8 characters"),
    ({"tenants": {"a": {"keys": ["aaaaaaaa"]}, "b": {"keys": ["aaaaaaaa"]}}},
     "also used by another"),
    ({"tenants": {"a": {"keys": ["aaaaaaaa"], "max_concurent": 2}}}, "unknown setting"),
    ({"tenants": {"a": {"keys": ["aaaaaaaa"], "requests_per_minute": 0}}}, "positive integer"),
    ({"tenants": {"a": {"keys": ["aaaaaaaa"], "weight": -1}}}, "weight"),
    ({"tenants": {}}, "must map tenant names"),
    ({"tenant": {}}, "expected a mapping with `tenants`"),
    ({"admin_keys": ["aaaaaaaa"], "tenants": {"a": {"keys": ["aaaaaaaa"]}}}, "also used by"),
])
def test_tenants_file_is_checked_once_with_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message) as e:
        Tenants.from_dict(bad)
    assert "aaaaaaaa" not in str(e.value)  # a key is never echoed back
