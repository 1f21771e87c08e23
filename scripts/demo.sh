#!/usr/bin/env bash
# The main job: a meshed two-node cluster on this host (local mode), some traffic, its status.
#   scripts/demo.sh          run the demo and remove the cluster at the end
#   scripts/demo.sh --keep   leave it running (then: .venv/bin/ambient -c demo down)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
amb() { .venv/bin/ambient -c demo "$@"; }
keep=${1:-}
[ "$keep" = --keep ] || trap 'echo; echo "== ambient down"; amb down' EXIT

amb down >/dev/null 2>&1 || true
echo "== ambient up deploy/local/demo.yaml"
amb up deploy/local/demo.yaml
echo; echo "== ambient status"
amb status
ip_of() { amb status --json | .venv/bin/python -c "import json,sys; print(next(p['ip'] for p in json.load(sys.stdin)['pods'] if p['name']=='$1'))"; }
echo2=$(ip_of echo-2); old=$(ip_of old-app)
echo; echo "== demo/client -> demo/echo-2 ($echo2:8080), across nodes (plain TCP until the L4 data path lands)"
amb exec -n demo client -- python3 apps/client.py "$echo2" 8080 --bytes 1000000
echo; echo "== demo/client -> legacy/old-app ($old:9090), a pod outside the mesh"
amb exec -n demo client -- python3 apps/client.py "$old" 9090
echo; echo "== ztunnel on node-1: workloads it knows (admin config_dump)"
.venv/bin/python - <<'PY'
import asyncio, json
from mesh.admin_http import get_unix
status, body = asyncio.run(get_unix("/run/ambient/demo/nodes/node-1/admin.sock", "/config_dump"))
d = json.loads(body)
print(f"state version {d['version']}, connected={d['connected']}")
for w in d["workloads"]:
    print(f"  {w['uid']:<18} {w['ip']:<12} {w['protocol']:<6} spiffe://{w['identity']['trust_domain']}/ns/{w['identity']['namespace']}/sa/{w['identity']['service_account']}")
for c in d["certificates"]:
    print(f"  certificate {c['identity']} ({c['state']})")
PY
if [ "$keep" = --keep ]; then
  echo; echo "cluster 'demo' left running: .venv/bin/ambient -c demo status | exec | down"
fi
