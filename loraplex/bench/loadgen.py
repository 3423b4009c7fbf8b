"""`loraplex bench serve`: a load generator for any OpenAI-compatible endpoint.

Arrivals are open-loop Poisson at `request_rate` (optionally capped at `concurrency` in flight)
or closed-loop (`concurrency` clients, each sending its next request when the last one ends).
Each request names a model drawn uniformly or Zipf-distributed over the given adapters; prompt
and output lengths are fixed or drawn from a distribution. Streams are timed chunk by chunk:
TTFT, inter-token latency (gap between content chunks, per token), time per output token, and
end-to-end latency. Token counts come from the server's `usage` (streams ask for it with
`stream_options.include_usage`), so they are the server's own tokenizer's counts.

Only the standard OpenAI request fields are sent, plus vLLM's `ignore_eos` when asked (so that
outputs have the requested length); servers that reject it can run with `ignore_eos=False`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

# Common English words; with BPE tokenizers " word" is one token for nearly all of them, so a
# prompt of n words is close to n tokens (the server's `usage` gives the exact count).
_WORDS_TEXT = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education river stone light green
"""
WORDS = tuple(_WORDS_TEXT.split())


class BenchError(ValueError):
    """A bad benchmark setting (the message says which)."""


@dataclass(frozen=True, slots=True)
class Lengths:
    """A length distribution: `fixed:N` (or just `N`), `uniform:A:B`, `exp:MEAN` (>= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> Lengths:
        parts = str(spec).split(":")
        try:
            if len(parts) == 1 or parts[0] == "fixed":
                n = int(parts[-1])
                if n < 1:
                    raise ValueError
                return cls("fixed", n)
            if parts[0] == "uniform" and len(parts) == 3:
                a, b = int(parts[1]), int(parts[2])
                if not 1 <= a <= b:
                    raise ValueError
                return cls("uniform", a, b)
            if parts[0] == "exp" and len(parts) == 2 and float(parts[1]) >= 1:
                return cls("exp", float(parts[1]))
        except ValueError:
            pass
        raise BenchError(f"length {spec!r}: use N, fixed:N, uniform:A:B or exp:MEAN (all >= 1)")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.expovariate(1.0 / self.a)))

    def __str__(self) -> str:
        return {"fixed": f"{int(self.a)}", "uniform": f"uniform:{int(self.a)}:{int(self.b)}",
                "exp": f"exp:{self.a:g}"}[self.kind]


@dataclass(slots=True)
class Workload:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    models: list[str]  # names to spread requests over (adapters, or the base name)
    num_requests: int = 100
    request_rate: float = math.inf  # requests/s (Poisson); inf = open the gates at once
    concurrency: int | None = None  # in flight at most; with rate inf = closed loop
    popularity: str = "uniform"  # or "zipf:S" (S > 0; rank 1 = models[0] most popular)
    prompt_len: Lengths = field(default_factory=lambda: Lengths("fixed", 64))
    output_len: Lengths = field(default_factory=lambda: Lengths("fixed", 64))
    endpoint: str = "completions"  # or "chat"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0
    warmup: int = 0  # untimed requests before the measured ones (one per model, up to this)

    def check(self) -> None:
        if not self.models:
            raise BenchError("no model to send requests to")
        if self.num_requests < 1:
            raise BenchError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.request_rate > 0:
            raise BenchError(f"request_rate must be > 0, got {self.request_rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise BenchError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.endpoint not in ("completions", "chat"):
            raise BenchError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        popularity_weights(self.popularity, len(self.models))


def popularity_weights(spec: str, n: int) -> list[float]:
    if spec == "uniform":
        return [1.0] * n
    if spec.startswith("zipf:"):
        try:
            s = float(spec[5:])
        except ValueError:
            s = -1.0
        if s > 0:
            return [1.0 / (i + 1) ** s for i in range(n)]
    raise BenchError(f"popularity {spec!r}: use uniform or zipf:S with S > 0")


@dataclass(slots=True)
class Planned:
    model: str
    prompt: str
    max_tokens: int
    at: float  # seconds after the start (open loop); 0 in closed loop


@dataclass(slots=True)
class Result:
    model: str
    ok: bool
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # seconds per token between content chunks
    start: float = 0.0


def plan(w: Workload) -> list[Planned]:
    """The requests, drawn up front from `w.seed` so two runs send the same work."""
    rng = random.Random(w.seed)
    weights = popularity_weights(w.popularity, len(w.models))
    t, out = 0.0, []
    for _ in range(w.num_requests):
        model = rng.choices(w.models, weights)[0]
        n = w.prompt_len.draw(rng)
        prompt = " ".join(rng.choice(WORDS) for _ in range(n))
        if math.isfinite(w.request_rate):
            t += rng.expovariate(w.request_rate)
        out.append(Planned(model, prompt, w.output_len.draw(rng), t))
    return out


def _body(w: Workload, p: Planned) -> dict:
    body: dict = {"model": p.model, "max_tokens": p.max_tokens, "temperature": w.temperature,
                  "stream": w.stream}
    if w.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    if w.stream:
        body["stream_options"] = {"include_usage": True}
    if w.ignore_eos:
        body["ignore_eos"] = True
    return body


def _content(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if chat:
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


async def _one(client: httpx.AsyncClient, w: Workload, p: Planned) -> Result:
    url = "/chat/completions" if w.endpoint == "chat" else "/completions"
    res = Result(p.model, ok=False, start=time.perf_counter())
    t0 = res.start
    try:
        if not w.stream:
            r = await client.post(url, json=_body(w, p))
            res.e2e = res.ttft = time.perf_counter() - t0
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}"
                return res
            usage = r.json().get("usage") or {}
            res.prompt_tokens = usage.get("prompt_tokens", 0)
            res.output_tokens = usage.get("completion_tokens", 0)
            res.ok = True
            return res
        async with client.stream("POST", url, json=_body(w, p)) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}"
                return res
            last, pieces, done, usage, first_choice = None, 0, False, {}, None
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if first_choice is None and chunk.get("choices"):
                    first_choice = time.perf_counter() - t0
                if _content(chunk, w.endpoint == "chat"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    pieces += 1
            res.e2e = time.perf_counter() - t0
            if not done:
                res.error = "stream ended without [DONE]"
                return res
            res.prompt_tokens = usage.get("prompt_tokens", 0)
            res.output_tokens = usage.get("completion_tokens", pieces)
            if pieces and res.output_tokens > pieces:  # several tokens per chunk: per token
                scale = (pieces - 1) / max(1, res.output_tokens - 1)
                res.itl = [g * scale for g in res.itl]
            if res.ttft is None:  # tokens that decode to no text (yet): first chunk counts
                res.ttft = first_choice
            res.ok = True
            return res
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.e2e = time.perf_counter() - t0
        res.error = type(e).__name__
        return res


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _dist_ms(xs: list[float]) -> dict:
    return {"mean": 1e3 * sum(xs) / len(xs) if xs else None,
            **{f"p{q}": (1e3 * v if (v := _pct(xs, q)) is not None else None)
               for q in (50, 90, 99)}}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.output_tokens > 1 and r.ttft is not None and r.e2e is not None]
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": errors, "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tok / duration if duration > 0 else None,
        "total_token_throughput": (in_tok + out_tok) / duration if duration > 0 else None,
        "prompt_tokens": in_tok, "output_tokens": out_tok,
        "ttft_ms": _dist_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _dist_ms([g for r in ok for g in r.itl]),
        "tpot_ms": _dist_ms(tpot),
        "e2e_ms": _dist_ms([r.e2e for r in ok if r.e2e is not None]),
        "per_model_completed": _count(r.model for r in ok),
    }


def _count(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


async def run(w: Workload, progress: bool = True) -> dict:
    """Send the workload; returns {"config", "summary"} (JSON-ready)."""
    w.check()
    planned = plan(w)
    headers = {"Authorization": f"Bearer {w.api_key}"} if w.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = _bar(len(planned), progress)
    async with httpx.AsyncClient(base_url=w.base_url.rstrip("/"), headers=headers,
                                 timeout=w.timeout, limits=limits) as client:
        for p in _warmup_set(w, planned):
            await _one(client, w, p)
        results: list[Result] = []
        # open loop with a cap: a semaphore; closed loop: `concurrency` client loops instead
        capped = w.concurrency and math.isfinite(w.request_rate)
        gate = asyncio.Semaphore(w.concurrency) if capped else None

        async def send(p: Planned) -> None:
            if gate is None:
                results.append(await _one(client, w, p))
            else:
                async with gate:
                    results.append(await _one(client, w, p))
            bar.update(1)
            if not results[-1].ok:
                bar.set_postfix(failed=sum(not r.ok for r in results), refresh=False)

        t0 = time.perf_counter()
        if math.isfinite(w.request_rate):
            tasks = []
            for p in planned:
                delay = p.at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(p)))
            await asyncio.gather(*tasks)
        elif w.concurrency:  # closed loop: `concurrency` clients back to back
            queue = list(reversed(planned))

            async def client_loop() -> None:
                while queue:
                    await send(queue.pop())

            await asyncio.gather(*[client_loop() for _ in range(w.concurrency)])
        else:
            await asyncio.gather(*[send(p) for p in planned])
        duration = time.perf_counter() - t0
    bar.close()
    cfg = asdict(w)
    cfg["prompt_len"], cfg["output_len"] = str(w.prompt_len), str(w.output_len)
    cfg["request_rate"] = None if math.isinf(w.request_rate) else w.request_rate
    cfg.pop("api_key")
    return {"config": cfg, "summary": summarize(results, duration)}


def _warmup_set(w: Workload, planned: list[Planned]) -> list[Planned]:
    seen, out = set(), []
    for p in planned:
        if len(out) >= w.warmup:
            break
        if p.model not in seen:
            seen.add(p.model)
            out.append(Planned(p.model, p.prompt, min(p.max_tokens, 4), 0.0))
    return out


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", disable=not enabled, file=sys.stderr,
                leave=False)


def discover_models(base_url: str, api_key: str | None, timeout: float = 30.0
                    ) -> tuple[str, list[str]]:
    """(the base model's name, the adapters) from GET /v1/models: entries with a `parent`
    (vLLM and loraplex mark adapters so) are adapters; the first entry without one is the base."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise BenchError(f"GET {base_url}/models answered {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise BenchError(f"{base_url}/models lists no model")
    adapters = [m["id"] for m in data if m.get("parent")]
    base = next((m["id"] for m in data if not m.get("parent")), data[0]["id"])
    return base, adapters


def print_summary(s: dict, file=sys.stdout) -> None:
    def d(key: str) -> str:
        v = s[key]
        return " / ".join("-" if v[q] is None else f"{v[q]:.1f}" for q in ("p50", "p90", "p99"))

    rt = s["request_throughput"] or 0.0
    print(f"requests {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f}s: "
          f"{rt:.2f} req/s, {s['output_throughput'] or 0:.1f} output tok/s, "
          f"{s['total_token_throughput'] or 0:.1f} total tok/s", file=file)
    print(f"  TTFT ms p50/p90/p99 {d('ttft_ms')} | ITL {d('itl_ms')} | TPOT {d('tpot_ms')} | "
          f"E2E {d('e2e_ms')}", file=file)
    if s["errors"]:
        print(f"  errors: {s['errors']}", file=file)
