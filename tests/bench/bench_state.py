#!/usr/bin/env python3
"""Micro-benchmark of ProxyState lookups at mesh scale: what ztunnel pays per connection and per delta.

Builds one state (default 10,000 workloads in 100 namespaces on 10 nodes, 2,000 services, 1,000
AuthorizationPolicies -- root-namespace, namespace-wide and selector-based -- and 200
PeerAuthentications), then times, in microseconds (median of --runs runs):

  outbound   plan_outbound to a service VIP and to a pod IP (ztunnel/inpod.py `_outbound`)
  inbound    the policy lookup + authz.evaluate for the destination workload, as
             ztunnel/inpod.py `authorize` calls it today (every policy of the mesh), and through
             the indexed lookup when this ProxyState has it (`policies_for` + `evaluate_applicable`);
             mTLS and plaintext
  update     apply_delta of one workload (label change) and of one policy, then the first
             inbound lookup after it (what a lazily rebuilt index costs), and
             workloads_on_node (ztunnel/app.py `_on_update` runs it on every update)

Runs on any commit (the indexed rows appear only where the API exists). No network, no root.

Results, 2 shared cores (other engineers' tests running; medians vary by ~20-30% run to run),
defaults, microseconds. "before" is the original commit 3518bc0 (full-scan ProxyState: every
lookup listed and sorted every object of its kind, every delta rebuilt the IP/VIP indexes);
"after" is the indexed ProxyState of branch `state`:

  row                                          before      after
  apply_snapshot                                ~9000     ~17000   (13,200 objects; once per control-plane (re)connect)
  outbound plan, VIP                              5.1        2.9
  outbound plan, pod IP                           3.7        1.2
  inbound authz, all policies (mTLS)             ~970       ~150   (today's inpod.authorize call)
  inbound authz, all policies (plain)            ~960       ~170
  inbound authz, indexed (mTLS)                     -         15   (policies_for + evaluate_applicable)
  inbound authz, indexed (plain)                    -         14
  apply_delta, 1 workload                       ~4200        ~20
  apply_delta, 1 policy                         ~4000         ~9
  first policies_for after a policy delta           -         15   (the lookup alone, memo just dropped)
  workloads_on_node                             ~1280        1.7
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # runnable as a script from a checkout

from mesh.distribution.protocol import Delta, Snapshot  # noqa: E402
from mesh.identity import SpiffeId  # noqa: E402
from mesh.model import FrozenMap, ObjectMeta, ServiceInfo, TunnelProtocol, Workload  # noqa: E402
from mesh.model.policy import (ROOT_NAMESPACE, Action, AuthorizationPolicy, MtlsMode,  # noqa: E402
                               Operation, PeerAuthentication, Rule, Source, StringMatch)
from mesh.model.resources import ServicePort  # noqa: E402
from mesh.model.workload import Endpoint  # noqa: E402
from mesh.state import ProxyState  # noqa: E402
from ztunnel.authz import Connection, evaluate  # noqa: E402
from ztunnel.outbound.plan import plan_outbound  # noqa: E402

TD = "cluster.local"
APPS_PER_NS = 10


def _ip(n: int, base: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address(base)) + n)


def build(n_workloads: int, n_namespaces: int, n_nodes: int, n_services: int, n_policies: int,
          n_peer_auths: int, rng: random.Random) -> tuple[list[Any], list[Workload], list[ServiceInfo]]:
    """The resources of one mesh, deterministic for a seed."""
    namespaces = [f"ns{i}" for i in range(n_namespaces)]
    workloads = []
    for i in range(n_workloads):
        ns = namespaces[i % n_namespaces]
        app = f"app{(i // n_namespaces) % APPS_PER_NS}"
        name = f"{app}-{i}"
        workloads.append(Workload(
            uid=f"{ns}/{name}", name=name, namespace=ns, node=f"node{i % n_nodes}", ip=_ip(i, "10.0.0.1"),
            service_account=app, identity=SpiffeId(trust_domain=TD, namespace=ns, service_account=app),
            protocol=TunnelProtocol.HBONE if (i // n_namespaces) % 20 else TunnelProtocol.NONE,
            labels=FrozenMap({"app": app, "version": f"v{i % 2 + 1}", "pod-template-hash": f"h{i % 7}"})))
    by_app: dict[tuple[str, str], list[Workload]] = {}
    for w in workloads:
        by_app.setdefault((w.namespace, w.labels["app"]), []).append(w)
    services = []
    for i in range(n_services):
        ns = namespaces[i % n_namespaces]
        app = f"app{(i // n_namespaces) % APPS_PER_NS}"
        eps = by_app.get((ns, app), [])
        services.append(ServiceInfo(
            name=f"svc{i}", namespace=ns, vip=_ip(i, "10.96.0.1"),
            ports=(ServicePort(port=80, target_port=8080), ServicePort(port=443, target_port=8443)),
            endpoints=tuple(Endpoint(workload_uid=w.uid, ip=w.ip) for w in eps)))
    policies: list[Any] = []
    for i in range(n_policies):
        kind = i % 20
        if kind == 0:  # 5%: root namespace, mesh-wide or across namespaces by selector
            ns, sel = ROOT_NAMESPACE, (None if i % 40 == 0 else FrozenMap({"app": f"app{i % APPS_PER_NS}"}))
        elif kind < 6:  # 25%: namespace-wide
            ns, sel = rng.choice(namespaces), None
        else:  # 70%: selector-based
            ns = rng.choice(namespaces)
            labels = {"app": f"app{rng.randrange(APPS_PER_NS)}"}
            if i % 3 == 0:
                labels["version"] = f"v{rng.randrange(1, 3)}"
            sel = FrozenMap(labels)
        action = Action.DENY if i % 4 == 0 else Action.ALLOW
        rule = Rule(sources=(Source(namespaces=(StringMatch.parse(rng.choice(namespaces)),),
                                    principals=(StringMatch.parse(f"{TD}/ns/*/sa/app{rng.randrange(APPS_PER_NS)}"),)),),
                    operations=(Operation(ports=(8080, 9000 + i % 50)),))
        policies.append(AuthorizationPolicy(meta=ObjectMeta(name=f"ap{i}", namespace=ns), action=action,
                                            selector=sel, rules=(rule,)))
    modes = (MtlsMode.PERMISSIVE, MtlsMode.STRICT, MtlsMode.UNSET)
    for i in range(n_peer_auths):
        if i == 0:
            ns, sel = ROOT_NAMESPACE, None
        elif i % 4 == 0:
            ns, sel = namespaces[i % n_namespaces], None
        else:
            ns, sel = rng.choice(namespaces), FrozenMap({"app": f"app{rng.randrange(APPS_PER_NS)}"})
        policies.append(PeerAuthentication(
            meta=ObjectMeta(name=f"pa{i}", namespace=ns), selector=sel, mode=modes[i % 3],
            port_modes=((8080, MtlsMode.STRICT),) if sel is not None and i % 5 == 0 else ()))
    return [*workloads, *services, *policies], workloads, services


def per_op_us(fn: Callable[[int], Any], n: int, runs: int) -> float:
    """Median over `runs` of the mean time of fn(i) for i in range(n), in microseconds."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        samples.append((time.perf_counter_ns() - t0) / n / 1000)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    resources, workloads, services = build(args.workloads, args.namespaces, args.nodes, args.services,
                                           args.policies, args.peer_auths, rng)
    state = ProxyState()
    t0 = time.perf_counter_ns()
    state.apply_snapshot(Snapshot(version=1, resources=tuple(resources)))
    out: dict[str, float] = {"apply_snapshot": (time.perf_counter_ns() - t0) / 1000}

    src = workloads[1]
    vips = [(str(s.vip), 80) for s in services if s.endpoints]
    pods = [(str(w.ip), 8080) for w in workloads]
    dests = [w for w in workloads if w.protocol is TunnelProtocol.HBONE]
    peers = [w.identity for w in workloads[:APPS_PER_NS * args.namespaces]]
    mtls = [Connection(src_identity=peers[i % len(peers)], src_ip=workloads[i % len(workloads)].ip,
                       dst_ip=dests[i % len(dests)].ip, dst_port=8080) for i in range(997)]
    plain = [Connection(src_identity=None, src_ip=c.src_ip, dst_ip=c.dst_ip, dst_port=c.dst_port) for c in mtls]
    prng = random.Random(1)
    n = args.iterations

    out["outbound plan, VIP"] = per_op_us(
        lambda i: plan_outbound(state, src, *vips[i % len(vips)], prng), n, args.runs)
    out["outbound plan, pod IP"] = per_op_us(
        lambda i: plan_outbound(state, src, *pods[i % len(pods)], prng), n, args.runs)

    def legacy(conns: list[Connection]) -> Callable[[int], Any]:
        def one(i: int) -> Any:  # what inpod.authorize does today: every policy, every connection
            w = dests[i % len(dests)]
            return evaluate(state.authorization_policies(), state.peer_authentications(), w, conns[i % len(conns)])
        return one

    small = max(50, n // 20)  # the full-scan path is slow: fewer iterations keep the run short
    out["inbound authz, all policies (mTLS)"] = per_op_us(legacy(mtls), small, args.runs)
    out["inbound authz, all policies (plain)"] = per_op_us(legacy(plain), small, args.runs)
    indexed = getattr(state, "policies_for", None)
    if indexed is not None:
        from ztunnel.authz import evaluate_applicable
        def via_index(conns: list[Connection]) -> Callable[[int], Any]:
            def one(i: int) -> Any:
                w = dests[i % len(dests)]
                return evaluate_applicable(indexed(w), w, conns[i % len(conns)])
            return one
        for w in dests:  # steady state: every destination looked up once since the last change
            indexed(w)
        out["inbound authz, indexed (mTLS)"] = per_op_us(via_index(mtls), n, args.runs)
        out["inbound authz, indexed (plain)"] = per_op_us(via_index(plain), n, args.runs)
        # Equal decisions both ways, or the numbers compare different work.
        for i in range(0, 997, 7):
            assert legacy(mtls)(i) == via_index(mtls)(i) and legacy(plain)(i) == via_index(plain)(i), i

    # -- updates: one small delta at a time, as the control plane sends them
    version = [state.version]

    def delta(upserts: tuple[Any, ...]) -> float:
        version[0] += 1
        t = time.perf_counter_ns()
        state.apply_delta(Delta(version=version[0], upserts=upserts))
        return (time.perf_counter_ns() - t) / 1000

    def relabel(i: int) -> Workload:
        w = workloads[(i * 37) % len(workloads)]
        return Workload(uid=w.uid, name=w.name, namespace=w.namespace, node=w.node, ip=w.ip,
                        service_account=w.service_account, identity=w.identity, protocol=w.protocol,
                        labels=FrozenMap({**w.labels, "version": f"v{i % 3 + 1}"}))

    def repolicy(i: int) -> AuthorizationPolicy:
        p = resources[len(workloads) + len(services) + (i * 13) % args.policies]
        return AuthorizationPolicy(meta=p.meta, action=p.action, selector=p.selector, rules=p.rules,
                                   dry_run=i % 2 == 0)

    k = args.deltas
    out["apply_delta, 1 workload"] = statistics.median(delta((relabel(i),)) for i in range(k))
    out["apply_delta, 1 policy"] = statistics.median(delta((repolicy(i),)) for i in range(k))
    if indexed is not None:
        def first_after_policy_delta(i: int) -> float:
            p = repolicy(i)
            delta((p,))
            w = next(w for w in dests if w.namespace == p.namespace or p.namespace == ROOT_NAMESPACE)
            t = time.perf_counter_ns()
            indexed(w)
            return (time.perf_counter_ns() - t) / 1000
        out["first policies_for after a policy delta"] = statistics.median(
            first_after_policy_delta(i) for i in range(k))
    out["workloads_on_node"] = per_op_us(lambda i: state.workloads_on_node(f"node{i % args.nodes}"),
                                         max(5, k), args.runs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--services", type=int, default=2_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--peer-auths", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=2_000, help="lookups per run")
    ap.add_argument("--deltas", type=int, default=15, help="deltas timed per kind")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.workloads} workloads, {args.services} services, {args.policies} AuthorizationPolicies, "
              f"{args.peer_auths} PeerAuthentications; median of {args.runs} runs, microseconds")
        for name, us in out.items():
            print(f"  {name:<42} {us:>12.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
