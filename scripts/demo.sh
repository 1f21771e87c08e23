#!/usr/bin/env bash
# The main job: a meshed two-node cluster on this host (local mode) with a small shop under steady
# traffic, a canary and one misbehaving service (deploy/local/shop.yaml), next to the L4 demo
# (deploy/local/demo.yaml: capture, HBONE mTLS, passthrough, a policy); then what the mesh saw,
# from a real Prometheus: `ambient stat`, `ambient logs --access`, and the dashboard's URL.
#   scripts/demo.sh          run the demo (about two minutes) and remove the cluster at the end
#   scripts/demo.sh --keep   leave it running to explore (it says how to remove it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
amb() { timeout 300 .venv/bin/ambient -c demo "$@"; }
py() { .venv/bin/python "$@"; }
keep=${1:-}
[ "$keep" = --keep ] || trap 'echo; echo "== ambient down"; amb down' EXIT

amb down >/dev/null 2>&1 || true
# Prometheus on 127.0.0.1:9090, or any free loopback port if something has that one.
port=$(py -c "
import socket
s = socket.socket()
try:
    s.bind(('127.0.0.1', 9090))
except OSError:
    s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
echo "== ambient up deploy/local/demo.yaml deploy/local/shop.yaml --prometheus --scrape-interval 2s"
amb up deploy/local/demo.yaml deploy/local/shop.yaml --prometheus --prometheus-port "$port" --scrape-interval 2s
started=$(date +%s)
echo; echo "== ambient status"
amb status
ip_of() { amb status --json | py -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['pods'] if p['name']=='$1'))"; }
zt() {  # ztunnel admin endpoint of a node, from the host (Unix socket)
  py -c "import asyncio,sys; from mesh.admin_http import get_unix; s,b=asyncio.run(get_unix('/run/ambient/demo/nodes/$1/admin.sock','$2')); sys.stdout.write(b.decode())"
}
echo2=$(ip_of echo-2); old=$(ip_of old-app)
svc=$(amb status --json | py -c "import json,sys; print(next(s['cluster_ip'] for s in json.load(sys.stdin)['services'] if s['name']=='echo'))")

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
zt node-2 /metrics | grep -E '^istio_tcp_connections_(opened|failed)_total' | grep 'destination_workload_namespace="demo"' | head -4

# The shop has had traffic since `up`; a minute's window needs some of it in Prometheus.
echo; echo "== the shop: traffic -> frontend -> catalog, payment (canary v1 95 % / v2 5 %) -> ledger, recommendations (misbehaving)"
wait=$(( 40 - ($(date +%s) - started) ))
if [ "$wait" -gt 0 ]; then echo "(collecting ${wait}s of traffic)"; sleep "$wait"; fi
for _ in $(seq 60); do  # until every shop service has numbers (at most a minute more)
  n=$(amb stat svc -n shop -o json 2>/dev/null | py -c "import json,sys; print(sum(r['rps'] is not None for r in json.load(sys.stdin)['rows']))" 2>/dev/null) || true
  [ "${n:-0}" -ge 5 ] && break
  sleep 1
done
echo; echo "== ambient logs --access -n shop --status 5xx --tail 3   (the failing requests, from the waypoint's access log)"
amb logs --access -n shop --status 5xx --tail 3 || true
echo; echo "== ambient stat pod -n shop -t 30s   (the canary: payment-v2 takes about 5 % of payment's requests, 30 ms slower)"
amb stat pod -n shop -t 30s || true
echo; echo "== ambient stat svc -n shop -t 30s --sort success   (worst first: the misbehaving service)"
amb stat svc -n shop -t 30s --sort success || true
dash=$(amb status --json | py -c "import json,sys; print(json.load(sys.stdin)['observability']['scrape_endpoint'] + '/dashboard')")
echo; echo "dashboard: $dash   (prometheus: http://127.0.0.1:$port)"
if [ "$keep" = --keep ]; then
  echo; echo "cluster 'demo' left running, traffic flowing: .venv/bin/ambient -c demo status | stat svc -n shop | logs --access -f"
  echo "remove it with: .venv/bin/ambient -c demo down"
fi
