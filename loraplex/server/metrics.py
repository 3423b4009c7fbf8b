"""Prometheus metrics under vLLM's names (so dashboards and LoRA-affinity routers work
unchanged) plus `loraplex_adapter_*` for the adapter tiers.

Gauges and the adapter counters are read at scrape time from the engine's latest
`EngineStats` snapshot (taken on the step thread, so never half-updated); latencies and token
counts are observed by the API layer as outputs reach clients. Each server owns its own
registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.engine import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LOAD_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        lbl = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=lbl)
            g.add_metric([self._model], value)
            return g

        yield gauge("vllm:num_requests_running", "Sequences running in the batch.",
                    s.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be admitted.",
                    s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                    s.kv_cache_usage)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running and waiting LoRA adapters; value = timestamp.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters),
                         str(s.max_loras)], time.time())
        yield info
        c = s.lora_counters
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter reads from disk.",
                                    labels=lbl)
        loads.add_metric([self._model], c.get("loads", 0))
        yield loads
        for metric, doc, per_tier in (
                ("loraplex_adapter_evictions", "Adapters evicted from a tier.",
                 {"device": "evictions", "cpu": "cpu_evictions"}),
                ("loraplex_adapter_cache_hits", "Adapter found resident in a tier.",
                 {"device": "slot_hits", "cpu": "cpu_hits"}),
                ("loraplex_adapter_cache_misses", "Adapter not resident in a tier.",
                 {"device": "slot_misses", "cpu": "cpu_misses"})):
            fam = CounterMetricFamily(metric, doc, labels=["tier"])
            for tier, key in per_tier.items():
                fam.add_metric([tier], c.get(key, 0))
            yield fam
        yield gauge("loraplex_adapters_registered", "Adapters registered (servable by name).",
                    s.num_registered_adapters)
        yield gauge("loraplex_adapters_cpu_resident", "Adapter versions held in CPU memory.",
                    s.num_cpu_adapters)
        yield gauge("loraplex_adapter_pins", "Sequences holding an adapter pin.", s.num_pinned)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        self.model_name = model_name
        r.register(_EngineCollector(stats, model_name))
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              lbl, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.",
                             lbl, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency end to end.",
                             lbl, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", lbl,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", lbl,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Requests finished.",
                                ["model_name", "finished_reason"], registry=r)
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds", "Reading and validating an adapter from disk.",
            buckets=_LOAD_BUCKETS, registry=r)
        self.rejected = Counter("loraplex_requests_rejected", "Requests refused before running.",
                                ["reason"], registry=r)

    def request_finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
