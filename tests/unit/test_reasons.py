"""The closed Reason set: every member is complete, and every label the HBONE layer (or ztunnel) can
produce maps to a specific member -- found by reading the source, so a new label fails here."""
import ast
import asyncio
import pathlib
import re
import ssl

import pytest

from mesh.hbone import Reject, TunnelError
from mesh.hbone.connection import LocalProtocolError
from mesh.hbone.frames import ErrorCode, ProtocolError
from mesh.proxy.reason import Direction, Kind, Reason, classify
from mesh.proxy.result import ConnectionResult, Listener, Peer, ResultBuilder, SecurityPolicy, Stage
from mesh.tls import PeerIdentityError
from ztunnel.inbound.validate import BadAuthority
from ztunnel.outbound.plan import PlanError

ROOT = pathlib.Path(__file__).resolve().parents[2]
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
FLAGS = {"-", "DENY", "DPE", "UPE", "UF", "UH", "NR", "UO", "OM", "DT", "DC", "UC"}

# Where a call takes its reason label: positional indexes (and `reason=` keywords).
REASON_ARGS = {"TunnelError": [0], "Reject": [1], "Rejection": [], "ProtocolError": [1], "LocalProtocolError": [0],
               "PeerIdentityError": [0], "_finish": [0], "abort": [0], "on_reset": [0], "_report": [0],
               "_reject": [2], "_stream_error": [2], "StreamReset": [3], "RequestRejected": [2],
               "PlanError": [0], "BadAuthority": [0], "Decision": [], "fail": [0]}


def _labels(node):
    """String constants of an expression, through `a if c else b` and `x or "y"`, not into calls."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} if LABEL.match(node.value) else set()
    if isinstance(node, ast.IfExp):
        return _labels(node.body) | _labels(node.orelse)
    if isinstance(node, ast.BoolOp):
        return set().union(*(_labels(v) for v in node.values))
    return set()


def produced_labels(paths):
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            got = set()
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name in REASON_ARGS:
                    args = [node.args[i] for i in REASON_ARGS[name] if i < len(node.args)]
                    args += [k.value for k in node.keywords if k.arg == "reason"]
                    for a in args:
                        got |= _labels(a)
            elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.IfExp, ast.BoolOp, ast.Constant)):
                if any((t.id if isinstance(t, ast.Name) else getattr(t, "attr", None)) in ("reason", "error")
                       for t in node.targets):
                    got = _labels(node.value)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                if any(isinstance(t, ast.Name) and t.id.endswith("_REASONS") for t in node.targets):
                    for v in node.value.values:
                        got |= _labels(v)
            elif isinstance(node, ast.FunctionDef) and (node.name in ("validate_connect", "regular_headers")
                                                        or node.name.endswith("_reason")):
                for r in ast.walk(node):
                    if isinstance(r, ast.Return) and r.value is not None:
                        got |= _labels(r.value)
            for label in got:
                found.setdefault(label, where)
    return found


HBONE_SOURCES = sorted((ROOT / "mesh" / "hbone").glob("*.py")) + [ROOT / "mesh" / "tls.py"]
ZTUNNEL_SOURCES = [ROOT / "ztunnel" / "authz.py", ROOT / "ztunnel" / "outbound" / "plan.py",
                   ROOT / "ztunnel" / "inbound" / "validate.py", ROOT / "ztunnel" / "relay.py"]
NOT_REASONS = {"allowed"}        # authz's positive decision


def test_the_scan_finds_the_labels_it_should():
    # Guard against a scan that silently finds nothing (a renamed call, a moved table).
    found = produced_labels(HBONE_SOURCES)
    assert {"not_tls", "cert_expired", "bad_preface", "scheme_or_path_present", "goaway", "peer_reset",
            "tcp_reset", "connect_rejected", "too_many_pending_handshakes", "wrong_trust_domain",
            "max_concurrent_streams", "bad_status", "connection_lost"} <= set(found)
    assert len(found) > 70


@pytest.mark.parametrize("label, where", sorted(produced_labels(HBONE_SOURCES).items()))
def test_every_hbone_label_maps_to_its_own_reason(label, where):
    r = classify(label)
    assert r is not Reason.UNEXPECTED, f"{where} produces {label!r}, which no Reason has"
    assert r.label == label


@pytest.mark.parametrize("label, where", sorted((set(produced_labels(ZTUNNEL_SOURCES).items()))))
def test_every_ztunnel_label_maps_to_its_own_reason(label, where):
    if label in NOT_REASONS:
        return
    assert classify(label).label == label, f"{where} produces {label!r}, which no Reason has"


def test_ztunnel_scan_is_not_empty():
    assert {"denied_by_policy", "no_allow_match", "no_healthy_upstream", "authority_not_local",
            "connection_reset"} <= set(produced_labels(ZTUNNEL_SOURCES))


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_label_kind_flag_and_status(reason):
    assert LABEL.match(reason.label) and str(reason) == reason.label
    assert isinstance(reason.kind, Kind)
    assert reason.flag in FLAGS
    assert reason.status is None or reason.status in (400, 401, 503)
    assert Reason.of(reason.label) is reason
    assert reason.flag_for(Direction.INBOUND) == reason.flag
    assert reason.flag_for(Direction.OUTBOUND) in FLAGS


def test_labels_are_unique():
    assert len({r.label for r in Reason}) == len(Reason)


@pytest.mark.parametrize("kind, flag, status", [(Kind.POLICY, "DENY", 401), (Kind.BAD_REQUEST, "DPE", 400)])
def test_policy_and_bad_request_reasons_answer_with_their_status(kind, flag, status):
    members = [r for r in Reason if r.kind is kind and r is not Reason.POLICY_REVOKED]
    assert members and all((r.flag, r.status) == (flag, status) for r in members)


def test_upstream_failures_answer_503_with_uf():
    members = [r for r in Reason if r.kind is Kind.UPSTREAM]
    assert members and all((r.flag, r.status) == ("UF", 503) for r in members)


def test_mirrored_flags_swap_sides_for_outbound_reports():
    assert Reason.BAD_PREFACE.flag_for(Direction.INBOUND) == "DPE"
    assert Reason.BAD_PREFACE.flag_for(Direction.OUTBOUND) == "UPE"
    assert Reason.PEER_RESET.flag_for(Direction.OUTBOUND) == "UC"
    assert Reason.TCP_RESET.flag_for(Direction.OUTBOUND) == "DC"
    assert Reason.DENIED_BY_POLICY.flag_for(Direction.OUTBOUND) == "DENY"


class _Odd(Exception):
    pass


@pytest.mark.parametrize("error, expected", [
    (TunnelError("connect_failed", "x"), Reason.CONNECT_FAILED),
    (TunnelError("connect_rejected", status=401), Reason.CONNECT_DENIED),
    (TunnelError("connect_rejected", status=503), Reason.CONNECT_REJECTED),
    (Reject(401, "no_allow_match"), Reason.NO_ALLOW_MATCH),
    (ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad_preface"), Reason.BAD_PREFACE),
    (LocalProtocolError("stream_ids_exhausted"), Reason.STREAM_IDS_EXHAUSTED),
    (PeerIdentityError("wrong_trust_domain", "x"), Reason.WRONG_TRUST_DOMAIN),
    (PlanError("no_healthy_upstream", "x"), Reason.NO_HEALTHY_UPSTREAM),
    (BadAuthority("authority_not_ip", "x"), Reason.AUTHORITY_NOT_IP),
    (asyncio.TimeoutError(), Reason.CONNECT_TIMEOUT),
    (ConnectionRefusedError(111, "refused"), Reason.CONNECT_FAILED),
    (ConnectionResetError(104, "reset"), Reason.CONNECTION_RESET),
    (ssl.SSLError(1, "boom"), Reason.TLS_FAILED),
    (_Odd("what"), Reason.UNEXPECTED),
    ("tls_alert_bad_certificate", Reason.TLS_ALERT),
    ("no_such_label", Reason.UNEXPECTED),
])
def test_classify_returns_one_specific_reason(error, expected):
    assert classify(error) is expected


def test_classify_walks_the_causes():
    try:
        try:
            raise PlanError("no_service_port", "svc has no port 9")
        except PlanError as inner:
            raise _Odd("wrapped") from inner
    except _Odd as outer:
        assert classify(outer) is Reason.NO_SERVICE_PORT


def test_an_unknown_label_on_an_exception_falls_back_to_its_causes_then_unexpected():
    e = TunnelError("brand_new_label")
    assert classify(e) is Reason.UNEXPECTED


def test_builder_counts_bytes_source_to_destination_on_either_side_of_a_tunnel():
    client = ResultBuilder(Direction.OUTBOUND, Listener.OUTBOUND, 10.0)
    client.tunnel_bytes(100, 7, server_side=False)
    server = ResultBuilder(Direction.INBOUND, Listener.HBONE, 10.0)
    server.tunnel_bytes(7, 100, server_side=True)      # the server sent the 7 reply bytes
    for b in (client, server):
        r = b.build(12.5)
        assert (r.bytes_sent, r.bytes_recv, r.duration) == (100, 7, 2.5)


def test_builder_keeps_the_first_reason_and_its_detail():
    b = ResultBuilder(Direction.INBOUND, Listener.HBONE, 0.0)
    assert b.fail(TunnelError("connect_rejected", "answered 503", status=503)) is Reason.CONNECT_REJECTED
    b.fail("tcp_reset")
    r = b.build(1.0)
    assert r.reason is Reason.CONNECT_REJECTED and r.status == 503 and r.detail == "answered 503"
    b2 = ResultBuilder(Direction.INBOUND, Listener.HBONE, 0.0)
    b2.fail("tls_alert_bad_certificate", "alert 42")
    assert b2.build(0.0).detail == "tls_alert_bad_certificate: alert 42"


def test_log_fields_keep_the_access_log_names():
    r = ConnectionResult(direction=Direction.INBOUND, listener=Listener.HBONE,
                         src=Peer("c", "a", "spiffe://td/ns/a/sa/c", "10.0.0.1:5"),
                         dst=Peer("s", "b", None, "10.0.0.2:80"), security=SecurityPolicy.MUTUAL_TLS,
                         bytes_sent=5, bytes_recv=6, duration=0.25, reason=Reason.DENIED_BY_POLICY,
                         policy="b/deny", status=401)
    assert r.log_fields() == {
        "direction": "inbound", "src.workload": "c", "src.namespace": "a", "src.identity": "spiffe://td/ns/a/sa/c",
        "src.addr": "10.0.0.1:5", "dst.workload": "s", "dst.namespace": "b", "dst.addr": "10.0.0.2:80",
        "security": "mutual_tls", "bytes_sent": 5, "bytes_recv": 6, "duration_ms": 250.0,
        "error": "denied_by_policy", "response_flags": "DENY", "policy": "b/deny", "status": 401}


def test_rejection_log_fields_say_event_stage_and_count():
    r = ConnectionResult(direction=Direction.INBOUND, listener=Listener.HBONE, src=Peer(addr="10.0.0.1:5"),
                         dst=Peer("s", "b"), reason=Reason.NOT_TLS, stage=Stage.TLS, count=3, detail="x" * 500)
    f = r.log_fields()
    assert (f["event"], f["listener"], f["stage"], f["count"], f["error"]) == ("rejected", "hbone", "tls", 3, "not_tls")
    assert len(f["detail"]) == 200 and "bytes_sent" not in f
