"""The runner's scrape endpoint on loopback: a proxy's /metrics through its admin socket (+ process_*),
http_sd targets, mesh text, 404 for unknown paths, 503 for a proxy that does not answer."""
import asyncio
import json
import os

from prometheus_client.parser import text_string_to_metric_families

from localcluster.scrape import ScrapeServer, ScrapeTarget
from mesh.admin_http import AdminServer, Response


async def _get(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_scrape_endpoint(tmp_path):
    async def main():
        sock = str(tmp_path / "admin.sock")
        proxy = AdminServer({"/metrics": lambda _: Response(200, b"# TYPE x_total counter\nx_total 7\n")})
        await proxy.listen_unix(sock)
        targets = [ScrapeTarget(kind="ztunnel", target="n1", admin_socket=sock, pid=os.getpid(), pod="ztunnel-n1",
                                namespace="istio-system", node="n1"),
                   ScrapeTarget(kind="waypoint", target="shop/wp", admin_socket=str(tmp_path / "gone.sock"),
                                pod="wp-waypoint", namespace="shop", node="n2")]

        async def mesh():
            return b"# TYPE pilot_xds gauge\npilot_xds 2\n"
        srv = ScrapeServer(lambda: targets, mesh)
        await srv.start()
        try:
            status, body = await _get(srv.port, "/metrics/ztunnel/n1/0")
            assert status == 200
            fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
            assert fams["x"].samples[0].value == 7  # the proxy's own text, as it served it
            assert fams["process_open_fds"].samples[0].value > 0  # and this (the "proxy's") process
            status, body = await _get(srv.port, "/targets")
            sd = json.loads(body)
            assert status == 200 and [g["labels"]["__metrics_path__"] for g in sd] == [
                "/metrics/ztunnel/n1/0", "/metrics/waypoint/shop/wp/0", "/metrics/mesh"]
            assert all(g["targets"] == [f"127.0.0.1:{srv.port}"] for g in sd)
            assert await _get(srv.port, "/metrics/mesh") == (200, b"# TYPE pilot_xds gauge\npilot_xds 2\n")
            status, body = await _get(srv.port, "/metrics/waypoint/shop/wp/0")
            assert status == 503 and b"did not answer" in body  # Prometheus records up == 0
            assert (await _get(srv.port, "/metrics/ztunnel/n9/0"))[0] == 404
        finally:
            await srv.close()
            await proxy.close()
    asyncio.run(main())
