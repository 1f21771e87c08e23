"""End to end (root): `ambient up` a 2-node, 4-pod cluster, use it, change it, take it down.

One cluster for the module (bringing it up costs a few seconds); the tests run in file order
and the last one takes it down and checks that nothing is left on the host.
"""
import asyncio
import json
import os
import subprocess
import textwrap
import sys
import time

import pytest

from mesh.admin_http import get_unix
from localcluster import api
from localcluster.paths import ClusterPaths

from .cluster_helper import LocalCluster

NAME = f"it{os.getpid() % 100000}"
PATHS = ClusterPaths(NAME)

CLUSTER_YAML = textwrap.dedent("""
    apiVersion: v1
    kind: Node
    metadata: {name: n1}
    ---
    apiVersion: v1
    kind: Node
    metadata: {name: n2}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {name: front, namespace: shop}
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata: {name: back, namespace: shop}
    """) + "".join(textwrap.dedent(f"""
    ---
    apiVersion: v1
    kind: Pod
    metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
    spec:
      nodeName: {node}
      serviceAccountName: {sa}
      containers:
      - name: echo
        command: [python3, echo.py, --port, "8080"]
    """) for name, app, node, sa in [
        ("a", "front", "n1", "front"), ("b", "back", "n1", "back"),
        ("c", "back", "n2", "back"), ("d", "front", "n2", "front")]) + textwrap.dedent("""
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: back, namespace: shop}
    spec:
      selector: {app: back}
      ports: [{port: 80, targetPort: 8080}]
    """)


C: LocalCluster = None  # set by the module fixture


def ambient(*args, check=True):
    return C.ambient(*args, check=check)


def status():
    return C.status()


def pod(st, name):
    return next(p for p in st["pods"] if p["name"] == name)


def dump(node):
    return C.admin(node)


def write(_dir, name, text):
    return C.write(name, text)


def leftovers():
    """Everything of this cluster that may exist on the host."""
    out = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += [l for l in ns.splitlines() if l.split()[0].startswith(PATHS.prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [l for l in links.splitlines() if PATHS.prefix in l]
    from mesh.linux import cgroup
    cg = os.path.join(cgroup.cgroup2_root(), PATHS.prefix)
    if os.path.exists(cg):
        out.append(cg)
    for p in (PATHS.run_dir, PATHS.bpf_pin_dir):
        if os.path.exists(p):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    global C
    d = tmp_path_factory.mktemp("cluster")
    C = LocalCluster(NAME, d)
    (d / "cluster.yaml").write_text(CLUSTER_YAML)
    ambient("down", check=False)
    t0 = time.monotonic()
    ambient("up", str(d / "cluster.yaml"))
    print(f"ambient up took {time.monotonic() - t0:.1f}s")
    yield d
    C.destroy()


@pytest.mark.root
def test_up_runs_every_pod_and_a_ready_ztunnel_per_node(cluster):
    st = status()
    assert sorted(n["name"] for n in st["nodes"]) == ["n1", "n2"]
    assert all(n["ztunnel"]["ready"] and n["ztunnel"]["connected"] for n in st["nodes"])
    assert {p["name"]: p["phase"] for p in st["pods"]} == dict.fromkeys("abcd", "Running")
    assert {p["name"]: p["node"] for p in st["pods"]} == {"a": "n1", "b": "n1", "c": "n2", "d": "n2"}
    svc = st["services"][0]
    assert svc["name"] == "back" and svc["cluster_ip"].startswith("10.96.")


@pytest.mark.root
def test_status_output_formats_and_a_closed_pipe(cluster):
    import yaml
    st = status()
    as_yaml = yaml.safe_load(ambient("status", "-o", "yaml").stdout)
    assert as_yaml["cluster"] == st["cluster"] and as_yaml["pods"] == st["pods"]
    wide = ambient("status", "-o", "wide").stdout
    assert "NETNS" in wide and pod(st, "a")["netns"] in wide
    # `ambient status | head -1` exits quietly (it died with BrokenPipeError before): a reader
    # that is gone before anything is written makes the broken pipe certain.
    from .cluster_helper import ROOT
    for args in (["status"], ["status", "-o", "json"]):
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", NAME, *args], stdout=w,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
        finally:
            os.close(w)
        assert p.returncode == 0 and p.stderr == "", p.stderr


@pytest.mark.root
@pytest.mark.parametrize("src, dst", [("a", "b"), ("a", "c"), ("d", "a"), ("c", "d")])
def test_pods_reach_each_other_by_pod_ip(cluster, src, dst):
    st = status()
    src_ip, dst_ip = pod(st, src)["ip"], pod(st, dst)["ip"]
    out = ambient("exec", "-n", "shop", src, "--", "python3", "client.py", dst_ip, "8080",
                  "--bytes", "200000").stdout
    # The server saw the connection arrive at its pod IP, from the client's pod IP.
    assert f"hello from {dst} (shop) local={dst_ip}:8080 peer={src_ip}:" in out
    assert "echo ok: 200000/200000 bytes" in out


@pytest.mark.root
def test_exec_runs_inside_the_pod(cluster):
    st = status()
    out = ambient("exec", "-n", "shop", "b", "--", "sh", "-c",
                  "cat /proc/self/cgroup; ip -4 -o addr show dev eth0").stdout
    assert pod(st, "b")["ip"] + "/" in out
    assert PATHS.prefix in out  # the cgroup of the pod
    p = ambient("exec", "-n", "shop", "b", "--", "sh", "-c", "exit 7", check=False)
    assert p.returncode == 7
    p = ambient("exec", "-n", "shop", "nope", "--", "true", check=False)
    assert p.returncode == 1 and "shop/nope" in p.stderr


@pytest.mark.root
def test_host_has_no_route_or_link_into_the_cluster(cluster):
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for net in ("10.244.", "10.96.", "172.30."):
        assert net not in routes
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert PATHS.prefix not in links
    # And no pod can reach out: a pod's only routes are its node's.
    out = ambient("exec", "-n", "shop", "a", "--", "ip", "-4", "route").stdout
    assert "default via 10.244." in out
    netns = next(n["netns"] for n in status()["nodes"] if n["name"] == "n1")
    node_routes = subprocess.run(["ip", "-n", netns, "-4", "route"],
                                 capture_output=True, text=True).stdout
    assert "default" not in node_routes


@pytest.mark.root
def test_ztunnels_hold_certificates_for_their_nodes_service_accounts_only(cluster):
    # Nothing is enrolled yet: no certificates. Enroll the namespace, then each node's ztunnel
    # holds exactly the identities of its own pods.
    ns = write(cluster, "ambient-ns.yaml", """
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
        """)
    ambient("apply", ns)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        certs = {n: sorted(c["identity"] for c in dump(n)["certificates"] if c["state"] == "valid")
                 for n in ("n1", "n2")}
        if all(len(v) == 2 for v in certs.values()):
            break
        time.sleep(0.1)
    td = "spiffe://cluster.local/ns/shop/sa/"
    assert certs == {"n1": [td + "back", td + "front"], "n2": [td + "back", td + "front"]}
    st = status()
    assert all(p["ambient"] for p in st["pods"])


@pytest.mark.root
def test_label_change_reaches_every_ztunnel_within_1s(cluster):
    async def go(value):
        text = textwrap.dedent(f"""
            apiVersion: v1
            kind: Namespace
            metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient, team: "{value}"}}}}
            """)
        t0 = time.monotonic()
        await api.call_async(PATHS.runner_socket, "apply", wait=False,
                             sources=[{"name": "label.yaml", "text": text, "base_dir": str(cluster)}])
        seen = {}
        while len(seen) < 2 and time.monotonic() - t0 < 5:
            for node in ("n1", "n2"):
                if node in seen:
                    continue
                _, body = await get_unix(os.path.join(PATHS.node_dir(node), "admin.sock"), "/config_dump")
                nss = {n["meta"]["name"]: n for n in json.loads(body)["namespaces"]}
                if nss["shop"]["meta"]["labels"].get("team") == value:
                    seen[node] = time.monotonic() - t0
            await asyncio.sleep(0.005)
        return seen
    for value in ("red", "blue", "green"):
        seen = asyncio.run(go(value))
        print(f"label team={value} reached ztunnels in " + ", ".join(f"{n}: {t * 1000:.0f} ms" for n, t in seen.items()))
        assert set(seen) == {"n1", "n2"}
        assert max(seen.values()) < 1.0


@pytest.mark.root
def test_ztunnels_keep_state_without_control_plane_and_resync(cluster):
    before = {n: dump(n) for n in ("n1", "n2")}
    ambient("control-plane", "stop")
    try:
        time.sleep(0.5)
        for n in ("n1", "n2"):
            d = dump(n)
            assert not d["connected"]
            assert d["workloads"] == before[n]["workloads"]  # still serving from the last state
        # A change made while the control plane is down...
        extra = write(cluster, "extra.yaml", """
            apiVersion: v1
            kind: Pod
            metadata: {name: e, namespace: shop, labels: {app: back}}
            spec:
              nodeName: n2
              serviceAccountName: back
              containers:
              - {name: echo, command: [python3, echo.py, --port, "8080"]}
            """)
        ambient("apply", "--no-wait", extra)
        time.sleep(0.3)
        assert "shop/e" not in {w["uid"] for w in dump("n1")["workloads"]}
    finally:
        ambient("control-plane", "start")
    # ...reaches every ztunnel once it is back.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ds = {n: dump(n) for n in ("n1", "n2")}
        if all(d["connected"] and "shop/e" in {w["uid"] for w in d["workloads"]} for d in ds.values()):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"ztunnels did not resync: {[(n, d['connected'], d['version']) for n, d in ds.items()]}")
    ambient("delete", extra)
    assert "shop/e" not in {p["namespace"] + "/" + p["name"] for p in status()["pods"]}


BAD_INPUTS = [
    ("syntax.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", ["syntax.yaml"]),
    ("kind.yaml", "apiVersion: v1\nkind: Deployment\nmetadata: {name: x, namespace: shop}\n",
     ["kind.yaml", "Deployment"]),
    ("missing.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {namespace: shop}\nspec: {containers: [{name: c}]}\n",
     ["missing.yaml", "metadata.name"]),
    # (The same object twice in one apply is not bad input: the last one wins, as with kubectl.)
    ("dup.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  namespace: shop\n  name: y\n",
     ["dup.yaml", "ServiceAccount shop/y", "defined twice"]),
    # A good object followed by a bad one: the good one must not be applied either.
    ("half.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ok, namespace: shop}\n---\n"
                  "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n"
                  "spec: {nodeName: n9, containers: [{name: c, command: [sleep, '1']}]}\n",
     ["half.yaml", "Pod shop/p", "spec.nodeName", "n9"]),
    ("immutable.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, labels: {app: front}}\n"
                       "spec: {nodeName: n1, serviceAccountName: front, containers: [{name: echo, command: [sleep, '9']}]}\n",
     ["immutable.yaml", "Pod shop/a", "spec.containers"]),
]


@pytest.mark.root
@pytest.mark.parametrize("fname, text, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_changes_nothing(cluster, fname, text, words):
    before = status()
    path = write(cluster, fname, text)
    p = ambient("apply", path, check=False)
    assert p.returncode == 1, p.stdout
    assert "internal error" not in p.stderr and "nothing was applied" in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, f"{w!r} not in {p.stderr!r}"
    after = status()
    for k in ("pods", "services", "namespaces", "policies"):
        strip = lambda xs: [{kk: vv for kk, vv in x.items() if kk not in ("containers", "restarts")} for x in xs]
        assert strip(after[k]) == strip(before[k]) if k == "pods" else after[k] == before[k]
    assert after["control_plane"]["version"] == before["control_plane"]["version"]


@pytest.mark.root
def test_accepted_but_not_enforced_fields_warn_in_apply_and_status(cluster):
    vs = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: warned, namespace: shop}\n"
          "spec:\n  hosts: [back]\n  http:\n  - route: [{destination: {host: back}}]\n"
          "    corsPolicy: {allowMethods: [GET]}\n")
    path = write(cluster, "warned.yaml", vs)
    p = ambient("apply", path)
    assert "VirtualService shop/warned applied" in p.stdout
    assert "warned.yaml" in p.stderr and "spec.http[0].corsPolicy" in p.stderr and "warning:" in p.stderr, p.stderr
    st = status()
    assert any("spec.http[0].corsPolicy" in w for w in st["warnings"]["VirtualService shop/warned"])
    assert "WARNINGS" in ambient("status").stdout
    ambient("delete", path)
    assert "VirtualService shop/warned" not in status()["warnings"]


@pytest.mark.root
def test_down_leaves_nothing_behind(cluster):
    st = status()
    pids = [c["pid"] for p in st["pods"] for c in p["containers"].values()]
    with open(PATHS.runner_pid_file) as f:
        pids.append(int(f.read()))
    assert leftovers()  # sanity: the check sees the running cluster
    ambient("down")
    assert leftovers() == []
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
        time.sleep(0.05)
    assert alive == []
    ztunnels = subprocess.run(["pgrep", "-f", f"ztunnel --node .* --run-dir {PATHS.run_dir}"],
                              capture_output=True, text=True).stdout
    assert ztunnels == ""
