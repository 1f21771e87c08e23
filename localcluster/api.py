"""The runner's local API: one JSON request and one JSON reply per Unix-socket connection.

Request `{"method": str, "params": {...}}`, reply `{"ok": true, "result": ...}` or
`{"ok": false, "error": str, "reason": str}`. The socket is mode 0600 in the cluster's run
directory: only root on this host can drive the cluster.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ApiError", "ApiServer", "call", "call_async"]

log = logging.getLogger("ambient.runner.api")
_MAX_REQUEST = 64 * 1024 * 1024


class ApiError(Exception):
    """An error the runner reports (or failure to reach it); `reason` is stable."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


Method = Callable[..., Awaitable[Any]]


class ApiServer:
    def __init__(self, methods: dict[str, Method]) -> None:
        self.methods = methods
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve, path=path, limit=_MAX_REQUEST)
        os.chmod(path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            method = None
            try:
                req = json.loads(line)
                method = self.methods[req["method"]]
                params = req.get("params") or {}
                result = await method(**params)
                reply: dict[str, Any] = {"ok": True, "result": result}
            except Exception as e:
                reason = getattr(e, "reason", None)
                if isinstance(reason, str):  # a user-facing error (config, CA, ...)
                    reply = {"ok": False, "error": str(e), "reason": reason}
                elif isinstance(e, (ValueError, KeyError, TypeError)) and method is None:
                    reply = {"ok": False, "error": f"bad request: {e}", "reason": "bad_request"}
                else:  # a bug in a handler: report it, keep serving
                    log.exception("api method failed")
                    reply = {"ok": False, "error": f"internal error: {e!r}", "reason": "internal"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def _decode(data: bytes) -> Any:
    if not data:
        raise ApiError("the runner closed the connection without a reply", "runner_unavailable")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ApiError(reply.get("error", "unknown error"), reply.get("reason", "error"))
    return reply.get("result")


def call(path: str, method: str, timeout: float = 120.0, **params: Any) -> Any:
    """Blocking call (for the CLI)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise ApiError(f"cluster runner not reachable at {path}: {e.strerror}", "runner_unavailable") from None
    with s:
        s.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return _decode(b"".join(chunks))


async def call_async(path: str, method: str, timeout: float = 120.0, **params: Any) -> Any:
    """Asyncio call (for tests and tools running an event loop)."""
    async def go() -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=_MAX_REQUEST)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ApiError(f"cluster runner not reachable at {path}: {e.strerror}", "runner_unavailable") from None
        try:
            writer.write(json.dumps({"method": method, "params": params}).encode() + b"\n")
            return _decode(await reader.read())
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)
