"""Entry point: `python -m controlplane [--socket PATH] [--listen HOST:PORT] [--ca-dir DIR] [FILE... | --kubernetes]`.

Serves proxies on a Unix socket from one resource source, both through the same config edge
(mesh.config) into the same ResourceStore the ControlPlane watches:
  * static Kubernetes-style YAML files (as `ambient apply` takes them), or
  * `--kubernetes`: list+watch of an API server (controlplane.kube; `--kubeconfig PATH`, or
    the pod's ServiceAccount when in a cluster); proxies are served once every kind is listed.
    There it also deploys istio-waypoint Gateways and writes Gateway/HTTPRoute status
    (controlplane.kube.waypoint_controller), and reports policy problems as Events
    (controlplane.kube.policy_events).
In Kubernetes mode the CA comes from a Secret (controlplane.kube.ca_secret) unless --ca-dir;
its root is then published in ConfigMap istio-ca-root-cert in every namespace
(controlplane.kube.root_publisher; a --ca-dir root is handed out by whoever made the directory);
controlplane.mode decides the combination. Local mode's runner hosts the same ControlPlane in
its own process, fed by its own store.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from mesh.clock import SystemClock
from mesh.config import ConfigError, parse_paths, validate_batch

from .ca import CAError, CertificateAuthority
from .health import HealthFacts, health_server
from .mode import CaSource, Mode, ModeError, Source, select_mode
from .server import ControlPlane
from .store import ResourceStore


log = logging.getLogger("ambient.control")
_SYNC_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controlplane", description="ambient mesh control plane")
    p.add_argument("--socket", help="Unix socket to serve proxies on (mTLS)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve proxies over TCP (mTLS, or TLS + token)")
    p.add_argument("--health", metavar="HOST:PORT", help="HTTP /ready and /healthz for probes")
    p.add_argument("--ca-dir", help="CA directory (root-cert.pem, root-key.pem; created if empty)")
    p.add_argument("--ca-from-secret", metavar="NAME",
                   help="with --kubernetes: the CA is the user's Secret NAME in --namespace (Istio's "
                        "cacerts layout or cert-manager's tls); default: istio-ca-secret, created once")
    p.add_argument("--namespace", default="istio-system", help="the mesh's namespace (CA Secret, root ConfigMap)")
    p.add_argument("--token-audience", default="istio-ca",
                   help="with --kubernetes: audience of the ServiceAccount tokens proxies present")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--cert-ttl", type=float, default=24 * 3600.0, help="workload certificate lifetime, seconds")
    p.add_argument("--check", action="store_true", help="load and validate FILEs, print a summary, exit")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--kubernetes", action="store_true", help="watch a Kubernetes API server instead of FILEs")
    p.add_argument("--kubeconfig", help="with --kubernetes: kubeconfig file (default: in-cluster config)")
    p.add_argument("--waypoint-image", default="ambient-mesh:0.1.0",
                   help="with --kubernetes: the image of the waypoint Deployments it makes for istio-waypoint Gateways")
    p.add_argument("files", nargs="*", help="YAML files with the cluster's resources")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        mode = select_mode(kubernetes=a.kubernetes, files=bool(a.files), check=a.check, ca_dir=a.ca_dir,
                           ca_from_secret=a.ca_from_secret, socket=a.socket, listen=a.listen,
                           health=a.health, namespace=a.namespace, token_audience=a.token_audience)
    except ModeError as e:
        print(f"controlplane: {e}", file=sys.stderr)
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
    try:
        asyncio.run(_run(mode, a, store))
    except (CAError, CaStartError) as e:
        print(f"controlplane: {getattr(e, 'reason', 'ca_error')}: {e}", file=sys.stderr)
        return 1
    return 0


class CaStartError(Exception):
    """The CA could not be obtained from the cluster (wraps CaSecretError, keeps its reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def _run(mode: Mode, a: argparse.Namespace, store: ResourceStore) -> None:
    # Handlers first: a SIGTERM while starting (the socket is bound before start() returns)
    # still stops cleanly, once started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clock = SystemClock()
    source = api = waypoints = policy_events = roots = None
    authenticate_token = None
    if mode.source is Source.KUBERNETES:  # imported here: file mode should not load aiohttp and the API client
        from .kube.api import KubeApi
        from .kube.ca_secret import CaSecretError, load_or_create_ca, publish_root
        from .kube.source import KubeSource
        from .kube.tokens import TokenAuthenticator
        api = await KubeApi.from_kubeconfig(a.kubeconfig)
        try:
            if mode.ca is CaSource.DIRECTORY:
                ca = CertificateAuthority.load_or_create(mode.ca_dir, a.trust_domain, clock=clock)
            else:
                ca, origin = await load_or_create_ca(api, namespace=mode.namespace, trust_domain=a.trust_domain,
                                                     clock=clock, from_secret=mode.ca_secret)
                log.info("mesh CA: %s (%s)", origin.value, mode.ca_secret or "istio-ca-secret")
                # Proxies in the cluster verify the control plane against this ConfigMap (a
                # --ca-dir root is handed out by whoever made the directory).
                await publish_root(api, namespace=mode.namespace, roots_pem=ca.roots_pem)
        except CaSecretError as e:
            await api.close()
            raise CaStartError(e.reason, str(e)) from None
        assert mode.token_audience is not None
        authenticate_token = TokenAuthenticator(api, audience=mode.token_audience, trust_domain=a.trust_domain,
                                                clock=clock, node_agent=(mode.namespace, "ztunnel")).authenticate
        source = KubeSource(api, store)
        from .kube.waypoint_controller import WaypointController
        from .kube.waypoint_objects import WaypointOptions
        waypoints = WaypointController(api, source, options=WaypointOptions(
            image=a.waypoint_image, trust_domain=a.trust_domain, control_plane=f"istiod.{mode.namespace}.svc:15012"))
        from .kube.policy_events import PolicyEvents
        policy_events = PolicyEvents(api, source, store, trust_domain=a.trust_domain)
        policy_events.start()
        if mode.ca is not CaSource.DIRECTORY:
            from .kube.root_publisher import RootPublisher
            roots = RootPublisher(api, source, roots_pem=ca.roots_pem)  # before the source starts: its first list
        await source.start()
        await waypoints.start()
        if roots is not None:
            await roots.start()
    else:
        assert mode.ca_dir is not None
        ca = CertificateAuthority.load_or_create(mode.ca_dir, a.trust_domain, clock=clock)
    cp = ControlPlane(ca=ca, socket_path=mode.socket, listen=mode.listen, clock=clock, cert_ttl=a.cert_ttl,
                      resources=store.objects.values(), authenticate_token=authenticate_token)

    def facts() -> HealthFacts:
        reflectors = source.reflectors if source is not None else []
        return HealthFacts(listening=cp.running, synced_kinds=sum(r.synced.is_set() for r in reflectors),
                           watched_kinds=len(reflectors), now=clock.now(), ca_not_after=ca.not_after,
                           cert_ttl=a.cert_ttl)
    health = health_server(facts) if mode.health else None
    if health is not None and mode.health is not None:
        await health.listen_tcp(*mode.health)  # up before the sync: /ready says what is missing
    if source is not None:
        await source.wait_synced(_SYNC_TIMEOUT)  # no empty snapshot to proxies before the first list
        cp.resources_changed(store.objects.values())
    store.watch(cp.resources_changed)
    await cp.start()
    await stop.wait()
    if health is not None:
        await health.close()
    await cp.stop()
    if waypoints is not None:
        await waypoints.stop()
    if roots is not None:
        await roots.stop()
    if policy_events is not None:
        await policy_events.stop()
    if source is not None:
        await source.stop()
    if api is not None:
        await api.close()


if __name__ == "__main__":
    sys.exit(main())
