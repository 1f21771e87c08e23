"""End to end (root): an istio-waypoint Gateway becomes a running waypoint (synthesized pod, system
workload, status), restarted when killed, gone with its Gateway; a binding to a missing waypoint
is refused by ztunnel with `waypoint_missing` in its access log and metrics."""
import os
import re
import signal
import textwrap

import pytest

from .cluster_helper import (cluster_fixture, namespace_yaml, nodes_yaml, pod_yaml, service_yaml, wait_for,
                             waypoint_yaml)

NAME = f"wd{os.getpid() % 100000}"

PORTS = [{"port": 80, "targetPort": 8080}]
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True)
           + pod_yaml("server", "shop", "n2", "server") + pod_yaml("client", "shop", "n1", "client")
           + service_yaml("ghost", "shop", {"app": "server"}, PORTS, waypoint="nowhere")
           + service_yaml("plain", "shop", {"app": "server"}, PORTS))

USE_WP = service_yaml("web", "shop", {"app": "server"}, PORTS, waypoint="wp")

cluster = cluster_fixture(NAME, "wpdeploy", CLUSTER)


def waypoint(st, name="wp"):
    found = [w for w in st["waypoints"] if (w["namespace"], w["name"]) == ("shop", name)]
    return found[0] if found else None


def metric_value(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) + 1:line.rindex("}")]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.root
def test_gateway_yields_a_ready_waypoint_in_its_own_pod(cluster):
    out = cluster.apply(waypoint_yaml() + USE_WP, "wp.yaml")  # returns once the waypoint has the config
    assert "Pod shop/wp-waypoint" in out.stdout and "ServiceAccount shop/wp" in out.stdout, out.stdout
    st = cluster.status()
    w = waypoint(st)
    assert w["running"] and w["ready"] and w["connected"] and w["restarts"] == 0
    assert w["version"] >= st["control_plane"]["version"]
    assert w["identity"] == "spiffe://cluster.local/ns/shop/sa/wp"
    assert w["used_by"] == {"services": ["shop/web"], "pods": [], "namespaces": []}
    p = next(p for p in st["pods"] if p["name"] == "wp-waypoint")
    assert (p["ip"], p["node"]) == (w["ip"], w["node"]) and p["ip"].startswith("10.244.")
    assert p["ambient"] is False and p["owner"] == "Gateway shop/wp" and p["service_account"] == "wp"
    assert p["containers"] == {}
    # The process runs in the pod's netns (its HBONE port answers on the pod IP, seen from the node).
    with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"waypoint" in argv and b"shop/wp" in argv
    assert os.stat(f"/proc/{w['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{p['netns']}").st_ino
    table = cluster.ambient("status").stdout
    assert re.search(r"WAYPOINTS\n.*\nshop\s+wp\s+n\d\s+10\.244\.\S+\s+ready\s+0\s+svc shop/web", table), table
    assert re.search(r"shop\s+nowhere\s+-\s+-\s+MISSING \(traffic refused\)\s+-\s+svc shop/ghost", table), table


@pytest.mark.root
def test_reapplying_the_gateway_changes_nothing(cluster):
    before = waypoint(cluster.status())
    out = cluster.apply(waypoint_yaml(), "wp-again.yaml")
    assert out.stdout == "3 unchanged\n", out.stdout  # the Gateway and what it made
    after = waypoint(cluster.status())
    assert (after["ip"], after["pid"], after["restarts"]) == (before["ip"], before["pid"], before["restarts"])


@pytest.mark.root
def test_a_gateway_without_the_hbone_listener_is_refused(cluster):
    bad = waypoint_yaml("bad").replace("port: 15008, protocol: HBONE", "port: 80, protocol: HTTP")
    p = cluster.ambient("apply", cluster.write("bad.yaml", bad), check=False)
    assert p.returncode != 0
    assert "15008" in p.stderr + p.stdout and "HBONE" in p.stderr + p.stdout and "spec.listeners" in p.stderr + p.stdout
    assert waypoint(cluster.status(), "bad") is None


@pytest.mark.root
def test_the_synthesized_pod_cannot_be_deleted_alone(cluster):
    p = cluster.ambient("delete", cluster.write("del-pod.yaml", textwrap.dedent("""
        apiVersion: v1
        kind: Pod
        metadata: {name: wp-waypoint, namespace: shop}
        spec: {containers: [{name: c, command: ["true"]}]}
        """)), check=False)
    assert p.returncode != 0 and "Gateway shop/wp" in p.stderr + p.stdout
    p = cluster.ambient("apply", cluster.write("own-pod.yaml", pod_yaml("wp-waypoint", "shop", "n1", "x")), check=False)
    assert p.returncode != 0 and "made by Gateway shop/wp" in p.stderr + p.stdout
    assert waypoint(cluster.status())["running"]


@pytest.mark.root
def test_a_killed_waypoint_is_restarted_and_ready_again(cluster):
    w = waypoint(cluster.status())
    os.kill(w["pid"], signal.SIGKILL)
    wait_for(lambda: (x := waypoint(cluster.status()))["restarts"] == 1 and x["ready"], timeout=20, step=0.2)
    again = waypoint(cluster.status())
    assert again["pid"] != w["pid"] and again["ip"] == w["ip"] and again["last_exit"] == -signal.SIGKILL


@pytest.mark.root
def test_service_bound_to_a_missing_waypoint_is_refused_with_the_reason(cluster):
    st = cluster.status()
    vips = {s["name"]: s["cluster_ip"] for s in st["services"]}
    assert cluster.echo("shop", "client", vips["plain"], port=80).returncode == 0  # the endpoint is fine
    log = os.path.join(cluster.paths.logs_dir, "ztunnel-n1.log")
    lines = len(open(log, errors="replace").readlines())
    before = metric_value(cluster.admin("n1", "/metrics"), "ztunnel_outbound_refused_total", reason="waypoint_missing")
    p = cluster.echo("shop", "client", vips["ghost"], port=80, check=False)
    assert p.returncode != 0 and "echo ok" not in p.stdout

    def logged():
        new = open(log, errors="replace").readlines()[lines:]
        return [ln for ln in new if '"error":"waypoint_missing"' in ln and "ghost.shop.svc.cluster.local" in ln]
    wait_for(logged, timeout=5)
    assert '"response_flags":"UH"' in logged()[0] and "shop/nowhere" in logged()[0]
    after = metric_value(cluster.admin("n1", "/metrics"), "ztunnel_outbound_refused_total", reason="waypoint_missing")
    assert after - before == 1
    failed = metric_value(cluster.admin("n1", "/metrics"), "istio_tcp_connections_failed_total",
                          response_flags="UH", destination_service="ghost.shop.svc.cluster.local")
    assert failed >= 1


@pytest.mark.root
def test_deleting_the_gateway_removes_the_waypoint_and_its_objects(cluster):
    w = waypoint(cluster.status())
    out = cluster.delete(waypoint_yaml(), "del-wp.yaml")
    assert "Pod shop/wp-waypoint" in out.stdout and "ServiceAccount shop/wp" in out.stdout, out.stdout
    st = cluster.status()
    assert waypoint(st) is None
    assert not [p for p in st["pods"] if p["name"] == "wp-waypoint"]
    assert not os.path.exists(f"/proc/{w['pid']}") or open(f"/proc/{w['pid']}/stat").read().split()[2] == "Z"
    assert not os.path.exists(cluster.paths.waypoint_dir("shop", "wp"))
    # The Service still names it: now a missing waypoint, refused rather than bypassed.
    assert {m["waypoint"] for m in st["missing_waypoints"]} == {"shop/nowhere", "shop/wp"}
    vip = next(s["cluster_ip"] for s in st["services"] if s["name"] == "web")
    assert cluster.echo("shop", "client", vip, port=80, check=False).returncode != 0
    # And it comes back the same way.
    cluster.apply(waypoint_yaml(), "wp-back.yaml")
    assert waypoint(cluster.status())["ready"]


@pytest.mark.root
def test_a_gateway_changed_to_another_class_gives_up_its_waypoint(cluster):
    assert waypoint(cluster.status())["ready"]
    out = cluster.apply(waypoint_yaml().replace("istio-waypoint", "istio"), "wp-ingress.yaml")
    assert "Pod shop/wp-waypoint deleted" in out.stdout and "ServiceAccount shop/wp deleted" in out.stdout, out.stdout
    st = cluster.status()
    assert waypoint(st) is None and not [p for p in st["pods"] if p["name"] == "wp-waypoint"]
    cluster.apply(waypoint_yaml(), "wp-back-again.yaml")
    assert waypoint(cluster.status())["ready"]
