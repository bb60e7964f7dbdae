"""Operator metrics through Ray's metrics API (Ray dashboard and its Prometheus endpoint).

Every name starts with ``oppu_serve_``; Ray adds the ``ray_`` prefix on export.
"""

from __future__ import annotations

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
ITL_BUCKETS_S = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5]


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
        self.ttft = metrics.Histogram(
            "oppu_serve_time_to_first_token_seconds", description="From a request's arrival at the model "
            "replica to its first token (per choice).", boundaries=TTFT_BUCKETS_S)
        self.itl = metrics.Histogram(
            "oppu_serve_inter_token_latency_seconds", description="Time between two tokens of one choice.",
            boundaries=ITL_BUCKETS_S)
        self.prompt_token_count = metrics.Counter(
            "oppu_serve_prompt_tokens", description="Prompt tokens of accepted requests.")
        self.completion_token_count = metrics.Counter(
            "oppu_serve_completion_tokens", description="Tokens generated (every choice).")
        # Kept for the Grafana dashboard (cluster/grafana): the running batch and generation rate as
        # seen when a request finishes.
        self.batch_size = metrics.Histogram(
            "oppu_serve_batch_size", description="Rows in the running decode batch when a request finishes.",
            boundaries=BATCH_SIZE_BUCKETS)
        self.tokens = metrics.Counter(
            "oppu_serve_generated_tokens", description="Tokens generated (the same count as completion_tokens).")
        self.tokens_per_s = metrics.Gauge(
            "oppu_serve_tokens_per_s", description="Tokens generated per second since the previous finished request.")
        self.sequences = metrics.Gauge(
            "oppu_serve_sequences", description="Sequences in the running decode batch and waiting for a row.",
            tag_keys=("state",))
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

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def prompt_tokens(self, n: int) -> None:
        if n:
            self.prompt_token_count.inc(n)

    def completion_tokens(self, n: int) -> None:
        if n:
            self.completion_token_count.inc(n)
            self.tokens.inc(n)

    def running(self, running: int, waiting: int, tokens_per_s: float | None = None) -> None:
        self.sequences.set(running, tags={"state": "running"})
        self.sequences.set(waiting, tags={"state": "waiting"})
        self.batch_size.observe(running)
        if tokens_per_s is not None:
            self.tokens_per_s.set(tokens_per_s)

    def resident(self, tier: str, count: int) -> None:
        self.resident_adapters.set(count, tags={"tier": tier})
