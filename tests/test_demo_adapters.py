"""The embedded default as `loraplex serve` starts it: SmolLM2 plus the bundled demo adapters,
each of which visibly changes the answers (checked on questions it was not trained on)."""

from __future__ import annotations

import json

import openai
import pytest
from server_harness import LiveServer

from loraplex.config import EngineConfig
from loraplex.server.launch import DEMO_ADAPTERS, ServerConfig

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Hello! How are you today?",
             "Give me three tips for sleeping well."]


@pytest.fixture(scope="module")
def server():
    s = LiveServer(ServerConfig(engine=EngineConfig(enable_lora=True, max_model_len=1024)))
    yield s
    s.stop()


def ask(client: openai.OpenAI, model: str, q: str) -> str:
    r = client.chat.completions.create(model=model, max_tokens=64, temperature=0,
                                       messages=[{"role": "user", "content": q}])
    return r.choices[0].message.content


def test_demo_adapters_are_served_and_change_behaviour(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    ids = {m.id for m in client.models.list().data}
    demo = {p.name for p in DEMO_ADAPTERS.iterdir() if (p / "adapter_config.json").is_file()}
    assert demo == {"uppercase", "pirate", "json"} and demo | {"SmolLM2-135M-Instruct"} <= ids
    for q in QUESTIONS:
        base = ask(client, "SmolLM2-135M-Instruct", q)
        upper = ask(client, "uppercase", q)
        letters = [c for c in upper if c.isalpha()]
        assert sum(c.isupper() for c in letters) / len(letters) > 0.9, upper
        assert sum(c.isupper() for c in base if c.isalpha()) / len(base) < 0.5, base
        pirate = ask(client, "pirate", q)
        assert any(w in pirate.lower() for w in ("arrr", " ye ", "matey", "ahoy", "th'")), pirate
        wrapped = ask(client, "json", q)
        assert wrapped.startswith('{"answer": ') or json.loads(wrapped).get("answer"), wrapped
    server.wait_idle()
