"""The manifests `ambient install` prints: `ambient install | kubectl apply -f -` (pure).

In order: CRDs (Istio kinds; Gateway API ones unless the cluster has them), the mesh namespace,
the control plane (ServiceAccount, ClusterRole/Binding, Deployment, Service) and ztunnel
(ServiceAccount, DaemonSet). Names follow Istio's (istio-system, istiod, ztunnel) because the
mesh's identities do: the control plane is spiffe://<td>/ns/istio-system/sa/istiod.

RBAC is least privilege for what the control plane does today: list+watch of the watched
kinds (`watch_rules`, from controlplane.kube.kinds.WATCHED and the controllers' own watches:
the one table both sides read; a kind watched by one name, fieldSelector metadata.name, is
granted by resourceName only: the mesh config `istio` and the root `istio-ca-root-cert`
ConfigMaps), what the waypoint controller writes (`WAYPOINT_RULES`: apply of
ServiceAccounts, Services and Deployments, Gateway and HTTPRoute status, the istio-waypoint
GatewayClass, reading the pod a waypoint's token is bound to), the root ConfigMap in every
namespace (`ROOT_RULES`, the root publisher), creating Events for rejected objects and
TokenReviews, and in istio-system only its CA Secret and reading pods (`_namespace_rules`);
ztunnel gets no API access at all (its token is mounted only as a projected token for the
mesh CA's audience, not the API's).

How ztunnel finds each pod's network namespace and cgroup on a node: from the pod's sandbox
record (mesh.sandbox), one small JSON file per pod in the hostPath `/var/run/ambient/pods/`,
written by the node's CNI step when it creates the pod's sandbox (Istio's CNI node agent hands
ztunnel the same over its ZDS socket): `{"uid": "ns/name", "netns": "/var/run/netns/...",
"cgroup": "/sys/fs/cgroup/..."}`. ztunnel opens the netns path (hostPath /var/run/netns with
HostToContainer propagation, so netns created later appear) to open the pod's listeners, and
the cgroup directory (/sys/fs/cgroup, read-only) is where the capture programs attach; bpffs
at /sys/fs/bpf holds their pins. hostPID and /proc (at /host/proc) let ztunnel and `ambient
check` see the node's processes. On the tests' simulated nodes the node agent
(localcluster/kubelet.py) is that CNI step. ztunnel reaches the control plane at
istiod.istio-system.svc:15012 with its projected token (audience istio-ca; TokenReview on the
control plane's side) and verifies it against ConfigMap istio-ca-root-cert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.kube.kinds import ROOT_CONFIGMAPS, WATCHED, WAYPOINT_DEPLOYMENTS

from .crds import crds

__all__ = ["InstallOptions", "manifests", "MESH_NAMESPACE", "CA_AUDIENCE", "watch_rules"]

MESH_NAMESPACE = "istio-system"
CA_AUDIENCE = "istio-ca"
"""The audience of ztunnel's projected ServiceAccount token, as Istio's ztunnel uses."""
CONTROL_PLANE_PORT = 15012
HEALTH_PORT = 8080  # istiod's readiness port
_PART_OF = {"app.kubernetes.io/part-of": "ambient"}



def watch_rules() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(apiGroup, resources, resourceNames) the control plane lists and watches, by group:
    resourceNames () for the kinds watched whole; a kind watched only by name (fieldSelector
    metadata.name, which RBAC authorizes by resourceName) gets a rule of its names."""
    whole: dict[str, set[str]] = {}
    named: dict[tuple[str, str], set[str]] = {}
    for k in (*WATCHED, WAYPOINT_DEPLOYMENTS, ROOT_CONFIGMAPS):
        if k.only_name is None:
            whole.setdefault(k.group, set()).add(k.plural)
        else:
            named.setdefault((k.group, k.plural), set()).add(k.only_name)
    rules = [(g, tuple(sorted(r)), ()) for g, r in sorted(whole.items())]
    rules += [(g, (r,), tuple(sorted(n))) for (g, r), n in sorted(named.items()) if r not in whole.get(g, ())]
    return rules


@dataclass(frozen=True, slots=True)
class InstallOptions:
    image: str = "ambient-mesh:0.1.0"
    trust_domain: str = "cluster.local"
    gateway_api_crds: bool = True
    image_pull_policy: str = "IfNotPresent"
    ca_from_secret: str | None = None
    """The user's CA Secret in istio-system (cert-manager's, or Istio's `cacerts`); None: the
    control plane generates a root into `istio-ca-secret` once."""


def _meta(name: str, namespaced: bool = True, **labels: str) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "labels": {**_PART_OF, **labels}}
    if namespaced:
        m["namespace"] = MESH_NAMESPACE
    return m


WAYPOINT_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # What the waypoint controller writes (controlplane.kube.waypoint_controller): it server-side
    # applies each waypoint Gateway's objects (apply needs create and patch; none can be limited
    # by name, as Gateways are in any namespace), and writes status through the subresources.
    ("", ("serviceaccounts", "services"), ("create", "patch")),
    ("apps", ("deployments",), ("create", "patch")),
    ("gateway.networking.k8s.io", ("gateways/status", "httproutes/status"), ("patch",)),
    # A waypoint pod's CA token is bound to its pod, in the Gateway's namespace: the CA reads
    # that pod at each review (as it reads a ztunnel's in istio-system).
    ("", ("pods",), ("get",)),
)
ROOT_RULES: tuple[dict[str, Any], ...] = (
    # The root publisher (controlplane.kube.root_publisher) keeps istio-ca-root-cert in every
    # namespace: get/update limited to it by name; create cannot be limited by name in RBAC.
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["istio-ca-root-cert"],
     "verbs": ["get", "update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
)
GATEWAY_CLASS_RULES: tuple[dict[str, Any], ...] = (
    # The istio-waypoint GatewayClass, applied once at start: patch limited to it by name
    # (create cannot be limited by name in RBAC).
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses"], "verbs": ["create"]},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses", "gatewayclasses/status"],
     "resourceNames": ["istio-waypoint"], "verbs": ["patch"]},
)


def _namespace_rules(o: InstallOptions) -> list[dict[str, Any]]:
    """What the control plane does in its own namespace only: read (or create once) the CA
    Secret, and read the ztunnel pod a token is bound to. `create` cannot be limited by name in
    RBAC; get is, to that Secret. (The root ConfigMap here is the ClusterRole's ROOT_RULES.)"""
    secret = o.ca_from_secret or "istio-ca-secret"
    rules: list[dict[str, Any]] = [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]}]
    if not o.ca_from_secret:
        rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]})
    # The pod a ztunnel token is bound to (its node), read fresh at each review.
    rules.append({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})
    return rules


def _control_plane(o: InstallOptions) -> list[dict[str, Any]]:
    app = {"app": "istiod"}
    rules = [{"apiGroups": [g], "resources": list(r), **({"resourceNames": list(n)} if n else {}),
              "verbs": ["list", "watch"]} for g, r, n in watch_rules()]
    rules += [{"apiGroups": [g], "resources": list(r), "verbs": list(v)} for g, r, v in WAYPOINT_RULES]
    rules += [dict(r) for r in (*GATEWAY_CLASS_RULES, *ROOT_RULES)]
    rules.append({"apiGroups": [""], "resources": ["events"], "verbs": ["create"]})
    # ztunnel's token is verified by the API server (controlplane.kube.tokens).
    rules.append({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]})
    ca_args = ["--ca-from-secret", o.ca_from_secret] if o.ca_from_secret else []
    container = {
        "name": "discovery", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": ["python3", "-m", "controlplane", "--kubernetes", "--listen", f"0.0.0.0:{CONTROL_PLANE_PORT}",
                    "--health", f"0.0.0.0:{HEALTH_PORT}", "--namespace", MESH_NAMESPACE, *ca_args,
                    "--trust-domain", o.trust_domain, "--waypoint-image", o.image],
        "ports": [{"name": "tls-ambient-cp", "containerPort": CONTROL_PLANE_PORT, "protocol": "TCP"},
                  {"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        # Ready once listening with every kind listed (controlplane.health), as istiod's /ready.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": HEALTH_PORT}, "periodSeconds": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": HEALTH_PORT}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("istiod", **app)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta("ambient-istiod", namespaced=False, **app), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta("ambient-istiod", namespaced=False, **app),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ambient-istiod"},
         "subjects": [{"kind": "ServiceAccount", "name": "istiod", "namespace": MESH_NAMESPACE}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta("ambient-istiod", **app),
         "rules": _namespace_rules(o)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta("ambient-istiod", **app),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ambient-istiod"},
         "subjects": [{"kind": "ServiceAccount", "name": "istiod", "namespace": MESH_NAMESPACE}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("istiod", **app),
         "spec": {"replicas": 1, "selector": {"matchLabels": app},
                  # Replicas may start together: the CA Secret is created once (409 for the rest).
                  "strategy": {"type": "RollingUpdate"},
                  "template": {"metadata": {"labels": {**_PART_OF, **app}},
                               "spec": {"serviceAccountName": "istiod", "containers": [container],
                                        }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("istiod", **app),
         "spec": {"selector": app, "ports": [{"name": "tls-ambient-cp", "port": CONTROL_PLANE_PORT,
                                              "targetPort": CONTROL_PLANE_PORT, "protocol": "TCP"}]}},
    ]


def _host(name: str, path: str, type_: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": type_}}


def _ztunnel(o: InstallOptions) -> list[dict[str, Any]]:
    app = {"app": "ztunnel"}
    container = {
        "name": "ztunnel", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": ["python3", "-m", "ztunnel", "--node", "$(NODE_NAME)", "--run-dir", "/var/run/ambient",
                    "--control-plane", f"istiod.{MESH_NAMESPACE}.svc:{CONTROL_PLANE_PORT}",
                    "--ca-token", "/var/run/secrets/tokens/istio-token",
                    "--ca-root", "/var/run/secrets/istio/root-cert.pem",
                    "--trust-domain", o.trust_domain, "--pin-dir", "/sys/fs/bpf/ambient",
                    "--status-address", "0.0.0.0"],  # its own pod netns: the kubelet probes the pod IP
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
                  {"name": "readiness", "containerPort": 15021, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
        # Privileged: it enters pods' network namespaces (setns), loads and attaches eBPF
        # programs to their cgroups, and opens listeners with SO_MARK inside them.
        "securityContext": {"privileged": True, "runAsUser": 0},
        "volumeMounts": [
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": True},
            {"name": "host-proc", "mountPath": "/host/proc", "readOnly": True},
            {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
            {"name": "run", "mountPath": "/var/run/ambient"},
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
            {"name": "istio-root", "mountPath": "/var/run/secrets/istio", "readOnly": True},
        ],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("ztunnel", **app),
         "automountServiceAccountToken": False},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta("ztunnel", **app),
         "spec": {"selector": {"matchLabels": app},
                  "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                  "template": {"metadata": {"labels": {**_PART_OF, **app}}, "spec": {
                      "serviceAccountName": "ztunnel", "automountServiceAccountToken": False,
                      "hostPID": True,  # /proc of the node: each pod's processes, hence its netns
                      "priorityClassName": "system-node-critical",
                      "tolerations": [{"operator": "Exists"}],  # every node, tainted or not
                      "nodeSelector": {"kubernetes.io/os": "linux"},
                      "terminationGracePeriodSeconds": 30,
                      "containers": [container],
                      "volumes": [
                          _host("bpffs", "/sys/fs/bpf", "Directory"),
                          _host("cgroup", "/sys/fs/cgroup", "Directory"),
                          _host("host-proc", "/proc", "Directory"),
                          _host("netns", "/var/run/netns", "DirectoryOrCreate"),
                          _host("run", "/var/run/ambient", "DirectoryOrCreate"),
                          {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                              "audience": CA_AUDIENCE, "expirationSeconds": 43200, "path": "istio-token"}}]}},
                          {"name": "istio-root", "configMap": {"name": "istio-ca-root-cert"}},
                      ]}}}},
    ]


def manifests(o: InstallOptions = InstallOptions()) -> list[dict[str, Any]]:
    """Every object of the install, in apply order."""
    ns = {"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": MESH_NAMESPACE, "labels": dict(_PART_OF)}}
    return [*crds(gateway_api=o.gateway_api_crds), ns, *_control_plane(o), *_ztunnel(o)]
