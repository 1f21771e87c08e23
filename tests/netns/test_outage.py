"""End to end (root): a control-plane outage longer than a certificate renewal period, scaled.

The cluster runs with 30 s workload certificates (renewed at half-life, 15 s), so the real
10-minute drill (scripts/outage.sh) fits in CI as a 17 s outage right after a renewal: it
spans a renewal that must fail, yet ends before the certificates expire. While the control
plane is away, a long connection through the ztunnel pair stays byte-exact, new connections
work from the last config, and the certificates are the very ones held before (never replaced
by anything, fetch errors counted). A pod created meanwhile is held `Pending` with reason
`control_plane_unavailable` (its containers do not run uncaptured). Once the control plane is
back, every certificate is renewed within 3 s and the held pod starts and is meshed. The
second test lets the certificates expire during the outage: status says `expired`, the
established connection carries on, and renewal follows the return at once.
"""
import os
import time

import pytest

from .cluster_helper import LocalCluster, namespace_yaml, nodes_yaml, pod_yaml, service_accounts_yaml, wait_for

NAME = f"ou{os.getpid() % 100000}"
TTL = 30.0
RENEW_BOUND = 3.0  # reconnect (backoff <= 1 s) + CSR; without retry_now up to 30 s of backoff

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("mesh", ambient=True)
           + service_accounts_yaml(("mesh", "client"), ("mesh", "server"))
           + pod_yaml("c1", "mesh", "n1", "client", "client") + pod_yaml("s1", "mesh", "n2", "server", "server"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(NAME, tmp_path_factory.mktemp("outage"))
    c.ambient("down", check=False)
    try:
        c.ambient("up", "--cert-ttl", f"{TTL:g}s", c.write("cluster.yaml", CLUSTER))
        wait_for(lambda: c.enrolled("n1") == ["mesh/c1"] and c.enrolled("n2") == ["mesh/s1"], timeout=20)
        yield c
    finally:
        c.ambient("control-plane", "start", check=False)
        c.destroy()


def certs(c):
    """{(node, identity): cert row} from every ztunnel's /config_dump."""
    return {(n, r["identity"]): r for n in ("n1", "n2") for r in c.admin(n)["certificates"]}


def pod(c, name):
    return next((p for p in c.status()["pods"] if p["name"] == name), None)


def just_renewed(c, timeout=2 * TTL):
    """Wait for a renewal on every node (a fresh half-life ahead), then return the certs."""
    before = {k: r["not_before"] for k, r in certs(c).items()}
    wait_for(lambda: all(r["not_before"] != before[k] and r["state"] == "valid" for k, r in certs(c).items()),
             timeout=timeout)
    return certs(c)


def renewed_after(c, held, timeout=RENEW_BOUND):
    """Seconds until every certificate in `held` was replaced by a newer valid one."""
    return wait_for(lambda: all(
        (r := certs(c).get(k)) and r["state"] == "valid" and r["not_before"] > h["not_before"]
        for k, h in held.items()), timeout=timeout, step=0.05)


@pytest.mark.root
def test_outage_past_a_renewal_keeps_serving_and_renews_on_return(cluster):
    c = cluster
    s1 = c.ip("s1")
    held = just_renewed(c)
    assert {i.rsplit("/", 1)[-1] for _, i in held} == {"client", "server"}
    long = c.longconn("mesh", "c1", s1, duration=TTL / 2 + 6)  # until after the return
    assert long.stdout.readline().startswith("hello"), "long connection did not start"
    c.ambient("control-plane", "stop")
    stopped = time.monotonic()
    try:
        extra = c.write("c2.yaml", pod_yaml("c2", "mesh", "n1", "client", "client"))
        c.ambient("apply", "--no-wait", extra)
        while time.monotonic() - stopped < TTL / 2 + 2:  # past the renewal the outage spans
            assert c.echo("mesh", "c1", s1).returncode == 0  # last config, certificate still valid
            time.sleep(0.5)
        p = pod(c, "c2")
        assert p["phase"] == "Pending" and p["reason"] == "control_plane_unavailable", p
        assert "control plane" in p["message"]
        assert not any(x["running"] for x in p["containers"].values())
        out = c.ambient("status").stdout
        assert "mesh/c2: Pending, control_plane_unavailable" in out, out
        now = certs(c)
        for k, h in held.items():  # the same certificates: nothing rotated, nothing dropped
            assert (now[k]["not_before"], now[k]["not_after"], now[k]["state"]) == \
                   (h["not_before"], h["not_after"], "valid"), (k, now[k])
            assert now[k]["fetches"] > h["fetches"], (k, now[k])  # renewal was tried (and waits)
        assert all(not c.admin(n)["connected"] for n in ("n1", "n2"))
    finally:
        c.ambient("control-plane", "start")
    took = renewed_after(c, held)
    print(f"certificates renewed {took:.2f}s after the control plane returned")
    wait_for(lambda: (p := pod(c, "c2")) and p["phase"] == "Running" and p["reason"] is None, timeout=5)
    wait_for(lambda: "mesh/c2" in c.enrolled("n1"), timeout=5)
    assert c.echo("mesh", "c2", s1).returncode == 0
    out, _ = long.communicate(timeout=30)
    assert long.returncode == 0 and out.strip().startswith("ok "), out  # byte-exact all along
    c.ambient("delete", extra)


@pytest.mark.root
def test_outage_past_expiry_keeps_open_connections_and_renews_on_return(cluster):
    c = cluster
    s1 = c.ip("s1")
    held = just_renewed(c)
    long = c.longconn("mesh", "c1", s1, duration=TTL + 6)
    assert long.stdout.readline().startswith("hello")
    c.ambient("control-plane", "stop")
    try:
        wait_for(lambda: all(r["state"] == "expired" for r in certs(c).values()), timeout=TTL + 2)
        st = c.status()
        assert all(cert["state"] == "expired" for n in st["nodes"] for cert in n["ztunnel"]["certificates"])
    finally:
        c.ambient("control-plane", "start")
    took = renewed_after(c, held)
    print(f"expired certificates renewed {took:.2f}s after the control plane returned")
    assert c.echo("mesh", "c1", s1).returncode == 0
    out, _ = long.communicate(timeout=30)
    assert long.returncode == 0 and out.strip().startswith("ok "), out
