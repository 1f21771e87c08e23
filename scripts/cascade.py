"""The seed article's retry cascade, reproduced in local mode and contained: prints the amplification.

    .venv/bin/python scripts/cascade.py [-n REQUESTS] [-c CONCURRENCY] [--fail RATE] [--json] [--keep]

Brings up deploy/local/cascade.yaml (11 services, orders -> cart -> pricing -> catalog each
retried by its callers' VirtualService, one namespace waypoint), makes `catalog` answer 503 to
`--fail` of its requests, then sends the same load into `checkout` three times:

1. `no budget`: the three retried services annotated `retry.ambient.dev/budget: "off"`, i.e.
   what Istio does: each layer retries on its own and the attempts multiply;
2. `budget`: the annotation removed, the mesh's default retry budget (20 % of requests, at
   least 10 retries/s, over 10 s, per destination service; a request seen again by its
   x-request-id counts as a retry, so the layers do not compound);
3. `outlier`: catalog-1 fails every request, catalog-2 none, and a DestinationRule with
   `outlierDetection` on catalog: the bad replica is ejected and the client hardly notices.

Amplification = attempts that reached catalog (counted by the catalog pods themselves, so
every retry is in it) / requests that entered the chain. The cluster is removed at the end
unless `--keep`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = os.path.join(ROOT, "deploy", "local", "cascade.yaml")
CHECKOUT = "10.96.50.10:80"
RETRIED = ("cart", "pricing", "catalog")
SERVICE_IPS = {"cart": "10.96.50.17", "pricing": "10.96.50.19", "catalog": "10.96.50.20"}


class Cluster:
    def __init__(self, name: str, workdir: str) -> None:
        self.name, self.workdir = name, workdir

    def ambient(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        p = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", self.name, *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise SystemExit(f"ambient {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p.stdout

    def in_load_pod(self, *argv: str, timeout: float = 300) -> str:
        return self.ambient("exec", "-n", "pay", "load", "--", "python3", *argv, timeout=timeout)

    def apply(self, text: str, name: str) -> None:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        self.ambient("apply", path)

    def pod_ips(self, app: str) -> dict[str, str]:
        st = json.loads(self.ambient("status", "-o", "json"))
        return {p["name"]: p["ip"] for p in st["pods"] if p["namespace"] == "pay" and p["name"].startswith(app + "-")}

    def catalog(self, method: str, ip: str, path: str) -> str:
        return self.in_load_pod("apps/fetch.py", method, f"http://{ip}:8080{path}")

    def load(self, n: int, c: int) -> dict:
        return json.loads(self.in_load_pod("apps/load.py", CHECKOUT, "-n", str(n), "-c", str(c)))


def services_yaml(budget_off: bool) -> str:
    ann = '  annotations: {retry.ambient.dev/budget: "off"}\n' if budget_off else ""
    return "".join(textwrap.dedent(f"""\
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: {s}
          namespace: pay
        """) + ann + textwrap.dedent(f"""\
        spec:
          clusterIP: {SERVICE_IPS[s]}
          selector: {{app: {s}}}
          ports: [{{name: http, port: 80, targetPort: 8080}}]
        """) for s in RETRIED)


OUTLIER = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: pay}
spec:
  host: catalog
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""


def phase(cl: Cluster, name: str, rates: dict[str, float], n: int, c: int) -> dict:
    """Set each catalog pod's failure rate, zero the counters, send `n` requests into checkout."""
    for ip, rate in rates.items():
        cl.catalog("POST", ip, f"/fail?rate={rate}")
        cl.catalog("POST", ip, "/stats/reset")
    got = cl.load(n, c)
    per_pod = {ip: json.loads(cl.catalog("GET", ip, "/stats"))["requests"] for ip in rates}
    attempts = sum(per_pod.values())
    ok = got["status"].get("200", 0)
    return {"phase": name, "requests": got["requests"], "catalog_attempts": attempts,
            "amplification": round(attempts / max(1, got["requests"]), 3),
            "client_success": round(ok / max(1, got["requests"]), 4), "catalog_per_pod": per_pod,
            "client_status": got["status"], "rps": got["rps"], "p99_ms": got["p99_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="requests into the chain per phase (default 1000)")
    ap.add_argument("-c", type=int, default=4, help="concurrent client connections (default 4)")
    ap.add_argument("--fail", type=float, default=0.3, help="catalog's 503 share (default 0.3)")
    ap.add_argument("--cluster", default="cascade")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    a = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="cascade-")
    cl = Cluster(a.cluster, workdir)
    say = (lambda *x: None) if a.json else (lambda *x: print(*x, flush=True))
    cl.ambient("down", check=False)
    results = []
    try:
        say(f"== ambient up {os.path.relpath(YAML, ROOT)}")
        cl.ambient("up", YAML)
        ips = list(cl.pod_ips("catalog").values())
        deadline = time.monotonic() + 60
        while cl.load(20, 2)["status"].get("200", 0) != 20:   # every hop up (waypoint ready)
            if time.monotonic() > deadline:
                raise SystemExit("the chain did not answer 200 within 60 s")
            time.sleep(0.5)
        say(f"== catalog answers 503 to {a.fail:.0%} of requests; {a.n} requests into checkout per phase")
        cl.apply(services_yaml(budget_off=True), "no-budget.yaml")
        results.append(phase(cl, "no budget", {ip: a.fail for ip in ips}, a.n, a.c))
        cl.apply(services_yaml(budget_off=False), "budget.yaml")
        results.append(phase(cl, "budget", {ip: a.fail for ip in ips}, a.n, a.c))
        cl.apply(OUTLIER, "outlier.yaml")
        results.append(phase(cl, "outlier", {ips[0]: 1.0, ips[1]: 0.0}, a.n, a.c))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not a.keep:
            cl.ambient("down", check=False)
    if a.json:
        print(json.dumps({"fail": a.fail, "phases": results}))
    else:
        print(f"\n{'phase':<10} {'requests':>8} {'at catalog':>10} {'amplification':>13} {'client 200':>10}")
        for r in results:
            print(f"{r['phase']:<10} {r['requests']:>8} {r['catalog_attempts']:>10} {r['amplification']:>12.2f}x "
                  f"{r['client_success']:>9.1%}")
        print("\noutlier phase, attempts per catalog pod (the first fails every request):",
              results[-1]["catalog_per_pod"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
