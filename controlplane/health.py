"""The control plane's probe endpoints (the Deployment's readiness and liveness probes).

  GET /ready    200 once it can serve proxies: listening, every watched kind listed once
                (no empty snapshot), the CA usable for longer than one certificate lifetime;
                503 with the failing checks otherwise. A replica that is not ready gets no
                new ztunnel connections through the Service.
  GET /healthz  200 while the event loop answers (liveness: a wedged loop gets restarted).

`judge` is pure over `HealthFacts`, gathered by the caller at each probe.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mesh.admin_http import AdminServer, Response

__all__ = ["HealthFacts", "Check", "judge", "health_server"]


@dataclass(frozen=True, slots=True)
class HealthFacts:
    listening: bool
    synced_kinds: int
    watched_kinds: int
    now: float
    ca_not_after: float
    cert_ttl: float


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    reason: str
    detail: str


def judge(f: HealthFacts) -> list[Check]:
    ca_left = f.ca_not_after - f.now
    return [
        Check("listening", f.listening, "ok" if f.listening else "not_listening",
              "serving proxies" if f.listening else "not accepting proxy connections"),
        Check("synced", f.synced_kinds >= f.watched_kinds,
              "ok" if f.synced_kinds >= f.watched_kinds else "not_synced",
              f"{f.synced_kinds}/{f.watched_kinds} kinds listed"),
        # Certificates it signs cannot outlive the CA: below one lifetime they would be cut short.
        Check("ca", ca_left > f.cert_ttl, "ok" if ca_left > f.cert_ttl else
              ("ca_expired" if ca_left <= 0 else "ca_expiring"),
              f"CA valid for {max(ca_left, 0) / 86400:.1f} more days"),
    ]


def health_server(facts: Callable[[], HealthFacts]) -> AdminServer:
    def ready(_path: str) -> Response:
        checks = judge(facts())
        body = {"ready": all(c.ok for c in checks),
                "checks": [{"name": c.name, "ok": c.ok, "reason": c.reason, "detail": c.detail} for c in checks]}
        return Response(200 if body["ready"] else 503, body)

    return AdminServer({"/ready": ready, "/healthz": lambda _p: Response(200, "ok\n")})
