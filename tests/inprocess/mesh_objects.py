"""What both in-process harnesses share: loopback addresses, a CA, and the objects fed to ProxyState."""
from __future__ import annotations

import os
import random
import socket
import textwrap

from controlplane.ca import CertificateAuthority
from mesh.clock import SystemClock
from mesh.config import load_text
from mesh.distribution.protocol import Snapshot
from mesh.state import ProxyState

TD = "cluster.local"


class MeshObjects:
    """Addresses from a loopback /24 of the run's own, and the mesh's objects given to the
    proxies' ProxyState as snapshots (as the control-plane client would)."""

    def __init__(self) -> None:
        # A /24 of its own per run: parallel runs (other worktrees) must not collide on 15008.
        self.prefix = f"127.{100 + os.getpid() % 100}.{random.Random().randrange(1, 255)}."
        self._next = 1
        self.ca = CertificateAuthority.generate(TD, clock=SystemClock())
        self.state = ProxyState()
        self.objects: list = []
        self._version = 0

    def ip(self) -> str:
        # An address whose 15008 is free: a listener another test (or run) left behind on the same
        # address made a later bind fail with EADDRINUSE (1 red CI run).
        for _ in range(250):
            ip = self.prefix + str(self._next)
            self._next += 1
            with socket.socket() as probe:
                try:
                    probe.bind((ip, 15008))
                except OSError:
                    continue
            return ip
        raise RuntimeError(f"no free address in {self.prefix}0/24")

    def publish(self) -> None:
        self._version += 1
        self.state.apply_snapshot(Snapshot(version=self._version, resources=tuple(self.objects)))
        self.published()

    def published(self) -> None:
        """After each snapshot (a harness re-checks live connections here)."""

    def apply(self, yaml: str) -> list:
        objs = load_text(textwrap.dedent(yaml), "test.yaml")
        self.objects.extend(objs)
        self.publish()
        return objs

    def remove(self, objs: list) -> None:
        self.objects = [o for o in self.objects if all(o is not x for x in objs)]
        self.publish()
