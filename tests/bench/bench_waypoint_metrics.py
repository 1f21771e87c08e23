#!/usr/bin/env python3
"""Waypoint metrics exposition: 1,000 services x 10 label sets each (routes/peers), time to render."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # runnable as a script from a checkout

from waypoint.telemetry import RequestLabels, RequestResult, WaypointMetrics  # noqa: E402


def fill(services: int, per_service: int, requests_per_series: int, seed: int = 1) -> WaypointMetrics:
    rng = random.Random(seed)
    m = WaypointMetrics(max_series=services * per_service)
    for s in range(services):
        ns = f"ns{s % 50}"
        for k in range(per_service):
            labels = RequestLabels(
                source_workload=f"client-{k}", source_workload_namespace="clients",
                source_principal=f"spiffe://cluster.local/ns/clients/sa/client-{k}", source_app=f"client-{k}",
                source_version="v1", source_canonical_service=f"client-{k}", source_canonical_revision="v1",
                destination_workload=f"svc-{s}-v1", destination_workload_namespace=ns,
                destination_principal=f"spiffe://cluster.local/ns/{ns}/sa/svc-{s}", destination_app=f"svc-{s}",
                destination_version="v1", destination_service=f"svc-{s}.{ns}.svc.cluster.local",
                destination_service_name=f"svc-{s}", destination_service_namespace=ns,
                destination_canonical_service=f"svc-{s}", destination_canonical_revision="v1",
                response_code="200", destination_cluster="Kubernetes", source_cluster="Kubernetes")
            for _ in range(requests_per_series):
                m.record(RequestResult(labels=labels, start_time=0.0, duration_ms=rng.expovariate(1 / 20),
                                       request_bytes=rng.randrange(0, 5000), response_bytes=rng.randrange(0, 50000)))
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--per-service", type=int, default=10)
    ap.add_argument("--requests", type=int, default=3, help="requests recorded per label set")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = fill(args.services, args.per_service, args.requests)
    fill_s = time.perf_counter() - t0
    streamed, joined, size, lines = [], [], 0, 0
    for _ in range(args.runs):
        t = time.perf_counter()
        size = lines = 0
        for chunk in m.exposition_chunks():  # what a server writing chunk by chunk pays
            size += len(chunk)
            lines += chunk.count(b"\n")
        streamed.append(time.perf_counter() - t)
        t = time.perf_counter()
        body = m.exposition()  # one body: adds the join (and its memory)
        joined.append(time.perf_counter() - t)
        assert len(body) == size
        del body
    n = args.services * args.per_service * args.requests
    print(json.dumps({"series": len(m), "exposition_bytes": size, "lines": lines,
                      "streamed_s_min": round(min(streamed), 3), "streamed_s_median": round(sorted(streamed)[len(streamed) // 2], 3),
                      "joined_s_min": round(min(joined), 3), "joined_s_median": round(sorted(joined)[len(joined) // 2], 3),
                      "record_us_per_request": round(fill_s / n * 1e6, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
