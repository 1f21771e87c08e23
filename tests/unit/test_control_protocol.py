"""Control-plane wire protocol: framing, message round trips, hostile frames."""
import ipaddress
import json
import struct

import pytest

from mesh.distribution.protocol import (MAX_FRAME, CertificateRequest, CertificateResponse, Delta,
                                   FrameDecoder, ProtocolError, Snapshot, Subscribe, decode, encode)
from mesh.identity import SpiffeId
from mesh.model import (Endpoint, FrozenMap, Namespace, ObjectMeta, PolicyObject, ServiceInfo,
                        ServicePort, TunnelProtocol, Workload, freeze)
from mesh.model.route import (BackendRef, ConnectionPool, DestinationRule, HeaderMatch,
                              HeaderModifier, HTTPFilters, HTTPRoute, HTTPRouteMatch, HTTPRouteRetry,
                              HTTPRouteRule, HTTPRouteTimeouts, HTTPSettings, IstioStringMatch,
                              LoadBalancer, OutlierDetection, ParentRef, PathMatch, PathMatchType,
                              RequestMirror, StringMatchType, Subset, TCPSettings, TrafficPolicy,
                              VirtualService, VSDestination, VSDirectResponse, VSFault, VSFaultAbort, VSFaultDelay,
                              VSRedirect,
                              VSHTTPRoute, VSMatch, VSRetries, VSRouteDestination)

SA = SpiffeId(trust_domain="cluster.local", namespace="demo", service_account="web")
W = Workload(uid="demo/web-1", name="web-1", namespace="demo", node="n1",
             ip=ipaddress.IPv4Address("10.244.0.2"), service_account="web", identity=SA,
             protocol=TunnelProtocol.HBONE, labels=FrozenMap({"app": "web"}), services=("demo/web",))
S = ServiceInfo(name="web", namespace="demo", vip=ipaddress.IPv4Address("10.96.0.10"),
                ports=(ServicePort(port=80, target_port=8080, name="http"),
                       ServicePort(port=81, target_port="metrics")),
                endpoints=(Endpoint(workload_uid="demo/web-1", ip=W.ip),))
N = Namespace(meta=ObjectMeta(name="demo", labels=FrozenMap({"istio.io/dataplane-mode": "ambient"})))
HR = HTTPRoute(meta=ObjectMeta(name="split", namespace="demo"),
               parent_refs=(ParentRef(group="", kind="Service", namespace="demo", name="web", port=80),),
               rules=(HTTPRouteRule(
                   matches=(HTTPRouteMatch(path=PathMatch(type=PathMatchType.EXACT, value="/a"),
                                           headers=(HeaderMatch(name="x-v", value="2"),),
                                           method="GET"),),
                   filters=HTTPFilters(request_headers=HeaderModifier(set=(("x-a", "1"),), remove=("x-b",)),
                                       mirrors=(RequestMirror(backend=BackendRef(name="shadow", namespace="demo",
                                                                                 port=80), percent=12.5),)),
                   backend_refs=(BackendRef(name="web-v1", namespace="demo", port=80, weight=90),
                                 BackendRef(name="web-v2", namespace="demo", port=80, weight=0)),
                   timeouts=HTTPRouteTimeouts(request=10.0, backend_request=0.5),
                   retry=HTTPRouteRetry(codes=(503,), attempts=2, backoff=0.1)), HTTPRouteRule()))
VS = VirtualService(meta=ObjectMeta(name="web", namespace="demo"), hosts=("web",), http=(VSHTTPRoute(
    match=(VSMatch(uri=IstioStringMatch(type=StringMatchType.PREFIX, value="/v2"),
                   headers=(("x-user", IstioStringMatch(type=StringMatchType.EXACT, value="bob")),)),),
    route=(VSRouteDestination(destination=VSDestination(host="web", subset="v2", port=80), weight=100),),
    timeout=1.5, retries=VSRetries(attempts=3, per_try_timeout=2.0, retry_on=("5xx",)),
    fault=VSFault(delay=VSFaultDelay(fixed_delay=0.5, percentage=10.0),
                  abort=VSFaultAbort(http_status=503, percentage=1.0)),
    mirror=VSDestination(host="shadow"), mirror_percentage=5.0),
    VSHTTPRoute(redirect=VSRedirect(uri="/x", port=8080, redirect_code=308)),
    VSHTTPRoute(direct_response=VSDirectResponse(status=503, body=b"\0down\xff")),))
DR = DestinationRule(meta=ObjectMeta(name="web", namespace="demo"), host="web",
                     subsets=(Subset(name="v1", labels=FrozenMap({"version": "v1"})),),
                     traffic_policy=TrafficPolicy(
                         connection_pool=ConnectionPool(tcp=TCPSettings(max_connections=10),
                                                        http=HTTPSettings(max_retries=3)),
                         outlier_detection=OutlierDetection(consecutive_5xx_errors=5, interval=10.0),
                         load_balancer=LoadBalancer.ROUND_ROBIN))
P = PolicyObject(meta=ObjectMeta(name="deny", namespace="demo"), policy_kind="AuthorizationPolicy",
                 api_version="security.istio.io/v1", spec=freeze({"action": "DENY", "rules": [{}]}))


def roundtrip(msg):
    (obj,) = FrameDecoder().feed(encode(msg))
    return decode(obj)


@pytest.mark.parametrize("msg", [
    Subscribe(last_version=7),
    Snapshot(version=3, resources=(W, S, N, P)),
    Snapshot(version=3, resources=(HR, VS, DR)),
    Delta(version=4, upserts=(W,), removals=(("Service", "demo/web"),)),
    Delta(version=5, upserts=(HR, VS, DR), removals=(("HTTPRoute", "demo/old"),)),
    CertificateRequest(id=1, identity=SA, csr_pem="-----BEGIN CERTIFICATE REQUEST-----", ttl_seconds=60.0),
    CertificateResponse(id=1, chain_pem=("a", "b")),
    CertificateResponse(id=2, error="no", reason="identity_not_on_node"),
])
def test_messages_round_trip(msg):
    assert roundtrip(msg) == msg


def test_decoder_reassembles_split_and_coalesced_frames():
    data = encode(Subscribe(last_version=1)) + encode(Snapshot(version=2, resources=(W,)))
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), 3):
        out += dec.feed(data[i:i + 3])
    assert [decode(o) for o in out] == [Subscribe(last_version=1), Snapshot(version=2, resources=(W,))]


def frame(raw: bytes) -> bytes:
    return struct.pack("!I", len(raw)) + raw


@pytest.mark.parametrize("data, words", [
    (struct.pack("!I", MAX_FRAME + 1), "exceeds"),
    (frame(b"not json"), "not JSON"),
    (frame(b"[1,2]"), "object"),
    (frame(b'{"no":"type"}'), "object"),
])
def test_decoder_rejects_hostile_frames(data, words):
    with pytest.raises(ProtocolError, match=words):
        FrameDecoder().feed(data)


@pytest.mark.parametrize("obj, words", [
    ({"type": "bogus"}, "unknown message type"),
    ({"type": "snapshot", "version": "1", "resources": []}, "version"),
    ({"type": "snapshot", "version": 1, "resources": [{"type": "Pod", "data": {}}]}, "unknown resource"),
    ({"type": "snapshot", "version": 1, "resources": [{"type": "Workload", "uid": "x", "data": {"uid": "x"}}]},
     "bad Workload"),
    ({"type": "delta", "version": 2, "removals": [["Workload"]]}, "bad removal"),
    ({"type": "csr", "id": "1", "identity": {}, "csr_pem": ""}, "bad csr"),
    ({"type": "subscribe", "last_version": True}, "bad subscribe"),
])
def test_decode_rejects_malformed_messages(obj, words):
    with pytest.raises(ProtocolError, match=words):
        decode(json.loads(json.dumps(obj)))
