"""The node agent's decisions about a Pod's volumes (pure): what each volume is, where a
container mounts it, and where a hostPath lands on a simulated node.

Simulated nodes share one kernel and one host filesystem, so a hostPath cannot simply be the
host's path: two nodes' ztunnels would share `/var/run/ambient` and `/sys/fs/bpf`. The rule
(`node_host_path`): what the kernel owns once for the machine is shared by every node, as it
is (`/proc`, `/sys` except bpffs, `/dev`, `/var/run/netns` where the pods' netns are, the
OS's `/usr` and `/lib/modules`); bpffs is a per-node directory of the real bpffs (so pins do
not collide); every other path is under the node's own root directory (`<state>/host`), which
is the node's "disk". Volumes the node writes files into (ServiceAccount tokens with an
audience, ConfigMaps, projections of both) are `FilesVolume`s; the API token admission adds
(at SA_TOKEN_DIR) stays the node agent's own (kubelet_pods). An `emptyDir` is a per-pod
directory on the node's disk (`EmptyDirVolume`), writable, removed with the pod; medium Memory
is the same directory (the node's state dir is its only disk) and sizeLimit is not enforced.
"""
from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["HostPathVolume", "EmptyDirVolume", "TokenFile", "ConfigMapFiles", "FilesVolume", "Mount", "plan_volumes", "plan_mounts",
           "node_host_path", "expand_argv", "SHARED_HOST_PATHS", "BPFFS", "SANDBOX_HOST_DIR"]

BPFFS = "/sys/fs/bpf"
SHARED_HOST_PATHS = ("/proc", "/sys", "/dev", "/var/run/netns", "/run/netns", "/usr", "/lib/modules")
"""Host paths every simulated node sees as they are (one kernel, one OS); bpffs excepted."""
SANDBOX_HOST_DIR = "/var/run/ambient/pods"
"""Where on the node the node agent (as the CNI step) writes each pod's sandbox record
(mesh.sandbox) for the node's ztunnel, which mounts `/var/run/ambient` as a hostPath."""
_HOST_PATH_TYPES = ("", "Directory", "DirectoryOrCreate")


@dataclass(frozen=True, slots=True)
class HostPathVolume:
    name: str
    path: str
    type: str
    """"" (no check), Directory (must exist) or DirectoryOrCreate."""


@dataclass(frozen=True, slots=True)
class EmptyDirVolume:
    """A scratch directory of the pod's own, made empty when the pod starts and removed with it."""

    name: str
    memory: bool = False
    """medium Memory: accepted, but served by the same on-disk directory (no tmpfs per pod)."""


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A ServiceAccount token bound to the pod, for `audience` ("" = the API server's)."""

    path: str
    audience: str
    seconds: int


@dataclass(frozen=True, slots=True)
class ConfigMapFiles:
    name: str
    items: tuple[tuple[str, str], ...]
    """(key, file path); empty: every key under its own name."""
    optional: bool = False


@dataclass(frozen=True, slots=True)
class FilesVolume:
    """Files the node writes for the pod (a projected or configMap volume)."""

    name: str
    tokens: tuple[TokenFile, ...] = ()
    config_maps: tuple[ConfigMapFiles, ...] = ()


@dataclass(frozen=True, slots=True)
class Mount:
    volume: str
    path: str
    read_only: bool


Volume = HostPathVolume | EmptyDirVolume | FilesVolume


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _safe_rel(path: str) -> bool:
    return bool(path) and not path.startswith("/") and ".." not in path.split("/")


def _config_map(src: Mapping[str, Any]) -> ConfigMapFiles:
    items = tuple((str(i.get("key") or ""), str(i.get("path") or "")) for i in src.get("items") or ())
    bad = [p for _, p in items if not _safe_rel(p)]
    if bad:
        raise ValueError(f"configMap {src.get('name')!r}: item paths must be relative without '..': {bad}")
    return ConfigMapFiles(name=str(src.get("name") or ""), items=items, optional=bool(src.get("optional")))


def _volume(v: Mapping[str, Any]) -> Volume:
    """One volume of the pod spec, or ValueError naming what this node cannot provide."""
    name = str(v.get("name") or "")
    if "hostPath" in v:
        hp = v["hostPath"] or {}
        path, type_ = str(hp.get("path") or ""), str(hp.get("type") or "")
        if not posixpath.isabs(path):
            raise ValueError(f"volume {name}: hostPath {path!r} must be absolute")
        if type_ not in _HOST_PATH_TYPES:
            raise ValueError(f"volume {name}: hostPath type {type_!r} (this node supports {', '.join(_HOST_PATH_TYPES[1:])})")
        return HostPathVolume(name, posixpath.normpath(path), type_)
    if "emptyDir" in v:
        ed = v["emptyDir"] or {}
        medium = str(ed.get("medium") or "")
        if medium not in ("", "Memory"):
            raise ValueError(f"volume {name}: emptyDir medium {medium!r} (this node supports \"\" and Memory)")
        return EmptyDirVolume(name, memory=medium == "Memory")  # sizeLimit: not enforced (module doc)
    if "configMap" in v:
        return FilesVolume(name, config_maps=(_config_map(v["configMap"] or {}),))
    if "projected" in v:
        tokens, cms = [], []
        for s in (v["projected"] or {}).get("sources") or ():
            if "serviceAccountToken" in s:
                t = s["serviceAccountToken"] or {}
                path = str(t.get("path") or "")
                if not _safe_rel(path):
                    raise ValueError(f"volume {name}: token path {path!r} must be relative without '..'")
                tokens.append(TokenFile(path, str(t.get("audience") or ""), _int(t.get("expirationSeconds")) or 3600))
            elif "configMap" in s:
                cms.append(_config_map(s["configMap"] or {}))
            else:
                raise ValueError(f"volume {name}: projected sources other than serviceAccountToken and configMap "
                                 f"({', '.join(s)}) are not supported on this node")
        return FilesVolume(name, tokens=tuple(tokens), config_maps=tuple(cms))
    kinds = ", ".join(k for k in v if k != "name") or "none"
    raise ValueError(f"volume {name}: {kinds} volumes are not supported on this node "
                     "(hostPath, emptyDir, configMap and projected are)")


def plan_volumes(spec_volumes: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Volume], dict[str, str]]:
    """The pod's volumes by name, and the reason each unusable one cannot be provided."""
    ok: dict[str, Volume] = {}
    bad: dict[str, str] = {}
    for v in spec_volumes:
        try:
            vol = _volume(v)
            ok[vol.name] = vol
        except ValueError as e:
            bad[str(v.get("name") or "")] = str(e)
    return ok, bad


def plan_mounts(mounts: Sequence[Mapping[str, Any]], volumes: Mapping[str, Volume], bad: Mapping[str, str],
                *, skip: str) -> tuple[tuple[Mount, ...], str | None]:
    """A container's volumeMounts (except the one at `skip`, the node's own API token), or the
    first reason one cannot be mounted."""
    out = []
    for m in mounts:
        path, name = str(m.get("mountPath") or ""), str(m.get("name") or "")
        if path == skip:
            continue
        if name in bad:
            return (), bad[name]
        if name not in volumes:
            return (), f"volumeMount {path}: no volume named {name!r}"
        if not posixpath.isabs(path) or m.get("subPath"):
            return (), f"volumeMount {path}: must be absolute, without subPath"
        out.append(Mount(name, posixpath.normpath(path), bool(m.get("readOnly"))))
    return tuple(out), None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def node_host_path(path: str, *, node_root: str, bpf_root: str) -> str:
    """Where host path `path` of this simulated node is on the real host (module doc)."""
    p = posixpath.normpath(path)
    if _under(p, BPFFS):
        return bpf_root + p[len(BPFFS):]
    if any(_under(p, s) for s in SHARED_HOST_PATHS):
        return p
    return node_root.rstrip("/") + p


def expand_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion of command and args: a defined variable is replaced,
    an undefined reference is left as written, `$$` is a literal `$`."""
    out = []
    for arg in argv:
        res, i = [], 0
        while i < len(arg):
            if arg.startswith("$$", i):
                res.append("$")
                i += 2
            elif arg.startswith("$(", i) and (j := arg.find(")", i + 2)) != -1 and arg[i + 2:j] in env:
                res.append(env[arg[i + 2:j]])
                i = j + 1
            else:
                res.append(arg[i])
                i += 1
        out.append("".join(res))
    return out
