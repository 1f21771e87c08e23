"""Entry point: `python -m controlplane --socket PATH --ca-dir DIR [FILE... | --kubernetes]`.

Serves proxies on a Unix socket from one resource source, both through the same config edge
(mesh.config) into the same ResourceStore the ControlPlane watches:
  * static Kubernetes-style YAML files (as `ambient apply` takes them), or
  * `--kubernetes`: list+watch of an API server (controlplane.kube; `--kubeconfig PATH`, or
    the pod's ServiceAccount when in a cluster); proxies are served once every kind is listed.
Local mode's runner hosts the same ControlPlane in its own process, fed by its own store.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from mesh.clock import SystemClock
from mesh.config import ConfigError, parse_paths, validate_batch

from .ca import CertificateAuthority
from .server import ControlPlane
from .store import ResourceStore


_SYNC_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controlplane", description="ambient mesh control plane")
    p.add_argument("--socket", required=True, help="Unix socket to serve proxies on (mTLS)")
    p.add_argument("--ca-dir", required=True, help="CA directory (root-cert.pem, root-key.pem; created if empty)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--cert-ttl", type=float, default=24 * 3600.0, help="workload certificate lifetime, seconds")
    p.add_argument("--check", action="store_true", help="load and validate FILEs, print a summary, exit")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--kubernetes", action="store_true", help="watch a Kubernetes API server instead of FILEs")
    p.add_argument("--kubeconfig", help="with --kubernetes: kubeconfig file (default: in-cluster config)")
    p.add_argument("files", nargs="*", help="YAML files with the cluster's resources")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if a.kubernetes and (a.files or a.check):
        print("controlplane: --kubernetes takes no FILEs and no --check", file=sys.stderr)
        return 2
    try:
        loaded = parse_paths(a.files) if a.files else []
        validate_batch(loaded, {})
    except ConfigError as e:
        print(f"controlplane: {e}", file=sys.stderr)
        return 2
    store = ResourceStore()
    store.commit(x.resource for x in loaded)
    if a.check:
        print(f"controlplane: {len(loaded)} objects valid")
        return 0
    clock = SystemClock()
    ca = CertificateAuthority.load_or_create(a.ca_dir, a.trust_domain, clock=clock)

    async def run() -> None:
        source = None
        if a.kubernetes:  # imported here: file mode should not load aiohttp and the API client
            from .kube.api import KubeApi
            from .kube.source import KubeSource
            api = await KubeApi.from_kubeconfig(a.kubeconfig)
            source = KubeSource(api, store)
            await source.start()
            await source.wait_synced(_SYNC_TIMEOUT)  # no empty snapshot to proxies before the first list
        cp = ControlPlane(ca=ca, socket_path=a.socket, clock=clock, cert_ttl=a.cert_ttl,
                          resources=store.objects.values())
        store.watch(cp.resources_changed)
        await cp.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await cp.stop()
        if source is not None:
            await source.stop()
            await source.api.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
