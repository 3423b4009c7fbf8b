"""Read a PEFT LoRA folder and validate it against the base model.

A folder is `adapter_config.json` + `adapter_model.safetensors` (or, only with an explicit
opt-in, `adapter_model.bin` read with `torch.load(weights_only=True)`). Everything that changes
the math and is not implemented (DoRA, modules_to_save, LoRA bias, embedding or lm_head LoRA,
Activated LoRA, QA-LoRA, trainable tokens, LoRA on parameters, the other LoRA variants
listed in `_UNSUPPORTED` and `_UNSUPPORTED_SUBCONFIGS`, and initializations other than
`_PLAIN_INITS`: with PiSSA, OLoRA and LoftQ PEFT rewrites the base weights on load) is refused
by name, never ignored. Every error is a LoRAError naming the module and the shapes, or the
config field.

The weights file says which modules are adapted; the config must agree. PEFT builds LoRA layers
only where the config's target_modules / exclude_modules / layers_to_transform select a module
(a config without target_modules gets PEFT's default for the architecture, q_proj and v_proj)
and ignores weights for any other, so a file holding weights for a module its config does not
select would be served differently by PEFT: it is refused, naming the module (`_selects`
mirrors PEFT's matching).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
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


class AdapterExistsError(LoRAError):
    """A load that must not replace found its name already registered (manager.register)."""


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


class ModuleTable(Mapping[tuple[int, str], LoRAModule]):
    """An adapter's modules: one flat tensor holding every A and B, and a table of where each
    lies in it; a `LoRAModule` of views is made on access.

    Why not a dict of tensors: 210 modules as separate tensors are ~1000 Python objects that
    the cyclic GC scans on every full collection, and 128 adapters in the CPU tier made one
    such collection take 29 ms (measured on the 2-core Zen 2 VM) in the middle of a load, or of
    a step: the collector holds the GIL. The table holds only ints, floats and strings, which
    the GC stops tracking, so an adapter is a handful of tracked objects however large.
    Invariant: the table's offsets and shapes were checked against `flat` when it was built.
    """

    __slots__ = ("_where", "flat")

    def __init__(self, flat: torch.Tensor,
                 where: dict[tuple[int, str], tuple[int, int, int, int, int, int, float]]) -> None:
        self.flat = flat  # [n] in the adapter's dtype
        # (layer, proj) -> (A offset, r, in, B offset, out, r, scale), offsets in elements
        self._where = where

    def __getitem__(self, key: tuple[int, str]) -> LoRAModule:
        ao, ar, ac, bo, br, bc, scale = self._where[key]
        f = self.flat
        return LoRAModule(key[0], key[1], f[ao:ao + ar * ac].view(ar, ac),
                          f[bo:bo + br * bc].view(br, bc), scale)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def max_rank(self) -> int:
        return max(w[1] for w in self._where.values())

    @property
    def nbytes(self) -> int:
        return self.flat.element_size() * sum(
            w[1] * w[2] + w[4] * w[5] for w in self._where.values())


@dataclass(slots=True)
class LoRAAdapter:
    name: str
    path: str
    version: str  # content hash of config + weights: a changed folder is a new version
    # The CPU copy; None while evicted from the CPU tier (reloaded from `path` on next use).
    modules: ModuleTable | None
    base_model_name_or_path: str | None
    nbytes: int = 0  # size of A and B weights in `dtype`
    max_rank: int = 0
    # The buffer `modules` view: the one the file was read into, or the one its weights were
    # converted into (the manager recycles it once the CPU copy is dropped); None for none.
    raw: bytearray | None = None


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module name when the
    # name ends with it at a dot boundary; the first matching key wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# LoraConfig fields that change the forward pass in ways this engine does not implement; any
# truthy value is refused. (VeLoRA's config changes only training's backward pass; its extra
# tensor is refused as an unexpected tensor.)
_UNSUPPORTED = {
    "alora_invocation_tokens": "Activated LoRA (the adapter acts only from its invocation "
                               "tokens on)",
    "use_qalora": "QA-LoRA (inputs pooled before lora_A)",
    "trainable_token_indices": "trainable tokens (changed embedding rows)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}
# Variants PEFT switches on by a sub-config: it turns any dict, even an empty one, into a
# config object (its defaults), and the variant is then on. So these are refused whenever they
# are present and not null, not only when truthy.
_UNSUPPORTED_SUBCONFIGS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (a truncated base weight and a diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (sampled adapters)",
}
# init_lora_weights values that leave the base weights as they are when PEFT loads the adapter
# (its saved A and B then replace whatever the initialization made). Any other value is
# refused: with pissa* and olora PEFT subtracts the initial B A from the base weights it
# adapts, with loftq it swaps in its quantized ones (served on the unchanged base, such an
# adapter gives other outputs), corda needs PEFT's preprocessing before it loads at all, and an
# initialization newer than this list may do either. PEFT's save_pretrained(
# path_initial_model_for_weight_conversion=...) turns PiSSA and OLoRA adapters into plain ones
# (init_lora_weights=true).
_PLAIN_INITS = {"true", "false", "gaussian", "eva", "orthogonal", "mica", "lora_ga"}
# PEFT's target modules for a config without target_modules, for every architecture loraplex
# serves (llama, mistral, qwen2, qwen3: peft.utils.constants.
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")


def _selects(cfg: dict, key: str, where: str) -> bool:
    """Whether PEFT would put a LoRA layer on module `key` (a full module name such as
    "model.layers.3.self_attn.q_proj") under this config: exclude_modules, then target_modules
    (a regex string matched whole, "all-linear", or a list of names matched whole or as a
    dotted suffix), then layers_to_transform, which PEFT applies to list targets matched by
    suffix only, finding the layer index with layers_pattern
    (peft.tuners.tuners_utils.check_target_module_exists)."""
    try:
        excluded = cfg.get("exclude_modules")
        if isinstance(excluded, str) and excluded:
            if re.fullmatch(excluded, key):
                return False
        elif excluded and (key in excluded or any(key.endswith(f".{e}") for e in excluded)):
            return False
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            if targets.lower() == "all-linear":  # every nn.Linear but the output head
                return key not in ("lm_head", "model.embed_tokens")
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        wanted = cfg.get("layers_to_transform")
        if wanted is None or wanted == []:
            return True
        patterns = cfg.get("layers_pattern")
        if not patterns:  # the first numbered segment
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if m is not None:
                    break
    except re.error as e:
        raise LoRAError(f"{where}: a target_modules / exclude_modules / layers_pattern pattern "
                        f"is not a valid regex ({e})") from None
    if m is None:
        return False
    layer = int(m.group("idx"))
    return layer == wanted if isinstance(wanted, int) else layer in wanted


def _check_config(cfg: dict, where: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(f"{where}: peft_type {peft_type} is not supported (only LORA)")
    _check_values(cfg, where)  # first: the matching below takes these values as they come
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
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            refused.append(f"{what} ({key}={cfg[key]!r})")
    for key, what in _UNSUPPORTED_SUBCONFIGS.items():
        if cfg.get(key) is not None:
            refused.append(f"{what} ({key}={cfg[key]!r})")
    init = cfg.get("init_lora_weights", True)
    if init is not None and str(init).lower() not in _PLAIN_INITS:
        refused.append(
            f"init_lora_weights={init!r} (with PiSSA, OLoRA and LoftQ PEFT rewrites the base "
            f"weights when it loads the adapter, CorDA needs PEFT's preprocessing; PiSSA and "
            f"OLoRA adapters convert to plain ones with PEFT's save_pretrained("
            f"path_initial_model_for_weight_conversion=...))")
    targets = cfg.get("target_modules")
    # Configs PEFT refuses (LoraConfig.__post_init__); matched as a regex, a string target
    # would silently ignore the layer fields.
    for field in ("layers_to_transform", "layers_pattern"):
        if isinstance(targets, str) and cfg.get(field) not in (None, []):
            raise LoRAError(f"{where}: {field}={cfg[field]!r} cannot be combined with "
                            f"target_modules as a string ({targets!r}); PEFT refuses this "
                            f"config too")
    if cfg.get("layers_pattern") not in (None, []) and cfg.get("layers_to_transform") is None:
        raise LoRAError(f"{where}: layers_pattern={cfg['layers_pattern']!r} needs "
                        f"layers_to_transform; PEFT refuses this config too")
    # as PEFT matches them: the full module names of the input embedding and the output head
    # (targets is never None here: load_adapter puts PEFT's default in for a config without)
    for bad, full in (("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")):
        if _selects(cfg, full, where):
            refused.append(f"{bad} LoRA (target_modules={targets!r})")
    if refused:
        raise LoRAError(f"{where}: unsupported adapter feature(s): {'; '.join(refused)}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    # (a JSON integer may have any number of digits: bounded so float() of it cannot overflow)
    return (_is_int(v) and abs(v) < 2 ** 63) or (isinstance(v, float) and math.isfinite(v))


def _check_values(cfg: dict, where: str) -> None:
    """The types and ranges of the config values the loader computes with, so that a bad one
    is a LoRAError naming the field rather than a TypeError deep in the loader."""
    def bad(field: str, want: str) -> LoRAError:
        return LoRAError(f"{where}: adapter_config.json {field} must be {want}, got "
                         f"{cfg.get(field)!r}")

    if not _is_int(cfg.get("r", 8)) or cfg.get("r", 8) < 1:
        raise bad("r", "a positive integer")
    if not _is_number(cfg.get("lora_alpha", 8)):
        raise bad("lora_alpha", "a finite number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise bad("use_rslora", "true or false")
    for field, ok, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1,
                             "an object of positive integer ranks"),
                            ("alpha_pattern", _is_number, "an object of finite numbers")):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(ok(v) for v in patterns.values()):
            raise bad(field, want)
        for key in patterns:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise LoRAError(f"{where}: adapter_config.json {field} key {key!r} is not a "
                                f"valid regex ({e})") from None
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", "a list of module names or a regex string")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (
            isinstance(layers, list) and all(_is_int(v) for v in layers)):
        raise bad("layers_to_transform", "null, a layer index or a list of them")
    for field in ("layers_pattern", "exclude_modules"):
        v = cfg.get(field)
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(e, str) for e in v)):
            raise bad(field, "null, a string or a list of strings")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}


@dataclass(slots=True)
class _Weights:
    """A weights file's tensors before validation: name -> (dtype, shape), and where the data
    is: byte ranges in one buffer (safetensors, read once, nothing copied yet) or tensors
    (a pickle, already unpickled)."""

    info: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    whole: memoryview | None = None  # the buffer; tensors are made through this one view
    base: int = 0  # where the data region starts in it
    ranges: dict[str, tuple[int, int]] | None = None  # byte ranges in the data region
    tensors: dict[str, torch.Tensor] | None = None

    def tensor(self, key: str) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[key]
        dtype, shape = self.info[key]
        start, _ = self.ranges[key]
        numel = math.prod(shape)
        if not numel:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.whole, dtype=dtype, offset=self.base + start,
                                count=numel).view(shape)


def _parse_safetensors(data: bytearray, size: int) -> _Weights:
    """The header of a safetensors file read into `data`, every declared offset and size
    checked against the file. No tensor is made here (safetensors' own loader copies every
    tensor into a fresh allocation, which cost ~100 ms per 20 MB adapter in a large process)."""
    if size < 8:
        raise ValueError("file shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise ValueError(f"header of {n} bytes in a {size}-byte file")
    header = json.loads(bytes(data[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end_of_data = size - 8 - n
    info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key} has unsupported dtype {t['dtype']}")
        shape = tuple(int(d) for d in t["shape"])
        start, end = (int(o) for o in t["data_offsets"])
        if not 0 <= start <= end <= end_of_data or \
                end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key} declares bytes {start}..{end} for shape "
                             f"{list(shape)} but the file has {end_of_data} data bytes")
        info[key], ranges[key] = (dtype, shape), (start, end)
    # Every tensor is made through this one memoryview, whose buffer export lives as long as
    # any tensor does (frombuffer keeps its argument alive): that is what lets the BufferPool
    # tell, exactly, when a dropped copy's buffer is no longer read by anyone.
    return _Weights(info, memoryview(data)[:size], 8 + n, ranges)


Take = Callable[[int], bytearray]  # a buffer of at least n bytes (see buffers.BufferPool)


def _read_weights(folder: Path, allow_pickle: bool, take: Take
                  ) -> tuple[_Weights, bytes | bytearray, int]:
    """(the file's tensors, the buffer it was read into, the file's size: the buffer may be
    longer)."""
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

            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or \
                    not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise TypeError("not a dict of tensors")
        except Exception as e:
            raise LoRAError(f"{pt}: cannot be read with weights_only=True ({e})") from None
        info = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return _Weights(info, tensors=tensors), data, len(data)
    raise LoRAError(f"{folder} has no adapter_model.safetensors")


def load_adapter(name: str, path: str | Path, base: ModelConfig, max_lora_rank: int,
                 dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 take: Take = bytearray, give: Callable[[bytearray], object] | None = None
                 ) -> LoRAAdapter:
    """Read, check and version an adapter folder. `take`/`give` let the caller recycle
    buffers (buffers.BufferPool): the file is read into one, and weights converted to `dtype`
    go into another; `give` gets the file's buffer back when the weights were converted
    (nothing views it any more), and every buffer taken when the adapter is refused."""
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
    default_targets = cfg.get("target_modules") is None
    if default_targets:
        # PEFT fills in its default targets for the architecture and ignores any other weights
        cfg["target_modules"] = list(PEFT_DEFAULT_TARGETS)
    _check_config(cfg, where)
    weights, raw, size = _read_weights(folder, allow_pickle, take)
    held = None
    try:
        # The version: a content hash of config + weights. xxh3-128 runs at memory speed
        # (~0.5 ms per 20 MB here, sha256 ~12 ms); it tells versions apart, nothing more (an
        # adversary able to load adapters needs no collision to serve what they like).
        digest = xxhash.xxh3_128(cfg_bytes)
        digest.update(memoryview(raw)[:size])
        plan = _validate(where, cfg, weights.info, base, max_lora_rank, default_targets)
        table, held = _build_table(weights, plan, dtype, take)
        # One reduction over every weight: NaN and inf propagate into the sum (a finite
        # overflow would need values no adapter has), several times cheaper than isfinite().
        # bf16 sums in its own dtype, whose range is float32's (a float32 result costs an
        # up-conversion of every element: 1.5-8 ms for a SmolLM2 adapter, the sum 0.2 ms).
        # float16's sum could overflow its 65504 on finite weights: there min and max (NaN
        # propagates into both), 1.0 ms for a SmolLM2 adapter against 4.7 ms for a float32 sum.
        flat = table.flat
        if dtype == torch.float16 and flat.numel():
            finite = all(bool(torch.isfinite(v)) for v in torch.aminmax(flat))
        else:
            finite = not flat.numel() or bool(torch.isfinite(flat.sum(dtype=dtype)))
        if not finite:
            beyond = (" (or weights, B x scale included, beyond float16's range, 65504: serve "
                      "it with --lora-dtype bfloat16 or float32)"
                      if dtype == torch.float16 else "")
            raise LoRAError(f"{where}: the adapter has NaN or infinite weights "
                            f"(first in {_first_nonfinite(table)}){beyond}")
        if dtype == torch.float16:
            _check_float16_scaled(where, table)
    except BaseException:
        weights = table = None  # drops the buffers' exports before `give`
        if give is not None:
            for buf in (raw,) if held is raw else (raw, held):
                if isinstance(buf, bytearray):
                    give(buf)
        raise
    weights = None  # the table's flat tensor keeps the buffer it views exported
    ad = LoRAAdapter(name, str(folder), digest.hexdigest()[:16], table,
                     cfg.get("base_model_name_or_path"), table.nbytes, table.max_rank)
    ad.raw = held  # goes back to the pool when this copy is dropped
    if give is not None and isinstance(raw, bytearray) and raw is not held:
        give(raw)
    return ad


def _first_nonfinite(table: ModuleTable) -> str:
    """Where the first NaN or inf of a refused adapter lies (the error path only)."""
    for key in table:
        m = table[key]
        for which, t in (("lora_A", m.a), ("lora_B", m.b)):
            if not bool(torch.isfinite(t).all()):
                return f"layer {key[0]} {key[1]} {which}"
    return "no module"  # (not reached: the caller saw a non-finite value)


def _check_float16_scaled(where: str, table: ModuleTable) -> None:
    """The device slots hold B x scale (ops.LoRASlots.write), in float16 too: a finite B whose
    product with a scale above 1 passes 65504 would be inf there, and every row using the
    adapter NaN. Refused at load instead, naming the module (~1 ms a SmolLM2 adapter). Only a
    float16 file keeps a scale here; a converted one holds the product (see _build_table),
    whose inf the finiteness check finds."""
    for key, where_in_flat in table._where.items():  # (no views for modules with scale <= 1)
        if where_in_flat[-1] > 1:
            m = table[key]
            lo, hi = torch.aminmax(m.b)
            big = max(-float(lo), float(hi))
            if big * m.scale > 65504:
                raise LoRAError(
                    f"{where}: layer {key[0]} {key[1]}: B x scale reaches {big * m.scale:.6g} "
                    f"(|B| up to {big:.6g}, scale {m.scale:g}), beyond float16's range, 65504: "
                    f"serve it with --lora-dtype bfloat16 or float32")


# One module of the plan: (layer, proj, A's tensor name, B's, scale).
_Planned = tuple[int, str, str, str, float]


def _build_table(w: _Weights, plan: list[_Planned], dtype: torch.dtype, take: Take
                 ) -> tuple[ModuleTable, bytearray | None]:
    """The adapter's ModuleTable, and the buffer its flat tensor views (None: it views none).
    When the file holds nothing but `dtype` tensors (the common case), the flat tensor is the
    file's data region itself, nothing copied; otherwise the used tensors are converted into a
    buffer from `take`, so that a server at its CPU-tier limit converts into the buffer of a
    dropped copy (fresh memory costs a page fault per 4 KiB on first touch: ~25 ms for a 9.8 MB
    bf16 SmolLM2 adapter on the dev VM, against ~15 ms for the whole load).
    A converted B holds B x scale (its module's scale is then 1): the slots hold that product,
    and rounding it once from the file's values, not B and then the product, keeps 16-bit
    adapters with a scale that is no power of two a quarter closer to the file's.
    """
    item = dtype.itemsize
    if w.ranges is not None and all(d == dtype for d, _ in w.info.values()) and \
            all(start % item == 0 for start, _ in w.ranges.values()):
        n = (len(w.whole) - w.base) // item
        flat = torch.frombuffer(w.whole, dtype=dtype, offset=w.base, count=n) if n else \
            torch.empty(0, dtype=dtype)
        offsets = {key: start // item for key, (start, _) in w.ranges.items()}
        held = w.whole.obj if n else None  # the file's buffer (a slice's .obj is the whole one)
    else:
        offsets, total = {}, 0
        for _, _, ka, kb, _ in plan:
            for key in (ka, kb):
                offsets[key] = total
                total += math.prod(w.info[key][1])
        held = take(total * item) if total else None
        # through a memoryview, as the file's tensors are made: the export is what tells the
        # pool when nothing reads this buffer any more (buffers.py)
        flat = torch.frombuffer(memoryview(held), dtype=dtype, count=total) if total else \
            torch.empty(0, dtype=dtype)
        b_scale = {kb: scale for _, _, _, kb, scale in plan}
        for key, o in offsets.items():
            t = w.tensor(key).reshape(-1)
            dst, s = flat[o:o + t.numel()], b_scale.get(key, 1.0)
            if s == 1.0:
                dst.copy_(t)
            else:  # computed in float32, rounded into dtype once
                torch.mul(t if t.dtype == torch.float32 else t.float(), s, out=dst)
        plan = [(layer, proj, ka, kb, 1.0) for layer, proj, ka, kb, _ in plan]
    where = {}
    for layer, proj, ka, kb, scale in plan:
        (r, fin), (fout, _) = w.info[ka][1], w.info[kb][1]
        where[(layer, proj)] = (offsets[ka], r, fin, offsets[kb], fout, r, scale)
    return ModuleTable(flat, where), held


def _validate(where: str, cfg: dict, info: dict[str, tuple[torch.dtype, tuple[int, ...]]],
              base: ModelConfig, max_lora_rank: int, default_targets: bool = False
              ) -> list[_Planned]:
    """Every tensor name and shape checked against the base model and the config; the plan of
    modules, sorted by (layer, projection). default_targets: target_modules is PEFT's default,
    put in by load_adapter for a config without any (named so in the errors)."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in info:
        m = _KEY.match(key)
        if m is None:
            hint = ""
            if "lora_magnitude_vector" in key:
                hint = " (DoRA magnitude vector)"
            elif "velora" in key:
                hint = " (VeLoRA's training-time projection)"
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
        if not info[key][0].is_floating_point:
            raise LoRAError(f"{where}: {key} has dtype {info[key][0]}, not a float type")
        pairs.setdefault((layer, proj), {})[ab] = key
    if not pairs:
        raise LoRAError(f"{where}: the adapter matches no module of the base model "
                        f"(no lora_A/lora_B tensors for its projections)")

    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern"), cfg.get("alpha_pattern")
    shapes = {proj: projection_shape(base, proj) for proj in PROJECTIONS}
    plan: list[_Planned] = []
    for (layer, proj), ab in sorted(pairs.items()):
        mod_name = f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"  # noqa: E501
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where}: {mod_name} has lora_{next(iter(ab))} but not its pair")
        a, b = info[ab["A"]][1], info[ab["B"]][1]
        fin, fout = shapes[proj]
        if len(a) != 2 or len(b) != 2 or a[1] != fin or b[0] != fout or a[0] != b[1]:
            raise LoRAError(f"{where}: {mod_name} lora_A {a} / lora_B "
                            f"{b} do not fit the base projection ({fin} -> {fout}): "
                            f"expected lora_A [r, {fin}] and lora_B [{fout}, r]")
        r = a[0]
        if r > max_lora_rank:
            raise LoRAError(f"{where}: {mod_name} has rank {r} > max_lora_rank={max_lora_rank}")
        r_cfg = int(_pattern_value(rank_pattern, mod_name, r_default))
        if r_cfg != r:
            raise LoRAError(f"{where}: {mod_name} has rank {r} in its weights but {r_cfg} in "
                            f"adapter_config.json")
        if not _selects(cfg, mod_name, where):
            targets = (f"no target_modules, so PEFT's default {list(PEFT_DEFAULT_TARGETS)!r}"
                       if default_targets else f"target_modules={cfg.get('target_modules')!r}")
            raise LoRAError(
                f"{where}: the weights adapt {mod_name}, which adapter_config.json does not "
                f"select ({targets}, exclude_modules="
                f"{cfg.get('exclude_modules')!r}, layers_to_transform="
                f"{cfg.get('layers_to_transform')!r}); PEFT would ignore these weights, so the "
                f"config and the weights disagree")
        alpha = float(_pattern_value(alpha_pattern, mod_name, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        plan.append((layer, proj, ab["A"], ab["B"], scale))
    return plan
