"""GET /metrics in Prometheus' text format, through prometheus-client (one registry per app, in
app.state.metrics: no process-global state). Engine numbers are read from each engine's counters when
scraped; each engine step's phase times feed a histogram as they happen (engine.on_step, on the engine's
thread: prometheus-client's metrics are thread-safe)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.engine.engine import StepPhases
from ember.serving.models import FIREWORKS_PREFIX, Model, ModelRegistry, ServedModel

router = APIRouter()

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENDPOINTS = frozenset({"chat.completions", "completions", "responses", "embeddings", "models", "usage",
                       "engine.stats", "files", "batches"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# (stats key, metric name, help); counters are monotonic engine counters, gauges are read as they are
COUNTERS = [("prompt_tokens", "ember_prompt_tokens", "prompt tokens computed (not served from the prefix cache)"),
            ("cached_tokens", "ember_cached_prompt_tokens", "prompt tokens served from the prefix cache"),
            ("generated_tokens", "ember_generated_tokens", "tokens generated"),
            ("requests", "ember_engine_requests", "requests the engine accepted"),
            ("steps", "ember_engine_steps", "engine steps run"),
            ("preemptions", "ember_preemptions", "sequences preempted for lack of KV blocks")]
GAUGES = [("num_running", "ember_sequences_running", "sequences in the running batch"),
          ("num_waiting", "ember_sequences_waiting", "sequences waiting to be scheduled"),
          ("kv_blocks_used", "ember_kv_blocks_used", "KV blocks held by sequences"),
          ("kv_blocks_cached", "ember_kv_blocks_cached", "KV blocks holding a cached prefix"),
          ("kv_blocks_total", "ember_kv_blocks_total", "KV blocks in the cache")]


class EngineCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator:
        """An embedding model has no KV cache: it reports only the counters it has (tokens, requests, passes)."""
        stats = {m.name: m.engine.stats() for m in self.models.all()}
        for kind, metrics in ((CounterMetricFamily, COUNTERS), (GaugeMetricFamily, GAUGES)):
            for key, name, help_ in metrics:
                family = kind(name, help_, labels=["model"])
                for model, s in stats.items():
                    if key in s:
                        family.add_metric([model], s[key])
                yield family
        ratio = GaugeMetricFamily("ember_prefix_cache_hit_ratio", "cached / (cached + computed) prompt tokens",
                                  labels=["model"])
        for model, s in stats.items():
            if "cached_tokens" not in s:
                continue
            total = s["cached_tokens"] + s["prompt_tokens"]
            ratio.add_metric([model], s["cached_tokens"] / total if total else 0.0)
        yield ratio


class Metrics:
    """The app's registry and the metrics Ember observes as events happen."""

    def __init__(self, models: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(models))
        self.models = {m.name for m in models}
        self.step_seconds = Histogram("ember_engine_step_seconds", "engine step time by phase",
                                      ["model", "phase"], buckets=STEP_BUCKETS, registry=self.registry)
        self.requests = Counter("ember_requests", "API requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.ttft = Histogram("ember_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("ember_e2e_request_latency_seconds", "request latency, arrival to last byte",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("ember_request_queue_seconds", "time waiting for the first engine step", ["model"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("ember_inter_token_latency_seconds", "gaps between a request's tokens",
                                     ["model"], buckets=STEP_BUCKETS, registry=self.registry)
        self.batch_lines = Counter("ember_batch_requests", "batch job lines committed, by outcome", ["outcome"],
                                   registry=self.registry)
        self.batch_in_flight = Gauge("ember_batch_requests_in_flight", "batch job lines being generated now",
                                     registry=self.registry)
        for m in models.generators():
            m.engine.engine.on_step = self._step_observer(m.name)
        models.on_load.append(self.add_model)

    def add_model(self, model: Model) -> None:
        """A model loaded after start-up (a deployment's replica): its requests and steps get its label."""
        self.models.add(model.name)
        if isinstance(model, ServedModel):
            model.engine.engine.on_step = self._step_observer(model.name)

    def observe_request(self, endpoint: str, model: str, status: int, ttft: float | None, latency: float,
                        queue: float | None, gaps: list[float]) -> None:
        # labels only from known values: a client naming random models or paths must not grow the registry
        model = model.removeprefix(FIREWORKS_PREFIX)
        label = model if model in self.models else "unknown"
        self.requests.labels(endpoint if endpoint in ENDPOINTS else "other", label, str(status)).inc()
        if status >= 400:
            return
        self.latency.labels(label).observe(latency)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)
        if queue is not None:
            self.queue.labels(label).observe(queue)
        inter_token = self.inter_token.labels(label)
        for gap in gaps:
            inter_token.observe(gap)

    def _step_observer(self, model: str) -> Callable[[StepPhases], None]:
        phases = {p: self.step_seconds.labels(model, p) for p in
                  ("schedule", "prepare", "forward", "sample", "postprocess")}

        def observe(step: StepPhases) -> None:
            for phase, histogram in phases.items():
                histogram.observe(getattr(step, phase))
        return observe


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
