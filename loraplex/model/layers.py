"""Building blocks of a Llama-family decoder: norm, rotary embedding, linears, paged attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.config import RopeConfig
from loraplex.model.context import get_context


def _empty_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty_param(dim)
        self.fused = None  # C++ ops (CPU fp32/bf16), set by LlamaForCausalLM.use_cpu_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Same op order as transformers' LlamaRMSNorm (variance in fp32) so fp32 logits match.
        if residual is not None and self.fused is not None:
            return self.fused.add_rms_norm(x, residual, self.weight, self.eps), residual
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op, bit-identical to the expression below
            out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return out if residual is None else (out, residual)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def can_pack(w: torch.Tensor) -> bool:
    """Whether oneDNN can pre-pack `w` here. Its bf16 path needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT (an AVX2-only CPU refuses the reorder); bf16 weights there stay plain and
    run through F.linear: slower, and tested as close to fp32 as transformers' bf16 (`--dtype
    auto` picks fp32 on such CPUs)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if w.dtype == torch.bfloat16:
        return onednn_packs_bf16()
    return w.dtype == torch.float32


def onednn_packs_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(w: torch.Tensor, batch_hint: int) -> torch.Tensor:
    # On the project's CPUs oneDNN with a pre-packed weight runs the decode-sized GEMMs up to 2x
    # faster than MKL sgemm (lm_head: 17 vs 38 ms at M=32), and each row's result does not
    # depend on how many rows share the call (MKL's small-M path differs by ~5e-5), which keeps
    # a request's output identical alone or in a batch. (In fp32; in bf16 on the Intel AMX VM
    # a few of ~10^5 outputs of a row differed between M=1 and M=33-64: cpu_gemm "amx" is
    # exactly invariant there. RESULTS.md, session 19.)
    return torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)


def padded_rows(m: int) -> int:
    """`m` rounded up to one of at most 8 sizes per octave above 16 (at most 12.5% more rows).

    oneDNN builds a GEMM primitive for every distinct row count and keeps it in its primitive
    cache and ideep's (LRU, 1024 entries each; ~0.5 MB per weight shape and row count with the
    tiny test model). Fed every count from 1 to max_num_batched_tokens, a server's RSS kept
    growing for thousands of requests (tests/test_soak.py, CI size: +15% between its 200th and
    its 1976th request). Padded, a model sees at most ~70 counts per weight shape, so the caches
    stop growing early. A row's result does not depend on the other rows of the call (bit for
    bit in fp32, and in bf16 on Zen 4; oneDNN's bf16 on the Intel AMX VM varies in a few
    outputs, see pack_weight), so the zero rows change nothing."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    m = x.shape[0]
    rows = padded_rows(m) if x.dim() == 2 else m
    if rows == m:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    x = F.pad(x, (0, 0, 0, rows - m))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:m]


def amx_packed_shape(n: int, k: int) -> tuple[int, int, int, int, int]:
    """The shape pack_amx gives an [n, k] weight (callers size a HugePageArena with it)."""
    return (-(-n // 16), -(-k // 32), 16, 16, 2)


def pack_amx(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] bf16 -> the AMX GEMM's layout [ceil(N/16), ceil(K/32), 16, 16, 2], zero-padded:
    tile (nb, kc) holds pair row p, column c, lane l = W[16 nb + c, 32 kc + 2 p + l], the B
    operand of tdpbf16ps (loraplex/kernels/amx_gemm.cpp). Written into `out` if given."""
    n, k = w.shape
    nb, kc = amx_packed_shape(n, k)[:2]
    wz = w.new_zeros(nb * 16, kc * 32)
    wz[:n, :k] = w
    tiles = wz.view(nb, 16, kc, 16, 2).permute(0, 2, 3, 1, 4)
    if out is None:
        return tiles.contiguous()
    return out.copy_(tiles)


def amx_linear(op, x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None, n: int
               ) -> torch.Tensor:
    """y = x Wᵀ (+ b) through the AMX GEMM `op` (kernels.amx_linear_op()), W packed by pack_amx;
    x [..., K] bf16."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = x2.new_empty(x2.shape[0], n)
    op(y, x2, wp, bias)
    return y.view(*x.shape[:-1], n)


class Linear(nn.Module):
    """y = x Wᵀ (+ b). `output_sizes` records the logical projections fused into W (q/k/v,
    gate/up) so adapters can address each slice; LoRA hooks in through `self.lora`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.weight: nn.Parameter | None = _empty_param(self.out_features, in_features)
        self.bias = _empty_param(self.out_features) if bias else None
        self.lora: nn.Module | None = None
        self.packed: torch.Tensor | None = None  # oneDNN's pre-packed W
        self.amx_packed: torch.Tensor | None = None  # pack_amx(W), run by self.amx_op
        self.amx_op = None

    def load_shard(self, param: str, tensor: torch.Tensor, shard: int) -> None:
        off = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        dst = getattr(self, param)
        if tensor.shape[0] != size or (param == "weight" and tensor.shape[1] != self.in_features):
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit slice {shard} of "
                             f"{tuple(dst.shape)}")
        dst.data[off:off + size].copy_(tensor)

    def pack(self, batch_hint: int, amx_op=None, arena=None) -> None:
        """Reorder W once into oneDNN's blocked layout, or with `amx_op` (bf16 W) into the AMX
        GEMM's (CPU only; in `arena`, a HugePageArena, if given), and drop the plain copy."""
        if self.weight is None:
            return
        if amx_op is not None and self.weight.dtype == torch.bfloat16:
            out = (arena.take(amx_packed_shape(*self.weight.shape), torch.bfloat16)
                   if arena is not None else None)
            self.amx_packed, self.amx_op = pack_amx(self.weight.data, out), amx_op
            self.weight = None
            return
        if not can_pack(self.weight):
            return
        self.packed = pack_weight(self.weight.data, batch_hint)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_op is not None:
            y = amx_linear(self.amx_op, x, self.amx_packed, self.bias, self.out_features)
        elif self.packed is not None:
            y = packed_linear(x, self.packed, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            # forward(), not __call__: nothing hooks these modules, and a module call costs
            # ~2 us more, 120 times a SmolLM2 decode step.
            y = self.lora.forward(x, y)
        return y


def _yarn_inv_freq(cfg: RopeConfig, dim: int, base_max: int) -> tuple[torch.Tensor, float]:
    base = cfg.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (cfg.factor * pos_freqs)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(base_max / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    mscale = cfg.attention_factor
    if mscale is None:
        mscale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    return inv, float(mscale)


def rope_inv_freq(cfg: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the rope variants we serve."""
    inv = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.kind == "default":
        return inv, 1.0
    if cfg.kind == "linear":
        return inv / cfg.factor, 1.0
    if cfg.kind == "llama3":
        old_len = cfg.original_max_position_embeddings or 8192
        low_wavelen = old_len / cfg.low_freq_factor
        high_wavelen = old_len / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        smooth = (old_len / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if cfg.kind == "yarn":
        base_max = cfg.original_max_position_embeddings or max_position
        return _yarn_inv_freq(cfg, dim, base_max)
    raise ValueError(f"unsupported rope type {cfg.kind}")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table, the layout of HF checkpoints."""

    def __init__(self, head_dim: int, max_position: int, cfg: RopeConfig) -> None:
        super().__init__()
        self.rot_dim = int(head_dim * cfg.partial_rotary_factor)
        inv, scale = rope_inv_freq(cfg, self.rot_dim, max_position)
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)  # [max_pos, rot_dim]
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self.fused = None  # loraplex C++ ops (CPU fp32/bf16)

    def table(self, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step's positions, [T, 1, rot]: looked up once per forward."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (q and k heads may be stacked to rotate both in one pass)."""
        rot = self.rot_dim
        if self.fused is not None and rot == x.shape[-1]:
            self.fused.rope_(x, cos, sin)  # in place
            return x
        if rot < x.shape[-1]:
            return torch.cat((self.apply(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
        half = rot // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class PagedAttention(nn.Module):
    """Scaled dot-product attention over the paged KV cache described by the step's Context.

    The cache tensors ([num_blocks, Hkv, block_size, D] each) are bound by the runner.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.fused = None  # loraplex C++ ops (CPU fp32/bf16)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]  ->  [T, H, D]
        ctx = get_context()
        kc, vc = self.k_cache, self.v_cache
        assert kc is not None and vc is not None, "KV cache not bound"
        hkv, d = self.num_kv_heads, self.head_dim
        if self.fused is not None:
            self.fused.cache_write_(k, v, kc, vc, ctx.kv_rows)
        else:
            kc.view(-1, d).index_copy_(0, ctx.kv_rows, k.reshape(-1, d))
            vc.view(-1, d).index_copy_(0, ctx.kv_rows, v.reshape(-1, d))
        nd = ctx.num_decode
        if nd and ctx.decode_kernel is not None:
            # q may be a strided view (of the qkv output): the kernel reads it in place
            od = ctx.decode_kernel(q[:nd], kc, vc, ctx.decode_block_tables,
                                   ctx.decode_context_lens, self.scale, ctx.sliding_window)
            if nd == q.shape[0]:  # a decode-only step: no prefill rows to place beside
                return od
        out = torch.empty_like(q)
        if nd and ctx.decode_kernel is not None:
            out[:nd] = od
        elif nd:
            # Query heads of one KV group play the role of query positions: no K/V expansion.
            tables = ctx.decode_block_tables
            kd = _gather(kc, tables)  # [B, Hkv, L, D]
            vd = _gather(vc, tables)
            qd = q[:nd].view(nd, hkv, self.group, d)  # [B, Hkv, G, D]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=ctx.decode_mask,
                                                scale=self.scale)
            out[:nd] = od.reshape(nd, self.num_heads, d)
        for seg in ctx.prefills:
            qs = q[seg.t0:seg.t1].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            if seg.block_ids is None:
                ks = k[seg.t0:seg.t1].transpose(0, 1).unsqueeze(0)  # [1, Hkv, q, D]
                vs = v[seg.t0:seg.t1].transpose(0, 1).unsqueeze(0)
            else:
                kv_len = seg.start_pos + (seg.t1 - seg.t0)
                ks = _gather(kc, seg.block_ids.unsqueeze(0))[:, :, :kv_len]  # [1, Hkv, kv, D]
                vs = _gather(vc, seg.block_ids.unsqueeze(0))[:, :, :kv_len]
            causal = seg.mask is None  # then block_ids is None too: fresh K/V, plain causal
            os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, is_causal=causal,
                                                 scale=self.scale, enable_gqa=self.group > 1)
            out[seg.t0:seg.t1] = os_.squeeze(0).transpose(0, 1)
        return out


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, Hkv, bs, D] cache, [B, nblk] block ids -> contiguous [B, Hkv, nblk*bs, D]."""
    b, nblk = tables.shape
    _, hkv, bs, d = cache.shape
    return cache[tables].transpose(1, 2).reshape(b, hkv, nblk * bs, d)
