"""Helpers the kubernetes tests share: TokenRequest tokens, pod manifests, polling."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TypeVar

from controlplane.kube.api import KubeApi

T = TypeVar("T")


def pod_json(name: str, ns: str, sa: str, node: str, **labels: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": ns, "labels": labels},
                       "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": False,
                                "containers": [{"name": "c", "image": "none"}]}})


async def request_token(api: KubeApi, ns: str, sa: str, *, audience: str = "istio-ca",
                        pod: str | None = None, seconds: int = 3600) -> str:
    """A token from the TokenRequest API, bound to `pod` (by name and uid) when given."""
    spec: dict = {"audiences": [audience], "expirationSeconds": seconds}
    if pod is not None:
        uid = (await api.request_json("GET", f"/api/v1/namespaces/{ns}/pods/{pod}"))["metadata"]["uid"]
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    out = await api.request_json("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", body=body)
    return out["status"]["token"]


def poll(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """fn()'s first truthy value, or AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)


async def until(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """poll() for async tests: fn()'s first truthy value, fn run in a thread (it calls kubectl)."""
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.to_thread(fn)
        if v:
            return v
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)
