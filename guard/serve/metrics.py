"""The guard service's Prometheus metrics, served at GET /metrics in the text format.

    clip_guard_requests_total{endpoint, status}          HTTP requests answered, by endpoint and status code
    clip_guard_request_errors_total{reason}              requests answered with an error, by reason (bad_image, ...)
    clip_guard_request_latency_seconds{endpoint}         histogram: request received -> answer sent
    clip_guard_requests_in_progress                      requests being answered now
    clip_guard_batch_size                                histogram: images per backend call (dynamic batching)
    clip_guard_batch_seconds                             histogram: time of one backend call
    clip_guard_queued_images                             images waiting for a batch
    clip_guard_images_total{statistic, alert_status}     images classified, by alert statistic and outcome
                                                         (alert, clear, uncalibrated, off)
    clip_guard_model_loaded                              1 once the model is loaded, else 0
    clip_guard_model_info{...}                           the model path, backend, device and alert threshold

The alert rate per statistic, which drifts when the inputs or an attacker change:
    sum by (statistic) (rate(clip_guard_images_total{alert_status="alert"}[5m]))
      / sum by (statistic) (rate(clip_guard_images_total[5m]))

Each service has its own registry, so several services (tests, benchmarks) can live in one process.
"""
from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Request latency buckets: the tiny reference model answers in milliseconds, a ViT-B/32 on a CPU in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The metrics of one service, in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("clip_guard_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.errors = Counter("clip_guard_request_errors", "Requests answered with an error, by reason",
                              ["reason"], registry=registry)
        self.latency = Histogram("clip_guard_request_latency_seconds", "Time from receiving a request to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("clip_guard_requests_in_progress", "Requests being answered now", registry=registry)
        self.batch_size = Histogram("clip_guard_batch_size", "Images per backend call", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.batch_seconds = Histogram("clip_guard_batch_seconds", "Time of one backend call (classification and "
                                       "trigger alert)", buckets=LATENCY_BUCKETS, registry=registry)
        self.queued = Gauge("clip_guard_queued_images", "Images waiting for a batch", registry=registry)
        self.images = Counter("clip_guard_images", "Images classified, by trigger-alert statistic and alert status "
                              "(alert, clear, uncalibrated, off)", ["statistic", "alert_status"], registry=registry)
        self.model_loaded = Gauge("clip_guard_model_loaded", "1 once the model is loaded, else 0", registry=registry)
        self.model_info = Info("clip_guard_model", "The served model", registry=registry)

    def observe_batch(self, size: int, seconds: float, statistic: str, statuses) -> None:
        """One backend call of `size` images and the alert status of each result."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        for status, count in collections.Counter(statuses).items():
            self.images.labels(statistic, status).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
