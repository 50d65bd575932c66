"""GET /health/live, /health/ready, /health (details with the admin token) and /metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dovecote.ops import metrics
from dovecote.ops.health import HealthMonitor
from dovecote.web.admin import AdminAuth, address_allowed, client_of
from dovecote.web.responses import refusal

# Seconds a not-ready answer asks probes to wait.
NOT_READY_RETRY = 5


class HealthEndpoints:
    """Liveness, readiness, the health summary and the Prometheus exposition."""

    def __init__(self, health: HealthMonitor, auth: AdminAuth, metrics_allow: list[str]) -> None:
        self.health = health
        self.auth = auth
        self.metrics_allow = metrics_allow

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/health/live", self.live, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
            Route("/health", self.full, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        health = self.health
        ready = health.ready
        store = health.results.get("store") if health.results else None
        # Only whether the store answers: its error text can name hosts (see /health details).
        body = {
            "ready": ready,
            "draining": health.degradation.draining,
            "degradation": health.degradation.level,
            "store": {"ok": store.ok} if store else None,
        }
        headers = {} if ready else {"Retry-After": str(NOT_READY_RETRY)}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    async def full(self, request: Request) -> Response:
        """Status and level for anyone; the details (targets, hosts, queues) with the token."""
        summary = self.health.summary()
        code = 200 if summary["ready"] else 503
        if "authorization" in request.headers and self.auth.token:
            if (denied := self.auth.check_token(request)) is not None:
                return denied
            return JSONResponse(summary, status_code=code)
        return JSONResponse(
            {"status": summary["status"], "degradation": summary["degradation"]}, status_code=code
        )

    async def metrics(self, request: Request) -> Response:
        if self.metrics_allow and not address_allowed(client_of(request), self.metrics_allow):
            metrics.METRICS_FORBIDDEN.inc()
            return refusal(403, "metrics_forbidden", "client address not in METRICS_ALLOW")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
