"""Table tests: when a meshed pod's containers may start (localcluster/meshgate.py)."""
from __future__ import annotations

import pytest

from localcluster.meshgate import GateReason, decide

UP = {"connected": True, "enrolled": ["shop/a"], "enroll_errors": {}}
CASES = [
    # (meshed, control plane running, ztunnel dump, start, reason)
    (False, False, None, True, GateReason.NOT_MESHED),
    (True, True, UP, True, GateReason.ENROLLED),
    (True, False, UP, True, GateReason.ENROLLED),  # enrolled before the outage: capture is in place
    (True, True, None, False, GateReason.ZTUNNEL_UNAVAILABLE),
    (True, False, {"connected": False, "enrolled": []}, False, GateReason.CONTROL_PLANE_UNAVAILABLE),
    (True, True, {"connected": False, "enrolled": []}, False, GateReason.CONTROL_PLANE_UNAVAILABLE),
    (True, False, {"connected": True, "enrolled": []}, False, GateReason.CONTROL_PLANE_UNAVAILABLE),
    (True, True, {"connected": True, "enrolled": [], "enroll_errors": {"shop/a": "pod netns gone"}},
     False, GateReason.ENROLL_FAILED),
    (True, True, {"connected": True, "enrolled": ["shop/b"]}, False, GateReason.WAITING_FOR_ENROLLMENT),
]


@pytest.mark.parametrize("meshed, cp, dump, start, reason", CASES)
def test_decide(meshed, cp, dump, start, reason):
    d = decide(uid="shop/a", node="n1", meshed=meshed, control_plane_running=cp, dump=dump)
    assert (d.start, d.reason) == (start, reason)
    assert "n1" in d.message or reason is GateReason.NOT_MESHED


def test_control_plane_message_says_what_to_do():
    d = decide(uid="shop/a", node="n1", meshed=True, control_plane_running=False,
               dump={"connected": False, "enrolled": []})
    assert "control plane" in d.message and "ambient control-plane start" in d.message


def test_enroll_error_is_quoted():
    d = decide(uid="shop/a", node="n1", meshed=True, control_plane_running=True,
               dump={"connected": True, "enrolled": [], "enroll_errors": {"shop/a": "no sandbox record"}})
    assert d.message.endswith("no sandbox record")
