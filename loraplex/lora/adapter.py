"""Read a PEFT LoRA folder and validate it against the base model.

A folder is `adapter_config.json` + `adapter_model.safetensors` (or, only with an explicit
opt-in, `adapter_model.bin` read with `torch.load(weights_only=True)`). Everything that changes
the math and is not implemented (DoRA, modules_to_save, LoRA bias, embedding or lm_head LoRA) is
refused by name, never ignored. Every error is a LoRAError naming the module and the shapes.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from loraplex.config import ModelConfig

# HF projection name -> (fused base module, shard index). Same table the model loader uses.
PROJECTIONS = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
MAX_ADAPTER_FILE_BYTES = 4 << 30


class LoRAError(ValueError):
    """An adapter that cannot be served; the message says why (module, shapes, feature)."""


def projection_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of the base model."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}[proj]


@dataclass(slots=True)
class LoRAModule:
    layer: int
    proj: str  # HF projection name (q_proj, ..., down_proj)
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (per-module patterns)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(slots=True)
class LoRAAdapter:
    name: str
    path: str
    version: str  # content hash of config + weights: a changed folder is a new version
    # The CPU copy; None while evicted from the CPU tier (reloaded from `path` on next use).
    modules: dict[tuple[int, str], LoRAModule] | None
    base_model_name_or_path: str | None
    nbytes: int = 0  # size of A and B weights in `dtype`
    max_rank: int = 0
    # The buffer the file was read into, when `modules` are views of it (the manager recycles
    # it once the CPU copy is dropped); None when the weights were converted into new tensors.
    raw: bytearray | None = None


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module name when the
    # name ends with it at a dot boundary; the first matching key wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_config(cfg: dict, where: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(f"{where}: peft_type {peft_type} is not supported (only LORA)")
    refused = []
    if cfg.get("use_dora"):
        refused.append("DoRA (use_dora=true)")
    if cfg.get("modules_to_save"):
        refused.append(f"modules_to_save={cfg['modules_to_save']}")
    if cfg.get("lora_bias"):
        refused.append("LoRA bias (lora_bias=true)")
    if cfg.get("bias", "none") not in ("none", None):
        refused.append(f"bias={cfg['bias']!r} (trained biases)")
    if cfg.get("fan_in_fan_out"):
        refused.append("fan_in_fan_out=true")
    if cfg.get("layer_replication"):
        refused.append("layer_replication")
    targets = cfg.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for bad in ("embed_tokens", "lm_head"):
        if any(bad in str(t) for t in names):
            refused.append(f"{bad} LoRA (target_modules={targets})")
    if refused:
        raise LoRAError(f"{where}: unsupported adapter feature(s): {'; '.join(refused)}")
    if not isinstance(cfg.get("r", 8), int) or cfg.get("r", 8) < 1:
        raise LoRAError(f"{where}: r must be a positive integer, got {cfg.get('r')!r}")


def _all_finite(raw: bytes | memoryview, tensors: dict[str, torch.Tensor]) -> bool:
    """One pass over a safetensors data region when every tensor is F32 (the common case),
    instead of one isfinite per tensor (hundreds of small calls)."""
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(bytes(raw[8:8 + n]))
        if all(v.get("dtype") == "F32" for k, v in header.items() if k != "__metadata__"):
            if len(raw) == 8 + n:
                return True
            with warnings.catch_warnings():  # read-only view: we only read it
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(raw, dtype=torch.float32, offset=8 + n)
            # NaN and inf propagate into the sum (a finite overflow would need values no
            # adapter has); one reduction is several times cheaper than isfinite().all().
            return bool(torch.isfinite(data.sum()))
    except (ValueError, TypeError):
        pass
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}


def _parse_safetensors(data: bytearray, size: int) -> dict[str, torch.Tensor]:
    """Tensors as zero-copy views of one buffer (safetensors' own loader copies every tensor
    into a fresh allocation, which cost ~100 ms per 20 MB adapter inside a large process).
    Every declared offset and size is checked against the file before any view is made."""
    if size < 8:
        raise ValueError("file shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise ValueError(f"header of {n} bytes in a {size}-byte file")
    header = json.loads(bytes(data[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base, end_of_data = 8 + n, size - 8 - n
    # Every tensor views the buffer through this one memoryview, whose buffer export lives as
    # long as any tensor does (frombuffer keeps its argument alive): that is what lets the
    # BufferPool tell, exactly, when a dropped copy's buffer is no longer read by anyone.
    whole = memoryview(data)
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key} has unsupported dtype {info['dtype']}")
        shape = [int(d) for d in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
        numel = math.prod(shape)
        if not 0 <= start <= end <= end_of_data or end - start != numel * dtype.itemsize:
            raise ValueError(f"tensor {key} declares bytes {start}..{end} for shape {shape} but "
                             f"the file has {end_of_data} data bytes")
        out[key] = torch.frombuffer(whole, dtype=dtype, offset=base + start,
                                    count=numel).view(shape) if numel else torch.empty(shape)
    return out


Take = Callable[[int], bytearray]  # a buffer of at least n bytes (see buffers.BufferPool)


def _read_tensors(folder: Path, allow_pickle: bool, take: Take
                  ) -> tuple[dict[str, torch.Tensor], bytes | bytearray, int]:
    """(tensors, the buffer they view, the file's size: the buffer may be longer)."""
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        size = st.stat().st_size
        if size > MAX_ADAPTER_FILE_BYTES:
            raise LoRAError(f"{st}: {size} bytes is larger than any LoRA adapter loraplex "
                            f"accepts ({MAX_ADAPTER_FILE_BYTES} bytes)")
        data = take(size)
        with open(st, "rb") as f:
            got = f.readinto(memoryview(data)[:size])
        try:
            return _parse_safetensors(data, got), data, got
        except (ValueError, KeyError, TypeError) as e:
            raise LoRAError(f"{st}: not a valid safetensors file ({e})") from None
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        if not allow_pickle:
            raise LoRAError(f"{folder} has only adapter_model.bin (a pickle); loading pickles "
                            f"must be enabled explicitly (allow_pickle / --allow-pickle-adapters)")
        data = pt.read_bytes()
        try:
            import io

            return (torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), data,
                    len(data))
        except Exception as e:
            raise LoRAError(f"{pt}: cannot be read with weights_only=True ({e})") from None
    raise LoRAError(f"{folder} has no adapter_model.safetensors")


def load_adapter(name: str, path: str | Path, base: ModelConfig, max_lora_rank: int,
                 dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 take: Take = bytearray, give: Callable[[bytearray], object] | None = None
                 ) -> LoRAAdapter:
    """Read, check and version an adapter folder. `take`/`give` let the caller recycle file
    buffers (buffers.BufferPool); `give` gets the buffer back when the weights were converted
    (nothing views it) or the adapter is refused."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoRAError(f"adapter {name!r}: {folder} is not a folder")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoRAError(f"adapter {name!r}: {folder} has no adapter_config.json")
    try:
        cfg_bytes = cfg_path.read_bytes()
        cfg = json.loads(cfg_bytes)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise LoRAError(f"adapter {name!r}: adapter_config.json is not valid JSON ({e})") from None
    where = f"adapter {name!r}"
    _check_config(cfg, where)
    tensors, raw, size = _read_tensors(folder, allow_pickle, take)
    content = memoryview(raw)[:size]
    try:
        # The version: a content hash of config + weights. xxh3-128 runs at memory speed
        # (~0.5 ms per 20 MB here, sha256 ~12 ms); it tells versions apart, nothing more (an
        # adversary able to load adapters needs no collision to serve what they like).
        digest = xxhash.xxh3_128(cfg_bytes)
        digest.update(content)
        modules = _validate(where, cfg, tensors, base, max_lora_rank, dtype)
        if not _all_finite(content, tensors):
            raise LoRAError(f"{where}: the adapter has NaN or infinite weights")
    except BaseException:
        del tensors, content
        if give is not None and isinstance(raw, bytearray):
            give(raw)
        raise
    del tensors, content
    nbytes = sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                 for m in modules.values())
    ad = LoRAAdapter(name, str(folder), digest.hexdigest()[:16], modules,
                     cfg.get("base_model_name_or_path"), nbytes,
                     max(m.rank for m in modules.values()))
    if isinstance(raw, bytearray):
        if _views(raw, modules):
            ad.raw = raw
        elif give is not None:
            give(raw)
    return ad


def _views(raw: bytearray, modules: dict[tuple[int, str], LoRAModule]) -> bool:
    """Whether any module tensor lies inside `raw` (kept as a view rather than converted)."""
    lo = torch.frombuffer(raw, dtype=torch.uint8).data_ptr() if len(raw) else 0
    hi = lo + len(raw)
    return any(lo <= t.data_ptr() < hi for m in modules.values() for t in (m.a, m.b))


def _validate(where: str, cfg: dict, tensors: dict[str, torch.Tensor], base: ModelConfig,
              max_lora_rank: int, dtype: torch.dtype) -> dict[tuple[int, str], LoRAModule]:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            hint = ""
            if "lora_magnitude_vector" in key:
                hint = " (DoRA magnitude vector)"
            elif "embed" in key or "lm_head" in key:
                hint = " (embedding / lm_head LoRA is not supported)"
            elif key.endswith(".bias"):
                hint = " (LoRA bias is not supported)"
            raise LoRAError(f"{where}: unexpected tensor {key}{hint}")
        layer, _, proj, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if proj not in PROJECTIONS:
            raise LoRAError(f"{where}: {key} targets {proj!r}, which is not a projection of "
                            f"the base model ({', '.join(PROJECTIONS)})")
        if layer >= base.num_layers:
            raise LoRAError(f"{where}: {key} targets layer {layer} but the base model has "
                            f"{base.num_layers} layers")
        pairs.setdefault((layer, proj), {})[ab] = t
    if not pairs:
        raise LoRAError(f"{where}: the adapter matches no module of the base model "
                        f"(no lora_A/lora_B tensors for its projections)")

    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], LoRAModule] = {}
    for (layer, proj), ab in sorted(pairs.items()):
        mod_name = f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"  # noqa: E501
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where}: {mod_name} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        fin, fout = projection_shape(base, proj)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fin or b.shape[0] != fout \
                or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{where}: {mod_name} lora_A {tuple(a.shape)} / lora_B "
                            f"{tuple(b.shape)} do not fit the base projection ({fin} -> {fout}): "
                            f"expected lora_A [r, {fin}] and lora_B [{fout}, r]")
        r = a.shape[0]
        if r > max_lora_rank:
            raise LoRAError(f"{where}: {mod_name} has rank {r} > max_lora_rank={max_lora_rank}")
        r_cfg = int(_pattern_value(cfg.get("rank_pattern"), mod_name, r_default))
        if r_cfg != r:
            raise LoRAError(f"{where}: {mod_name} has rank {r} in its weights but {r_cfg} in "
                            f"adapter_config.json")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod_name, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[(layer, proj)] = LoRAModule(layer, proj, a.to(dtype).contiguous(),
                                            b.to(dtype).contiguous(), scale)
    return modules
