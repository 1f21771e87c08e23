"""The kubernetes tier: one real control plane (etcd + kube-apiserver + controller-manager +
scheduler on loopback) for the whole session; each test works in its own namespace."""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from .cluster import KubeCluster

if TYPE_CHECKING:
    from .nodes import Nodes

_ns = itertools.count(1)


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    cluster = KubeCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mesh_crds(kube: KubeCluster) -> KubeCluster:
    """The cluster with the mesh's CRDs (Istio kinds and Gateway API) installed and established."""
    import yaml

    from kubemode.crds import crds
    kube.apply(yaml.safe_dump_all(crds(gateway_api=True)))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/part-of=ambient")
    return kube


@pytest.fixture
def namespace(kube: KubeCluster) -> Iterator[str]:
    """A fresh namespace (deleted afterwards, without waiting for it to finish terminating)."""
    name = f"t{os.getpid()}-{next(_ns)}"
    kube.kubectl("create", "namespace", name)
    # Pods need the namespace's default ServiceAccount, which the controller-manager creates.
    deadline = time.monotonic() + 30
    while kube.kubectl("get", "sa", "default", "-n", name, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name}"
        time.sleep(0.1)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def no_mesh_namespace(mesh_crds: KubeCluster) -> KubeCluster:
    """The cluster without istio-system (the tests that install share the one name): an
    earlier test's uninstall may still be terminating it, so wait until it is gone."""
    kube = mesh_crds
    kube.kubectl("delete", "namespace", "istio-system", "--ignore-not-found", "--wait=false")
    deadline = time.monotonic() + 120
    while kube.kubectl("get", "namespace", "istio-system", check=False).returncode == 0:
        assert time.monotonic() < deadline, "istio-system did not go away"
        time.sleep(0.5)
    return kube


@pytest.fixture
def nodes(kube: KubeCluster, tmp_path: object) -> Iterator["Nodes"]:
    """Node agents for this test (root: under `flock /tmp/netns.lock`); start them with
    `nodes.start(name, ...)`. Afterwards none of their netns may be left."""
    from mesh.linux.netns import list_netns

    from .nodes import PREFIX, Nodes
    n = Nodes(kube, str(tmp_path))
    try:
        yield n
    finally:
        n.stop()
    assert [x for x in list_netns() if x.startswith(PREFIX + "-")] == []
