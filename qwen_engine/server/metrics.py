"""The Prometheus metrics of `/metrics`: requests, tokens and latencies counted by the server, queue and KV-cache
occupancy read from the engine's `stats()` at each scrape."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.serving import ServingEngine

ENGINE_GAUGES = {  # gauge name: (description, key of ServingEngine.stats())
    "qwen_requests_waiting": ("Sequences waiting for a slot", "waiting"),
    "qwen_requests_running": ("Sequences in the running batch", "running"),
    "qwen_kv_blocks_free": ("Free KV-cache blocks", "kv_blocks_free"),
    "qwen_kv_blocks_used": ("KV-cache blocks in use", "kv_blocks_used"),
    "qwen_kv_blocks_total": ("KV-cache blocks", "kv_blocks_total"),
}


class Metrics:
    def __init__(self, engine: ServingEngine, in_flight: Callable[[], int]) -> None:
        self.registry = registry = CollectorRegistry()
        self.http = Counter("qwen_http_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
        self.prompt_tokens = Counter("qwen_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("qwen_generation_tokens", "Generated tokens", registry=registry)
        self.finished = Counter("qwen_sequences_finished", "Finished sequences by reason", ["reason"], registry=registry)
        self.ttft = Histogram("qwen_time_to_first_token_seconds", "Arrival to first token", registry=registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.latency = Histogram("qwen_request_latency_seconds", "Arrival to last token", registry=registry,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        Gauge("qwen_requests_in_flight", "HTTP requests being served", registry=registry).set_function(in_flight)
        for name, (description, key) in ENGINE_GAUGES.items():
            Gauge(name, description, registry=registry).set_function(lambda key=key: engine.stats()[key])
