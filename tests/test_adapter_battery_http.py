"""The bad-adapter battery through the real server: every adapter the engine cannot serve, loaded
over HTTP (`/v1/load_lora_adapter`) or found in `--lora-dir` on first use, gets a clear 4xx that
says why, and the server keeps serving the good adapter with unchanged output, also while the
battery runs."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch
from lora_helpers import BAD_ADAPTERS, make_peft_adapter
from safetensors.torch import load_file
from server_harness import LiveServer

from loraplex.config import EngineConfig
from loraplex.server.launch import ServerConfig

KEY = "battery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEMO = Path(__file__).resolve().parent.parent / "loraplex" / "demo_adapters" / "uppercase"


def _pickle_only(d: Path) -> None:
    torch.save(load_file(str(d / "adapter_model.safetensors")), str(d / "adapter_model.bin"))
    (d / "adapter_model.safetensors").unlink()


def _ten_gigabytes(d: Path) -> None:
    with open(d / "adapter_model.safetensors", "r+b") as f:  # sparse: nothing is written
        f.truncate(10 << 30)


# Beyond the engine battery: cases that need a whole folder swapped or a server-side limit.
EXTRA = {
    "wrong_base": (lambda d: (shutil.rmtree(d), shutil.copytree(DEMO, d)),
                   "but the base model has 3 layers"),  # a SmolLM2 adapter on the tiny model
    "pickle_file": (_pickle_only, "pickle"),
    "ten_gb": (_ten_gigabytes, "larger than any LoRA adapter"),
}
BATTERY = {**BAD_ADAPTERS, **EXTRA}


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("battery")
    good = make_peft_adapter(base, tmp / "good", seed=1, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])
    big = make_peft_adapter(base, tmp / "big", seed=2, r=16, lora_alpha=16,
                            target_modules=["o_proj"])
    lora_dir = tmp / "dir"
    lora_dir.mkdir()
    shutil.copytree(good, lora_dir / "in-dir-dora")
    BAD_ADAPTERS["dora"][0](lora_dir / "in-dir-dora")
    cfg = ServerConfig(engine=EngineConfig(model=str(base), max_model_len=128, max_num_seqs=8,
                                           enable_lora=True, max_lora_rank=8),
                       lora_modules=[("good", str(good))], lora_dir=str(lora_dir), api_key=KEY,
                       enable_runtime_lora=True, demo_adapters=False)
    server = LiveServer(cfg)
    yield server, tmp, good, big
    server.stop()


def _chat(server, model: str) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", headers=AUTH, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
        "temperature": 0})


def _load(server, name: str, path: Path | str) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", headers=AUTH, timeout=60,
                      json={"lora_name": name, "lora_path": str(path)})


def test_every_bad_adapter_gets_a_clear_4xx_while_good_traffic_flows(env):
    server, tmp, good, big = env
    ref = _chat(server, "good").json()["choices"][0]["message"]["content"]
    stop, bad_answers, served = threading.Event(), [], [0]

    def traffic() -> None:  # the good tenant keeps talking during the whole battery
        while not stop.is_set():
            r = _chat(server, "good")
            if r.status_code != 200 or r.json()["choices"][0]["message"]["content"] != ref:
                bad_answers.append((r.status_code, r.text[:200]))
            served[0] += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        for case, (mutate, message) in BATTERY.items():
            d = tmp / f"http-{case}"
            shutil.copytree(good, d)
            mutate(d)
            r = _load(server, case, d)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == 400, (case, r.text)
            assert message in err["message"] and case in err["message"], (case, err)
            # never registered: using it is the same 404 as any unknown model
            r = _chat(server, case)
            assert r.status_code == 404 and r.json()["error"]["message"] == \
                f"The model `{case}` does not exist.", (case, r.text)
        r = _load(server, "big", big)  # rank 16 over --max-lora-rank 8
        assert r.status_code == 400 and "max_lora_rank=8" in r.json()["error"]["message"]
        r = _load(server, "nowhere", tmp / "no-such-folder")
        assert r.status_code == 404 and "no-such-folder" in r.json()["error"]["message"]
        r = _load(server, "file", good / "adapter_config.json")  # a file, not a folder
        assert r.status_code == 404
        # --lora-dir: a broken adapter found on first use is refused with the reason, and
        # names that would leave the folder are unknown models
        r = _chat(server, "in-dir-dora")
        assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"], r.text
        for name in ["../good", "/etc", "in-dir-dora/../../x", "..", "%2e%2e"]:
            assert _chat(server, name).status_code == 404, name
    finally:
        stop.set()
        t.join(60)
    assert not bad_answers, bad_answers
    assert served[0] >= 3  # the good traffic really ran alongside
    names = {m["id"] for m in httpx.get(server.base_url + "/models", headers=AUTH,
                                        timeout=10).json()["data"]}
    assert names & set(BATTERY) == set() and "big" not in names and "good" in names
    assert _chat(server, "good").json()["choices"][0]["message"]["content"] == ref
    server.wait_idle()


def test_adapter_files_are_never_unpickled_without_opt_in(env, tmp_path):
    """A pickle that would run code on load: refused from its name alone, never opened."""
    server, _, good, _ = env
    d = tmp_path / "evil"
    shutil.copytree(good, d)
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, str(d / "adapter_model.bin"))
    r = _load(server, "evil", d)
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
    assert not marker.exists()
