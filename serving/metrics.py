"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

``ntu_serve_requests_total{route, method, status}`` and ``ntu_serve_request_seconds{route, method}``
(route = the path template, ``unmatched`` for unknown paths), ``ntu_serve_inference_seconds`` (each
model call), ``ntu_serve_batch_clips`` / ``ntu_serve_batch_requests`` (clips and requests per model
call: the micro-batch sizes), ``ntu_serve_stream_messages_total{kind}`` (WebSocket traffic),
``ntu_serve_model_ready`` (1 when a model is loaded).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batching import Batch

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other: "other" (bounded labels)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ntu_serve_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ntu_serve_request_seconds", "HTTP request latency", ["route", "method"], registry=r
        )
        self.inference = Histogram(
            "ntu_serve_inference_seconds",
            "wall time of one model call",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.batch_clips = Histogram(
            "ntu_serve_batch_clips", "clips per model call", buckets=_SIZES, registry=r
        )
        self.batch_requests = Histogram(
            "ntu_serve_batch_requests", "requests grouped per model call", buckets=_SIZES, registry=r
        )
        self.stream = Counter("ntu_serve_stream_messages", "WebSocket messages by kind", ["kind"], registry=r)
        self.ready = Gauge("ntu_serve_model_ready", "1 when a model is loaded", registry=r)

    def observe_batch(self, batch: Batch) -> None:
        self.inference.observe(batch.inference_ms / 1000)
        self.batch_clips.observe(batch.clips)
        self.batch_requests.observe(batch.requests)


class MetricsMiddleware:
    """Counts and times every HTTP request (errors and early rejections included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self._paths: frozenset[str] | None = None  # the app's route paths, read at the first need

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self._route(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)

    def _route(self, scope: Scope) -> str:
        """The route's path template; for a request refused before routing (a body over the limit,
        told by its Content-Length) or answered by a route that does not record itself
        (``/openapi.json``, ``/docs``), its path when the app has a route of that path (none has
        parameters); ``unmatched`` for any other path (one label: none per client-chosen URL)."""
        route = scope.get("route")
        if route is not None:
            return route.path
        if self._paths is None:
            app = scope.get("app")
            try:
                paths = set(app.openapi()["paths"]) if hasattr(app, "openapi") else set()
            except Exception:  # no schema, no paths: everything unrouted stays 'unmatched'
                paths = set()
            paths |= {p for r in getattr(app, "routes", ()) if isinstance(p := getattr(r, "path", None), str)}
            self._paths = frozenset(paths)
        return scope["path"] if scope.get("path") in self._paths else "unmatched"
