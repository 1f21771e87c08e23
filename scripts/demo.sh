#!/usr/bin/env bash
# The main job: a meshed two-node cluster on this host (local mode), traffic through the mesh,
# a policy, and what ztunnel saw.
#   scripts/demo.sh          run the demo and remove the cluster at the end
#   scripts/demo.sh --keep   leave it running (then: .venv/bin/ambient -c demo down)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
amb() { .venv/bin/ambient -c demo "$@"; }
py() { .venv/bin/python "$@"; }
keep=${1:-}
[ "$keep" = --keep ] || trap 'echo; echo "== ambient down"; amb down' EXIT

amb down >/dev/null 2>&1 || true
echo "== ambient up deploy/local/demo.yaml"
amb up deploy/local/demo.yaml
echo; echo "== ambient status"
amb status
ip_of() { amb status --json | py -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['pods'] if p['name']=='$1'))"; }
zt() {  # ztunnel admin endpoint of a node, from the host (Unix socket)
  py -c "import asyncio,sys; from mesh.admin_http import get_unix; s,b=asyncio.run(get_unix('/run/ambient/demo/nodes/$1/admin.sock','$2')); sys.stdout.write(b.decode())"
}
echo2=$(ip_of echo-2); old=$(ip_of old-app)
svc=$(amb status --json | py -c "import json,sys; print(json.load(sys.stdin)['services'][0]['cluster_ip'])")

echo; echo "== demo/client -> demo/echo-2 ($echo2:8080), across nodes: captured by eBPF, HBONE mTLS between the ztunnels"
amb exec -n demo client -- python3 apps/client.py "$echo2" 8080 --bytes 1000000
echo; echo "== demo/client -> service demo/echo ($svc:80): ztunnel picks an endpoint"
amb exec -n demo client -- python3 apps/client.py "$svc" 80
echo; echo "== demo/client -> legacy/old-app ($old:9090): a pod outside the mesh, plain TCP passthrough"
amb exec -n demo client -- python3 apps/client.py "$old" 9090
echo; echo "== node-2's ztunnel: the last inbound connection it carried (access log)"
zt node-2 /connections | py -c "import json,sys; c=[x for x in json.load(sys.stdin) if x['direction']=='inbound'][-1]; print(json.dumps(c, indent=1))"

echo; echo "== apply deploy/local/demo-policy.yaml: only demo/client may reach the echo pods"
amb apply deploy/local/demo-policy.yaml
echo "-- demo/client -> echo-2 (allowed):"
amb exec -n demo client -- python3 apps/client.py "$echo2" 8080
echo "-- legacy/old-app -> echo-2 (plaintext, not the client's identity: refused):"
amb exec -n legacy old-app -- python3 apps/client.py "$echo2" 8080 --timeout 3 2>&1 | tail -1 || true
echo; echo "== node-2's ztunnel metrics (Istio names)"
zt node-2 /metrics | grep -E '^istio_tcp_connections_(opened|failed)_total' | head -4
if [ "$keep" = --keep ]; then
  echo; echo "cluster 'demo' left running: .venv/bin/ambient -c demo status | exec | down"
fi
