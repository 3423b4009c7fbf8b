"""Model weights → a ready `LlamaForCausalLM`: HF folders (single or sharded safetensors) and
GGUF files (dequantized once into a cached HF folder, see `gguf_convert`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from loraplex.config import ConfigError, ModelConfig
from loraplex.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{folder}: shard(s) listed in the index are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise ConfigError(f"{folder} holds no model.safetensors (nor a sharded index); "
                      f"PyTorch .bin checkpoints are not loaded")


def iter_safetensors(files: list[Path], desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open has no iter)
    for h, k in tqdm(keys, desc=desc, unit="tensor", leave=False, mininterval=0.5):
        yield k, h.get_tensor(k)


def resolve_model_path(model: str | None) -> Path:
    """A HF folder as is; a .gguf file or None (embedded SmolLM2) via the conversion cache."""
    from loraplex.model import gguf_convert

    if model is None:
        return gguf_convert.converted_folder(gguf_convert.embedded_gguf_path())
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_convert.converted_folder(p)
    if p.is_dir():
        return p
    raise ConfigError(f"model {model!r} is neither a model folder nor a .gguf file (loraplex does "
                      f"not download from a model hub)")


def load_model(folder: Path, device: torch.device, dtype: torch.dtype, max_position: int,
               pack: bool = True, batch_hint: int = 32, amx_op=None) -> LlamaForCausalLM:
    """pack: move the weights to oneDNN's layout (CPU), or with `amx_op` (bf16 on AMX CPUs:
    kernels.amx_linear_op()) to the AMX GEMM's."""
    cfg = ModelConfig.from_folder(folder)
    files = safetensors_files(folder)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, max_position)
    finally:
        torch.set_default_dtype(prev)
    model.load_weights(iter_safetensors(files, desc=f"loading {folder.name}"))
    model.eval()
    if pack:
        model.pack_weights(batch_hint, amx_op)
    return model
