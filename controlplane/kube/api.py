"""The few API-server calls the control plane makes, as raw JSON over kubernetes_asyncio's
authenticated HTTP client: paged list, watch stream, Event create, server-side apply.

Raw dicts rather than the client's generated models: the config edge converts Kubernetes-
style dicts (the same as YAML gives), and custom resources come back as dicts anyway. A watch
is read in chunks and split on newlines here, since one line can be larger than aiohttp's
readline limit (a Pod with a big last-applied annotation).
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from .kinds import WatchedKind

__all__ = ["ApiError", "Gone", "KubeApi"]

log = logging.getLogger("ambient.kube.api")
_MAX_LINE = 64 * 1024 * 1024  # etcd's object limit is 1.5 MiB; a longer line is a broken stream


class ApiError(Exception):
    """A failed API call: HTTP `status` (0 for a transport error) and the server's reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


class Gone(ApiError):
    """410: the resourceVersion is older than etcd keeps (compacted): relist."""


def _error(status: int, body: bytes | Mapping[str, Any]) -> ApiError:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            body = {"message": body[:200].decode(errors="replace")}
    reason, message = str(body.get("reason") or ""), str(body.get("message") or "")
    cls = Gone if status == 410 else ApiError
    return cls(status, reason, message)


class KubeApi:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client

    @classmethod
    async def from_kubeconfig(cls, path: str | None = None) -> "KubeApi":
        """From a kubeconfig file; None: in-cluster (the pod's ServiceAccount token)."""
        cfg = client.Configuration()
        if path is None:
            config.load_incluster_config(client_configuration=cfg)
        else:
            await config.load_kube_config(config_file=path, client_configuration=cfg)
        return cls(client.ApiClient(configuration=cfg))

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self._client.configuration.host)

    @property
    def ca_file(self) -> str | None:
        """The CA bundle that verifies the API server (None: the system's)."""
        return self._client.configuration.ssl_ca_cert

    async def close(self) -> None:
        await self._client.close()

    async def _request(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                       body: Any = None, timeout: aiohttp.ClientTimeout | None = None,
                       content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            return await self._client.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=timeout or aiohttp.ClientTimeout(total=30))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, type(e).__name__, str(e) or repr(e)) from e

    async def _json(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                    body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        resp = await self._request(method, path, query, body, content_type=content_type)
        try:
            data = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, type(e).__name__, str(e) or repr(e)) from e
        finally:
            resp.release()
        if not 200 <= resp.status < 300:
            raise _error(resp.status, data)
        return json.loads(data)

    async def list(self, kind: WatchedKind, *, page: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object of `kind` and the list's resourceVersion (paged, one consistent read)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", page)]
            if kind.field_selector:
                query.append(("fieldSelector", kind.field_selector))
            if kind.label_selector:
                query.append(("labelSelector", kind.label_selector))
            if token:
                query.append(("continue", token))
            data = await self._json("GET", kind.path, query)
            items.extend(data.get("items") or ())
            meta = data.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    async def watch(self, kind: WatchedKind, resource_version: str, *, timeout_seconds: int
                    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after `resource_version` until the server ends the watch;
        raises Gone when the version is too old (as an HTTP 410 or a 410 ERROR event)."""
        query: list[tuple[str, Any]] = [
            ("watch", "1"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_seconds)]
        if kind.field_selector:
            query.append(("fieldSelector", kind.field_selector))
        if kind.label_selector:
            query.append(("labelSelector", kind.label_selector))
        resp = await self._request("GET", kind.path, query, timeout=aiohttp.ClientTimeout(
            sock_connect=10, sock_read=timeout_seconds + 30))
        try:
            if not 200 <= resp.status < 300:
                raise _error(resp.status, await resp.read())
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                if len(buf) > _MAX_LINE:
                    raise ApiError(0, "LineTooLong", f"watch line over {_MAX_LINE} bytes")
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    etype, obj = ev.get("type"), ev.get("object") or {}
                    if etype == "ERROR":
                        raise _error(int(obj.get("code") or 0), obj)
                    yield etype, obj
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, type(e).__name__, str(e) or repr(e)) from e
        except ValueError as e:
            raise ApiError(0, "BadWatchEvent", str(e)) from e
        finally:
            resp.close()  # a watch ended early must not return a half-read connection to the pool

    async def create_event(self, namespace: str, event: Mapping[str, Any]) -> None:
        await self._json("POST", f"/api/v1/namespaces/{namespace}/events", body=dict(event))

    async def request_json(self, method: str, path: str, body: Any = None,
                           query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        """Any other call (tests, status writers): JSON in, JSON out, ApiError on failure."""
        return await self._json(method, path, query, body=body)

    async def merge_patch(self, path: str, body: Any) -> dict[str, Any]:
        """PATCH with a JSON merge patch (RFC 7386): status writes, node registration."""
        return await self._json("PATCH", path, body=body, content_type="application/merge-patch+json")

    async def apply(self, path: str, obj: Mapping[str, Any], *, field_manager: str) -> dict[str, Any]:
        """Server-side apply of `obj` at its object path (created when missing); `force` takes
        over fields another manager set, since the caller owns the object."""
        return await self._json("PATCH", path, [("fieldManager", field_manager), ("force", "true")],
                                body=dict(obj), content_type="application/apply-patch+yaml")
