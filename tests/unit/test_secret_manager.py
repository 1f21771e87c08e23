"""SecretManager on virtual time: caching, single-flight, half-life renewal, backoff, expiry."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest

from controlplane.ca import CLOCK_SKEW_GRACE, CertificateAuthority
from mesh.ca import SecretError, SecretManager, build_csr, generate_key
from mesh.identity import NodeId, SpiffeId
from tests.fakes import FakeClock

TD = "cluster.local"
ALICE = SpiffeId(trust_domain=TD, namespace="default", service_account="alice")
BOB = SpiffeId(trust_domain=TD, namespace="default", service_account="bob")
NODE = NodeId(trust_domain=TD, node="node-1")
TTL = 1000
START = 1_800_000_000.0


class FakeCA:
    """The fetch callable: signs with a real CA, records calls, can fail or be held."""

    def __init__(self, clock: FakeClock, ttl: float = TTL) -> None:
        self.clock = clock
        self.ca = CertificateAuthority.generate(TD, clock=clock)
        self.ttl = ttl
        self.calls: list[tuple[float, SpiffeId | NodeId]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None
        self.issue_as: tuple[SpiffeId, object] | None = None  # misbehave: (identity, its key)

    async def fetch(self, identity: SpiffeId | NodeId, csr: bytes) -> Sequence[bytes]:
        self.calls.append((self.clock.now(), identity))
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionError("CA unreachable")
        if self.issue_as is not None:
            other, key = self.issue_as
            return self.ca.sign_csr(build_csr(other, key), other, self.ttl)
        return self.ca.sign_csr(csr, identity, self.ttl)

    def call_times(self) -> list[float]:
        return [t - START for t, _ in self.calls]


def run(test: Callable[[FakeClock, FakeCA, SecretManager], Awaitable[None]], **kw) -> None:
    async def main() -> None:
        clock = FakeClock(START)
        ca = FakeCA(clock)
        mgr = SecretManager(ca.fetch, clock=clock, rng=random.Random(7), **kw)
        try:
            await test(clock, ca, mgr)
        finally:
            await mgr.close()
    asyncio.run(main())


def test_get_fetches_once_and_caches():
    async def t(clock, ca, mgr):
        cert = await mgr.get(ALICE)
        assert cert.identity == ALICE
        # Issued at START: valid from the CA's backdate, for the TTL from issuance, renewed
        # half the TTL after issuance (the backdate does not move it).
        assert cert.not_before == START - CLOCK_SKEW_GRACE and cert.not_after == START + TTL
        assert cert.issued_at == START and cert.refresh_at == START + TTL / 2
        assert await mgr.get(ALICE) is cert
        assert len(ca.calls) == 1
        node_cert = await mgr.get(NODE)
        assert node_cert.identity == NODE
        assert [i for _, i in ca.calls] == [ALICE, NODE]
        assert set(mgr.identities()) == {ALICE, NODE}
    run(t)


def test_renews_at_half_life_and_not_before():
    async def t(clock, ca, mgr):
        first = await mgr.get(ALICE)
        await clock.advance(TTL / 2 - 1)
        assert len(ca.calls) == 1
        assert await mgr.get(ALICE) is first
        await clock.advance(1)
        assert ca.call_times() == [0, 500]
        second = await mgr.get(ALICE)
        assert second is not first
        assert second.not_before == START + 500 - CLOCK_SKEW_GRACE  # issued at 500
        assert second.refresh_at == START + 1000
        assert second.key_pem != first.key_pem  # renewal rotates the key
        # Each renewal is at the half-life of the cert it replaces.
        await clock.advance(1200)
        assert ca.call_times() == [0, 500, 1000, 1500]
    run(t)


def test_a_ttl_shorter_than_the_backdate_renews_at_its_half_life_not_at_once():
    async def t(clock, ca, mgr):
        ca.ttl = 2  # under CLOCK_SKEW_GRACE: counted from not_before, the half-life is already past
        first = await mgr.get(ALICE)
        assert first.not_before == START - CLOCK_SKEW_GRACE and first.refresh_at == START + 1
        await clock.settle()
        assert ca.call_times() == [0]
        await clock.advance(3.5)
        assert ca.call_times() == [0, 1, 2, 3]
    run(t)


def test_concurrent_gets_share_one_fetch():
    async def t(clock, ca, mgr):
        ca.gate = asyncio.Event()
        waiters = [asyncio.create_task(mgr.get(ALICE)) for _ in range(5)]
        await clock.settle()
        assert len(ca.calls) == 1
        assert not any(w.done() for w in waiters)
        ca.gate.set()
        certs = await asyncio.gather(*waiters)
        assert all(c is certs[0] for c in certs)
        assert len(ca.calls) == 1
    run(t)


def test_first_fetch_retries_with_exponential_backoff_and_jitter():
    async def t(clock, ca, mgr):
        ca.failing = True
        waiter = asyncio.create_task(mgr.get(ALICE))
        await clock.advance(100)
        assert not waiter.done()
        times = ca.call_times()
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Delay n is in [d/2, d] with d = min(0.5 * 2**n, 4): grows, then stays capped.
        for n, gap in enumerate(gaps):
            d = min(0.5 * 2**n, 4.0)
            assert d / 2 <= gap <= d, (n, gap)
        assert len(set(gaps)) == len(gaps)  # jittered, not a fixed schedule
        assert max(gaps) <= 4.0 and len(gaps) > 20
        assert mgr.snapshot(clock.now())[0]["state"] == "pending"
        assert mgr.stats["fetch_errors"] == len(times)
        ca.failing = False
        await clock.advance(4)
        cert = await asyncio.wait_for(waiter, 1)
        assert cert.not_before == int(ca.calls[-1][0]) - CLOCK_SKEW_GRACE  # from the successful attempt
        snap = mgr.snapshot(clock.now())[0]
        assert snap["state"] == "valid" and snap["fetch_errors"] == len(times)
        assert "CA unreachable" in snap["last_error"]
    run(t, backoff_initial=0.5, backoff_max=4.0)


def test_failed_renewal_keeps_old_cert_until_expiry_then_get_waits():
    async def t(clock, ca, mgr):
        first = await mgr.get(ALICE)
        ca.failing = True
        await clock.advance(TTL / 2 + 10)
        assert len(ca.calls) > 2  # renewal attempted and retried
        assert await mgr.get(ALICE) is first
        await clock.advance(TTL / 2 - 11)  # 1 s before expiry
        assert await mgr.get(ALICE) is first
        assert mgr.snapshot(clock.now())[0]["state"] == "valid"
        await clock.advance(1)  # now expired
        assert first.expired(clock.now())
        assert mgr.snapshot(clock.now())[0]["state"] == "expired"
        waiter = asyncio.create_task(mgr.get(ALICE))
        await clock.advance(60)
        assert not waiter.done()
        ca.failing = False
        await clock.advance(30)  # at most one backoff_max later
        fresh = await asyncio.wait_for(waiter, 1)
        assert fresh is not first and not fresh.expired(clock.now())
        assert mgr.snapshot(clock.now())[0]["state"] == "valid"
    run(t)


def test_wall_clock_jump_past_expiry_renews_without_waiting_for_the_sleep():
    async def t(clock, ca, mgr):
        first = await mgr.get(ALICE)
        clock.jump(TTL * 3)  # suspend: the half-life sleep has not fired
        fresh = await asyncio.wait_for(mgr.get(ALICE), 1)
        assert fresh is not first and fresh.not_before == START + TTL * 3 - CLOCK_SKEW_GRACE
    run(t)


def test_prefetch_fetches_in_background():
    async def t(clock, ca, mgr):
        mgr.prefetch(BOB)
        assert mgr.snapshot(clock.now()) == [
            {"identity": BOB.uri, "state": "pending", "not_before": None, "not_after": None,
             "refresh_at": None, "fetches": 0, "fetch_errors": 0, "last_error": None, "failing_since": None}]
        await clock.settle()
        assert len(ca.calls) == 1
        snap = mgr.snapshot(clock.now())[0]
        assert snap["state"] == "valid" and snap["refresh_at"] == START + TTL / 2
        await mgr.get(BOB)
        assert len(ca.calls) == 1
    run(t)


def test_cert_for_the_wrong_identity_is_rejected_and_retried():
    key = generate_key()  # the manager's key, so only the identity is wrong

    async def t(clock, ca, mgr):
        ca.issue_as = (BOB, key)
        waiter = asyncio.create_task(mgr.get(ALICE))
        await clock.advance(5)
        assert not waiter.done() and len(ca.calls) > 1
        assert "asked for" in mgr.snapshot(clock.now())[0]["last_error"]
        ca.issue_as = None
        await clock.advance(30)
        assert (await asyncio.wait_for(waiter, 1)).identity == ALICE
    run(t, key_factory=lambda: key)


def test_forget_stops_renewal_and_fails_waiters():
    async def t(clock, ca, mgr):
        await mgr.get(ALICE)
        mgr.forget(ALICE)
        assert mgr.identities() == []
        await clock.advance(TTL * 3)
        assert len(ca.calls) == 1
        # A get parked on a pending fetch fails when its identity is forgotten.
        ca.failing = True
        waiter = asyncio.create_task(mgr.get(BOB))
        await clock.advance(1)
        mgr.forget(BOB)
        with pytest.raises(SecretError) as e:
            await asyncio.wait_for(waiter, 1)
        assert e.value.reason == "forgotten"
        calls = len(ca.calls)
        await clock.advance(100)
        assert len(ca.calls) == calls
        mgr.forget(BOB)  # idempotent
    run(t)


def test_close_cancels_everything():
    async def t(clock, ca, mgr):
        await mgr.get(ALICE)
        ca.failing = True
        waiter = asyncio.create_task(mgr.get(BOB))
        await clock.advance(1)
        await mgr.close()
        with pytest.raises(SecretError) as e:
            await asyncio.wait_for(waiter, 1)
        assert e.value.reason == "closed"
        calls = len(ca.calls)
        await clock.advance(TTL * 3)
        assert len(ca.calls) == calls
        assert clock.pending_sleepers == []
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        with pytest.raises(SecretError):
            await mgr.get(ALICE)
    run(t)


OUTAGE = 600.0  # the issue's 10-minute control-plane outage, in virtual seconds


def test_ten_minute_outage_keeps_the_old_cert_and_renews_as_soon_as_the_ca_returns():
    async def t(clock, ca, mgr):
        first = await mgr.get(ALICE)
        await clock.advance(300)
        ca.failing = True  # the control plane goes away 200 s before the half-life renewal
        await clock.advance(OUTAGE)
        tries = len(ca.calls)
        assert tries > 10  # renewal attempted from t=500 on, with backoff
        assert mgr.current(ALICE) is first and await mgr.get(ALICE) is first  # kept, not replaced
        snap = mgr.snapshot(clock.now())[0]
        assert snap["state"] == "valid" and snap["fetch_errors"] == tries - 1
        assert START + 500 <= snap["failing_since"] <= START + 506  # the first failed renewal
        ca.failing = False  # back at t=900; the pending backoff could last up to 30 s more
        assert mgr.retry_now() == 1
        await clock.settle()
        second = mgr.current(ALICE)
        assert second is not None and second is not first
        assert second.not_before == START + 300 + OUTAGE - CLOCK_SKEW_GRACE  # renewed at once, no virtual time passed
        assert mgr.retry_now() == 0  # nothing is backing off any more
        assert mgr.snapshot(clock.now())[0]["failing_since"] is None
    run(t)


def test_outage_past_expiry_fails_closed_then_renews_at_once():
    async def t(clock, ca, mgr):
        first = await mgr.get(ALICE)
        ca.failing = True
        await clock.advance(TTL + 1)
        assert mgr.current(ALICE) is None  # never an expired certificate
        waiter = asyncio.create_task(mgr.get(ALICE))
        await clock.settle()
        assert not waiter.done()  # new connections wait: fail closed
        ca.failing = False
        mgr.retry_now()
        fresh = await asyncio.wait_for(waiter, 1)
        assert fresh is not first and fresh.not_before == START + TTL + 1 - CLOCK_SKEW_GRACE
    run(t)


def test_retry_now_while_still_down_only_costs_one_attempt():
    async def t(clock, ca, mgr):
        ca.failing = True
        mgr.prefetch(ALICE)
        await clock.advance(100)
        n = len(ca.calls)
        assert mgr.retry_now() == 1
        await clock.settle()
        assert len(ca.calls) == n + 1 and mgr.current(ALICE) is None
    run(t)
