"""Prometheus metrics, prefix `cogserve:`, named after vLLM's so dashboards and autoscalers map over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"cogserve:{name}", doc, labels, registry=registry).labels(model_name)

        def counter(name, doc):
            return Counter(f"cogserve:{name}", doc, labels, registry=registry).labels(model_name)

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"cogserve:{name}", doc, labels, buckets=buckets, registry=registry).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting for a slot (queue depth)")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Share of KV blocks in use, 0 to 1")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.encoder_cache_hits = counter("encoder_cache_hits", "Images whose vision features were cached")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (recomputed later)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens, image slots included")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.request_success = Counter(
            "cogserve:request_success", "Finished requests", ["model_name", "finished_reason"], registry=registry
        )
        self.http_responses = Counter(
            "cogserve:http_responses", "HTTP responses by status code", ["model_name", "status"], registry=registry
        )
        self.model_name = model_name
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Between streamed tokens", TOKEN_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to last token")
        self.request_queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled")
        self.image_fetch = histogram("image_fetch_seconds", "Fetching and decoding an image")
        self.vision_encode = histogram("vision_encode_seconds", "One batched vision-tower call")

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def responded(self, status: int) -> None:
        self.http_responses.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
