"""The mesh's own health as Prometheus text: pushes and their latency, proxies, versions, certificates, eBPF, errors.

Decide, then do: `observe.py` gathers one `MeshSample` (the control plane's counters, each
proxy's config dump, the pinned eBPF links), `render(sample, convergence)` turns it into text,
pure. Istio's names where Istio has the metric (pilot_*, citadel_*, istio_agent_*,
istio_build); `ambient_*` where it has none:

    istio_build{component="pilot",tag}                      gauge 1
    pilot_xds{version}                                      gauge: proxies subscribed now
    pilot_xds_pushes{type="snapshot"|"delta"}               counter: frames pushed to proxies
    pilot_proxy_convergence_time                            histogram (s): a change committed ->
                                                            a proxy has it (its config dump's
                                                            last_update_at), per proxy and version
    citadel_server_csr_count / _success_cert_issuance_count counters
    ambient_control_plane_config_version                    gauge
    ambient_proxy_config_version{proxy,proxy_kind}          gauge: the version each proxy holds
    ambient_proxy_connected{proxy,proxy_kind}               gauge 0/1 (subscribed to the control plane)
    ambient_proxy_up{proxy,proxy_kind}                      gauge 0/1 (its admin endpoint answered)
    istio_agent_cert_expiry_seconds{proxy,resource_name}    gauge: seconds to expiry per identity held
    ambient_ebpf_programs_attached{node,workload_namespace,workload,program}  gauge: pinned links
    ambient_mesh_errors_total{component,proxy,reason}       counter: errors by stable reason
    ambient_pod_enroll_failing{proxy,workload_namespace,workload}  gauge 1 while enrolling fails

Labels avoid `pod`/`namespace`: those are the scrape target's labels (Kubernetes SD's names).
Convergence is sampled when Prometheus scrapes: a proxy that moved several versions since the
last scrape is observed once, for the newest version.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.metrics import BUILD_TAG, build_info, family

__all__ = ["CertSample", "ProxySample", "ControlPlaneSample", "MeshSample", "Convergence", "render",
           "CONVERGENCE_BUCKETS"]

CONVERGENCE_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 3, 5, 10, 20, 30)
"""Seconds: Istio's pilot_proxy_convergence_time buckets (0.1 .. 30) with finer ones below, as
a local push takes milliseconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertSample:
    identity: str
    not_after: float | None
    fetch_errors: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySample:
    proxy: str
    """The proxy's pod name (`ztunnel-n1`, `ztunnel-n1/1` for worker 1, `waypoint-waypoint`)."""
    kind: str
    node: str
    up: bool
    version: int | None = None
    connected: bool = False
    last_update_at: float | None = None
    connect_failures: int = 0
    certificates: tuple[CertSample, ...] = ()
    enroll_failing: tuple[str, ...] = ()
    """Pod uids (`ns/name`) this ztunnel fails to enroll right now."""
    ebpf: tuple[tuple[str, str], ...] = ()
    """(pod uid, program) per pinned link of the pods this ztunnel captures."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneSample:
    running: bool
    version: int
    subscribed: int
    snapshots: int
    pushes: int
    certificates: int
    csr_denied_by_reason: Mapping[str, int] = field(default_factory=dict)
    version_times: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshSample:
    now: float
    control_plane: ControlPlaneSample
    proxies: tuple[ProxySample, ...]


class Convergence:
    """pilot_proxy_convergence_time: fed every sample, observes each proxy's newly reached version."""

    def __init__(self, buckets: tuple[float, ...] = CONVERGENCE_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._seen: dict[str, int] = {}

    def observe(self, sample: MeshSample) -> None:
        times = sample.control_plane.version_times
        for p in sample.proxies:
            if p.version is None or p.last_update_at is None:
                continue
            prev = self._seen.get(p.proxy)
            self._seen[p.proxy] = p.version
            # The first sight of a proxy is a baseline (it may have had that version for hours).
            if prev is None or p.version <= prev or p.version not in times:
                continue
            seconds = max(0.0, p.last_update_at - times[p.version])
            self.counts[bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds
            self.count += 1

    def render(self) -> str:
        name = "pilot_proxy_convergence_time"
        out = [f"# HELP {name} Delay in seconds between a config change and a proxy receiving it.",
               f"# TYPE {name} histogram"]
        acc = 0
        for b, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return "\n".join(out) + "\n"


def _uid(uid: str) -> dict[str, str]:
    ns, _, name = uid.partition("/")
    return {"workload_namespace": ns, "workload": name}


def render(s: MeshSample, convergence: Convergence) -> bytes:
    cp = s.control_plane
    px = s.proxies
    who = lambda p: {"proxy": p.proxy, "proxy_kind": p.kind}  # noqa: E731
    fams = [
        build_info("pilot").decode(),
        family("pilot_xds", "gauge", "Number of endpoints connected to this pilot using XDS.",
               [({"version": BUILD_TAG}, cp.subscribed)]),
        family("pilot_xds_pushes", "counter", "Config frames pushed to proxies, by type.",
               [({"type": "snapshot"}, cp.snapshots), ({"type": "delta"}, max(0, cp.pushes - cp.snapshots))]),
        convergence.render(),
        family("citadel_server_csr_count", "counter", "The number of CSRs received by Citadel server.",
               [({}, cp.certificates + sum(cp.csr_denied_by_reason.values()))]),
        family("citadel_server_success_cert_issuance_count", "counter",
               "The number of certificates issuances that have succeeded.", [({}, cp.certificates)]),
        family("ambient_control_plane_config_version", "gauge",
               "The config version the control plane serves (1 + changes since start).", [({}, cp.version)]),
        family("ambient_proxy_config_version", "gauge", "The config version each proxy holds.",
               [(who(p), p.version) for p in px if p.version is not None]),
        family("ambient_proxy_connected", "gauge", "1 if the proxy is subscribed to the control plane.",
               [(who(p), int(p.connected)) for p in px]),
        family("ambient_proxy_up", "gauge", "1 if the proxy's admin endpoint answered.",
               [(who(p), int(p.up)) for p in px]),
        family("istio_agent_cert_expiry_seconds", "gauge",
               "The time remaining, in seconds, before the certificate chain will expire.",
               [({"proxy": p.proxy, "resource_name": c.identity}, c.not_after - s.now)
                for p in px for c in p.certificates if c.not_after is not None]),
        family("ambient_ebpf_programs_attached", "gauge", "eBPF programs attached (pinned links) per pod.",
               [({"node": node, **_uid(uid), "program": prog}, n)
                for (node, uid, prog), n in sorted(_count_links(px).items())]),
        family("ambient_pod_enroll_failing", "gauge", "1 while a ztunnel fails to enroll the pod.",
               [({"proxy": p.proxy, **_uid(uid)}, 1) for p in px for uid in p.enroll_failing]),
        family("ambient_mesh_errors_total", "counter", "Errors of the mesh's own machinery, by stable reason.",
               _errors(s)),
    ]
    return "".join(fams).encode()


def _count_links(px: tuple[ProxySample, ...]) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for p in px:
        for uid, prog in p.ebpf:
            k = (p.node, uid, prog)
            out[k] = out.get(k, 0) + 1
    return out


def _errors(s: MeshSample) -> list[tuple[dict[str, str], float]]:
    rows: list[tuple[dict[str, str], float]] = [
        ({"component": "control_plane", "proxy": "istiod-local", "reason": r}, n)
        for r, n in sorted(s.control_plane.csr_denied_by_reason.items())]
    for p in s.proxies:
        rows.append(({"component": p.kind, "proxy": p.proxy, "reason": "control_plane_unavailable"},
                     p.connect_failures))
        rows.append(({"component": p.kind, "proxy": p.proxy, "reason": "certificate_fetch_failed"},
                     sum(c.fetch_errors for c in p.certificates)))
    return rows
