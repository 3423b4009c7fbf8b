"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) from one set of config flags.

Parameter names follow the HF checkpoints, except that q/k/v are fused into `qkv_proj` and
gate/up into `gate_up_proj` (split back into shards at load time). Forward: (input_ids, positions).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.config import ModelConfig
from loraplex.model.huge_pages import HugePageArena
from loraplex.model.layers import (
    Linear,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    amx_linear,
    amx_packed_shape,
    can_pack,
    pack_amx,
    pack_weight,
    packed_linear,
)

# HF projection name -> (fused module name, shard index)
STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class MissingWeightsError(ValueError):
    pass


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.q_size, self.kv_size = h * d, hkv * d
        self.qkv_proj = Linear(cfg.hidden_size, [h * d, hkv * d, hkv * d], bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, [cfg.hidden_size], bias=cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rope
        self.attn = PagedAttention(h, hkv, d)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        qk = qkv[:, :self.q_size + self.kv_size].reshape(t, h + hkv, d)
        v = qkv[:, self.q_size + self.kv_size:].reshape(t, hkv, d)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), dim=1)
        qk = self.rotary.apply(qk, *rope)  # q and k heads rotated in one pass
        o = self.attn(qk[:, :h], qk[:, h:], v)  # [T, H, D]
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.fused = None  # loraplex C++ ops (CPU fp32/bf16)
        self.gate_up_proj = Linear(cfg.hidden_size, [self.inter, self.inter], bias=cfg.mlp_bias)
        self.down_proj = Linear(self.inter, [cfg.hidden_size], bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # [T, 2 I]
        if self.fused is not None:
            return self.down_proj(self.fused.silu_mul(gu))
        return self.down_proj(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rope)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        rope = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope)
        self.rotary = rope
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, rope) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.table(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_position)
        self.lm_head: nn.Linear | None = None
        self.lm_head_packed: torch.Tensor | None = None
        self.lm_head_amx: torch.Tensor | None = None  # pack_amx(lm_head), run by amx_op
        self.amx_op = None
        self.packed_arena: HugePageArena | None = None  # holds the AMX GEMM's packed weights
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_amx is not None:
            return amx_linear(self.amx_op, hidden, self.lm_head_amx, None,
                              self.config.vocab_size).float()
        if self.lm_head_packed is not None:
            return packed_linear(hidden, self.lm_head_packed, None).float()  # [R, vocab]
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def use_cpu_kernels(self, ops) -> None:
        """Route norms, RoPE, KV writes and SiLU*mul through loraplex's fused C++ ops (CPU,
        fp32 or bf16). Decided once per model, so every forward takes one path."""
        for m in self.modules():
            if isinstance(m, RMSNorm | PagedAttention | RotaryEmbedding | LlamaMLP):
                m.fused = ops

    def pack_weights(self, batch_hint: int, amx_op=None) -> None:
        """After loading: move every projection (and lm_head) to the fastest CPU layout:
        oneDNN's, or with `amx_op` (bf16 models on AMX CPUs) the AMX GEMM's, in one block of
        huge pages (see huge_pages.py)."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        arena = None
        if amx_op is not None:
            shapes = [tuple(m.weight.shape) for m in self.modules()
                      if isinstance(m, Linear) and m.weight is not None
                      and m.weight.dtype == torch.bfloat16]
            if w.dtype == torch.bfloat16:
                shapes.append(tuple(w.shape))
            if shapes:
                arena = self.packed_arena = HugePageArena.for_tensors(
                    (amx_packed_shape(*s), torch.bfloat16) for s in shapes)
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(batch_hint, amx_op, arena)
        if amx_op is not None and w.dtype == torch.bfloat16:
            out = arena.take(amx_packed_shape(*w.shape), torch.bfloat16)
            self.lm_head_amx, self.amx_op = pack_amx(w.data, out), amx_op
            if self.lm_head is not None:
                self.lm_head = None
        elif can_pack(w):
            self.lm_head_packed = pack_weight(w.data, batch_hint)
            if self.lm_head is not None:  # untied: the plain copy is no longer needed
                self.lm_head = None

    # ---- weights ----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (partly fused) parameters; every parameter must be
        covered, otherwise MissingWeightsError names the missing ones."""
        params = dict(self.named_parameters())
        expected: set[str] = set()
        for name in params:
            mod = name.rsplit(".", 1)[0]
            if mod.endswith(("qkv_proj", "gate_up_proj")):
                shards = 3 if mod.endswith("qkv_proj") else 2
                expected.update(f"{name}#{i}" for i in range(shards))
            else:
                expected.add(name)
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = hf_name.split(".")
            proj = parts[-2] if len(parts) >= 2 else ""
            if proj in STACKED:
                fused, shard = STACKED[proj]
                name = ".".join([*parts[:-2], fused, parts[-1]])
                mod = self.get_submodule(name.rsplit(".", 1)[0]) if name in params else None
                if not isinstance(mod, Linear):
                    raise MissingWeightsError(f"checkpoint tensor {hf_name} has no place in the "
                                              f"{self.config.architecture} model")
                try:
                    mod.load_shard(parts[-1], tensor, shard)
                except ValueError as e:
                    raise MissingWeightsError(f"{hf_name}: {e}") from None
                loaded.add(f"{name}#{shard}")
                continue
            if hf_name not in params:
                raise MissingWeightsError(f"checkpoint tensor {hf_name} has no place in the "
                                          f"{self.config.architecture} model")
            dst = params[hf_name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise MissingWeightsError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} "
                                          f"!= model shape {tuple(dst.shape)}")
            dst.data.copy_(tensor)
            loaded.add(hf_name)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(m.replace("#", " shard ") for m in missing[:8])
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise MissingWeightsError(f"checkpoint is missing {len(missing)} tensor(s): "
                                      f"{shown}{more}")
