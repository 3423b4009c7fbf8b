"""FastAPI routes. Every refusal leaves as OpenAI's error body with the right status; a client
mistake never becomes a 500 and never touches other requests."""

from __future__ import annotations

import hmac
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.engine.async_engine import AsyncEngine
from loraplex.lora.adapter import AdapterExistsError, LoRAError
from loraplex.server.adapters import AdapterResolver
from loraplex.server.errors import APIError
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    error_body,
    model_card,
    now,
)
from loraplex.server.serving import OpenAIServing
from loraplex.server.tenants import Principal, Tenants

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20  # far above any chat request; refuses memory-exhausting bodies


def runtime_lora_from_env() -> bool:
    """vLLM's switch for the load/unload endpoints."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")


@dataclass(slots=True)
class AppOptions:
    served_model_names: list[str]
    lora_dir: str | None = None
    api_key: str | None = None
    enable_runtime_lora: bool = False
    max_queued_requests: int = 256
    max_queued_tokens: int = 1 << 21
    tenants: Tenants | None = None
    lora_parents: dict[str, str] = field(default_factory=dict)  # name -> listed parent


class _Guard:
    """ASGI middleware: API key on every route but /health, and a cap on body size. Keys are
    compared in constant time and never logged. With tenants, the key says who is calling: the
    Principal goes to the routes in the request state (no tenants: None, full access)."""

    def __init__(self, app: ASGIApp, api_key: str | None, tenants: Tenants | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if (self.key is not None or self.tenants is not None) and scope.get("path") != "/health":
            auth = headers.get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if self.tenants is not None:
                principal = self.tenants.identify(token)
                ok = principal is not None
                scope.setdefault("state", {})["principal"] = principal
            else:
                ok = hmac.compare_digest(token, self.key)
            if not ok:
                err = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer "
                                    "<key>').")
                return await JSONResponse(err.body(), 401)(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            err = APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
            return await JSONResponse(err.body(), 413)(scope, receive, send)
        return await self.app(scope, receive, send)


def principal_of(raw: Request) -> Principal | None:
    """Who sent `raw` (set by _Guard when tenants are configured; None = full access)."""
    return raw.scope.get("state", {}).get("principal")


def build_app(engine: AsyncEngine, opts: AppOptions) -> FastAPI:
    eng = engine.engine
    base = opts.served_model_names[0]
    metrics = Metrics(lambda: engine.stats, base)
    if eng.lora is not None:
        # the loads made before the app existed (--lora-modules at start-up) first, so that
        # the histogram's count is loraplex_adapter_loads_total
        for seconds in list(eng.lora.load_seconds):
            metrics.adapter_load_seconds.observe(seconds)
        eng.lora.on_load = metrics.adapter_load_seconds.observe
    resolver = AdapterResolver(engine, opts.served_model_names, opts.lora_dir)
    serving = OpenAIServing(engine, resolver, metrics, opts.max_queued_requests, opts.tenants,
                            opts.max_queued_tokens)
    created = now()
    runtime_lora = opts.enable_runtime_lora or runtime_lora_from_env()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # uvicorn has stopped accepting and waited for open responses; drain what is left.
        log.info("shutting down: draining %d in-flight request(s)", engine.num_in_flight)
        engine.shutdown(timeout=60)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = serving
    app.state.tenants = opts.tenants
    app.add_middleware(_Guard, api_key=opts.api_key, tenants=opts.tenants)

    # ---- errors -----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        parts, param = [], None
        for err in errs[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (loc[0] if loc else None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("; ".join(parts) or "invalid request",
                                       "BadRequestError", 400, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(e.status_code,
                                                                         "BadRequestError")
        return JSONResponse(error_body(str(e.detail), kind, e.status_code), e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}",
                                       "InternalServerError", 500), 500)

    # ---- routes -----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine._dead is not None:
            return JSONResponse(error_body("engine stopped", "ServiceUnavailableError", 503),
                                503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def cards(who: Principal | None) -> list[dict[str, Any]]:
        """The models `who` may use: a tenant sees only its own adapters."""
        out = [model_card(n, str(eng.model_path), None, serving.max_model_len, created)
               for n in opts.served_model_names if Tenants.may_use(who, n, is_base=True)]
        out += [model_card(a.name, str(a.path), opts.lora_parents.get(a.name, base),
                           serving.max_model_len, created)
                for a in engine.list_loras() if Tenants.may_use(who, a.name, is_base=False)]
        return out

    @app.get("/v1/models")
    async def models(raw: Request) -> dict:
        return {"object": "list", "data": cards(principal_of(raw))}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, raw: Request) -> dict:
        for c in cards(principal_of(raw)):
            if c["id"] == model_id:
                return c
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        return await serving.chat(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await serving.completions(body, raw)

    def require_runtime_lora() -> None:
        if not runtime_lora:
            raise APIError(404, "Runtime adapter loading is disabled; start the server with "
                                "--enable-runtime-lora (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).")
        if eng.lora is None:
            raise APIError(400, "LoRA is not enabled on this server.")

    def require_admin(raw: Request) -> None:
        # Whatever the adapter name: the answer must not tell a tenant what exists.
        if opts.tenants is not None and not getattr(principal_of(raw), "admin", False):
            raise APIError(403, "Loading and unloading adapters needs an admin key.")

    def already_loaded(name: str) -> APIError:
        return APIError(400, f"The lora adapter '{name}' has already been loaded. "
                             "Pass load_inplace=true to replace it.", "lora_name")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoRAAdapterRequest, raw: Request) -> PlainTextResponse:
        require_admin(raw)
        require_runtime_lora()
        name = body.lora_name
        if resolver.is_base(name):
            raise APIError(400, f"`{name}` is the base model's name.", "lora_name")
        if resolver.registered(name) and not body.load_inplace:
            raise already_loaded(name)
        if not os.path.isdir(body.lora_path):
            raise APIError(404, f"No adapter folder at '{body.lora_path}'.", "lora_path")
        try:
            await engine.add_lora(name, body.lora_path, replace=body.load_inplace)
        except AdapterExistsError:  # registered while this one was being read
            raise already_loaded(name) from None
        except LoRAError as e:
            raise APIError(400, f"Failed to load adapter '{name}': {e}", "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoRAAdapterRequest, raw: Request) -> PlainTextResponse:
        require_admin(raw)
        require_runtime_lora()
        if not await engine.remove_lora(body.lora_name):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                           "lora_name")
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/version")
    async def version() -> dict:
        return {"version": "0.1.0"}

    return app
