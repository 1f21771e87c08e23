"""Tracing configuration, typed: Istio's Telemetry (`telemetry.istio.io`) and the mesh config's tracing providers.

Converted once at the config edge (mesh/config/telemetry.py); resolved per waypoint by
waypoint/trace_policy.py. As in Istio, a Telemetry names providers; the providers themselves
(where spans go) live in the mesh config (`meshConfig.extensionProviders`, the `mesh` key of
ConfigMap `istio-system/istio`), which this mesh distributes as `MeshConfig`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from .base import FrozenMap, ResourceKey
from .policy import TargetRef
from .resources import Resource

__all__ = ["TracingMode", "CustomTag", "Tracing", "Telemetry", "OtelHttp", "TracingProvider",
           "MeshConfig", "MESH_CONFIG_NAME", "DEFAULT_SAMPLING_PERCENTAGE"]

MESH_CONFIG_NAME = "istio"
"""Istio's mesh config is ConfigMap `istio-system/istio`, key `mesh` (YAML)."""
DEFAULT_SAMPLING_PERCENTAGE = 1.0
"""Istio's default: `meshConfig.defaultConfig.tracing.sampling` is 1 %."""


class TracingMode(enum.Enum):
    """`tracing[].match.mode`: which proxy direction an entry configures."""

    CLIENT_AND_SERVER = "CLIENT_AND_SERVER"
    CLIENT = "CLIENT"
    SERVER = "SERVER"


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomTag:
    """`tracing[].customTags[name]`: exactly one of a literal, an environment variable of the
    proxy, or a request header (each with a default)."""

    literal: str | None = None
    environment: str | None = None
    header: str | None = None
    default: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracing:
    """One `spec.tracing[]` entry. None = not set here (inherited from a less specific Telemetry)."""

    mode: TracingMode = TracingMode.CLIENT_AND_SERVER
    providers: tuple[str, ...] | None = None
    random_sampling_percentage: float | None = None
    disable_span_reporting: bool | None = None
    custom_tags: tuple[tuple[str, CustomTag], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry(Resource):
    kind: ClassVar[str] = "Telemetry"
    selector: FrozenMap | None = None
    """spec.selector.matchLabels (workloads with sidecars; a waypoint is chosen by targetRefs)."""
    target_refs: tuple[TargetRef, ...] = ()
    tracing: tuple[Tracing, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class OtelHttp:
    """`opentelemetry.http`: OTLP/HTTP (protobuf) export."""

    path: str = "/v1/traces"
    timeout: float = 10.0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingProvider:
    """`extensionProviders[]` entry with `opentelemetry`: where a waypoint exports spans."""

    name: str
    service: str
    """A Service host (`otel-collector.observability.svc.cluster.local`, or `name.namespace`)
    or an IP address."""
    port: int
    http: OtelHttp = OtelHttp()
    max_tag_length: int = 256
    """Istio's default for `maxTagLength`: longer attribute values are cut."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig(Resource):
    """The parts of Istio's mesh config the mesh acts on (tracing, protocol detection), from ConfigMap istio-system/istio."""

    kind: ClassVar[str] = "MeshConfig"
    protocol_detection_timeout: float = 0.0
    """`protocolDetectionTimeout`: how long a waypoint waits for a client's first bytes on a port
    of no declared protocol before relaying it as opaque TCP. 0 (Istio's default since 1.10):
    no timeout, wait for the client; a server-first protocol needs its port declared `tcp`."""
    enable_tracing: bool = True
    tracing_providers: tuple[TracingProvider, ...] = ()
    default_tracing_providers: tuple[str, ...] = ()
    """`defaultProviders.tracing`: used where no Telemetry names one."""
    default_sampling_percentage: float = DEFAULT_SAMPLING_PERCENTAGE
    """`defaultConfig.tracing.sampling`: where no Telemetry sets randomSamplingPercentage."""

    @property
    def key(self) -> ResourceKey:
        # Applied and deleted as the ConfigMap it is written as.
        return ResourceKey("ConfigMap", self.meta.namespace, self.meta.name)

    def provider(self, name: str) -> TracingProvider | None:
        return next((p for p in self.tracing_providers if p.name == name), None)
