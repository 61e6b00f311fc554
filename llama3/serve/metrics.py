"""The server's Prometheus metrics (GET /metrics): requests, tokens, first-token times, the batch, the prefix cache."""

from __future__ import annotations

from starlette.responses import Response

from llama3.serve.engine import Engine


class Metrics:
    """Prometheus metrics in their own registry (several apps can live in one process: the tests)."""

    def __init__(self, engine: Engine):
        import prometheus_client as pc

        self.pc = pc
        self.registry = r = pc.CollectorRegistry()
        self.requests = pc.Counter("llama3_requests", "HTTP requests to /v1/", ["path", "status"], registry=r)
        self.prompt_tokens = pc.Counter("llama3_prompt_tokens", "prompt tokens of finished choices", registry=r)
        self.generation_tokens = pc.Counter("llama3_generation_tokens", "tokens generated", registry=r)
        self.ttft = pc.Histogram(
            "llama3_time_to_first_token_seconds",
            "from arrival to the first token, per choice",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        pc.Gauge("llama3_queue_length", "requests waiting for a row", registry=r).set_function(lambda: engine.waiting)
        pc.Gauge("llama3_batch_rows_used", "rows of the batch in use", registry=r).set_function(lambda: engine.running)
        pc.Gauge("llama3_batch_rows", "rows of the batch", registry=r).set(engine.max_batch_size)
        pc.Gauge("llama3_decode_steps", "decode steps run", registry=r).set_function(lambda: engine.steps)
        pc.Gauge("llama3_prefill_tokens_computed", "prompt tokens run through the model", registry=r).set_function(
            lambda: engine.prompt_tokens_computed
        )
        cache = engine.prefix_cache
        if cache is not None:  # see llama3.generate.prefix_cache
            for name, what, value in (
                ("hit_tokens", "prompt tokens copied from the prefix cache", lambda: cache.hit_tokens),
                ("tokens", "tokens the prefix cache holds", lambda: cache.tokens),
                ("max_tokens", "tokens the prefix cache may hold", lambda: cache.max_tokens),
                ("evicted_blocks", "blocks evicted from the prefix cache (LRU)", lambda: cache.evicted_blocks),
            ):
                pc.Gauge(f"llama3_prefix_cache_{name}", what, registry=r).set_function(value)

    def render(self) -> Response:
        return Response(self.pc.generate_latest(self.registry), media_type=self.pc.CONTENT_TYPE_LATEST)
