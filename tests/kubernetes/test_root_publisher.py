"""The root publisher against the real API server and controller-manager: ConfigMap
istio-ca-root-cert appears in an existing and in a new namespace, comes back when deleted or
edited, is not written into kube-system, and a namespace being deleted is left alone (no
write the server would refuse, retried forever)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from controlplane.ca import CertificateAuthority
from controlplane.kube.api import KubeApi
from controlplane.kube.kinds import WATCHED
from controlplane.kube.root_publisher import CONFIGMAPS, RootPublisher, skip_reason
from controlplane.kube.source import KubeSource
from controlplane.store import ResourceStore
from mesh.clock import SystemClock

from .cluster import KubeCluster
from .support import until as _until

NAME = "istio-ca-root-cert"


@asynccontextmanager
async def _publisher(kube: KubeCluster, roots_pem: bytes) -> AsyncIterator[RootPublisher]:
    api = await KubeApi.from_kubeconfig(kube.kubeconfig)
    source = KubeSource(api, ResourceStore(), kinds=[k for k in WATCHED if k.kind == "Namespace"], events=False)
    roots = RootPublisher(api, source, roots_pem=roots_pem)
    await source.start()
    await roots.start()
    try:
        await source.wait_synced(20)
        yield roots
    finally:
        await roots.stop()
        await source.stop()
        # The session's cluster is shared: take back what this root put in other tests' namespaces.
        items, _ = await api.list(CONFIGMAPS)
        for cm in items:
            if (cm.get("data") or {}).get("root-cert.pem") == roots_pem.decode():
                try:
                    await api.request_json("DELETE", f"/api/v1/namespaces/{cm['metadata']['namespace']}"
                                                     f"/configmaps/{NAME}")
                except Exception:  # noqa: BLE001 - a namespace going away meanwhile
                    pass
        await api.close()


def _cm(kube: KubeCluster, ns: str) -> dict[str, Any] | None:
    p = kube.kubectl("get", "configmap", NAME, "-n", ns, "-o", "json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def test_every_namespace_gets_the_root_and_keeps_it(kube: KubeCluster, namespace: str) -> None:
    root = CertificateAuthority.generate("cluster.local", clock=SystemClock()).roots_pem.decode()
    new, doomed = f"{namespace}-new", f"{namespace}-doomed"

    def holds(ns: str) -> dict[str, Any] | None:
        cm = _cm(kube, ns)
        return cm if cm is not None and cm["data"].get("root-cert.pem") == root else None

    async def main() -> None:
        async with _publisher(kube, root.encode()) as roots:
            # A namespace that existed before: at the first pass.
            first = await _until(lambda: holds(namespace), 15, "the existing namespace's ConfigMap")
            assert first["metadata"]["labels"] == {"app.kubernetes.io/part-of": "ambient"}
            # A namespace created afterwards.
            await asyncio.to_thread(kube.kubectl, "create", "namespace", new)
            cm = await _until(lambda: holds(new), 15, "the new namespace's ConfigMap")
            # Deleted: put back (a new object).
            await asyncio.to_thread(kube.kubectl, "delete", "configmap", NAME, "-n", new)
            await _until(lambda: (c := holds(new)) and c["metadata"]["uid"] != cm["metadata"]["uid"], 15,
                         "the deleted ConfigMap restored")
            # Edited: its root put back, a key of the user's kept.
            await asyncio.to_thread(kube.kubectl, "patch", "configmap", NAME, "-n", new, "--type=merge", "-p",
                                    json.dumps({"data": {"root-cert.pem": "tampered", "note": "mine"}}))
            restored = await _until(lambda: holds(new), 15, "the edited ConfigMap restored")
            assert restored["data"]["note"] == "mine"
            assert await asyncio.to_thread(_cm, kube, "kube-system") is None
            assert await asyncio.to_thread(holds, "default") is not None

            # A namespace being deleted: a finalizer on an object in it keeps it Terminating while
            # the namespace controller deletes its content (our ConfigMap too); a create there is
            # refused (403), so the publisher must skip it rather than retry it forever.
            await asyncio.to_thread(kube.kubectl, "create", "namespace", doomed)
            await _until(lambda: holds(doomed), 15, "the doomed namespace's ConfigMap")
            await asyncio.to_thread(kube.apply, json.dumps({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "blocker", "namespace": doomed, "finalizers": ["ambient.test/hold"]}}))
            await asyncio.to_thread(kube.kubectl, "delete", "namespace", doomed, "--wait=false")
            await _until(lambda: _cm(kube, doomed) is None, 60, "the namespace controller deleting the ConfigMap")
            await _until(lambda: skip_reason(roots.namespaces[doomed]) == "terminating", 15, "Terminating seen")
            # A write that raced the namespace's event may have failed once; after that, none.
            await _until(lambda: doomed not in roots.failed, 30, "the doomed namespace skipped")
            passes = roots.stats["passes"]
            await asyncio.to_thread(kube.kubectl, "delete", "configmap", NAME, "-n", new)  # another pass
            await _until(lambda: holds(new), 15, "restored while another namespace terminates")
            assert roots.stats["passes"] > passes and doomed not in roots.failed
            assert await asyncio.to_thread(_cm, kube, doomed) is None

    try:
        asyncio.run(main())
    finally:
        kube.kubectl("patch", "configmap", "blocker", "-n", doomed, "--type=merge", "-p",
                     json.dumps({"metadata": {"finalizers": None}}), check=False)
        for ns in (new, doomed):
            kube.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
