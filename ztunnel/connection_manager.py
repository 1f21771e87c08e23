"""Live inbound connections of one pod: authorization when they open, re-authorization when policy changes.

Istio re-asserts RBAC on live connections when policy changes; so does this. Each inbound
connection is registered with what it was authorized as and how to cut it; `reauthorize()`
evaluates every one against the current policies and cuts the ones no longer allowed, marking
them so their result says `policy_revoked` rather than whatever the cut looked like.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from mesh.proxy.reason import Reason

from .authz import Connection, Decision, evaluate_applicable
from .pod_context import PodContext

__all__ = ["ConnectionManager", "Tracked"]

log = logging.getLogger("ambient.ztunnel")


class Tracked:
    """One registered live connection."""

    __slots__ = ("conn", "cut", "revoked_by", "closed_for")

    def __init__(self, conn: Connection, cut: Callable[[], None]) -> None:
        self.conn = conn
        self.cut = cut
        self.revoked_by: Decision | None = None
        """The decision that closed it, when re-authorization did."""
        self.closed_for: Reason | None = None
        """Why ztunnel cut it otherwise (the pod was deleted)."""


class ConnectionManager:
    def __init__(self, ctx: PodContext) -> None:
        self.ctx = ctx
        self.active: dict[object, Tracked] = {}
        self._warned: set[tuple[str, ...]] = set()

    def authorize(self, conn: Connection) -> Decision:
        ctx = self.ctx
        # Only the policies that apply to this pod (indexed by namespace and selector).
        d = evaluate_applicable(ctx.state.policies_for(ctx.workload), ctx.workload, conn)
        if d.failed_closed and d.failed_closed not in self._warned:
            # Once per distinct set of rules, not per connection.
            self._warned.add(d.failed_closed)
            log.warning("l7_policy_failed_closed: %s: ztunnel cannot evaluate %s", ctx.workload.uid,
                        "; ".join(d.failed_closed))
        if d.dry_run:
            log.info("dry_run: %s would be %s by %s", conn, "allowed" if not d.allowed else "denied",
                     ", ".join(d.dry_run))
        return d

    def register(self, key: object, conn: Connection, cut: Callable[[], None]) -> Tracked:
        t = self.active[key] = Tracked(conn, cut)
        return t

    def release(self, key: object) -> Tracked | None:
        return self.active.pop(key, None)

    def reauthorize(self) -> int:
        """Cut open inbound connections the current policies no longer allow; how many were."""
        closed = 0
        for t in list(self.active.values()):
            if t.revoked_by is not None:       # cut already; its handler releases it
                continue
            d = self.authorize(t.conn)
            if not d.allowed:
                log.info("policy_revoked: closing %s -> %s (%s %s)", t.conn.src_identity or t.conn.src_ip,
                         self.ctx.workload.uid, d.reason, d.policy or "")
                t.revoked_by = d
                t.cut()
                closed += 1
        return closed

    def cut_all(self, reason: Reason) -> int:
        """Cut every open connection (the pod is gone); their results say `reason`."""
        live = [t for t in self.active.values() if t.revoked_by is None and t.closed_for is None]
        for t in live:
            t.closed_for = reason
            t.cut()
        return len(live)

    def __len__(self) -> int:
        return len(self.active)
