"""Entry point: `python -m ztunnel --node NAME --run-dir DIR --control-plane SOCK|HOST:PORT [--ca-token F --ca-root F]`."""
from __future__ import annotations

import argparse
import os
import random
import sys

from mesh.clock import SystemClock
from mesh.proxy.bootstrap import run_until_signalled, setup_logging

from .app import Ztunnel
from .config import ZtunnelConfig


def _tune_malloc() -> None:
    """Keep glibc from mmapping (and page-faulting in) every large relay buffer: a fixed
    32 MiB mmap threshold (glibc's dynamic maximum, fixed from the start) serves TLS records
    and DATA payloads from the reused heap; measured: more bulk throughput, same RSS."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(os.environ.get("ZTUNNEL_MMAP_THRESHOLD", 32 << 20)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, ValueError):
        pass


def _freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, classes, config) to the GC's permanent
    generation: a full collection then scans only what the traffic allocated. Measured: a full
    collection of ztunnel's import-time heap (~33k objects) took 13 ms on a busy 2-core box, a
    pause every relayed request waiting in that loop iteration sees; after freezing, ~0 ms."""
    import gc
    gc.collect()
    gc.freeze()


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Istio's ztunnel does at start: a relayed
    connection costs ztunnel two fds (the pod's socket and, on the destination side, the
    upstream one), so the usual soft 1024 would cap a node at a few hundred connections."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _flag(name: str) -> bool:
    v = os.environ.get(name, "false").lower()
    if v not in ("true", "false", "1", "0"):
        raise SystemExit(f"ztunnel: {name}={v!r}: want true or false")
    return v in ("true", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztunnel", description="ambient node L4 proxy")
    p.add_argument("--node", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--control-plane", required=True, help="control plane Unix socket, or HOST:PORT")
    p.add_argument("--ca-token", default="", help="projected ServiceAccount token file: the credential "
                                                  "towards the control plane (instead of RUN_DIR/bootstrap)")
    p.add_argument("--ca-root", default="", help="with --ca-token: the mesh root certificate file")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--status-address", default="127.0.0.1",
                   help="address of the readiness (15021) and metrics (15020) ports; admin 15000 stays on 127.0.0.1")
    p.add_argument("--no-tcp-admin", action="store_true", help="do not open 127.0.0.1:15000/15021")
    p.add_argument("--sandbox-dir", default="", help="pod sandbox records from the node agent (default RUN_DIR/pods)")
    p.add_argument("--pin-dir", default="", help="bpffs dir for pinned capture maps/links; empty: no capture")
    p.add_argument("--fail-open", action="store_true", help="uncaptured traffic passes while ztunnel is down")
    p.add_argument("--worker", type=int, default=0,
                   help="worker index; workers share the in-pod ports (SO_REUSEPORT), each puts its listeners in "
                        "its capture slot; worker 0 also builds and attaches the eBPF programs")
    p.add_argument("--drain-timeout", type=float, default=float(os.environ.get("ZTUNNEL_DRAIN_TIMEOUT", 5.0)),
                   help="seconds open connections may finish after SIGTERM (default 5, ZTUNNEL_DRAIN_TIMEOUT)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    cfg = ZtunnelConfig(node=a.node, run_dir=a.run_dir, control_plane=a.control_plane,
                        ca_token=a.ca_token, ca_root=a.ca_root,
                        trust_domain=a.trust_domain, listen_tcp=not a.no_tcp_admin, status_address=a.status_address,
                        sandbox_dir=a.sandbox_dir, pin_dir=a.pin_dir,
                        fail_open=a.fail_open, worker=a.worker, drain_timeout=a.drain_timeout,
                        pool_unused_release_timeout=float(os.environ.get("ZTUNNEL_POOL_UNUSED_RELEASE_TIMEOUT", 300.0)),
                        connect_traceparent=_flag("ZTUNNEL_CONNECT_TRACEPARENT"))
    _tune_malloc()
    _raise_fd_limit()
    _freeze_startup_heap()

    async def run() -> None:
        capture = None
        if cfg.pin_dir:
            from mesh.linux import cgroup
            from ebpf.capture import Capture
            capture = Capture(cfg.pin_dir, ztunnel_cgroup=cgroup.abspath(cgroup.cgroup_of(os.getpid()) or ""),
                              fail_open=cfg.fail_open, worker=cfg.worker)
            if capture.owner:  # a worker > 0 opens worker 0's pinned maps when it first enrolls
                capture.start()
        await Ztunnel(cfg, clock=SystemClock(), rng=random.Random(), capture=capture).run()
    run_until_signalled(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
