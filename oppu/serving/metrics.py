"""Operator metrics through Ray's metrics API (Ray dashboard and its Prometheus endpoint).

Every name starts with ``oppu_serve_``; Ray adds the ``ray_`` prefix on export.
"""

from __future__ import annotations

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class ServingMetrics:
    """The counters, histograms and gauges of one deployment replica.

    Ray Serve's metrics add the ``deployment``, ``replica`` and ``application`` tags themselves.
    """

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "oppu_serve_requests", description="Requests received, by route.",
            tag_keys=("route",))
        self.errors = metrics.Counter(
            "oppu_serve_errors", description="Requests answered with an error, by kind.",
            tag_keys=("kind",))
        self.cache = metrics.Counter(
            "oppu_serve_adapter_cache", description="Adapter cache lookups by tier (gpu, host) and outcome.",
            tag_keys=("tier", "outcome"))
        self.load_seconds = metrics.Histogram(
            "oppu_serve_adapter_load_seconds", description="Time to read, verify and decode an adapter "
            "from the store.", boundaries=LATENCY_BUCKETS_S)
        self.batch_size = metrics.Histogram(
            "oppu_serve_batch_size", description="Rows decoded together in one batch.",
            boundaries=BATCH_SIZE_BUCKETS)
        self.tokens = metrics.Counter(
            "oppu_serve_generated_tokens", description="Tokens generated.")
        self.tokens_per_s = metrics.Gauge(
            "oppu_serve_tokens_per_s", description="Generated tokens per second of the last batch.")
        self.resident_adapters = metrics.Gauge(
            "oppu_serve_resident_adapters", description="Adapters held per tier.",
            tag_keys=("tier",))

    def request(self, route: str) -> None:
        self.requests.inc(tags={"route": route})

    def error(self, kind: str) -> None:
        self.errors.inc(tags={"kind": kind})

    def cache_lookup(self, tier: str, hit: bool) -> None:
        self.cache.inc(tags={"tier": tier, "outcome": "hit" if hit else "miss"})

    def adapter_loaded(self, seconds: float) -> None:
        self.load_seconds.observe(seconds)

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        if tokens:
            self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_s.set(tokens / seconds)

    def resident(self, tier: str, count: int) -> None:
        self.resident_adapters.set(count, tags={"tier": tier})
