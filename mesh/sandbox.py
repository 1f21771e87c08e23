"""Pod sandbox records: how a node agent tells the node proxy where a pod's netns and cgroup are.

Istio's CNI node agent hands ztunnel each pod's network namespace over a Unix socket (ZDS).
Here the node agent (local mode's runner today, the Kubernetes node agent next) writes one
small JSON file per pod on the node into the proxy's `<run_dir>/pods/` directory, and the
proxy reads it when it enrolls the pod; so the proxy never derives names from a runtime's
naming scheme. Files are written atomically (temp file + rename) and removed with the pod.

    {"uid": "ns/name", "netns": "/var/run/netns/...", "cgroup": "/sys/fs/cgroup/..."}
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

__all__ = ["Sandbox", "SandboxError", "SandboxDir"]


class SandboxError(ValueError):
    """A sandbox record is missing a field or is not valid JSON."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    uid: str
    """The pod's `namespace/name`."""
    netns: str
    """Absolute path of the pod's network namespace."""
    cgroup: str
    """Absolute path of the pod's cgroup v2 directory."""


class SandboxDir:
    """The `pods/` directory of one node proxy's run directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, uid: str) -> str:
        return os.path.join(self.path, hashlib.sha256(uid.encode()).hexdigest()[:16] + ".json")

    def write(self, sb: Sandbox) -> None:
        for what, p in (("netns", sb.netns), ("cgroup", sb.cgroup)):
            if not os.path.isabs(p):
                raise SandboxError(f"sandbox of {sb.uid}: {what} must be an absolute path, not {p!r}")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        final = self._file(sb.uid)
        tmp = final + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"uid": sb.uid, "netns": sb.netns, "cgroup": sb.cgroup}, f)
        os.replace(tmp, final)

    def remove(self, uid: str) -> None:
        try:
            os.unlink(self._file(uid))
        except FileNotFoundError:
            pass

    def get(self, uid: str) -> Sandbox | None:
        """The pod's record, or None while the node agent has not written it."""
        try:
            with open(self._file(uid)) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw)
            sb = Sandbox(uid=d["uid"], netns=d["netns"], cgroup=d["cgroup"])
        except (ValueError, KeyError, TypeError) as e:
            raise SandboxError(f"bad sandbox record {self._file(uid)}: {e}") from None
        if sb.uid != uid:
            raise SandboxError(f"sandbox record {self._file(uid)} is for {sb.uid}, not {uid}")
        return sb
