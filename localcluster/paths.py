"""Where a local cluster keeps its files and how its host objects are named."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["ClusterPaths", "DEFAULT_CLUSTER", "check_cluster_name"]

DEFAULT_CLUSTER = "ambient"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$")


def check_cluster_name(name: str) -> str:
    # Short: it prefixes netns, cgroup and interface names, some of which have 15-char limits.
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid cluster name {name!r}: 1-16 characters of [a-z0-9-]")
    return name


@dataclass(frozen=True, slots=True)
class ClusterPaths:
    name: str
    run_root: str = "/run/ambient"
    """Runtime files (sockets, logs, per-node credentials); removed by `ambient down`."""
    state_root: str = "/var/lib/ambient"
    """Persistent files (the CA, unless given); kept across `down`/`up`."""

    @property
    def prefix(self) -> str:
        """Prefix of every netns, cgroup and pin this cluster makes."""
        return f"amb-{self.name}"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run_root, self.name)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.state_root, self.name)

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.state_dir, "ca")

    @property
    def runner_socket(self) -> str:
        return os.path.join(self.run_dir, "runner.sock")

    @property
    def control_plane_socket(self) -> str:
        return os.path.join(self.run_dir, "cp.sock")

    @property
    def runner_log(self) -> str:
        return os.path.join(self.run_dir, "runner.log")

    @property
    def runner_pid_file(self) -> str:
        return os.path.join(self.run_dir, "runner.pid")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.run_dir, "logs")

    @property
    def bpf_pin_dir(self) -> str:
        return os.path.join("/sys/fs/bpf", self.prefix)

    def node_dir(self, node: str) -> str:
        return os.path.join(self.run_dir, "nodes", node)

    def waypoint_dir(self, namespace: str, gateway: str) -> str:
        """A waypoint's run dir (`bootstrap/`, `admin.sock`), as its command line names it."""
        return os.path.join(self.run_dir, "waypoints", namespace, gateway)

    def ztunnel_log(self, node: str, worker: int = 0) -> str:
        return os.path.join(self.logs_dir, f"ztunnel-{node}{'' if worker == 0 else f'-{worker}'}.log")

    @staticmethod
    def waypoint_log_name(namespace: str, gateway: str) -> str:
        return f"waypoint-{namespace}-{gateway}.log"

    def waypoint_log(self, namespace: str, gateway: str) -> str:
        return os.path.join(self.logs_dir, self.waypoint_log_name(namespace, gateway))

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        return os.path.join(self.logs_dir, f"{namespace}_{pod}_{container}.log")
