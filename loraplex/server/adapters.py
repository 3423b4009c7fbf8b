"""Model names → adapters: the base names, registered adapters, and `--lora-dir` lazy loads.

A name that is neither the base nor registered is looked up as `<lora-dir>/<name>` when a lora
dir is configured. The name must stay inside that folder: absolute names, `..` components and
symlinks that resolve outside are answered exactly like a name that does not exist. Concurrent
first requests for the same name share one load.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from loraplex.engine.async_engine import AsyncEngine
from loraplex.lora.adapter import AdapterExistsError, LoRAError
from loraplex.server.errors import APIError, model_not_found

log = logging.getLogger(__name__)


def contained_path(root: Path, name: str) -> Path | None:
    """`root/name` if it stays inside `root` after resolving symlinks, else None."""
    if not name or "\x00" in name or "\\" in name or name.startswith(("/", "~")):
        return None
    # On the raw string: pathlib drops "." and empty components ("./x", "x/", "x//y" all
    # become x's parts), which would make one folder answer to endless names, each loaded and
    # registered as its own adapter.
    parts = name.split("/")
    if any(p in ("..", ".", "") for p in parts):
        return None
    base = root.resolve()
    try:
        # A symlinked folder on the way (DIR/link -> .) would do the same: link/x, link/link/x,
        # ... The last component may be a symlink (an operator's alias for one adapter folder).
        if any((base / "/".join(parts[:i])).is_symlink() for i in range(1, len(parts))):
            return None
        target = (base / name).resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        return None
    if target == base or not target.is_relative_to(base):
        return None
    return target


class AdapterResolver:
    def __init__(self, engine: AsyncEngine, base_names: list[str], lora_dir: str | None) -> None:
        self.engine = engine
        self.base_names = list(base_names)
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self._loading: dict[str, asyncio.Task] = {}

    def is_base(self, name: str) -> bool:
        return name in self.base_names

    def registered(self, name: str) -> bool:
        lm = self.engine.engine.lora
        return lm is not None and lm.get(name) is not None

    async def resolve(self, name: str) -> str | None:
        """The adapter to run for `model` = name (None = the base), loading it from the lora dir
        on first use. Raises APIError 404 for unknown names, 400 for an adapter that fails."""
        if self.is_base(name):
            return None
        if self.registered(name):
            return name
        if self.lora_dir is None or self.engine.engine.lora is None:
            raise model_not_found(name)
        path = contained_path(self.lora_dir, name)
        if path is None or not path.is_dir():
            raise model_not_found(name)
        task = self._loading.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load(name, path))
            self._loading[name] = task
            task.add_done_callback(lambda _t: self._loading.pop(name, None))
        await asyncio.shield(task)
        return name

    async def _load(self, name: str, path: Path) -> None:
        try:
            # never over an adapter registered while this one was being read (an explicit
            # load that has already answered 200): that one is served
            await self.engine.add_lora(name, str(path), replace=False)
        except AdapterExistsError:
            return
        except LoRAError as e:
            raise APIError(400, f"Failed to load adapter `{name}`: {e}", "model") from None
        log.info("loaded adapter %r from %s on first use", name, path)
