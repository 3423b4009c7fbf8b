"""Weight loading: sharded safetensors, clear errors for missing/misshapen tensors, GGUF cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex import LLM, SamplingParams
from loraplex.config import ConfigError
from loraplex.model.llama import MissingWeightsError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_gives_same_output(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_factory("qwen2")
    sharded = _copy(src, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(sharded),
                                                                   max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a = LLM(str(src), max_model_len=128).generate("hi there", GREEDY)[0].outputs[0].token_ids
    b = LLM(str(sharded), max_model_len=128).generate("hi there", GREEDY)[0].outputs[0].token_ids
    assert a == b


def test_missing_tensor_is_named(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.self_attn\.qkv_proj"):
        LLM(str(d), max_model_len=128)


def test_misshapen_tensor_is_named(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MissingWeightsError, match=r"down_proj.*\(64, 100\)"):
        LLM(str(d), max_model_len=128)


def test_unknown_tensor_is_refused(tiny_model_factory, tmp_path):
    d = _copy(tiny_model_factory("llama"), tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MissingWeightsError, match="extra"):
        LLM(str(d), max_model_len=128)


def test_max_model_len_beyond_model_is_refused(tiny_model_factory):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        LLM(str(tiny_model_factory("llama")), max_model_len=100_000)


def test_kv_budget_too_small_is_refused(tiny_model_factory):
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        LLM(str(tiny_model_factory("llama")), max_model_len=512, block_size=16, num_kv_blocks=4)


def test_gguf_cache_is_reused(smollm2_dir):
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert converted_folder(embedded_gguf_path()) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    assert (smollm2_dir / "tokenizer.json").is_file()
