"""Prometheus metrics of `decal serve` (GET /metrics), in a registry of their own per server.

requests (by endpoint and status), errors by kind, request latency, batch sizes and batch
seconds, queue depth, decisions by label, deferrals and the deferral ratio, the calibrated
confidence histogram, the label mass (histogram, mean, and the share of decisions below
`decal.metrics.LOW_LABEL_MASS`, as `decal metrics` reports them), and readiness.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["ServeMetrics", "ERROR_KINDS"]

# error kind by HTTP status, for decal_errors_total{kind=...}
ERROR_KINDS = {
    401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 422: "invalid_request",
    500: "internal", 503: "unavailable", 504: "timeout",
}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CONFIDENCE_BUCKETS = (*(i / 20 for i in range(1, 20)), 0.99, 0.999, 1.0)
_MASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class ServeMetrics:
    """The server's metrics; `render()` gives the Prometheus text exposition."""

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("decal_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"], registry=r)
        self.errors = Counter("decal_errors", "Requests answered with an error, by kind.", ["kind"], registry=r)
        self.latency = Histogram(
            "decal_request_duration_seconds", "Seconds from request start to response, by endpoint.", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram("decal_batch_size", "Inputs per scored batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("decal_batch_duration_seconds", "Seconds per scored batch.", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("decal_queue_depth", "Inputs waiting for a batch.", registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        self.decisions = Counter("decal_decisions", "Decisions returned, by decided label.", ["label"], registry=r)
        self.deferred = Counter("decal_deferred", "Decisions returned with defer=true.", registry=r)
        self.deferral_ratio = Gauge("decal_deferral_ratio", "Share of decisions deferred since the server started.", registry=r)
        self.confidence = Histogram(
            "decal_calibrated_confidence", "Calibrated confidence of returned decisions.", buckets=_CONFIDENCE_BUCKETS, registry=r,
        )
        self.label_mass = Histogram(
            "decal_label_mass", "Full-vocabulary probability the options hold together at the decision position.",
            buckets=_MASS_BUCKETS, registry=r,
        )
        self.label_mass_mean = Gauge("decal_label_mass_mean", "Mean label mass of decisions since the server started.", registry=r)
        self.low_label_mass_ratio = Gauge(
            "decal_low_label_mass_ratio", "Share of decisions since the server started whose label mass is below 0.5.", registry=r,
        )
        self.ready = Gauge("decal_ready", "1 once the model is loaded and warmed up.", registry=r)
        self._n_decisions = self._n_deferred = self._n_low_mass = 0
        self._mass_sum = 0.0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        if status >= 400 and endpoint not in ("/health", "/ready"):  # a probe's 503 is an answer, not an error
            self.errors.labels(kind=ERROR_KINDS.get(status, f"http_{status}")).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_answers(self, answers) -> None:
        from ..metrics import LOW_LABEL_MASS

        for a in answers:
            self.decisions.labels(label=a.record.prediction).inc()
            self.confidence.observe(a.calibrated_confidence)
            mass = a.record.label_mass
            self.label_mass.observe(mass)
            self._mass_sum += mass
            self._n_low_mass += mass < LOW_LABEL_MASS
            self._n_decisions += 1
            if a.defer:
                self.deferred.inc()
                self._n_deferred += 1
        if self._n_decisions:
            self.deferral_ratio.set(self._n_deferred / self._n_decisions)
            self.label_mass_mean.set(self._mass_sum / self._n_decisions)
            self.low_label_mass_ratio.set(self._n_low_mass / self._n_decisions)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
