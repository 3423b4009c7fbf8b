"""Engine configuration: plain dataclasses, validated once at construction.

Nothing below the engine reads global flags: each component receives the piece of config it needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ConfigError(ValueError):
    """A configuration the engine cannot run with; the message says which value and why."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    # "default" | "linear" | "llama3" | "yarn"
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    # Fraction of head_dim that rotates (1.0 for every family we support).
    partial_rotary_factor: float = 1.0

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> RopeConfig:
        # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        merged = {**scaling, **params}
        theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = merged.get("rope_type", merged.get("type", "default")) or "default"
        if kind not in ("default", "linear", "llama3", "yarn"):
            raise ConfigError(
                f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3, yarn"
            )
        return RopeConfig(
            theta=theta,
            kind=kind,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=merged.get("original_max_position_embeddings"),
            beta_fast=float(merged.get("beta_fast", 32.0)),
            beta_slow=float(merged.get("beta_slow", 1.0)),
            attention_factor=merged.get("attention_factor"),
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
        )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from a HF `config.json`."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Biases, as HF's modeling code builds each family (it ignores the config keys where it
    # hard-codes them): q/k/v always in Qwen2, never in Mistral; q/k/v and o per
    # `attention_bias` in Llama and Qwen3; gate/up/down per `mlp_bias` in Llama only.
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    mlp_bias: bool
    sliding_window: int | None
    rope: RopeConfig
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if model_type in by_type:
                arch = by_type[model_type]
            else:
                raise ConfigError(
                    f"unsupported architecture {archs or model_type!r}; loraplex serves "
                    f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
                )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        if family == "qwen3" and not cfg.get("use_sliding_window", False):
            window = None
        attn_bias = bool(cfg.get("attention_bias", False)) and family in ("llama", "qwen3")
        return ModelConfig(
            architecture=arch,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attn_bias or family == "qwen2",
            o_bias=attn_bias,
            qk_norm=family == "qwen3",
            mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            sliding_window=int(window) if window else None,
            rope=RopeConfig.from_hf(cfg),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @staticmethod
    def from_folder(path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{path} has no config.json (expected a Hugging Face model folder)")
        return ModelConfig.from_hf_dict(json.loads(p.read_text()))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` picks the dtype that is both correct and fastest on the device.

    On CPUs without native bf16 matmul (no AVX512-BF16/AMX) bf16 GEMMs are 5-8x slower than fp32
    (measured on the project's AVX2 machines, see README), so `auto` is fp32 there.
    """
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    # Memory budget for the paged KV cache, in GiB (vLLM's CPU backend calls it KV cache space).
    kv_cache_memory_gb: float = 1.0
    # Overrides the budget when set (tests use it to force preemption).
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, resolved (paths found, dtype chosen, limits checked)."""

    model: str | None = None  # HF folder or .gguf file; None = embedded SmolLM2
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0
    num_kv_blocks: int | None = None
    served_model_name: str | None = None
    # C++ CPU kernels (paged decode attention); False forces the pure-torch path.
    use_kernels: bool = True
    # CPU GEMMs: "onednn" (weights pre-packed once; 1.6-1.8x faster fp32 decode than MKL
    # here), "mkl" (torch's default F.linear: ~3x smaller fp32 rounding error per GEMM, see
    # README "Accuracy") or "amx" (bf16 models on CPUs with AMX-BF16: loraplex's own AMX GEMM,
    # kernels/amx_gemm.cpp; decode steps faster than oneDNN's, 2048-token prefill steps
    # slower, rows bit-for-bit batch invariant; README "cpu-gemm amx").
    cpu_gemm: str = "onednn"
    # LoRA (vLLM names): adapters per step, largest rank, adapter_model.bin opt-in.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    allow_pickle_adapters: bool = False
    # Adapter weights' dtype (vLLM's --lora-dtype): "auto" = the model's dtype. bfloat16 and
    # float16 halve adapter memory and the bytes a step reads (the LoRA tax's floor) at their
    # rounding of A, B (float16's is 8x finer; its range, 65504, is checked at load).
    lora_dtype: str = "auto"
    cache: CacheConfig = field(init=False)
    scheduler: SchedulerConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch sees no CUDA device")
        if self.lora_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"lora_dtype must be auto, float32, bfloat16 or float16, got "
                              f"{self.lora_dtype!r}")
        if self.cpu_gemm not in ("onednn", "mkl", "amx"):
            raise ConfigError(f"cpu_gemm must be onednn, mkl or amx, got {self.cpu_gemm!r}")
        self.cache = CacheConfig(self.block_size, self.kv_cache_memory_gb, self.num_kv_blocks)
        # max_model_len is settled against the model in Engine (needs the model config).
        self.scheduler = SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len or 4096
        )

    def with_model_len(self, model_max: int) -> SchedulerConfig:
        wanted = self.max_model_len or model_max
        if wanted > model_max:
            raise ConfigError(
                f"max_model_len={wanted} exceeds the model's max_position_embeddings={model_max}"
            )
        self.scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, wanted)
        return self.scheduler


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_block_bytes(m: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * m.num_layers * block_size * m.num_kv_heads * m.head_dim * elem


def num_blocks_for_budget(m: ModelConfig, c: CacheConfig, dtype: torch.dtype) -> int:
    if c.num_blocks is not None:
        return c.num_blocks
    return max(1, math.floor(c.kv_cache_memory_gb * 2**30 / kv_block_bytes(m, c.block_size, dtype)))
