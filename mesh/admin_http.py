"""A tiny HTTP/1.1 server for admin endpoints (config dump, readiness) and a matching client.

Admin traffic is rare and small, so this is deliberately minimal: GET only, one request per
connection, JSON or text bodies, bounded request size. Not for the data path.
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Response", "AdminServer", "get_unix"]

_MAX_REQUEST = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


class Response:
    __slots__ = ("status", "body", "content_type")

    def __init__(self, status: int, body: Any, content_type: str | None = None) -> None:
        self.status = status
        if isinstance(body, (dict, list)):
            self.body = json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
            self.content_type = content_type or "application/json"
        else:
            self.body = body if isinstance(body, bytes) else str(body).encode()
            self.content_type = content_type or "text/plain; charset=utf-8"

    def encode(self) -> bytes:
        head = (f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Status')}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
                "Connection: close\r\n\r\n")
        return head.encode() + self.body


Handler = Callable[[str], Awaitable[Response] | Response]


class AdminServer:
    """Routes `GET <path>` (query string dropped) to handlers; listens on Unix and/or TCP."""

    def __init__(self, routes: dict[str, Handler], fallback: Handler | None = None) -> None:
        self.routes = routes
        self.fallback = fallback
        """Handles paths not in `routes` (it may answer 404 itself)."""
        self._servers: list[asyncio.AbstractServer] = []
        self._tcp: list[asyncio.AbstractServer] = []

    async def listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self._servers.append(await asyncio.start_unix_server(self._serve, path=path))
        os.chmod(path, 0o600)

    async def listen_tcp(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on host:port (0: a free port); returns the port. `reuse_port`: a restarted
        proxy binds the port while the old one still drains (SO_REUSEPORT)."""
        server = await asyncio.start_server(self._serve, host, port, reuse_address=True, reuse_port=reuse_port)
        self._servers.append(server)
        self._tcp.append(server)
        return server.sockets[0].getsockname()[1]

    async def close_tcp(self) -> None:
        """Stop serving the TCP ports only (a draining proxy keeps its Unix socket)."""
        for s in self._tcp:
            s.close()
            if s in self._servers:
                self._servers.remove(s)
        self._tcp.clear()

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if len(head) > _MAX_REQUEST:
                resp = Response(400, "request too large\n")
            else:
                resp = await self._dispatch(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            resp = Response(400, "bad request\n")
        try:
            writer.write(resp.encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _dispatch(self, head: bytes) -> Response:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return Response(400, "bad request line\n")
        if method != "GET":
            return Response(405, "only GET\n")
        path = target.split("?", 1)[0]
        handler = self.routes.get(path) or self.fallback
        if handler is None:
            return Response(404, f"no such endpoint; try one of {sorted(self.routes)}\n")
        out = handler(path)
        return await out if asyncio.iscoroutine(out) else out  # type: ignore[return-value]


async def get_unix(path: str, target: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET `target` from an AdminServer on Unix socket `path`: (status, body)."""
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    return await asyncio.wait_for(go(), timeout)
