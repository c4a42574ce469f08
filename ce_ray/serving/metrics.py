"""The app's Prometheus metrics, through ``ray.serve.metrics`` (Ray adds deployment/replica/application tags).

They appear on every node's Ray metrics endpoint (``http://<node>:<metrics_export_port>/metrics``; the
port is in ``ray.nodes()`` as ``MetricsExportPort``) with Ray's ``ray_`` prefix, next to Serve's own
``ray_serve_*`` metrics, for Prometheus to scrape. Names and tags:

=====================================  =========  ========================================================
ce_ray_requests_total                  counter    HTTP requests by route and status (ingress)
ce_ray_request_seconds                 histogram  HTTP request latency by route (ingress)
ce_ray_request_pairs_total             counter    pairs the scoring requests asked for, by route and status
ce_ray_shed_requests_total             counter    requests refused because the model was busy (503) or past
                                                  the deadline (504), by route and reason (ingress)
ce_ray_pairs_total                     counter    pairs scored, by model (model replicas)
ce_ray_truncated_pairs_total           counter    pairs cut to the model's max length, by model
ce_ray_batch_requests                  histogram  requests merged into one model batch
ce_ray_batch_pairs                     histogram  pairs in one model batch
ce_ray_queue_wait_seconds              histogram  time a request waited for its batch
ce_ray_forward_seconds                 histogram  time to score one batch (tokenize + forward passes)
=====================================  =========  ========================================================
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

__all__ = ["IngressMetrics", "ModelMetrics", "route_label"]

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
_ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/predict", "/health", "/info", "/docs", "/openapi.json")


def route_label(route: str) -> str:
    """A route's metric tag: one of the app's routes, else ``other`` (a client cannot grow the tag set)."""
    return route if route in _ROUTES else "other"


class IngressMetrics:
    def __init__(self):
        self.requests = Counter("ce_ray_requests", "HTTP requests by route and status.", tag_keys=("route", "status"))
        self.pairs = Counter(
            "ce_ray_request_pairs", "Pairs asked for, by route and status.", tag_keys=("route", "status")
        )
        self.latency = Histogram("ce_ray_request_seconds", "HTTP request latency.", _SECONDS, tag_keys=("route",))
        self.shed = Counter(
            "ce_ray_shed_requests", "Requests refused: model busy (503) or past the deadline (504).",
            tag_keys=("route", "reason"),
        )  # fmt: skip


class ModelMetrics:
    def __init__(self):
        self.pairs = Counter("ce_ray_pairs", "Pairs scored.", tag_keys=("model",))
        self.truncated = Counter("ce_ray_truncated_pairs", "Pairs cut to the model's max length.", tag_keys=("model",))
        self.batch_requests = Histogram("ce_ray_batch_requests", "Requests merged into one model batch.", _COUNTS)
        self.batch_pairs = Histogram("ce_ray_batch_pairs", "Pairs in one model batch.", _COUNTS)
        self.queue_wait = Histogram("ce_ray_queue_wait_seconds", "Time a request waited for its batch.", _SECONDS)
        self.forward = Histogram("ce_ray_forward_seconds", "Time to score one batch.", _SECONDS)
