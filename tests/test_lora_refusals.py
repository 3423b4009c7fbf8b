"""Every adapter the engine cannot serve is refused by name, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_helpers import make_peft_adapter
from safetensors.torch import load_file, save_file

from loraplex import LLM, SamplingParams
from loraplex.config import ConfigError
from loraplex.engine.engine import RequestError
from loraplex.lora.adapter import LoRAError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("bad")
    good = make_peft_adapter(base, tmp / "good", seed=1, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8)
    llm.add_lora("good", str(good))
    ref = llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids
    return base, tmp, good, llm, ref


def _edit_config(d, **kv):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(kv)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    sd = load_file(str(d / "adapter_model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "adapter_model.safetensors"))


def _wrong_shape(sd):
    sd[f"{KEY}.lora_A.weight"] = torch.zeros(8, 100)


def _unknown_key(sd):
    sd[f"{KEY}.lora_magnitude_vector"] = torch.ones(64)


def _only_a(sd):
    del sd[f"{KEY}.lora_B.weight"]


def _far_layer(sd):
    sd["base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)


def _nan(sd):
    sd[f"{KEY}.lora_B.weight"][0, 0] = float("nan")


def _empty(sd):
    sd.clear()


def _stray(sd):
    sd["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight.unused"] = torch.zeros(1)


def _huge_declared(d):
    """A header that declares a 40 GB tensor over a few bytes of data."""
    import struct

    key = f"{KEY}.lora_A.weight"
    header = json.dumps({key: {"dtype": "F32", "shape": [100_000, 100_000],
                               "data_offsets": [0, 40_000_000_000]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                  + b"\0" * 64)


CASES = {
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "lora_bias": (lambda d: _edit_config(d, lora_bias=True), "LoRA bias"),
    "bias_all": (lambda d: _edit_config(d, bias="all"), "bias='all'"),
    "embed_target": (lambda d: _edit_config(d, target_modules=["q_proj", "embed_tokens"]),
                     "embed_tokens"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "rank_mismatch": (lambda d: _edit_config(d, r=4), "rank 8 in its weights but 4"),
    "wrong_shape": (lambda d: _edit_tensors(d, _wrong_shape), "q_proj lora_A (8, 100)"),
    "unknown_key": (lambda d: _edit_tensors(d, _unknown_key), "DoRA magnitude"),
    "missing_pair": (lambda d: _edit_tensors(d, _only_a), "but not its pair"),
    "far_layer": (lambda d: _edit_tensors(d, _far_layer), "layer 99"),
    "nan": (lambda d: _edit_tensors(d, _nan), "NaN"),
    "no_match": (lambda d: _edit_tensors(d, _empty), "matches no module"),
    "stray_key": (lambda d: _edit_tensors(d, _stray), "unexpected tensor"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad_json": (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(),
                   "no adapter_model.safetensors"),
    "huge_declared": (_huge_declared, "declares bytes 0..40000000000"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:300]), "not a valid safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_is_refused_and_engine_keeps_serving(env, case):
    _, tmp, good, llm, ref = env
    d = tmp / case
    shutil.copytree(good, d)
    mutate, message = CASES[case]
    mutate(d)
    with pytest.raises(LoRAError) as e:
        llm.add_lora(case, str(d))
    assert message in str(e.value)
    assert case not in [a.name for a in llm.list_loras()]
    with pytest.raises(RequestError):
        llm.generate("hello", GREEDY, lora=case)
    assert llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids == ref


def test_rank_above_max_is_refused(env):
    base, tmp, _, llm, ref = env
    big = make_peft_adapter(base, tmp / "big", seed=2, r=16, lora_alpha=16,
                            target_modules=["o_proj"])
    with pytest.raises(LoRAError, match=r"o_proj has rank 16 > max_lora_rank=8"):
        llm.add_lora("big", str(big))
    assert llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids == ref


def test_pickle_needs_opt_in(env):
    base, tmp, good, llm, ref = env
    d = tmp / "pickled"
    shutil.copytree(good, d)
    torch.save(load_file(str(d / "adapter_model.safetensors")), str(d / "adapter_model.bin"))
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAError, match="pickle"):
        llm.add_lora("pickled", str(d))
    opt_in = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8,
                 allow_pickle_adapters=True)
    opt_in.add_lora("pickled", str(d))
    assert opt_in.generate("hello", GREEDY, lora="pickled")[0].outputs[0].token_ids == ref


def test_lora_disabled_and_unknown_names(env, tiny_model_factory):
    _, _, good, llm, _ = env
    assert llm.remove_lora("never-added") is False
    plain = LLM(str(tiny_model_factory("llama")), max_model_len=128)
    with pytest.raises(ConfigError, match="enable_lora"):
        plain.add_lora("x", str(good))
