"""AsyncEngine: the engine stepping on a background thread, one output queue per request.

The step loop runs in its own thread (torch ops release the GIL), so the asyncio loop of a
server stays responsive. Requests are validated and tokenized on the caller's side
(`Engine.prepare` is pure); adds and aborts are handed to the step thread through an inbox and
applied between steps, so the engine itself is only ever touched by one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine, PreparedRequest
from loraplex.request import RequestOutput
from loraplex.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._adds: list[tuple[PreparedRequest, _Stream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> AsyncEngine:
        return cls(Engine(cfg))

    # ---- caller side ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                       request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None,
                       lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes. Closing the iterator (or
        cancelling the task) before then aborts the request and frees its resources."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        req = self.engine.prepare(prompt, params, request_id, prompt_token_ids, lora)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            self._streams[req.request_id] = stream
            self._adds.append((req, stream))
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        with self._cv:
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
                while not (self._adds or self._aborts or self._stopping
                           or eng.has_unfinished_requests):
                    self._cv.wait()
                if self._stopping and not eng.has_unfinished_requests and not self._adds:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            # Adds before aborts: an abort may target a request added in this same round.
            for req, _ in adds:
                try:
                    eng.add_prepared(req)
                except Exception as e:  # refused by the scheduler (e.g. does not fit the cache)
                    with self._cv:
                        self._deliver(req.request_id, e)
            for rid in aborts:
                eng.abort_request(rid)
                with self._cv:
                    self._streams.pop(rid, None)
            if not eng.has_unfinished_requests:
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
            with self._cv:
                for out in outputs:
                    self._deliver(out.request_id, out)
