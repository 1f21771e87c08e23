#!/usr/bin/env python3
"""Test helper: a real OTLP/HTTP trace receiver (protobuf), decoding ExportTraceServiceRequest with the official opentelemetry-proto classes.

As a module: `Receiver(host, port)` serves on a thread; `.spans` holds the decoded spans
(dicts: trace_id, span_id, parent_span_id as hex, name, kind, attributes, resource).
As a script (run in a pod by the netns tests): `otlp_receiver.py PORT [LIFETIME_S]` serves
on 0.0.0.0:PORT, prints `listening`, then one JSON line per span on stdout; it also answers
`GET /spans` with all of them as JSON. Exits by itself after LIFETIME_S (default 300).
"""
from __future__ import annotations

import http.server
import json
import sys
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


def decode(body: bytes) -> list[dict]:
    """The spans of one ExportTraceServiceRequest, flattened."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name, "kind": _KINDS.get(s.kind, s.kind),
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    "status": s.status.code, "trace_state": s.trace_state,
                    "attributes": {a.key: _value(a.value) for a in s.attributes}, "resource": resource})
    return out


class Receiver:
    """An OTLP/HTTP receiver on a thread (in-process tests)."""

    def __init__(self, host: str, port: int = 4318, *, on_span=None) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self.lock = threading.Lock()
        self._on_span = on_span
        recv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    return self._answer(404 if self.path != "/v1/traces" else 415, b"")
                try:
                    spans = decode(body)
                except Exception as e:   # noqa: BLE001 -- a bad request is the sender's bug: answer 400
                    return self._answer(400, str(e).encode())
                with recv.lock:
                    recv.requests += 1
                    recv.spans.extend(spans)
                if recv._on_span is not None:
                    for s in spans:
                        recv._on_span(s)
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def do_GET(self):
                with recv.lock:
                    body = json.dumps(recv.spans).encode()
                self._answer(200, body, "application/json")

            def _answer(self, status, body, ctype="text/plain"):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    port = int(sys.argv[1])
    lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    r = Receiver("0.0.0.0", port, on_span=lambda s: print(json.dumps(s), flush=True))
    print("listening", flush=True)
    time.sleep(lifetime)
    r.close()


if __name__ == "__main__":
    main()
