"""Per-step batch metadata, set by the runner before a forward and read by attention (and LoRA).

Keeping it here lets every model forward keep the signature `(input_ids, positions)`.
Token layout of a step: the first `num_decode` tokens are single-token rows (decode, or the last
token of a chunked prompt); after them come the prefill segments, one contiguous run per row.

KV cache layout (per layer, K and V alike): [num_blocks, Hkv, block_size, D], so that one KV
head's slice of a block is one contiguous block_size x D run (the paged kernel streams it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillSegment:
    t0: int  # first token of the segment in the step's flat token axis
    t1: int  # one past its last token
    start_pos: int  # absolute position of token t0 (= tokens already cached for this row)
    # Block ids covering [0, start_pos + (t1 - t0)); None when start_pos == 0 and no window
    # applies, in which case attention runs on the segment's own fresh K/V with a causal mask.
    block_ids: torch.Tensor | None
    # [1, 1, q_len, kv_len] bool, True = attend; None means plain causal over the segment.
    mask: torch.Tensor | None


@dataclass(slots=True)
class Context:
    # [T * Hkv] row of cache.view(-1, D) where each (token, kv head) vector is written:
    # (block * Hkv + head) * block_size + offset, token-major.
    kv_rows: torch.Tensor
    num_decode: int = 0
    # [num_decode, max_blocks] block ids per decode row (padded with block 0, masked out).
    decode_block_tables: torch.Tensor | None = None
    # [num_decode, 1, 1, max_blocks * block_size] bool, True = key position is visible
    # (torch path only).
    decode_mask: torch.Tensor | None = None
    # [num_decode] int64 keys visible per decode row (= its position + 1); set when the C++
    # paged kernel (`decode_kernel`) serves the decode rows instead of gather + SDPA.
    decode_context_lens: torch.Tensor | None = None
    decode_kernel: object | None = None
    sliding_window: int = 0
    prefills: list[PrefillSegment] = field(default_factory=list)
    # LoRA: per-token adapter slot data, set by the runner when adapters are active.
    lora: object | None = None


_CONTEXT: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> Context:
    if _CONTEXT is None:
        raise RuntimeError("no batch context set: model forwards run inside ModelRunner.execute")
    return _CONTEXT
