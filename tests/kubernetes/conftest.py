"""The kubernetes tier: one real control plane (etcd + kube-apiserver + controller-manager +
scheduler on loopback) for the whole session; each test works in its own namespace."""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from .cluster import KubeCluster

_ns = itertools.count(1)


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    cluster = KubeCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def namespace(kube: KubeCluster) -> Iterator[str]:
    """A fresh namespace (deleted afterwards, without waiting for it to finish terminating)."""
    name = f"t{os.getpid()}-{next(_ns)}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
