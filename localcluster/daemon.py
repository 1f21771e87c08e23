"""The runner daemon process: `python -m localcluster.daemon --cluster NAME ...` (started by `ambient up`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from mesh.clock import SystemClock
from localcluster.signals import set_on_signals
from localcluster.api import ApiError, ApiServer
from localcluster.paths import ClusterPaths, check_cluster_name
from localcluster.observe import ObserveSettings
from localcluster.runner import ClusterSettings, Runner

log = logging.getLogger("ambient.runner")


async def serve(paths: ClusterPaths, settings: ClusterSettings) -> None:
    runner = Runner(paths, settings, clock=SystemClock())
    done = asyncio.Event()

    async def ping() -> dict[str, Any]:
        return {"cluster": paths.name, "pid": os.getpid()}

    async def apply(sources: list[dict[str, str]], wait: bool = True) -> Any:
        return await runner.apply(sources, wait=wait)

    async def delete(sources: list[dict[str, str]]) -> Any:
        return await runner.delete(sources)

    async def status() -> Any:
        return await runner.status()

    async def pod_info(namespace: str, name: str) -> Any:
        return runner.pod_info(namespace, name)

    async def control_plane(action: str) -> Any:
        if action == "stop":
            await runner.cp.stop()
        elif action == "start":
            await runner.cp.start()
        else:
            raise ApiError(f"unknown control-plane action {action!r} (start|stop)", "bad_request")
        return {"running": runner.cp.running, "version": runner.cp.version}

    async def restart(kind: str, node: str | None = None) -> Any:
        if kind != "ztunnel":
            raise ApiError(f"cannot restart {kind!r} (only ztunnel)", "bad_request")
        return await runner.restart_ztunnel(node)

    async def shutdown() -> Any:
        await runner.shutdown()
        asyncio.get_running_loop().call_later(0.05, done.set)
        return {"stopped": paths.name}

    api = ApiServer({"ping": ping, "apply": apply, "delete": delete, "status": status,
                     "pod_info": pod_info, "control_plane": control_plane, "restart": restart,
                     "shutdown": shutdown})
    set_on_signals(done)
    try:
        await runner.start()
        await api.listen(paths.runner_socket)
        log.info("runner for cluster %s ready (pid %d)", paths.name, os.getpid())
        await done.wait()
    finally:
        api.close()
        await runner.shutdown()
        for f in (paths.runner_socket, paths.runner_pid_file):
            if os.path.exists(f):
                os.unlink(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="localcluster.daemon")
    p.add_argument("--cluster", required=True, type=check_cluster_name)
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--cert-ttl", type=float, default=24 * 3600.0)
    p.add_argument("--ca-dir", default=None)
    p.add_argument("--fail-open", action="store_true")
    p.add_argument("--ztunnel-workers", type=int, default=1)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--prometheus", action="store_true")
    p.add_argument("--prometheus-port", type=int, default=ObserveSettings.prometheus_port)
    p.add_argument("--scrape-interval", type=float, default=ObserveSettings.scrape_interval)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    paths = ClusterPaths(a.cluster)
    os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
    with open(paths.runner_pid_file, "w") as f:
        f.write(str(os.getpid()))
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = ClusterSettings(trust_domain=a.trust_domain, cert_ttl=a.cert_ttl, ca_dir=a.ca_dir,
                               fail_open=a.fail_open, ztunnel_workers=max(1, a.ztunnel_workers),
                               observe=ObserveSettings(metrics_port=a.metrics_port, prometheus=a.prometheus,
                                                       prometheus_port=a.prometheus_port,
                                                       scrape_interval=a.scrape_interval))
    import uvloop
    uvloop.install()
    asyncio.run(serve(paths, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
