"""The server's Prometheus metrics, in a registry of its own (one per app, so two apps in one
process, or a test and its server, never share counters)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

# Seconds: 10 ms (a small batch on a GPU) to 10 minutes (a queue under load on a CPU).
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("sdrt_queue_depth", "Requests waiting for the worker",
                                 registry=r)
        self.batch_size = Histogram("sdrt_batch_size", "Images per pipeline call",
                                    buckets=_BATCH, registry=r)
        self.stage_seconds = Histogram(
            "sdrt_stage_seconds", "Seconds per stage: queue (waiting), text, denoise, decode "
            "(per pipeline call), encode (PNG), total (per request)", ["stage"],
            buckets=_SECONDS, registry=r)
        self.requests = Counter("sdrt_requests_total", "Answered requests by endpoint and "
                                "status code", ["endpoint", "status"], registry=r)
        self.batch_fallbacks = Counter(
            "sdrt_batch_fallbacks_total", "Pipeline calls that failed with several requests "
            "(or rows) and were run again one at a time", registry=r)
        self.accepted = Counter("sdrt_requests_accepted_total", "Requests taken into the "
                                "queue", registry=r)
        self.images = Counter("sdrt_images_total", "Images generated", registry=r)
        self.errors = Counter("sdrt_errors_total", "Refused or failed requests by kind",
                              ["kind"], registry=r)
        self.plan_builds = Counter("sdrt_static_plan_builds_total", "Static plans built",
                                   registry=r)
        self.plan_build_seconds = Histogram("sdrt_static_plan_build_seconds",
                                            "Seconds per static plan build", buckets=_SECONDS,
                                            registry=r)
        self.ready = Gauge("sdrt_ready", "1 once the model is loaded and its plans built",
                           registry=r)

    def text(self):
        return generate_latest(self.registry)
