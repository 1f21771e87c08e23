"""Entry point: `python -m waypoint --gateway NS/GW --run-dir DIR --control-plane SOCK|HOST:PORT [--ca-token F --ca-root F]`."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys

from mesh.clock import SystemClock
from mesh.proxy.bootstrap import run_until_signalled, setup_logging
from mesh.proxy.sockets import HostSockets

from . import accesslog
from .app import Waypoint
from .config import HBONE_PORT, WaypointConfig

GC_THRESHOLD = 20_000


def _gateway(value: str) -> tuple[str, str]:
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"--gateway wants NAMESPACE/NAME, got {value!r}")
    return ns, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="waypoint", description="ambient L7 waypoint proxy")
    p.add_argument("--gateway", required=True, type=_gateway, help="NAMESPACE/NAME of the istio-waypoint Gateway")
    p.add_argument("--run-dir", required=True, help="holds bootstrap/ and admin.sock")
    p.add_argument("--control-plane", required=True, help="control plane Unix socket, or HOST:PORT")
    p.add_argument("--ca-token", default="", help="projected ServiceAccount token file: the credential "
                                                  "towards the control plane (instead of RUN_DIR/bootstrap)")
    p.add_argument("--ca-root", default="", help="with --ca-token: the mesh root certificate file")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--hbone-address", default=f"0.0.0.0:{HBONE_PORT}", help="HOST:PORT to serve HBONE on")
    p.add_argument("--metrics-address", default="", help="HOST:PORT to serve /metrics on (Istio: 15020); "
                   "default: the admin socket only")
    p.add_argument("--status-address", default="", help="HOST:PORT to serve /healthz/ready on (Istio: 15021); "
                   "default: the admin socket only")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    access = accesslog.install(sys.stderr)   # the same lines, batched per loop turn (waypoint/accesslog.py)
    host, _, port = a.hbone_address.rpartition(":")
    cfg = WaypointConfig(namespace=a.gateway[0], name=a.gateway[1], run_dir=a.run_dir,
                         control_plane=a.control_plane, ca_token=a.ca_token, ca_root=a.ca_root,
                         trust_domain=a.trust_domain,
                         hbone_host=host, hbone_port=int(port))
    if a.metrics_address:
        mhost, _, mport = a.metrics_address.rpartition(":")
        cfg = dataclasses.replace(cfg, metrics_host=mhost, metrics_port=int(mport))
    if a.status_address:
        shost, _, sport = a.status_address.rpartition(":")
        cfg = dataclasses.replace(cfg, status_host=shost, status_port=int(sport))
    # Per request the data path allocates a few hundred objects, nearly all freed by reference
    # counting; with the default gen-0 threshold (700) the cyclic collector ran every couple
    # of requests, rescanning the live ones. Module-level objects are frozen out of its scans.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    run_until_signalled(lambda: Waypoint(cfg, clock=SystemClock(), rng=random.Random(),
                                         sockets=HostSockets(), access_log=access.line).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
