"""Shared fixtures: tiny random-weight models of each family (built here, saved as HF folders
with a byte-level tokenizer) and the embedded SmolLM2 converted once per machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 384  # 256 byte tokens + specials + padding


def build_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is a token (so multi-byte
    characters span several tokens, which the detokenization tests rely on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(out))


FAMILIES: dict[str, dict] = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3_rope": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                    sliding_window=None),
    "mistral_window": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                           sliding_window=24),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=64,
                  use_sliding_window=False),
    # biases on q/k/v and o (and on the MLP: Llama's mlp_bias)
    "llama_bias": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                       attention_bias=True, mlp_bias=True),
    "qwen3_bias": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=64,
                       use_sliding_window=False, attention_bias=True),
    # keys HF's code ignores for these families: Mistral has no biases, Qwen2 q/k/v only
    "mistral_keys": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                         sliding_window=None, attention_bias=True, mlp_bias=True),
    "qwen2_keys": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       use_sliding_window=False, attention_bias=True, mlp_bias=True),
}


def tiny_config(family: str, tie: bool = False) -> dict:
    cfg = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, torch_dtype="float32", hidden_act="silu",
    )
    cfg.update(FAMILIES[family])
    return cfg


def build_tiny_model(out: Path, family: str, seed: int = 0, tie: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = tiny_config(family, tie)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_dict))
    cfg = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights make logits (and argmax) well separated
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out), safe_serialization=True)
    build_byte_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def make(family: str = "llama", seed: int = 0, tie: bool = False) -> Path:
        key = (family, seed, tie)
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed,
                                          tie)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    return converted_folder(embedded_gguf_path())
