"""The Kubernetes resource source against a real API server: objects made with kubectl reach
the control plane's store (and its translation) within 2 s, bad objects are reported and
skipped, and a watch whose version is gone relists only what changed."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable

from controlplane.kube.api import KubeApi
from controlplane.kube.reflector import Relisted
from controlplane.kube.source import EVENT_REASON, KubeSource
from controlplane.store import ResourceStore
from controlplane.translate import translate
from mesh.model import ResourceKey, TunnelProtocol, Workload
from mesh.model.policy import AuthorizationPolicy
from mesh.model.telemetry import Telemetry

from .cluster import KubeCluster

NODE = """{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "%s"}, "spec": {"podCIDR": "10.244.7.0/24"}}"""
POD = """
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, namespace: %(ns)s, labels: {app: web}}
spec:
  nodeName: %(node)s
  containers:
  - name: app
    image: none
    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
"""
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: %(ns)s}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
"""
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: %(name)s, namespace: %(ns)s}
spec:
  action: %(action)s
  rules: [{from: [{source: {principals: ["cluster.local/ns/%(ns)s/sa/default"]}}]}]
"""


async def _until(pred: Callable[[], object], timeout: float) -> float:
    """Seconds until pred() holds; AssertionError after `timeout`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _source(kube: KubeCluster) -> tuple[KubeApi, ResourceStore, KubeSource]:
    api = await KubeApi.from_kubeconfig(kube.kubeconfig)
    store = ResourceStore()
    source = KubeSource(api, store)
    await source.start()
    await source.wait_synced(20)
    return api, store, source


async def _kubectl(kube: KubeCluster, *args: str, input: str | None = None) -> str:
    return (await asyncio.to_thread(kube.kubectl, *args, input=input)).stdout


def test_objects_made_with_kubectl_reach_the_store_and_translation_within_2s(mesh_crds: KubeCluster,
                                                                             namespace: str) -> None:
    kube, ns, node = mesh_crds, namespace, f"{namespace}-node"

    async def main() -> None:
        api, store, source = await _source(kube)
        try:
            assert store.get(ResourceKey("Namespace", "", ns)) is not None  # listed at start
            await _kubectl(kube, "label", "namespace", ns, "istio.io/dataplane-mode=ambient")
            await _kubectl(kube, "create", "-f", "-", input=NODE % node)
            await _kubectl(kube, "create", "-f", "-", input=POD % {"name": "web-1", "ns": ns, "node": node})
            await _kubectl(kube, "create", "-f", "-", input=SERVICE % {"ns": ns})
            await _kubectl(kube, "create", "-f", "-", input=POLICY % {"name": "allow", "ns": ns, "action": "ALLOW"})
            # A kubelet's part: the pod's IP goes through the status subresource.
            await _kubectl(kube, "patch", "pod", "web-1", "-n", ns, "--subresource=status", "--type=merge",
                           "-p", json.dumps({"status": {"podIP": "10.244.7.5", "phase": "Running"}}))
            t0 = time.monotonic()

            def pod_live():
                p = store.get(ResourceKey("Pod", ns, "web-1"))
                return p is not None and p.pod_ip is not None
            await _until(pod_live, 2.0)
            await _until(lambda: store.get(ResourceKey("AuthorizationPolicy", ns, "allow")) is not None, 2.0)
            await _until(lambda: store.get(ResourceKey("Node", "", node)) is not None, 2.0)
            assert time.monotonic() - t0 < 2.0
            ns_obj = store.get(ResourceKey("Namespace", "", ns))
            assert ns_obj.labels.get("istio.io/dataplane-mode") == "ambient"
            pod = store.get(ResourceKey("Pod", ns, "web-1"))
            assert (pod.pod_ip, pod.node_name, pod.service_account) == (ipaddress.IPv4Address("10.244.7.5"), node, "default")
            svc = store.get(ResourceKey("Service", ns, "web"))
            assert [p.port for p in svc.ports] == [80] and svc.cluster_ip is not None  # the UDP port is not the mesh's
            assert isinstance(store.get(ResourceKey("AuthorizationPolicy", ns, "allow")), AuthorizationPolicy)
            state = translate(store.objects.values(), trust_domain="cluster.local")
            [w] = [o for o in state.values() if isinstance(o, Workload) and o.namespace == ns]
            assert (w.protocol, w.node, w.services) == (TunnelProtocol.HBONE, node, (f"{ns}/web",))
            assert source.rejected == {}

            # Per event, not per relist: one change is one small commit, the watch is not restarted.
            commits, lists = source.commits, sum(r.stats["lists"] for r in source.reflectors)
            await _kubectl(kube, "label", "namespace", ns, "istio.io/dataplane-mode-")
            await _until(lambda: "istio.io/dataplane-mode" not in store.get(ResourceKey("Namespace", "", ns)).labels, 2.0)
            assert source.commits == commits + 1
            assert sum(r.stats["lists"] for r in source.reflectors) == lists
            await _kubectl(kube, "delete", "pod", "web-1", "-n", ns, "--grace-period=0", "--force")
            await _until(lambda: store.get(ResourceKey("Pod", ns, "web-1")) is None, 2.0)
        finally:
            await source.stop()
            await api.close()
            kube.kubectl("delete", "node", node, check=False)

    asyncio.run(main())


def test_a_bad_object_is_reported_and_skipped_and_the_watch_goes_on(mesh_crds: KubeCluster, namespace: str) -> None:
    kube, ns = mesh_crds, namespace
    key = ResourceKey("AuthorizationPolicy", ns, "p")

    async def main() -> None:
        api, store, source = await _source(kube)
        try:
            await _kubectl(kube, "apply", "-f", "-", input=POLICY % {"name": "p", "ns": ns, "action": "ALLOW"})
            await _until(lambda: store.get(key) is not None, 2.0)
            # The CRD accepts any spec; the config edge does not: the edit is skipped, reported,
            # and the last valid version stays in effect.
            await _kubectl(kube, "apply", "-f", "-", input=POLICY % {"name": "p", "ns": ns, "action": "MAYBE"})
            await _until(lambda: key in source.rejected, 2.0)
            assert [e.reason for e in source.rejected[key]] == ["bad_value"]
            assert "spec.action" in str(source.rejected[key][0])
            assert store.get(key).action.value == "ALLOW"
            assert b'ambient_kube_rejected_objects_total{kind="AuthorizationPolicy",reason="bad_value"} 1' \
                in source.metrics.exposition()

            def event_recorded():
                out = kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout
                return [e for e in json.loads(out)["items"] if e["reason"] == EVENT_REASON
                        and e["involvedObject"]["name"] == "p"]
            [event] = await _until_value(event_recorded, 10.0)
            assert event["type"] == "Warning" and "spec.action" in event["message"]

            # The watch goes on: a later good object arrives, and fixing the bad one clears it.
            await _kubectl(kube, "apply", "-f", "-", input=POLICY % {"name": "q", "ns": ns, "action": "DENY"})
            await _until(lambda: store.get(ResourceKey("AuthorizationPolicy", ns, "q")) is not None, 2.0)
            await _kubectl(kube, "apply", "-f", "-", input=POLICY % {"name": "p", "ns": ns, "action": "DENY"})
            await _until(lambda: key not in source.rejected and store.get(key).action.value == "DENY", 2.0)
        finally:
            await source.stop()
            await api.close()

    asyncio.run(main())


async def _until_value(fn, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.to_thread(fn)
        if v:
            return v
        assert time.monotonic() < deadline, f"not within {timeout} s"
        await asyncio.sleep(0.2)


def test_a_watch_from_a_version_that_is_gone_relists_only_what_changed(mesh_crds: KubeCluster,
                                                                       namespace: str) -> None:
    kube, ns = mesh_crds, namespace

    async def main() -> None:
        for name in ("keep", "drop"):
            await _kubectl(kube, "create", "serviceaccount", name, "-n", ns)
        api, store, source = await _source(kube)
        relists: list[Relisted] = []
        [sa] = [r for r in source.reflectors if r.kind.kind == "ServiceAccount"]
        handler = sa.handler
        sa.handler = lambda ev: (relists.append(ev) if isinstance(ev, Relisted) else None, handler(ev))
        try:
            await _until(lambda: store.get(ResourceKey("ServiceAccount", ns, "drop")) is not None, 2.0)
            await source.stop()  # away: changes happen meanwhile, and its version is compacted away
            await _kubectl(kube, "delete", "serviceaccount", "drop", "-n", ns)
            await _kubectl(kube, "create", "serviceaccount", "new", "-n", ns)
            old = sa.resource_version
            assert int(old) < kube.compact_etcd()  # the version it resumes from is compacted away
            await source.start()
            await _until(lambda: store.get(ResourceKey("ServiceAccount", ns, "new")) is not None, 5.0)
            await _until(lambda: store.get(ResourceKey("ServiceAccount", ns, "drop")) is None, 2.0)
            assert sa.stats["relists_gone"] == 1
            [relist] = relists
            assert relist.cause == "gone"
            mine = [u.key.name for u in relist.upserts if u.key.namespace == ns]
            assert mine == ["new"]  # "keep" and "default" did not change: not passed on again
            # other tests' namespaces may be finishing their deletion meanwhile: look at ours
            assert [d.key.name for d in relist.deletes if d.key.namespace == ns] == ["drop"]
            assert store.get(ResourceKey("ServiceAccount", ns, "keep")) is not None
        finally:
            await source.stop()
            await api.close()

    asyncio.run(main())


TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tracing, namespace: %(ns)s}
spec:
  tracing: [{providers: [{name: otel}], randomSamplingPercentage: 25}]
"""
CONFIG_MAPS = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: %(ns)s}
data: {mesh: "enableTracing: true", meshNetworks: "networks: {}"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: app-settings, namespace: %(ns)s}
data: {a: b}
"""


def test_telemetry_and_the_mesh_config_map_are_watched_other_config_maps_are_not(mesh_crds: KubeCluster,
                                                                                namespace: str) -> None:
    kube, ns = mesh_crds, namespace

    async def main() -> None:
        api, store, source = await _source(kube)
        try:
            await _kubectl(kube, "create", "-f", "-", input=TELEMETRY % {"ns": ns})
            await _kubectl(kube, "create", "-f", "-", input=CONFIG_MAPS % {"ns": ns})
            await _until(lambda: store.get(ResourceKey("Telemetry", ns, "tracing")) is not None, 2.0)
            await _until(lambda: store.get(ResourceKey("ConfigMap", ns, "istio")) is not None, 2.0)
            t = store.get(ResourceKey("Telemetry", ns, "tracing"))
            assert isinstance(t, Telemetry) and t.tracing[0].random_sampling_percentage == 25.0
            # Only ConfigMaps named istio are listed (istio-system/istio is the mesh config), with their mesh key.
            cm = store.get(ResourceKey("ConfigMap", ns, "istio"))
            assert cm.spec == {"mesh": "enableTracing: true"}
            assert store.get(ResourceKey("ConfigMap", ns, "app-settings")) is None
            assert source.rejected == {}
        finally:
            await source.stop()
            await api.close()

    asyncio.run(main())
