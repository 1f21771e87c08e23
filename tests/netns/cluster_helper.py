"""Test helper: drive a local cluster through the `ambient` CLI and ztunnel admin sockets."""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mesh.admin_http import get_unix
from localcluster.paths import ClusterPaths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = os.path.join(ROOT, "deploy", "local", "apps")


def wait_for(pred, timeout=5.0, step=0.02):
    """Poll `pred` until truthy; returns the seconds it took, fails after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"condition not reached in {timeout:.1f}s")


def nodes_yaml(*names):
    return "".join(f"---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n" for n in names)


def namespace_yaml(name, ambient=False):
    labels = "{istio.io/dataplane-mode: ambient}" if ambient else "{}"
    return f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"


def service_accounts_yaml(*pairs):
    return "".join(f"---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n"
                   for ns, sa in pairs)


def pod_yaml(name, ns, node, app, sa="default", port=8080):
    return textwrap.dedent(f"""
        ---
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
        spec:
          nodeName: {node}
          serviceAccountName: {sa}
          containers:
          - name: echo
            command: [python3, echo.py, --port, "{port}"]
        """)


IDLE = ["python3", "-c", "import time; time.sleep(1e9)"]
HTTP_PORTS = [{"name": "http", "port": 80, "targetPort": 8080}]


def app_pod_yaml(name, ns, node, command, labels=None, sa=None, container="app"):
    """A Pod running `command` (an argv list); labels default to {app: name}, no serviceAccountName unless `sa`."""
    labels = {"app": name} if labels is None else labels
    sa_line = f"  serviceAccountName: {sa}\n" if sa else ""
    return (f"---\napiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: {name}, namespace: {ns}, labels: {json.dumps(labels)}}}\n"
            f"spec:\n  nodeName: {node}\n{sa_line}"
            f"  containers:\n  - name: {container}\n    command: {json.dumps(command)}\n")


def idle_pod_yaml(name, ns, node, labels=None):
    """A Pod that only sleeps: where `ambient exec` runs a test's client scripts."""
    return app_pod_yaml(name, ns, node, IDLE, labels, container="idle")


def service_yaml(name, ns, selector, ports=HTTP_PORTS, waypoint=None, labels=None, annotations=None,
                 cluster_ip=None):
    """A Service; `waypoint` names the waypoint it uses (the istio.io/use-waypoint label, added to `labels`).
    Without either, no labels key at all; `annotations` and `clusterIP` only when given."""
    if waypoint:
        labels = {**(labels or {}), "istio.io/use-waypoint": waypoint}
    meta = {"name": name, "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    ip_line = f"  clusterIP: {cluster_ip}\n" if cluster_ip else ""
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {json.dumps(meta)}\n"
            f"spec:\n{ip_line}  selector: {json.dumps(selector)}\n  ports: {json.dumps(ports)}\n")


def waypoint_yaml(name="wp", ns="shop"):
    """An istio-waypoint Gateway: the control plane runs a waypoint for it."""
    return textwrap.dedent(f"""\
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          gatewayClassName: istio-waypoint
          listeners:
          - {{name: mesh, port: 15008, protocol: HBONE}}
        """)


def cluster_fixture(name, prefix, cluster_yaml, files=None):
    """A module-scoped `cluster` fixture: `files` ({name: text}) written to a fresh directory, the cluster
    brought up from `cluster_yaml` (after an `ambient down` of any leftover of that name), destroyed after."""
    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        d = tmp_path_factory.mktemp(prefix)
        c = LocalCluster(name, d)
        for fname, text in (files or {}).items():
            (d / fname).write_text(text)
        c.ambient("down", check=False)
        try:  # a failed `up` can leave namespaces and processes behind: destroy those too
            c.ambient("up", c.write("cluster.yaml", cluster_yaml))
            yield c
        finally:
            c.destroy()
    return cluster


class Tcpdump:
    """tcpdump of TCP on `iface` in the netns at `netns_path` (a file under /var/run/netns) while it
    runs: `fabric` is the bridge between the nodes, `node` every interface of one node's netns."""

    def __init__(self, path, netns_path, iface):
        self.path = path
        self.p = subprocess.Popen(["nsenter", f"--net={netns_path}", "tcpdump", "--immediate-mode", "-i", iface, "-U",
                                   "-s", "0", "-w", str(path), "tcp"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        # tcpdump says "listening on" once its capture is attached (traffic before is lost; with
        # -i any a "data link type" line comes first). --immediate-mode: without it packets wait
        # in a ring block (up to 1 s) and a quick SIGINT drops them.
        said = [self.p.stderr.readline()]
        if "listening on" not in said[0]:
            said.append(self.p.stderr.readline())
        assert any("listening on" in line for line in said), said

    @classmethod
    def fabric(cls, path, paths):
        return cls(path, f"/var/run/netns/{paths.prefix}-fabric", "br0")

    @classmethod
    def node(cls, path, netns):
        return cls(path, f"/var/run/netns/{netns}", "any")

    def stop(self):
        """The pcap's bytes, once tcpdump has written everything it saw."""
        time.sleep(0.3)
        self.p.send_signal(signal.SIGINT)
        self.p.wait(10)
        return self.path.read_bytes()

    def _text(self, *flags):
        return subprocess.run(["tcpdump", "-nn", *flags, "-r", str(self.path)], capture_output=True, text=True).stdout

    def ports(self):
        """Every TCP port seen, source or destination."""
        return {int(m) for pair in re.findall(r"\.(\d+) > \S+?\.(\d+):", self._text()) for m in pair}

    def packets(self):
        """(wall-clock time, src ip, dst port, SYN?, payload length) per TCP packet."""
        return [(float(m.group(1)), m.group(2), int(m.group(3)), "S" in m.group(4), int(m.group(5)))
                for m in re.finditer(r"^(\d+\.\d+) .*?IP (\d+\.\d+\.\d+\.\d+)\.\d+ > [\d.]+\.(\d+): "
                                     r"Flags \[([^\]]*)\].*?length (\d+)", self._text("-tt"), re.M)]


class LocalCluster:
    """One named cluster; files (YAML, app symlinks) live in `workdir`."""

    def __init__(self, name, workdir):
        self.name = name
        self.paths = ClusterPaths(name)
        self.dir = workdir
        for f in ("echo.py", "client.py", "longconn.py"):
            if not os.path.exists(workdir / f):
                os.symlink(os.path.join(APPS, f), workdir / f)

    def ambient(self, *args, check=True, timeout=120):
        p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", self.name, *args], capture_output=True,
                           text=True, cwd=ROOT, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ambient {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def destroy(self):
        """`ambient down`, then also the cluster's persistent CA directory (tests make many)."""
        import shutil
        keep = os.environ.get("AMBIENT_TEST_KEEP_LOGS")  # a directory: the cluster's logs are copied there first
        if keep:
            shutil.copytree(self.paths.logs_dir, os.path.join(keep, self.name), dirs_exist_ok=True)
        self.ambient("down", check=False)
        shutil.rmtree(self.paths.state_dir, ignore_errors=True)

    def write(self, name, text):
        path = self.dir / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    def apply(self, text, name="apply.yaml", wait=True):
        args = ["apply", self.write(name, text)] + ([] if wait else ["--no-wait"])
        return self.ambient(*args)

    def delete(self, text, name="delete.yaml"):
        return self.ambient("delete", self.write(name, text))

    def status(self):
        return json.loads(self.ambient("status", "--json").stdout)

    def ip(self, pod):
        return next(p["ip"] for p in self.status()["pods"] if p["name"] == pod)

    def echo(self, ns, src, dst_ip, port=8080, nbytes=1000, check=True):
        return self.ambient("exec", "-n", ns, src, "--", "python3", "client.py", dst_ip, str(port),
                            "--bytes", str(nbytes), "--timeout", "5", check=check)

    def longconn(self, ns, src, dst_ip, duration, port=8080):
        return subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", self.name, "exec", "-n", ns, src, "--",
                                 "python3", "longconn.py", dst_ip, str(port), "--duration", str(duration)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def admin(self, node, path="/config_dump", worker=0):
        sock = "admin.sock" if worker == 0 else f"admin-{worker}.sock"
        status, body = asyncio.run(get_unix(os.path.join(self.paths.node_dir(node), sock), path))
        assert status == 200, body
        return body.decode() if path == "/metrics" else json.loads(body)

    def enrolled(self, node):
        return self.admin(node)["enrolled"]
