"""`ambient logs --access`: the ztunnels' and waypoints' access-log lines, parsed once into typed records, filtered, printed.

Each proxy's stderr is its log file under `<run dir>/logs/` (`ztunnel-<node>[-<worker>].log`,
`waypoint-<ns>-<gateway>.log`), one record per line: `<asctime> <LEVEL> <logger> <message>`.
Access lines are the `ambient.access` logger's:

    ztunnel   connection complete {"direction": ..., "src.workload": ..., "dst.service": ..., "status": ...}
    waypoint  Istio's default Envoy text format (waypoint/telemetry.py ACCESS_LOG_FORMAT)

`parse_line` turns one into an `AccessRecord` (pure, table-tested), `enrich` names the pods
behind the waypoint's bare addresses from the cluster's pod IPs, `Filter.matches` decides what
is shown, `text_line` / `json_doc` print it. The CLI only reads files (once, or following them).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, BinaryIO, Literal

from localcluster.api import ApiError, call
from localcluster.paths import ClusterPaths

__all__ = ["Endpoint", "AccessRecord", "AccessLogError", "Proxy", "parse_line", "enrich", "StatusMatch",
           "parse_status", "Filter", "text_line", "json_doc", "proxy_logs", "seek_since", "Reader", "add_arguments", "cmd"]

Kind = Literal["ztunnel", "waypoint"]
_LOGGER = "ambient.access"


class AccessLogError(ValueError):
    """An `ambient.access` line this parser cannot read (it names what was wrong)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """Whose log a line came from."""

    kind: Kind
    name: str
    """`<node>` or `<node>/<worker>` (ztunnel), `<ns>/<gateway>` (waypoint)."""

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    workload: str | None = None
    namespace: str | None = None
    identity: str | None = None
    addr: str | None = None
    """`ip:port`."""

    @property
    def ip(self) -> str | None:
        return self.addr.rpartition(":")[0] or None if self.addr else None

    def label(self) -> str:
        if self.workload:
            return f"{self.namespace}/{self.workload}" if self.namespace else self.workload
        return self.addr or "-"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessRecord:
    """One request (waypoint) or one connection (ztunnel), as its proxy logged it."""

    time: float
    """Unix seconds: the request's start (waypoint), the log time at the connection's end (ztunnel)."""
    proxy: Proxy
    src: Endpoint
    dst: Endpoint
    service: str | None = None
    """Destination Service FQDN (`name.ns.svc.<domain>`), when the traffic was addressed to one."""
    code: int | None = None
    """HTTP status (waypoint; 0: none was sent) or HBONE status (ztunnel), when there was one."""
    flags: str | None = None
    """Envoy response flags (`UF,URX`, ...), None when there were none."""
    error: str | None = None
    """ztunnel: the failure reason (a closed set, mesh/proxy/reason.py)."""
    duration_ms: float = 0.0
    bytes_sent: int = 0
    """Source -> destination (waypoint: request bytes received)."""
    bytes_recv: int = 0
    direction: str | None = None
    """ztunnel: `inbound` / `outbound`."""
    security: str | None = None
    """ztunnel: `mutual_tls` / `plaintext`."""
    method: str | None = None
    path: str | None = None
    protocol: str | None = None
    authority: str | None = None
    request_id: str | None = None
    user_agent: str | None = None
    details: str | None = None
    """Envoy's RESPONSE_CODE_DETAILS (`via_upstream`, `route_not_found`, ...)."""
    route: str | None = None
    upstream_cluster: str | None = None
    policy: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.code is not None and (self.code == 0 or self.code >= 500)) \
            or self.flags is not None

    @property
    def service_name(self) -> tuple[str, str] | None:
        """(name, namespace) of `service`."""
        if not self.service:
            return None
        parts = self.service.split(".")
        return (parts[0], parts[1]) if len(parts) >= 2 else (parts[0], "")


# -- parsing (pure) ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _local_second(v: str) -> float:
    """`2026-12-03 14:57:07` in the local time zone (logging's asctime) -> Unix seconds."""
    return datetime.datetime(int(v[0:4]), int(v[5:7]), int(v[8:10]), int(v[11:13]), int(v[14:16]),
                             int(v[17:19])).timestamp()   # naive: the local zone, as time.localtime wrote it


@functools.lru_cache(maxsize=4096)
def _utc_second(v: str) -> float:
    """`2026-12-03T14:57:07` (UTC) -> Unix seconds."""
    return datetime.datetime(int(v[0:4]), int(v[5:7]), int(v[8:10]), int(v[11:13]), int(v[14:16]),
                             int(v[17:19]), tzinfo=datetime.timezone.utc).timestamp()


_LOCAL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}$")
_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z?$")


def _prefix_time(date: str, clock: str) -> float:
    """logging's default asctime, `2026-12-03 14:57:07,123`, in the writer's local time."""
    v = f"{date} {clock}"
    try:
        if not _LOCAL.fullmatch(v):
            raise ValueError(v)
        return _local_second(v[:19]) + int(v[20:23]) / 1000.0
    except (ValueError, OverflowError):
        raise AccessLogError(f"bad log time {v!r}") from None


def _split(line: str) -> tuple[str, str, str, str, str] | None:
    parts = line.rstrip("\r\n").split(" ", 4)
    if len(parts) < 5 or parts[3] != _LOGGER:
        return None
    return parts[0], parts[1], parts[2], parts[3], parts[4]


# Quoted fields are lazy and the whole line is anchored: a quote inside a header still parses.
_ENVOY = re.compile(
    r'\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<details>\S+) (?P<term>\S+) "(?P<utfr>.*?)" (?P<rx>\d+) (?P<tx>\d+) (?P<dur>\d+) (?P<ust>\S+) '
    r'"(?P<xff>.*?)" "(?P<ua>.*?)" "(?P<rid>.*?)" "(?P<auth>.*?)" "(?P<uhost>.*?)" '
    r'(?P<ucluster>\S+) (?P<ulocal>\S+) (?P<dlocal>\S+) (?P<dremote>\S+) (?P<sni>\S+) (?P<route>\S+)$')


def _dash(v: str) -> str | None:
    return None if v in ("-", "") else v


def _start_time(v: str) -> float:
    """START_TIME as the waypoint prints it: `2026-12-03T14:57:07.123Z` (UTC)."""
    try:
        if not _UTC.fullmatch(v):
            raise ValueError(v)
        frac = v[19:].rstrip("Z")
        return _utc_second(v[:19]) + (float(frac) if frac else 0.0)
    except (ValueError, OverflowError):
        raise AccessLogError(f"bad START_TIME {v!r}") from None


def _cluster_service(cluster: str | None) -> str | None:
    """The Service FQDN of an Envoy cluster name `outbound|80|v1|catalog.pay.svc.cluster.local`."""
    if not cluster or "|" not in cluster:
        return None
    fqdn = cluster.rsplit("|", 1)[1]
    return fqdn if ".svc." in fqdn else None


def _waypoint(msg: str, proxy: Proxy) -> AccessRecord:
    m = _ENVOY.match(msg)
    if m is None:
        raise AccessLogError(f"not Istio's access-log format: {msg[:120]!r}")
    g = m.groupdict()
    service = _cluster_service(_dash(g["ucluster"]))
    svc_ns = service.split(".")[1] if service else None
    route = _dash(g["route"])
    return AccessRecord(
        time=_start_time(g["start"]), proxy=proxy,
        src=Endpoint(addr=_dash(g["dremote"])),
        dst=Endpoint(addr=_dash(g["uhost"]), namespace=svc_ns),
        service=service, code=int(g["code"]), flags=_dash(g["flags"]), duration_ms=float(g["dur"]),
        bytes_sent=int(g["rx"]), bytes_recv=int(g["tx"]), method=_dash(g["method"]), path=_dash(g["path"]),
        protocol=_dash(g["protocol"]), authority=_dash(g["auth"]), request_id=_dash(g["rid"]),
        user_agent=_dash(g["ua"]), details=_dash(g["details"]), route=route,
        upstream_cluster=_dash(g["ucluster"]))


_ZT_PREFIX = "connection complete "


def _ztunnel(msg: str, proxy: Proxy, t: float) -> AccessRecord:
    if not msg.startswith(_ZT_PREFIX):
        raise AccessLogError(f"not a ztunnel connection record: {msg[:120]!r}")
    try:
        d = json.loads(msg[len(_ZT_PREFIX):])
    except ValueError as e:
        raise AccessLogError(f"ztunnel record is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise AccessLogError("ztunnel record is not a JSON object")

    def s(k: str) -> str | None:
        v = d.get(k)
        return None if v is None else str(v)

    def ep(side: str) -> Endpoint:
        return Endpoint(workload=s(f"{side}.workload"), namespace=s(f"{side}.namespace"),
                        identity=s(f"{side}.identity"), addr=s(f"{side}.addr"))
    try:
        status = None if d.get("status") is None else int(d["status"])
        return AccessRecord(
            time=t, proxy=proxy, src=ep("src"), dst=ep("dst"), service=s("dst.service"), code=status,
            flags=_dash(s("response_flags") or ""), error=s("error"),
            duration_ms=float(d.get("duration_ms") or 0.0), bytes_sent=int(d.get("bytes_sent") or 0),
            bytes_recv=int(d.get("bytes_recv") or 0), direction=s("direction"), security=s("security"),
            details=s("detail"), policy=s("policy"))
    except (TypeError, ValueError) as e:
        raise AccessLogError(f"ztunnel record has a bad field: {e}") from None


def parse_line(line: str, proxy: Proxy) -> AccessRecord | None:
    """The record of one log line; None for a line that is not an access-log line (other loggers,
    tracebacks). Raises AccessLogError for an `ambient.access` line it cannot read."""
    parts = _split(line)
    if parts is None:
        return None
    date, clock, _level, _name, msg = parts
    if proxy.kind == "waypoint":
        return _waypoint(msg, proxy)
    return _ztunnel(msg, proxy, _prefix_time(date, clock))


def enrich(r: AccessRecord, pods: Mapping[str, tuple[str, str]]) -> AccessRecord:
    """Name the pods behind bare addresses (`pods`: IP -> (namespace, pod)), as a waypoint logs only those."""
    out = {}
    for side in ("src", "dst"):
        e: Endpoint = getattr(r, side)
        if e.workload is None and e.ip in pods:
            ns, pod = pods[e.ip]  # type: ignore[index]
            out[side] = replace(e, workload=pod, namespace=ns)
    return replace(r, **out) if out else r


# -- filtering (pure) ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusMatch:
    """One `--status` item: a code (`503`), a class (`5xx`) or `error` (any failure)."""

    code: int | None = None
    klass: int | None = None
    error: bool = False

    def matches(self, r: AccessRecord) -> bool:
        if self.error:
            return r.failed
        if r.code is None:
            return False
        return r.code == self.code if self.code is not None else r.code // 100 == self.klass


_STATUS = re.compile(r"^(?:(?P<code>[0-9]{3})|(?P<klass>[1-5])xx|(?P<error>error))$")


def parse_status(v: str) -> tuple[StatusMatch, ...]:
    """`5xx`, `503`, `2xx,404`, `error`."""
    out = []
    for item in v.lower().split(","):
        m = _STATUS.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"bad --status item {item!r}: want a code (503), a class (5xx) or 'error'")
        out.append(StatusMatch(code=int(m["code"]) if m["code"] else None,
                               klass=int(m["klass"]) if m["klass"] else None, error=bool(m["error"])))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    namespace: str | None = None
    """Traffic from or to this namespace."""
    service: str | None = None
    """`name`, `name.ns`, `ns/name` or the FQDN: traffic addressed to that Service."""
    status: tuple[StatusMatch, ...] = ()
    since: float | None = None
    """Records at or after this Unix time."""
    kind: Kind | None = None

    def _service_ok(self, r: AccessRecord) -> bool:
        want = self.service
        if want is None:
            return True
        got = r.service_name
        if got is None:
            return False
        if "/" in want:
            ns, _, name = want.partition("/")
            return got == (name, ns)
        parts = want.split(".")
        return parts[0] == got[0] and (len(parts) == 1 or parts[1] == got[1])

    def matches(self, r: AccessRecord) -> bool:
        if self.kind is not None and r.proxy.kind != self.kind:
            return False
        if self.since is not None and r.time < self.since:
            return False
        if self.namespace is not None and self.namespace not in (
                r.src.namespace, r.dst.namespace, (r.service_name or (None, None))[1]):
            return False
        if not self._service_ok(r):
            return False
        return not self.status or any(s.matches(r) for s in self.status)


# -- printing (pure) -----------------------------------------------------------------------------

def _iso(t: float) -> str:
    ms = int(round(t * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _short_service(fqdn: str | None) -> str | None:
    return ".".join(fqdn.split(".")[:2]) if fqdn else None


def text_line(r: AccessRecord) -> str:
    """One line per record: time, proxy, who -> whom, then what happened."""
    dst = r.dst.label()
    svc = _short_service(r.service)
    target = f"{svc} ({dst})" if svc and dst != "-" else svc or dst
    code = "-" if r.code is None else str(r.code)
    if r.proxy.kind == "waypoint":
        what = (f'"{r.method or "-"} {r.path or "-"}" {code} {r.flags or "-"} {r.details or "-"} '
                f"{r.duration_ms:.0f}ms route={r.route or '-'} id={r.request_id or '-'}")
    else:
        sec = "mTLS" if r.security == "mutual_tls" else r.security or "-"
        what = (f"{r.direction or '-'} {sec} {code} {r.flags or '-'} {r.error or 'ok'} {r.duration_ms:.1f}ms "
                f"{r.bytes_sent}B/{r.bytes_recv}B" + (f" policy={r.policy}" if r.policy else ""))
    return f"{_iso(r.time)} {r.proxy} {r.src.label()} -> {target} {what}"


def json_doc(r: AccessRecord) -> dict[str, Any]:
    d = asdict(r)
    d["proxy"] = {"kind": r.proxy.kind, "name": r.proxy.name}
    d["time_iso"] = _iso(r.time)
    return d


# -- files ---------------------------------------------------------------------------------------

_WORKER = re.compile(r"^(?P<node>.+)-(?P<worker>[0-9]+)$")


def proxy_logs(logs_dir: str, names: Iterable[str], nodes: Iterable[str],
               waypoints: Iterable[tuple[str, str]]) -> dict[str, Proxy]:
    """Which proxy wrote each log file in `logs_dir` (`names`: its file names). A node name may
    itself end in `-<n>`, so a file is matched against the known nodes first."""
    nodes = set(nodes)
    wps = {ClusterPaths.waypoint_log_name(ns, gw): Proxy("waypoint", f"{ns}/{gw}") for ns, gw in waypoints}
    out = {}
    for n in sorted(names):
        path = os.path.join(logs_dir, n)
        if n in wps:
            out[path] = wps[n]
        elif n.startswith("ztunnel-") and n.endswith(".log"):
            stem = n[len("ztunnel-"):-len(".log")]
            m = _WORKER.fullmatch(stem)
            if stem in nodes:
                out[path] = Proxy("ztunnel", stem)
            elif m and m["node"] in nodes:
                out[path] = Proxy("ztunnel", f"{m['node']}/{m['worker']}")
    return out


@dataclass
class _Tail:
    """Where reading a file got to; a partial last line waits for its newline."""

    offset: int = 0
    partial: str = ""
    inode: int | None = None


def _line_time(line: bytes) -> float | None:
    """The asctime a log line starts with, or None (a traceback, a wrapped line)."""
    try:
        v = line[:23].decode("ascii")
        return _prefix_time(v[:10], v[11:]) if len(v) == 23 else None
    except (UnicodeDecodeError, AccessLogError):
        return None


_SCAN = 1 << 16


def seek_since(f: BinaryIO, size: int, since: float) -> int:
    """An offset in a log file (lines in time order, as one process after another appends them)
    at or before its first line logged at or after `since`: a binary search over line times, so
    `--since 5m` does not parse hours of log. Every record after it is still filtered by time."""
    lo, hi = 0, size
    while hi - lo > _SCAN:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # the rest of the line mid fell in
        t = None
        for _ in range(50):  # the next line that has a time
            ln = f.readline()
            if not ln:
                break
            t = _line_time(ln)
            if t is not None:
                break
        if t is not None and t < since:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        return 0
    f.seek(lo)
    return lo + len(f.readline())  # start on a line boundary


@dataclass
class Reader:
    """Reads new complete lines of every proxy log; `unreadable` counts access lines not understood.
    With `since`, a file seen for the first time is read from about that time on."""

    files: dict[str, Proxy]
    pods: Mapping[str, tuple[str, str]]
    since: float | None = None
    tails: dict[str, _Tail] = field(default_factory=dict)
    unreadable: int = 0

    def read(self) -> list[AccessRecord]:
        out = []
        for path, proxy in self.files.items():
            t = self.tails.setdefault(path, _Tail())
            try:
                st = os.stat(path)
                if t.inode is None and self.since is not None:
                    with open(path, "rb") as f:
                        t.offset, t.inode = seek_since(f, st.st_size, self.since), st.st_ino
                elif st.st_ino != t.inode or st.st_size < t.offset:  # replaced or truncated: from the top
                    t.offset, t.partial, t.inode = 0, "", st.st_ino
                if st.st_size == t.offset:
                    continue
                with open(path, "rb") as f:
                    f.seek(t.offset)
                    data = f.read()
            except OSError:
                continue
            t.offset += len(data)
            text = t.partial + data.decode("utf-8", errors="replace")
            lines = text.split("\n")
            t.partial = lines.pop()
            for ln in lines:
                if _LOGGER not in ln:
                    continue
                try:
                    r = parse_line(ln, proxy)
                except AccessLogError:
                    self.unreadable += 1
                    continue
                if r is not None:
                    out.append(enrich(r, self.pods))
        out.sort(key=lambda r: r.time)
        return out


def _duration(v: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    except ValueError:
        raise ApiError(f"bad --since {v!r} (e.g. 30s, 5m, 2h)", "bad_request") from None


def _reader(paths: ClusterPaths, since: float | None = None) -> Reader:
    st = call(paths.runner_socket, "status")
    try:
        names = os.listdir(paths.logs_dir)
    except OSError as e:
        raise ApiError(f"cannot read {paths.logs_dir}: {e.strerror}", "not_found") from None
    files = proxy_logs(paths.logs_dir, names, [n["name"] for n in st["nodes"]],
                       [(w["namespace"], w["name"]) for w in st.get("waypoints", [])])
    pods = {p["ip"]: (p["namespace"], p["name"]) for p in st["pods"] if p.get("ip")}
    return Reader(files=files, pods=pods, since=since)


def cmd(paths: ClusterPaths, a: argparse.Namespace, *, now: float | None = None) -> int:
    """Exit status: 0 records printed (or following), 1 error, 3 nothing matched."""
    try:
        status = parse_status(a.status) if a.status else ()
    except ValueError as e:
        raise ApiError(str(e), "bad_request") from None
    now = time.time() if now is None else now
    flt = Filter(namespace=a.namespace, service=a.svc, status=status, kind=a.proxy,
                 since=now - _duration(a.since) if a.since else None)
    emit = (lambda r: print(json.dumps(json_doc(r), separators=(",", ":")))) if a.output == "json" \
        else (lambda r: print(text_line(r)))
    reader = _reader(paths, flt.since)
    shown = [r for r in reader.read() if flt.matches(r)]
    if a.tail is not None and a.tail >= 0:
        shown = shown[len(shown) - a.tail:] if a.tail else []
    for r in shown:
        emit(r)
    sys.stdout.flush()
    if reader.unreadable:
        print(f"{reader.unreadable} access-log lines not understood (skipped)", file=sys.stderr)
    if not a.follow:
        return 0 if shown else 3
    try:
        last_list = time.monotonic()
        while True:  # until interrupted or the reader goes away (`| head`: BrokenPipeError, main handles it)
            time.sleep(a.interval)
            if time.monotonic() - last_list > 5:  # waypoints and nodes that came meanwhile
                fresh = _reader(paths)
                reader.files, reader.pods = fresh.files, fresh.pods
                last_list = time.monotonic()
            for r in reader.read():
                if flt.matches(r):
                    emit(r)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`ambient logs`'s access-log options (the command also prints a pod's logs)."""
    p.add_argument("--access", action="store_true", help="the ztunnels' and waypoints' access logs")
    p.add_argument("--svc", default=None, metavar="NAME", help="only traffic to this Service (name, name.ns, ns/name)")
    p.add_argument("--status", default=None, metavar="CODES",
                   help="only these: 503, 5xx, 2xx, error (any failure); comma-separated")
    p.add_argument("--since", default=None, metavar="DURATION", help="only the last 30s, 5m, 1h ...")
    p.add_argument("--proxy", choices=["ztunnel", "waypoint"], default=None, help="only this kind of proxy")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", choices=["text", "json"], default="text",
                   help="json: one object per line")
