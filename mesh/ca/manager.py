"""Client-side certificate manager: per-identity cache, single-flight fetch, half-life renewal."""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..clock import Clock
from ..identity import NodeId, SpiffeId
from .certs import WorkloadCert
from .csr import build_csr, generate_key, key_to_pem

__all__ = ["SecretManager", "SecretError", "Fetch"]

log = logging.getLogger(__name__)

Identity = SpiffeId | NodeId
Fetch = Callable[[Identity, bytes], Awaitable[Sequence[bytes]]]
"""fetch(identity, csr_pem) -> chain PEMs (leaf first), as the CA returns them."""


class SecretError(Exception):
    """`get` cannot complete: the identity was forgotten or the manager closed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True, kw_only=True)
class _Entry:
    """Mutable per-identity state, owned by the manager and its one task for the identity."""

    cert: WorkloadCert | None = None
    task: asyncio.Task[None] | None = None
    updated: asyncio.Event = field(default_factory=asyncio.Event)  # pulsed on every change
    kick: asyncio.Event = field(default_factory=asyncio.Event)  # renew now (wall clock jumped)
    retry: asyncio.Event = field(default_factory=asyncio.Event)  # end the backoff (CA is back)
    dropped: bool = False
    backing_off: bool = False
    failing_since: float | None = None  # first failed fetch since the last success
    fetches: int = 0
    fetch_errors: int = 0
    last_error: str | None = None

    def pulse(self) -> None:
        self.updated.set()
        self.updated.clear()


class SecretManager:
    """Keeps a fresh certificate for every identity asked for, like ztunnel's SecretManager.

    One task per identity fetches (retrying with exponential backoff and jitter), then sleeps
    until the cert's half-life and renews; so concurrent `get`s share one in-flight fetch. A
    failed renewal keeps serving the old cert until it expires (never replacing it with
    anything but a fresh, valid certificate for the same identity), and after that `get`
    waits: fail closed, as a TLS peer would refuse the expired certificate anyway.
    `retry_now()` (the CA connection is back) ends every backoff wait at once, so renewal
    after a control-plane outage does not wait out up to `backoff_max`.
    """

    def __init__(self, fetch: Fetch, *, clock: Clock, rng: random.Random,
                 key_factory: Callable[[], Any] = generate_key,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self._fetch = fetch
        self._clock = clock
        self._rng = rng
        self._key_factory = key_factory
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._entries: dict[Identity, _Entry] = {}
        self._closed = False

    # -- public API -----------------------------------------------------------------------

    async def get(self, identity: Identity) -> WorkloadCert:
        """A certificate for `identity` that has not expired, waiting for a fetch if needed."""
        entry = self._ensure(identity)
        while True:
            if entry.dropped:
                if self._closed:
                    raise SecretError("closed", f"{identity.uri}: secret manager closed")
                raise SecretError("forgotten", f"{identity.uri}: identity forgotten while waiting")
            cert = entry.cert
            if cert is not None:
                if not cert.expired(self._clock.now()):
                    return cert
                entry.kick.set()  # the renewal sleep may lag wall-clock time (suspend, jumps)
            await entry.updated.wait()

    def current(self, identity: Identity) -> WorkloadCert | None:
        """The certificate held for `identity` if it is still valid now, without waiting."""
        entry = self._entries.get(identity)
        cert = entry.cert if entry is not None else None
        return cert if cert is not None and not cert.expired(self._clock.now()) else None

    def retry_now(self) -> int:
        """End the backoff of every identity whose last fetch failed; how many were waiting."""
        n = 0
        for entry in self._entries.values():
            if entry.backing_off:
                entry.retry.set()
                n += 1
        return n

    def prefetch(self, identity: Identity) -> None:
        """Start fetching and renewing `identity` in the background (needs a running loop)."""
        self._ensure(identity)

    def forget(self, identity: Identity) -> None:
        """Stop renewing `identity` and drop its certificate; waiting `get`s raise SecretError."""
        entry = self._entries.pop(identity, None)
        if entry is not None:
            self._drop(entry)

    def identities(self) -> list[Identity]:
        return list(self._entries)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Per-identity status for admin/status output, sorted by identity."""
        rows = []
        for identity, entry in self._entries.items():
            cert = entry.cert
            if cert is None:
                state = "pending"
            else:
                state = "expired" if cert.expired(now) else "valid"
            rows.append({
                "identity": identity.uri,
                "state": state,
                "not_before": cert.not_before if cert else None,
                "not_after": cert.not_after if cert else None,
                "refresh_at": cert.refresh_at if cert else None,
                "fetches": entry.fetches,
                "fetch_errors": entry.fetch_errors,
                "last_error": entry.last_error,
                "failing_since": entry.failing_since,
            })
        return sorted(rows, key=lambda r: r["identity"])

    @property
    def stats(self) -> dict[str, int]:
        """Totals over the current identities (for metrics)."""
        return {
            "identities": len(self._entries),
            "fetches": sum(e.fetches for e in self._entries.values()),
            "fetch_errors": sum(e.fetch_errors for e in self._entries.values()),
        }

    async def close(self) -> None:
        """Cancel all fetch/renewal tasks; pending and later `get`s raise SecretError."""
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            self._drop(entry)
        tasks = [e.task for e in entries if e.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    def _ensure(self, identity: Identity) -> _Entry:
        if self._closed:
            raise SecretError("closed", "secret manager is closed")
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry()
            entry.task = asyncio.get_running_loop().create_task(
                self._run(identity, entry), name=f"secret {identity.uri}")
        return entry

    def _drop(self, entry: _Entry) -> None:
        entry.dropped = True
        if entry.task is not None:
            entry.task.cancel()
        entry.pulse()

    async def _run(self, identity: Identity, entry: _Entry) -> None:
        """Fetch, then renew at every half-life, for as long as the identity is managed."""
        while True:
            entry.cert = await self._fetch_with_backoff(identity, entry)
            entry.pulse()
            log.info("certificate for %s valid until %.0f, renewing at %.0f",
                     identity.uri, entry.cert.not_after, entry.cert.refresh_at)
            await self._sleep_or_kick(entry, entry.cert.refresh_at - self._clock.now())

    async def _fetch_with_backoff(self, identity: Identity, entry: _Entry) -> WorkloadCert:
        for attempt in itertools.count():
            entry.fetches += 1
            try:
                cert = await self._fetch_once(identity)
                entry.failing_since = None
                return cert
            except Exception as e:  # any CA/transport failure is retried, never fatal
                if entry.failing_since is None:
                    entry.failing_since = self._clock.now()
                entry.fetch_errors += 1
                entry.last_error = f"{type(e).__name__}: {e}"
                delay = self._backoff(attempt)
                log.warning("fetching certificate for %s failed (%s); retrying in %.1fs",
                            identity.uri, entry.last_error, delay)
            entry.backing_off = True
            try:
                await self._sleep_or(entry.retry, delay)
            finally:
                entry.backing_off = False
        raise AssertionError("unreachable")

    async def _fetch_once(self, identity: Identity) -> WorkloadCert:
        key = self._key_factory()  # a fresh key per fetch: renewal rotates the key too
        key_pem = key_to_pem(key)
        # The request time stands for the issue time (renewal counts from it, see refresh_at):
        # at most the round trip early, so renewal is at most half of that early.
        asked = self._clock.now()
        chain = await self._fetch(identity, build_csr(identity, key))
        cert = WorkloadCert.from_pem(key_pem, tuple(chain), issued_at=asked)
        if cert.identity != identity:
            raise ValueError(f"CA issued {cert.identity.uri}, asked for {identity.uri}")
        if cert.expired(self._clock.now()):
            raise ValueError(f"CA issued a certificate that expired at {cert.not_after:.0f}")
        return cert

    def _backoff(self, attempt: int) -> float:
        # "Equal jitter": half fixed, half random, so retries spread but never collapse to 0.
        base = min(self._backoff_max, self._backoff_initial * 2 ** min(attempt, 32))
        return base / 2 + self._rng.random() * base / 2

    async def _sleep_or_kick(self, entry: _Entry, delay: float) -> None:
        await self._sleep_or(entry.kick, delay)

    async def _sleep_or(self, event: asyncio.Event, delay: float) -> None:
        event.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(max(0.0, delay)))
        kicked = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((sleeper, kicked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            kicked.cancel()
