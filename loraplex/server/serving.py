"""OpenAI completions and chat completions on top of `AsyncEngine`.

Everything a client can get wrong is checked before the request reaches the engine (model,
fields, prompt length, sampling ranges), so it is answered with a 4xx and never disturbs other
requests. A stream that loses its client closes its engine generator, which aborts the request
and frees its KV blocks and adapter pin; a non-streamed request watches for the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from loraplex.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from loraplex.engine.engine import RequestError
from loraplex.request import CompletionOutput, RequestOutput
from loraplex.sampling_params import SamplingParams, SamplingParamsError
from loraplex.server.adapters import AdapterResolver
from loraplex.server.errors import APIError, model_not_found
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import (
    MAX_PROMPTS,
    MAX_STOP_LEN,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)
from loraplex.server.tenants import LimitExceeded, Principal, Tenants

log = logging.getLogger(__name__)


# Characters that str.splitlines() (and so httpx's aiter_lines, and clients built on it)
# takes for line ends besides CR and LF, which json.dumps(ensure_ascii=False) leaves raw in
# strings (it escapes the C0 ones it would otherwise also split on: \x0b, \x0c, \x1c-\x1e).
# A generated token holding one would cut its event's JSON in two for such a client; escaped,
# the JSON text means the same.
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028",
                                     "\u2029": "\\u2029"})


def sse_event(ev: dict) -> bytes:
    """One server-sent event: `data: <JSON>` and a blank line, non-ASCII text as UTF-8 but
    every line-end character other than the event's own escaped."""
    text = json.dumps(ev, ensure_ascii=False)
    if not text.isascii():  # (translate costs ~4 us an event; isascii ~20 ns)
        text = text.translate(_SPLITLINES_ESCAPES)
    return b"data: " + text.encode() + b"\n\n"


@dataclass(slots=True)
class _Tracker:
    """Per-request latency bookkeeping for the metrics."""

    metrics: Metrics
    start: float = field(default_factory=time.monotonic)
    last: float | None = None
    tokens: dict[int, int] = field(default_factory=dict)  # choice index -> tokens seen

    def observe(self, key: int, out: CompletionOutput) -> None:
        new = len(out.token_ids) - self.tokens.get(key, 0)
        if new <= 0:
            return
        self.tokens[key] = len(out.token_ids)
        t = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(t - self.start)
        else:
            gap = (t - self.last) / new
            for _ in range(new):
                self.metrics.itl.observe(gap)
        self.last = t


class _Ticket:
    """A request counted against its tenant's limits: released exactly once, when the request
    ends however it ends (done, refused, client gone), with the tokens it used."""

    def __init__(self, tenants: Tenants | None, who: Principal | None, n_prompt: int) -> None:
        self.tenants, self.who, self.n_prompt = tenants, who, n_prompt
        self.generated: dict[str, int] = {}  # engine request id -> tokens generated so far
        self.released = False
        self.on_release: Callable[[], None] | None = None  # e.g. give back queued tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.on_release is not None:
                self.on_release()
            if self.tenants is not None:
                self.tenants.release(self.who, self.n_prompt + sum(self.generated.values()))


class _Outputs:
    """One engine request's outputs as the routes consume them: engine errors become API
    errors, the ticket counts generated tokens, closing aborts the request."""

    def __init__(self, stream: RequestStream, ticket: _Ticket) -> None:
        self.stream, self.ticket = stream, ticket

    async def accepted(self) -> None:
        """Wait until the engine has taken the request. Streams await this before their 200
        goes out, so an adapter unloaded between resolution and admission is still a 404."""
        try:
            await self.stream.accepted()
        except Exception as e:
            raise _api_error(e) from None

    def __aiter__(self) -> _Outputs:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.stream.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as e:
            self.stream.close()
            raise _api_error(e) from None
        except BaseException:  # cancelled (the client left): abort the request now
            self.stream.close()
            raise
        self.ticket.generated[self.stream.request_id] = sum(len(c.token_ids)
                                                            for c in out.outputs)
        return out

    async def aclose(self) -> None:
        self.stream.close()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, resolver: AdapterResolver, metrics: Metrics,
                 max_queued_requests: int, tenants: Tenants | None = None,
                 max_queued_tokens: int = 1 << 21) -> None:
        self.engine = engine
        self.resolver = resolver
        self.metrics = metrics
        self.max_queued = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.tokens_in_flight = 0  # prompt + max_tokens of every admitted, unfinished request
        self.tenants = tenants
        e = engine.engine
        self.tokenizer = e.tokenizer
        self.max_model_len = e.sched_config.max_model_len
        self.max_num_seqs = e.sched_config.max_num_seqs
        self.vocab_size = e.model_config.vocab_size
        # what the running batch can hold at once; accepted work beyond it is queued work
        self.kv_tokens = e.block_manager.num_blocks * e.block_manager.block_size

    # ---- shared steps -----------------------------------------------------------------------
    async def _resolve(self, model: str, raw: Request) -> str | None:
        """The adapter for `model`, if the caller may use it. Another tenant's adapter is
        answered exactly like one that does not exist, and is never loaded on its behalf."""
        if not Tenants.may_use(raw.scope.get("state", {}).get("principal"), model,
                               self.resolver.is_base(model)):
            raise model_not_found(model)
        return await self.resolver.resolve(model)

    def _ticket(self, raw: Request, n_prompt: int) -> _Ticket:
        """Count the request against its tenant's limits (429 + Retry-After beyond them)."""
        who = raw.scope.get("state", {}).get("principal")
        if self.tenants is not None:
            try:
                self.tenants.admit(who)
            except LimitExceeded as e:
                self.metrics.rejected.labels("tenant_limit").inc()
                raise APIError(429, str(e), headers={"Retry-After": str(e.retry_after)}) \
                    from None
        return _Ticket(self.tenants, who, n_prompt)

    def _tenant_of(self, ticket: _Ticket) -> tuple[str | None, float]:
        t = ticket.who.tenant if ticket.who is not None else None
        return (t.name, t.weight) if t is not None else (None, 1.0)

    def _admit(self, ticket: _Ticket, params: list[SamplingParams], prompt_lens: list[int]
               ) -> None:
        """Bounded queue, in requests and in tokens; beyond either bound, 429 + Retry-After.
        Requests: a full batch (`max_num_seqs`) plus `max_queued_requests` waiting. Tokens: the
        work accepted but unfinished (prompt + max_tokens of each sequence) may exceed what the
        KV cache holds at once by `max_queued_tokens`; with nothing in flight a request always
        gets in (it is bounded by the context length anyway). Counted at admission, so a burst
        is bounded before it runs; the ticket gives the tokens back when the request ends."""
        waiting = self.engine.num_in_flight - self.max_num_seqs
        if waiting >= self.max_queued:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"The server is at capacity ({waiting} requests waiting); "
                                "retry later.", headers={"Retry-After": "1"})
        work = sum((n + p.max_tokens) * p.n for n, p in zip(prompt_lens, params))
        queued = self.tokens_in_flight + work - self.kv_tokens
        if self.tokens_in_flight > 0 and queued > self.max_queued_tokens:
            self.metrics.rejected.labels("queue_tokens").inc()
            raise APIError(429, f"The server is at capacity ({self.tokens_in_flight} tokens of "
                                "work accepted); retry later.", headers={"Retry-After": "1"})
        self.tokens_in_flight += work

        def give_back() -> None:
            self.tokens_in_flight -= work

        ticket.on_release = give_back

    def _params(self, r: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                n_prompt: int, logprobs: int | None) -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        room = self.max_model_len - n_prompt
        if max_tokens is None:
            max_tokens = room  # what is left of the context, as vLLM does
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if any(len(s) > MAX_STOP_LEN for s in stop):
            raise APIError(400, f"stop strings are limited to {MAX_STOP_LEN} characters", "stop")
        if any(not 0 <= t < self.vocab_size for t in r.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be in [0, {self.vocab_size})",
                           "stop_token_ids")
        try:
            return SamplingParams(
                n=r.n, temperature=1.0 if r.temperature is None else r.temperature,
                top_p=1.0 if r.top_p is None else r.top_p,
                top_k=0 if r.top_k is None else r.top_k,
                min_p=0.0 if r.min_p is None else r.min_p,
                presence_penalty=r.presence_penalty or 0.0,
                frequency_penalty=r.frequency_penalty or 0.0,
                repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
                seed=r.seed, stop=stop, stop_token_ids=list(r.stop_token_ids or []),
                include_stop_str_in_output=r.include_stop_str_in_output,
                ignore_eos=r.ignore_eos, max_tokens=max_tokens, min_tokens=r.min_tokens or 0,
                logprobs=logprobs, skip_special_tokens=r.skip_special_tokens)
        except SamplingParamsError as e:
            raise APIError(400, str(e), e.param) from None

    def _check_length(self, n_prompt: int, max_tokens: int | None) -> None:
        if n_prompt >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens. However, your prompt has {n_prompt} tokens.", "messages")
        if max_tokens is not None and n_prompt + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens. However, you requested {n_prompt + max_tokens} tokens "
                                f"({n_prompt} in the prompt, {max_tokens} for the completion). "
                                "Please reduce the prompt or max_tokens.", "max_tokens")

    def _submit(self, prompt_ids: list[int], params: SamplingParams, lora: str | None,
                rid: str, ticket: _Ticket) -> _Outputs:
        """Enqueue now (so the queue bound counts it); the iterator maps engine errors to API
        errors, and closing it aborts the request."""
        tenant, weight = self._tenant_of(ticket)
        try:
            stream = self.engine.submit(None, params, rid, prompt_ids, lora, tenant, weight)
        except Exception as e:
            raise _api_error(e) from None
        return _Outputs(stream, ticket)

    async def _collect(self, streams: list[AsyncIterator[RequestOutput]], raw: Request,
                       tracker: _Tracker, n: int) -> list[RequestOutput] | None:
        """Run the request's engine streams to the end; abort them all and return None if the
        client leaves first."""
        async def drain(i: int, it: AsyncIterator[RequestOutput]) -> RequestOutput:
            last = None
            async for out in it:
                for c in out.outputs:
                    tracker.observe(i * n + c.index, c)
                last = out
            assert last is not None
            return last

        tasks = [asyncio.ensure_future(drain(i, it)) for i, it in enumerate(streams)]
        watcher = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            pending: set[asyncio.Future] = {*tasks, watcher}
            while not all(t.done() for t in tasks):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                    break  # result() below raises it
                if watcher.done() and not all(t.done() for t in tasks):
                    log.info("client disconnected; request aborted")
                    return None
            return [t.result() for t in tasks]
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()  # cancels the read of its _Outputs, which aborts an unfinished request
            await asyncio.gather(*tasks, watcher, return_exceptions=True)

    def _finish_metrics(self, tracker: _Tracker, n_prompt_tokens: int,
                        outs: list[RequestOutput]) -> None:
        m = self.metrics
        m.prompt_tokens.inc(n_prompt_tokens)
        m.generation_tokens.inc(sum(len(c.token_ids) for o in outs for c in o.outputs))
        m.e2e.observe(time.monotonic() - tracker.start)
        for o in outs:
            for c in o.outputs:
                m.request_finished(c.finish_reason)

    # ---- chat -------------------------------------------------------------------------------
    async def chat(self, r: ChatCompletionRequest, raw: Request):
        lora = await self._resolve(r.model, raw)
        if r.tools:
            raise APIError(400, "tools / function calling are not supported by this server.",
                           "tools")
        fmt = (r.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(400, f"response_format type {fmt!r} is not supported by this server "
                                "(structured output is not implemented); use type 'text'.",
                           "response_format")
        messages = []
        for i, m in enumerate(r.messages):
            if isinstance(m.content, list):
                texts = []
                for p in m.content:
                    if p.type != "text" or p.text is None:
                        raise APIError(400, f"messages[{i}].content: only text parts are "
                                            f"supported, got type {p.type!r}", "messages")
                    texts.append(p.text)
                content = "\n".join(texts)
            else:
                content = m.content or ""
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content})
        try:
            prompt_ids = self.tokenizer.encode_chat(messages)
        except Exception as e:  # a template that rejects the conversation (roles, order, ...)
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           "messages") from None
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None \
            else r.max_tokens
        self._check_length(len(prompt_ids), max_tokens)
        top = (r.top_logprobs or 0) if r.logprobs else None
        if r.top_logprobs and not r.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        params = self._params(r, max_tokens, len(prompt_ids), top)
        ticket = self._ticket(raw, len(prompt_ids))
        try:
            return await self._chat_run(r, raw, lora, prompt_ids, params, top, ticket)
        finally:
            if not r.stream:
                ticket.release()

    async def _chat_run(self, r: ChatCompletionRequest, raw: Request, lora: str | None,
                        prompt_ids: list[int], params: SamplingParams, top: int | None,
                        ticket: _Ticket):
        try:
            self._admit(ticket, [params], [len(prompt_ids)])
            await self.engine.prefetch(lora)
            rid = new_id("chatcmpl")
            stream = self._submit(prompt_ids, params, lora, rid, ticket)
            try:
                await stream.accepted()
            except BaseException:
                await stream.aclose()
                raise
        except BaseException:
            ticket.release()
            raise
        if r.stream:
            return self._sse(self._chat_stream(r, rid, stream, len(prompt_ids)), ticket)
        tracker = _Tracker(self.metrics)
        outs = await self._collect([stream], raw, tracker, r.n)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        (out,) = outs
        self._finish_metrics(tracker, len(prompt_ids), [out])
        choices = []
        for c in out.outputs:
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                "logprobs": self._chat_logprobs(c, 0, top) if top is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        n_out = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now(),
                             "model": r.model, "choices": choices,
                             "usage": usage(len(prompt_ids), n_out)})

    async def _chat_stream(self, r: ChatCompletionRequest, rid: str,
                           stream: AsyncIterator[RequestOutput], n_prompt: int
                           ) -> AsyncIterator[dict]:
        created, tracker = now(), _Tracker(self.metrics)
        top = (r.top_logprobs or 0) if r.logprobs else None
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        sent = _Sent()
        last: RequestOutput | None = None

        def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
            return _chunk(rid, "chat.completion.chunk", created, r.model, choices,
                          include_usage, usage_)

        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(r.n)])
            async for out in stream:
                last = out
                choices = []
                for c in out.outputs:
                    tracker.observe(c.index, c)
                    step = sent.advance(c.index, c)
                    if step is None:
                        continue
                    t0, k0, done = step
                    delta = {"content": c.text[t0:]} if len(c.text) > t0 else {}
                    choices.append({
                        "index": c.index, "delta": delta,
                        "logprobs": self._chat_logprobs(c, k0, top) if top is not None else None,
                        "finish_reason": c.finish_reason,
                        **({"stop_reason": c.stop_reason} if done else {})})
                if choices:
                    yield chunk(choices)
            if last is not None:
                self._finish_metrics(tracker, n_prompt, [last])
                if include_usage:
                    n_out = sum(len(c.token_ids) for c in last.outputs)
                    yield chunk([], usage(n_prompt, n_out))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def _chat_logprobs(self, c: CompletionOutput, start: int, top: int | None) -> dict:
        content = []
        for tid, lps in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            tok = self.tokenizer.decode([tid], skip_special_tokens=False)
            best = sorted(lps.items(), key=lambda kv: -kv[1])[:top or 0]
            content.append({
                "token": tok, "logprob": _finite(lps.get(tid)), "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": (t := self.tokenizer.decode([i], skip_special_tokens=False)),
                     "logprob": _finite(lp), "bytes": list(t.encode())} for i, lp in best]})
        return {"content": content}

    # ---- completions ------------------------------------------------------------------------
    async def completions(self, r: CompletionRequest, raw: Request):
        lora = await self._resolve(r.model, raw)
        if r.suffix:
            raise APIError(400, "suffix is not supported by this server.", "suffix")
        if r.best_of is not None and r.best_of != r.n:
            raise APIError(400, "best_of is not supported (only best_of == n).", "best_of")
        prompts = self._completion_prompts(r.prompt)
        for ids in prompts:
            self._check_length(len(ids), r.max_tokens)
        params_list = [self._params(r, r.max_tokens, len(ids), r.logprobs) for ids in prompts]
        n_prompt = sum(len(ids) for ids in prompts)
        ticket = self._ticket(raw, n_prompt)
        try:
            return await self._completions_run(r, raw, lora, prompts, params_list, ticket)
        finally:
            if not r.stream:
                ticket.release()

    async def _completions_run(self, r: CompletionRequest, raw: Request, lora: str | None,
                               prompts: list[list[int]], params_list: list[SamplingParams],
                               ticket: _Ticket):
        streams: list[_Outputs] = []
        try:
            self._admit(ticket, params_list, [len(ids) for ids in prompts])
            await self.engine.prefetch(lora)
            rid = new_id("cmpl")
            for i, (ids, p) in enumerate(zip(prompts, params_list)):
                streams.append(self._submit(ids, p, lora, f"{rid}-{i}", ticket))
            for st in streams:
                await st.accepted()
        except BaseException:
            for st in streams:
                await st.aclose()  # type: ignore[attr-defined]
            ticket.release()
            raise
        n_prompt = sum(len(ids) for ids in prompts)
        if r.stream:
            return self._sse(self._completion_stream(r, rid, prompts, streams, n_prompt), ticket)
        tracker = _Tracker(self.metrics)
        outs = await self._collect(streams, raw, tracker, r.n)
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        self._finish_metrics(tracker, n_prompt, outs)
        choices = []
        for i, out in enumerate(outs):
            echo = self._echo_text(prompts[i]) if r.echo else ""
            for c in out.outputs:
                choices.append({
                    "index": i * r.n + c.index, "text": echo + c.text,
                    "logprobs": self._completion_logprobs(c, 0, len(echo))
                    if r.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return JSONResponse({"id": rid, "object": "text_completion", "created": now(),
                             "model": r.model, "choices": choices,
                             "usage": usage(n_prompt, n_out)})

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(items) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
        out = []
        for p in items:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})",
                               "prompt")
            out.append(ids)
        return out

    def _echo_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _completion_stream(self, r: CompletionRequest, rid: str, prompts: list[list[int]],
                                 streams: list[AsyncIterator[RequestOutput]], n_prompt: int
                                 ) -> AsyncIterator[dict]:
        created, tracker = now(), _Tracker(self.metrics)
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in it:
                    await queue.put((i, out))
            except BaseException as e:
                await queue.put((i, e))
                raise
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
        sent = _Sent()
        finals: dict[int, RequestOutput] = {}
        open_streams = len(tasks)

        def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
            return _chunk(rid, "text_completion", created, r.model, choices, include_usage,
                          usage_)

        try:
            while open_streams:
                i, out = await queue.get()
                if out is None:
                    open_streams -= 1
                    continue
                if isinstance(out, BaseException):
                    raise out
                finals[i] = out
                choices = []
                for c in out.outputs:
                    key = i * r.n + c.index
                    tracker.observe(key, c)
                    echo = self._echo_text(prompts[i]) if r.echo and sent.first(key) else ""
                    step = sent.advance(key, c, force=bool(echo))
                    if step is None:
                        continue
                    t0, k0, done = step
                    choices.append({
                        "index": key, "text": echo + c.text[t0:],
                        "logprobs": self._completion_logprobs(c, k0, len(echo))
                        if r.logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        **({"stop_reason": c.stop_reason} if done else {})})
                if choices:
                    yield chunk(choices)
            outs = [finals[i] for i in sorted(finals)]
            self._finish_metrics(tracker, n_prompt, outs)
            if include_usage:
                yield chunk([], usage(n_prompt, sum(len(c.token_ids) for o in outs
                                                    for c in o.outputs)))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for st in streams:
                await st.aclose()  # type: ignore[attr-defined]

    def _completion_logprobs(self, c: CompletionOutput, start: int, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = offset
        for tid, lps in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            tok = self.tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append(tok)
            token_lps.append(_finite(lps.get(tid)))
            tops.append({self.tokenizer.decode([i], skip_special_tokens=False): _finite(lp)
                         for i, lp in sorted(lps.items(), key=lambda kv: -kv[1])})
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    # ---- SSE --------------------------------------------------------------------------------
    def _sse(self, events: AsyncIterator[dict], ticket: _Ticket) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for ev in events:
                    yield sse_event(ev)
            except APIError as e:
                yield sse_event(e.body())
            except Exception as e:  # after the 200 went out, an error can only be an event
                log.exception("stream failed")
                yield sse_event(error_body(f"internal error: {e}", "InternalServerError", 500))
            finally:
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]
                ticket.release()
            yield b"data: [DONE]\n\n"

        # The background task releases the ticket too (idempotent) if the body never ran.
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(ticket.release))


def _api_error(e: Exception) -> Exception:
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError):
        return APIError(404 if e.param == "model" else 400, str(e), e.param)
    if isinstance(e, EngineDeadError):
        return APIError(503, f"The engine is not serving: {e}")
    if isinstance(e, ValueError):  # refused by the scheduler (e.g. larger than the KV cache)
        return APIError(400, str(e))
    return e


class _Sent:
    """What a stream already sent per choice: text length and token count; finished choices
    are sent nothing more."""

    def __init__(self) -> None:
        self._text: dict[int, int] = {}
        self._tok: dict[int, int] = {}
        self._done: set[int] = set()

    def first(self, key: int) -> bool:
        return key not in self._text

    def advance(self, key: int, c: CompletionOutput, force: bool = False
                ) -> tuple[int, int, bool] | None:
        """(text sent so far, tokens sent so far, finished now), recording `c` as sent; None
        when there is nothing new for this choice."""
        if key in self._done:
            return None
        t0, k0 = self._text.get(key, 0), self._tok.get(key, 0)
        done = c.finish_reason is not None
        if not (done or force or len(c.text) > t0 or len(c.token_ids) > k0):
            return None
        self._text[key], self._tok[key] = len(c.text), len(c.token_ids)
        if done:
            self._done.add(key)
        return t0, k0, done


def _chunk(rid: str, obj: str, created: int, model: str, choices: list[dict],
           include_usage: bool, usage_: dict | None) -> dict:
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage_  # null on every chunk but the last, as OpenAI sends it
    return body


def _finite(x: float | None) -> float:
    """JSON has no -inf; OpenAI clients expect a number."""
    if x is None or x != x:
        return -9999.0
    return max(x, -9999.0)


async def _wait_disconnect(raw: Request) -> None:
    while True:
        msg = await raw.receive()
        if msg["type"] == "http.disconnect":
            return
