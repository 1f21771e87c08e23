"""System workloads: the mesh's own processes that the runtime keeps running, per node or per Gateway.

Kubernetes runs ztunnel as a DaemonSet (one pod per node) and a waypoint as a Deployment per
`istio-waypoint` Gateway; local mode's runner stands in for both with one concept: a
`SystemWorkload` is a kind (`ztunnel`, `waypoint`), the target it serves (a node name, a
Gateway's `ns/name`) and one `ProcSpec` per replica. The runner starts them, restarts them
with backoff when they exit (restartPolicy: Always), reports them in `status`, and waits for
each replica's admin endpoint to have the control plane's current version before `apply`
returns.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from localcluster import procs

__all__ = ["ProcSpec", "SystemWorkload", "Proc", "restart_delay", "RESTART_BACKOFF_MAX", "BACKOFF_RESET"]

RESTART_BACKOFF_MAX = 30.0
BACKOFF_RESET = 600.0
"""A process that ran this long before it exited is restarted after the shortest delay again
(the kubelet resets a container's crash-loop backoff after 10 minutes of running), so a
ztunnel that crashes once a day is back after 1 s each time, not after 30."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcSpec:
    """One process: what to run, where (netns, cgroup), and how to ask it whether it is ready."""

    argv: tuple[str, ...]
    netns: str | None
    cgroup: str | None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    log_path: str
    admin_socket: str | None = None
    """Unix socket serving `/config_dump` with the proxy's config `version` (readiness)."""
    label: str = ""
    """How status and logs name this replica (e.g. `ztunnel on n1 (worker 1)`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemWorkload:
    kind: str
    """`ztunnel` (one per node) or `waypoint` (one per Gateway)."""
    target: str
    """The node name, or the Gateway's `namespace/name`."""
    replicas: tuple[ProcSpec, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.target)


def restart_delay(restarts: int) -> float:
    """Capped exponential backoff before the next start of a process that exited."""
    return min(RESTART_BACKOFF_MAX, 2.0 ** min(restarts, 5))


@dataclass(slots=True)
class Proc:
    """A supervised process (a container or a system workload replica): restarted with backoff."""

    argv: list[str]
    netns: str | None
    cgroup: str | None
    env: dict[str, str]
    cwd: str | None
    log_path: str
    admin_socket: str | None = None
    label: str = ""
    popen: Any = None
    restarts: int = 0
    last_exit: int | None = None
    next_start: float = 0.0
    contain: procs.Containment | None = None
    """A pod container's containment; None for system workloads (they need privileges)."""
    started_at: float = 0.0
    """time.monotonic() of the last start."""
    streak: int = 0
    """Exits in a row, each within BACKOFF_RESET of its start: the backoff exponent."""

    @classmethod
    def of(cls, spec: ProcSpec) -> Proc:
        return cls(argv=list(spec.argv), netns=spec.netns, cgroup=spec.cgroup, env=dict(spec.env),
                   cwd=spec.cwd, log_path=spec.log_path, admin_socket=spec.admin_socket, label=spec.label)

    def backoff(self, now: float) -> float:
        """The delay before restarting a process that exited at `now` (capped exponential in
        the exits in a row; back to the shortest after BACKOFF_RESET of running)."""
        if now - self.started_at >= BACKOFF_RESET:
            self.streak = 0
        delay = restart_delay(self.streak)
        self.streak += 1
        return delay

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.popen = procs.spawn(self.argv, netns=self.netns, cgroup=self.cgroup, env=self.env,
                                 cwd=self.cwd, log_path=self.log_path, contain=self.contain)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def stop(self, *, now: bool = False) -> None:
        """SIGTERM (a proxy drains first), or with `now` SIGINT (a proxy exits at once)."""
        if self.popen is not None:
            procs.stop(self.popen, sig=signal.SIGINT if now else signal.SIGTERM)
