"""Random LoRA adapters in PEFT's folder format, for benchmarks (not for serving anything)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.config import ModelConfig
from loraplex.lora.adapter import projection_shape

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
        "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def parse_targets(spec: str) -> list[str]:
    """`all` (the 7 projections) or a comma list of projection names."""
    if spec in ("all", "all-linear"):
        return list(PROJ)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in PROJ]
    if bad or not names:
        raise ValueError(f"targets {spec!r}: use 'all' or a comma list of {', '.join(PROJ)}")
    return names


def write_adapter(out: Path, cfg: ModelConfig, rank: int, seed: int,
                  targets: list[str] | None = None) -> Path:
    """A PEFT-format folder (the layout and config PEFT writes) with random A and B, scaled
    so that the adapter changes outputs without blowing them up."""
    targets = targets or list(PROJ)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for proj in targets:
            fin, fout = projection_shape(cfg, proj)
            key = f"base_model.model.model.layers.{layer}.{PROJ[proj]}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False}))
    return out


def write_adapters(root: Path, cfg: ModelConfig, n: int, rank: int, targets: list[str],
                   distinct: int, prefix: str = "lora-", progress: bool = True) -> list[str]:
    """`n` adapter folders `root/<prefix>NNNN`. The first `distinct` get their own random
    weights; the others hard-link (or copy) those files, so 1000 adapters need not take 1000x
    the disk. Each name is still a separate adapter to the server (loaded, cached and slotted
    on its own). Folders already there with the same settings are reused."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "settings.json"
    settings = {"rank": rank, "targets": targets, "distinct": distinct,
                "layers": cfg.num_layers, "hidden": cfg.hidden_size}
    if not stamp.exists() or json.loads(stamp.read_text()) != settings:
        for old in root.glob(f"{prefix}*"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        stamp.write_text(json.dumps(settings))
    names = [f"{prefix}{i:04d}" for i in range(n)]
    for i, name in enumerate(tqdm(names, desc="adapters", disable=not progress, leave=False)):
        d = root / name
        if (d / "adapter_model.safetensors").exists():
            continue
        if i < distinct:
            write_adapter(d, cfg, rank, seed=i, targets=targets)
            continue
        src = root / names[i % distinct]
        d.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            try:
                os.link(src / f, d / f)
            except OSError:
                (d / f).write_bytes((src / f).read_bytes())
    return names
