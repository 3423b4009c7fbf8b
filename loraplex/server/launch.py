"""`loraplex serve`: build the engine, register the startup adapters, run uvicorn.

SIGTERM / SIGINT: uvicorn stops accepting, waits for open responses (streams included) up to
`drain_timeout`, then the app's lifespan drains the engine and the process exits 0.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.config import ConfigError, EngineConfig

log = logging.getLogger("loraplex.serve")

DEMO_ADAPTERS = Path(__file__).resolve().parent.parent / "demo_adapters"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(slots=True)
class ServerConfig:
    engine: EngineConfig
    served_model_names: list[str] = field(default_factory=list)
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # (name, path)
    # adapter name -> the served model name /v1/models lists as its parent (vLLM's
    # base_model_name); an adapter not named here gets the first served name
    lora_parents: dict[str, str] = field(default_factory=dict)
    lora_dir: str | None = None
    api_key: str | None = None
    enable_runtime_lora: bool = False
    tenants_file: str | None = None  # see loraplex/server/tenants.py
    max_queued_requests: int = 256
    max_queued_tokens: int = 1 << 21
    host: str = "127.0.0.1"
    port: int = 8000
    # None: the demo adapters are served when the model is the embedded default.
    demo_adapters: bool | None = None
    drain_timeout: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests < 1:
            raise ConfigError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_queued_tokens < 1:
            raise ConfigError(f"max_queued_tokens must be >= 1, got {self.max_queued_tokens}")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"--lora-dir {self.lora_dir} is not a folder")
        names = [n for n, _ in self.lora_modules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"--lora-modules names more than once: {', '.join(sorted(dup))}")
        clash = set(names) & set(self.served_model_names)
        if clash:
            raise ConfigError(f"adapter name(s) {', '.join(sorted(clash))} clash with the "
                              "served model name")

    def startup_adapters(self) -> list[tuple[str, str]]:
        demo = self.demo_adapters if self.demo_adapters is not None else self.engine.model is None
        out = list(self.lora_modules)
        if demo and DEMO_ADAPTERS.is_dir():
            taken = {n for n, _ in out}
            out += [(p.name, str(p)) for p in sorted(DEMO_ADAPTERS.iterdir())
                    if (p / "adapter_config.json").is_file() and p.name not in taken]
        return out


def build(cfg: ServerConfig):
    """The engine (with its startup adapters) and the ASGI app."""
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.engine.engine import Engine
    from loraplex.lora.adapter import LoRAError
    from loraplex.server.api import AppOptions, build_app

    t0 = time.perf_counter()
    tenants = None
    if cfg.tenants_file is not None:
        from loraplex.server.tenants import Tenants

        tenants = Tenants.from_file(cfg.tenants_file, extra_admin_key=cfg.api_key)
        log.info("tenants: %s", ", ".join(sorted(tenants.by_name)))

    def make() -> Engine:  # runs on the engine's own step thread (see AsyncEngine)
        eng = Engine(cfg.engine)
        base_names = cfg.served_model_names or [eng.served_model_name]
        for name, parent in cfg.lora_parents.items():
            if parent not in base_names:
                raise ConfigError(f"--lora-modules {name}: base_model_name {parent!r} is not a "
                                  f"served model name ({', '.join(base_names)})")
        for name, path in cfg.startup_adapters():
            if eng.lora is None:
                raise ConfigError("adapters given but LoRA is disabled")
            if name in base_names:  # (explicit names were checked already, the default not)
                raise ConfigError(f"adapter name {name} clashes with the served model name "
                                  f"(the model's default; set --served-model-name to serve "
                                  f"the base under another name)")
            try:
                eng.add_lora(name, path)
            except LoRAError as e:
                raise ConfigError(f"--lora-modules {name}={path}: {e}") from None
            log.info("adapter %s <- %s", name, path)
        return eng

    engine = AsyncEngine(make)
    eng = engine.engine
    names = cfg.served_model_names or [eng.served_model_name]
    app = build_app(engine, AppOptions(names, cfg.lora_dir, cfg.api_key, cfg.enable_runtime_lora,
                                       cfg.max_queued_requests, tenants=tenants,
                                       max_queued_tokens=cfg.max_queued_tokens,
                                       lora_parents=dict(cfg.lora_parents)))
    log.info("engine ready in %.1fs: model %s, adapters: %s", time.perf_counter() - t0,
             names[0], ", ".join(a.name for a in eng.list_loras()) or "none")
    return engine, app


def freeze_startup_heap() -> None:
    """Move every object alive after startup (torch's and transformers' modules, the model, the
    startup adapters: they live as long as the process) out of the cyclic GC's reach. Python runs
    a full collection whenever its tracked objects grow by a quarter, which a burst of adapter
    loads or requests does; each one scanned this whole heap and stalled the step thread and the
    event loop for ~0.2 s here. Frozen, a full collection scans only what came after. Done once,
    in `serve` only: an embedding application (or the tests, building many engines in one
    process) keeps its own GC policy."""
    gc.collect()
    gc.freeze()


def serve(cfg: ServerConfig) -> int:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.host not in LOOPBACK and not cfg.api_key and not cfg.tenants_file:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use "
                    "the server", cfg.host)
    _engine, app = build(cfg)
    freeze_startup_heap()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=int(cfg.drain_timeout),
                            access_log=cfg.log_level == "debug")
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after its graceful shutdown, so the process
            # would die "by SIGTERM"; a drained SIGTERM is a clean exit (status 0) here.
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    server = _Server(config)
    log.info("serving on http://%s:%d/v1", cfg.host, cfg.port)
    server.run()
    return 0
