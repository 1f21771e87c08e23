#!/usr/bin/env python3
"""The waypoint's per-request tracing cost (begin + end), off / not sampled / sampled, with spans exported to a real OTLP/HTTP receiver on loopback."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # runnable as a script from a checkout

from mesh.clock import SystemClock  # noqa: E402
from mesh.config import load_text  # noqa: E402
from mesh.distribution.protocol import Snapshot  # noqa: E402
from mesh.state import ProxyState  # noqa: E402
from tests.otlp_receiver import Receiver  # noqa: E402
from waypoint.telemetry import RequestLabels, RequestResult  # noqa: E402
from waypoint.tracing import Tracing  # noqa: E402

CONFIG = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {service: "%s", port: %d, http: {path: /v1/traces}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: otel}], randomSamplingPercentage: %s}]
"""

HEADERS = [(b"host", b"reviews"), (b"user-agent", b"bench"), (b"x-request-id", b"0d1b6f8e-1b8c-4f6e-9f0e-3c3b2a1f0e9d")]
RESULT = RequestResult(
    labels=RequestLabels(response_code="200", response_flags="-", source_principal="spiffe://cluster.local/ns/a/sa/b",
                         destination_service="reviews.shop.svc.cluster.local"),
    start_time=time.time(), duration_ms=1.5, method="GET", path="/reviews/1", protocol="HTTP/1.1",
    authority="reviews", upstream_cluster="outbound|80||reviews.shop.svc.cluster.local",
    upstream_host="10.244.0.5:8080", downstream_remote_address="10.244.0.9:40000")


def measure(percentage: float | None, n: int, receiver: Receiver) -> dict:
    state = ProxyState()
    objs = () if percentage is None else tuple(load_text(CONFIG % (*receiver.address, percentage), "bench.yaml"))
    state.apply_snapshot(Snapshot(version=1, resources=objs))
    t = Tracing(state=state, namespace="shop", name="waypoint", clock=SystemClock(), rng=random.Random(1))
    t.begin(list(HEADERS), RESULT.start_time)   # the policy (and, when on, the SDK import) before timing
    t.end(RESULT)
    t.flush()
    before = len(receiver.snapshot())
    t0 = time.perf_counter()
    for _ in range(n):
        t.begin(list(HEADERS), RESULT.start_time)
        t.end(RESULT)
    per_request_us = (time.perf_counter() - t0) / n * 1e6
    ok = t.flush()
    t.close()
    return {"percentage": percentage, "requests": n, "per_request_us": round(per_request_us, 2),
            "exported": len(receiver.snapshot()) - before, "dropped": t.stats.dropped, "flushed": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=20000, help="requests per case")
    a = p.parse_args(argv)
    receiver = Receiver("127.0.0.1", 0)
    try:
        cases = [measure(pct, a.n, receiver) for pct in (None, 0, 100)]
    finally:
        receiver.close()
    print(json.dumps({"cases": cases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
