"""loraplex: one base model, many LoRA adapters, one batched forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "EngineConfig", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from loraplex.config import EngineConfig
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.llm import LLM
    from loraplex.request import RequestOutput
    from loraplex.sampling_params import SamplingParams

_LAZY = {
    "LLM": "loraplex.llm", "AsyncEngine": "loraplex.engine.async_engine",
    "EngineConfig": "loraplex.config", "RequestOutput": "loraplex.request",
    "SamplingParams": "loraplex.sampling_params",
}


def __getattr__(name: str) -> Any:  # imports torch only when an engine piece is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
