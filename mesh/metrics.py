"""Prometheus counters with the text exposition format, for the proxies' own metrics.

Hand-written on purpose: the proxies only need labelled counters, and importing
prometheus_client costs every ztunnel about 3 MB of RSS (it pulls in http.server, wsgiref,
email). Tests check the output with prometheus_client's own parser.
"""
from __future__ import annotations

__all__ = ["BUILD_TAG", "Counter", "Registry", "build_info", "family"]

BUILD_TAG = "0.1.0"
"""The version `istio_build{component, tag}` reports (the project's version)."""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class Counter:
    """A counter family: `labels(*values)` returns the child for one label set (cache it)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name if name.endswith("_total") else f"{name}_total"
        self.documentation = documentation
        self.labelnames = labelnames
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Child()
        return child

    def exposition(self) -> str:
        out = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        for values, child in self._children.items():
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in zip(self.labelnames, values))
            out.append(f"{self.name}{{{labels}}} {child.value!r}")
        return "\n".join(out) + "\n"


def family(name: str, kind: str, documentation: str,
           samples: "list[tuple[dict[str, str], float]]") -> str:
    """One counter or gauge family in the text format: `# HELP`, `# TYPE`, `name{labels} value`
    per sample (a counter's name ends in `_total` unless Istio's does not)."""
    out = [f"# HELP {name} {documentation}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        v = float(value)
        out.append(f"{name}{{{text}}} {int(v) if v.is_integer() else repr(v)}" if text
                   else f"{name} {int(v) if v.is_integer() else repr(v)}")
    return "\n".join(out) + "\n"


def build_info(component: str) -> bytes:
    """Istio's `istio_build` gauge for one component (`ztunnel`, `proxy`, `pilot`)."""
    return family("istio_build", "gauge", "Istio component build info",
                  [({"component": component, "tag": BUILD_TAG}, 1)]).encode()


class Registry:
    def __init__(self) -> None:
        self._families: list[Counter] = []

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> Counter:
        c = Counter(name, documentation, labelnames)
        self._families.append(c)
        return c

    def exposition(self) -> bytes:
        """All families in the Prometheus text format (version 0.0.4)."""
        return "".join(f.exposition() for f in self._families).encode()
