"""AsyncEngine: the engine stepping on a background thread, one output queue per request.

The step loop runs in its own thread (torch ops release the GIL), so the asyncio loop of a
server stays responsive. Requests are validated and tokenized on the caller's side
(`Engine.prepare` is pure); adds, aborts and registry changes are handed to the step thread
through an inbox and applied between steps, so the engine itself is only ever mutated by one
thread. Disk reads of adapters (a runtime load, or a CPU-tier copy that was dropped) run on a
side thread before that hand-off, so a cold adapter never stalls the running batch; that thread
runs its torch ops without an OpenMP team (`side_thread.py` says why: with a team, every step
after the first load was ~1.5x slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine, EngineStats, PreparedRequest
from loraplex.engine.side_thread import side_executor
from loraplex.lora.adapter import LoRAAdapter
from loraplex.request import RequestOutput
from loraplex.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # Settled by the step thread once the engine has taken the request (result None) or
    # refused it (result: the exception; a result, not set_exception, so that nobody has to
    # retrieve it). Lets a server refuse with a status code before committing to a 200.
    accepted: asyncio.Future


class RequestStream:
    """The outputs of one submitted request. Closing it (or dropping it) before the request
    finishes aborts the request, freeing its KV blocks and adapter pin."""

    def __init__(self, owner: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._owner = owner
        self.request_id = request_id
        self._queue = stream.queue
        self._accepted = stream.accepted
        self._done = False

    async def accepted(self) -> None:
        """Return once the engine has taken the request (its adapter version pinned, so it can
        no longer vanish under it); raise what refused it otherwise."""
        error = await asyncio.shield(self._accepted)
        if error is not None:
            self._done = True
            raise error

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._owner.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class AsyncEngine:
    """An Engine stepped on its own thread, for asyncio callers.

    Pass a built Engine, or (better) a function that builds one: it then runs on the step
    thread itself. Measured on the CPU: an engine loaded on one thread and stepped on another
    decodes ~1.5x slower (one stream: 45-52 ms vs 30 ms per token) than one loaded and stepped
    on the same thread: the loading thread keeps the OpenMP team its torch ops started, and
    two teams on two cores throttle each other (side_thread.py). The constructor returns once
    the engine is built, and re-raises what building it raised."""

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        self._cv = threading.Condition()
        self._adds: list[tuple[PreparedRequest, _Stream]] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[Engine], Any], asyncio.Future]] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._loader = side_executor("loraplex-loader")  # adapter reads, off the step path
        ready, failed = threading.Event(), []

        def main() -> None:
            try:
                self.engine = engine if isinstance(engine, Engine) else engine()
                self.stats = self.engine.stats()  # refreshed by the step thread
            except BaseException as e:  # handed to the constructor's caller
                failed.append(e)
                return
            finally:
                ready.set()
            self._run()

        self.engine: Engine
        self.stats: EngineStats
        self._thread = threading.Thread(target=main, name="loraplex-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> AsyncEngine:
        return cls(lambda: Engine(cfg))

    # ---- caller side ------------------------------------------------------------------------
    def submit(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
               request_id: str | None = None, prompt_token_ids: list[int] | None = None,
               lora: str | None = None, tenant: str | None = None,
               tenant_weight: float = 1.0) -> RequestStream:
        """Validate and enqueue a request now (synchronously: arrival order is call order, and
        `num_in_flight` counts it at once); iterate the returned stream for its outputs."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        req = self.engine.prepare(prompt, params, request_id, prompt_token_ids, lora, tenant,
                                  tenant_weight)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        with self._cv:
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            self._streams[req.request_id] = stream
            self._adds.append((req, stream))
            self._cv.notify()
        return RequestStream(self, req.request_id, stream)

    async def prefetch(self, lora: str | None) -> None:
        """If `lora`'s CPU copy was dropped, read it back on a worker thread now, so admitting
        the request does not read disk on the step thread."""
        lm = self.engine.lora
        if lora is None or lm is None:
            return
        stale = lm.needs_reload(lora)
        if stale is None:
            return
        try:
            fresh = await self._off_step(lm.load, stale.name, stale.path)
        except Exception:  # the step thread retries at pin time and reports the error there
            log.warning("re-reading adapter %r off the step path failed", lora, exc_info=True)
            return
        await self.call(lambda eng: lm.install_copy(fresh))

    async def generate(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                       request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes. Closing the iterator (or
        cancelling the task) before then aborts the request and frees its resources."""
        await self.prefetch(lora)
        stream = self.submit(prompt, params, request_id, prompt_token_ids, lora)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the step thread between steps; its result or exception is ours."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        fut = asyncio.get_running_loop().create_future()
        with self._cv:
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            self._calls.append((fn, fut))
            self._cv.notify()
        return await fut

    async def add_lora(self, name: str, path: str, replace: bool = True) -> LoRAAdapter:
        """Read and validate on the loader thread, then register between steps. replace=False:
        raise AdapterExistsError if the name is registered by then (checked at registration,
        so a name registered while this one was being read is not replaced)."""
        lm = self.engine._lora_manager()
        ad = await self._off_step(lm.load, name, path)
        return await self.call(lambda eng: eng._lora_manager().register(ad, replace))

    async def remove_lora(self, name: str) -> bool:
        return await self.call(lambda eng: eng.remove_lora(name))

    async def _off_step(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the loader thread (never asyncio's default executor: see above)."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def list_loras(self) -> list[LoRAAdapter]:
        return self.engine.list_loras()

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request stops counting as in flight at once."""
        with self._cv:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
            self._cv.notify()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self._loader.shutdown(wait=False)

    # ---- step thread ------------------------------------------------------------------------
    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[rid]
        # RuntimeError: the caller's loop is closed, nobody is listening.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not (self._adds or self._aborts or self._calls or self._stopping
                           or eng.has_unfinished_requests):
                    self._cv.wait()
                if self._stopping and not (eng.has_unfinished_requests or self._adds
                                           or self._calls):
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                try:
                    result, error = fn(eng), None
                except Exception as e:
                    result, error = None, e
                self._resolve(fut, result, error)
            # Adds before aborts: an abort may target a request added in this same round.
            for req, stream in adds:
                try:
                    eng.add_prepared(req)
                except Exception as e:  # refused (adapter gone, does not fit the cache, ...)
                    with self._cv:  # no longer in flight before anyone hears of the refusal
                        self._deliver(req.request_id, e)
                    self._resolve(stream.accepted, e, None)
                else:
                    self._resolve(stream.accepted, None, None)
            for rid in aborts:
                eng.abort_request(rid)
                with self._cv:
                    self._streams.pop(rid, None)
            if not eng.has_unfinished_requests:
                self.stats = eng.stats()
                continue
            try:
                outputs = eng.step()
            except Exception as e:  # a bug or device error: fail in-flight requests, keep serving
                log.exception("engine step failed; aborting %d in-flight request(s)",
                              eng.num_requests)
                with self._cv:
                    for rid in list(self._streams):
                        eng.abort_request(rid)
                        self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            self.stats = eng.stats()
            with self._cv:
                for out in outputs:
                    self._deliver(out.request_id, out)

    @staticmethod
    def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if fut.cancelled():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            fut.get_loop().call_soon_threadsafe(settle)
