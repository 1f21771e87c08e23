"""When a meshed pod's containers may start: only once its node's ztunnel has enrolled it.

Istio's CNI plugin does not let a pod in an ambient namespace start before its traffic is
redirected to ztunnel (CNI ADD fails, the kubelet retries). Local mode's equivalent: the
runner writes the sandbox record (the CNI hand-over) and holds the containers until the
node's ztunnel lists the pod as enrolled (listeners open, eBPF capture attached). Without
this, a pod created while the control plane is down (ztunnel cannot learn about it, nor get
its certificate) would run uncaptured and talk plaintext: the hold makes that a clear
`Pending` with a reason in `ambient status` instead, and the pod starts once the control
plane is back. The decision is pure; the runner polls ztunnel's /config_dump and carries it out.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["GateReason", "GateDecision", "decide"]


class GateReason(enum.Enum):
    """Why a pod's containers start now or wait (value: the label in status and logs)."""

    ENROLLED = "enrolled"
    NOT_MESHED = "not_meshed"
    ZTUNNEL_UNAVAILABLE = "ztunnel_unavailable"
    CONTROL_PLANE_UNAVAILABLE = "control_plane_unavailable"
    ENROLL_FAILED = "enroll_failed"
    WAITING_FOR_ENROLLMENT = "waiting_for_enrollment"

    @property
    def label(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class GateDecision:
    start: bool
    reason: GateReason
    message: str


def decide(*, uid: str, node: str, meshed: bool, control_plane_running: bool,
           dump: dict[str, Any] | None) -> GateDecision:
    """Start the containers of pod `uid` on `node` now, or wait (and say why).

    `dump` is the node's ztunnel /config_dump (worker 0, which owns capture), None when it
    does not answer.
    """
    if not meshed:
        return GateDecision(start=True, reason=GateReason.NOT_MESHED, message="not in the mesh")
    if dump is not None and uid in dump.get("enrolled", ()):
        return GateDecision(start=True, reason=GateReason.ENROLLED, message=f"enrolled by ztunnel on {node}")
    if dump is None:
        return GateDecision(start=False, reason=GateReason.ZTUNNEL_UNAVAILABLE,
                            message=f"ztunnel on node {node} is not answering; the pod starts once it "
                                    "has enrolled it (traffic capture in place)")
    if not control_plane_running or not dump.get("connected"):
        return GateDecision(start=False, reason=GateReason.CONTROL_PLANE_UNAVAILABLE,
                            message=f"ztunnel on node {node} cannot reach the control plane, so it "
                                    "knows neither this pod nor its certificate; the pod starts once "
                                    "the control plane is back (`ambient control-plane start`)")
    err = dump.get("enroll_errors", {}).get(uid)
    if err:
        return GateDecision(start=False, reason=GateReason.ENROLL_FAILED,
                            message=f"ztunnel on node {node} could not enroll it yet: {err}")
    return GateDecision(start=False, reason=GateReason.WAITING_FOR_ENROLLMENT,
                        message=f"waiting for ztunnel on node {node} to enroll it")
