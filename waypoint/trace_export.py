"""Span export with the OpenTelemetry SDK: one TracerProvider per collector, OTLP/HTTP (protobuf), batched off the request path.

Imported only once tracing is configured (the SDK is not loaded otherwise). The request path
only starts and ends spans: `BatchSpanProcessor` queues an ended span (bounded, 2048 by
default, Envoy's and the SDK's order of size) and its worker thread exports batches over
OTLP/HTTP; when the queue is full the oldest span is dropped and counted, so a slow or
absent collector never slows a request. Span and trace ids are the ones the waypoint
decided (mesh/tracecontext.py, from its injected rng), handed to the SDK through its
IdGenerator hook, so the id forwarded upstream is the id exported.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import requests
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanKind, TraceFlags, TraceState

from mesh.tracecontext import TraceDecision

from .tracing import SpanStats

__all__ = ["SpanSink", "QUEUE_SIZE"]

QUEUE_SIZE = 2048
BATCH_SIZE = 512
FLUSH_MS = 1000.0
"""Export at least once a second (Envoy's OpenTelemetry tracer flushes every 5 s)."""


class _Ids(IdGenerator):
    """Hands the SDK the ids the waypoint decided (set just before each start_span, on the
    one event-loop thread)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


class _Counting(SpanExporter):
    def __init__(self, inner: SpanExporter, stats: SpanStats) -> None:
        self.inner = inner
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            r = self.inner.export(spans)
        except Exception:   # noqa: BLE001 -- a failed export loses this batch, never the thread
            r = SpanExportResult.FAILURE
        if r is SpanExportResult.SUCCESS:
            self.stats.exported += len(spans)
        else:
            self.stats.export_failed += len(spans)
        return r

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _Processor(BatchSpanProcessor):
    def __init__(self, exporter: SpanExporter, stats: SpanStats, queue_size: int) -> None:
        super().__init__(exporter, max_queue_size=queue_size, schedule_delay_millis=FLUSH_MS,
                         max_export_batch_size=min(BATCH_SIZE, queue_size))
        self.stats = stats
        self.queue_size = queue_size

    def on_end(self, span: ReadableSpan) -> None:
        # The SDK's deque drops its oldest entry when full; count that here (it only logs).
        q = getattr(self._batch_processor, "_queue", None)
        if q is not None and len(q) >= self.queue_size:
            self.stats.dropped += 1
        super().on_end(span)


class SpanSink:
    """Spans of one waypoint to one collector URL."""

    def __init__(self, url: str, *, service_name: str, resource: Mapping[str, str], headers: Mapping[str, str],
                 timeout: float, max_tag_length: int, stats: SpanStats, queue_size: int = QUEUE_SIZE) -> None:
        self.url = url
        session = requests.Session()
        session.trust_env = False    # never an HTTP(S)_PROXY from the environment: the collector is in the mesh
        exporter = OTLPSpanExporter(endpoint=url, headers=dict(headers), timeout=timeout, session=session)
        self._ids = _Ids()
        self._provider = TracerProvider(
            sampler=ALWAYS_ON, id_generator=self._ids, shutdown_on_exit=False,
            resource=Resource.create({"service.name": service_name, **resource}),
            span_limits=SpanLimits(max_attribute_length=max_tag_length))
        self._provider.add_span_processor(_Processor(_Counting(exporter, stats), stats, queue_size))
        self._tracer = self._provider.get_tracer("ambient.waypoint")

    def start(self, decision: TraceDecision, name: str, start_ns: int, attributes: Mapping[str, str]):
        """A recording SERVER span with the decided ids (the caller's span as remote parent)."""
        ctx = decision.context
        if decision.parent_span_id:
            state = TraceState.from_header([decision.tracestate]) if decision.tracestate else TraceState()
            parent = trace_api.set_span_in_context(NonRecordingSpan(trace_api.SpanContext(
                ctx.trace_id, decision.parent_span_id, is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=state)), Context())
        else:
            parent = Context()
        self._ids.trace_id, self._ids.span_id = ctx.trace_id, ctx.span_id
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns,
                                       attributes=dict(attributes))

    def close(self) -> None:
        """Flush what is queued and stop, on a thread of its own (it may wait for the collector)."""
        threading.Thread(target=self._provider.shutdown, name="span-sink-shutdown", daemon=True).start()

    def flush(self, timeout_millis: int = 5000) -> bool:
        """Blocking: export everything queued (tests and shutdown only, never the loop)."""
        return self._provider.force_flush(timeout_millis)
