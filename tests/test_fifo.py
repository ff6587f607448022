"""FIFO admission: a freed slot goes to the longest-waiting request that can use it.

Property tests drive the real ``SlotQueue``/``Waiter`` (the structure ``Router.acquire``
waits in) with hypothesis; the router tests go through the real HTTP server to fake nodes.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

import herd
import scoring
from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.test_router import raw_request

LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")

# ------------------------------------------------------------------ the structure ------


class Admission(RuleBasedStateMachine):
    """Waiters join several queues, slots free, capacity changes, waiters give up.

    Checked after every step: no slot is free while someone waits on its queue (no lost
    wake-up), every queue's waiters are in arrival order, a slot always goes to the
    longest-waiting waiter of its queue, granted waiters are woken, and every slot in
    flight is held by exactly one holder (no leak)."""

    waiting = Bundle("waiting")
    holding = Bundle("holding")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.queues = [herd.SlotQueue(node_id=f"n{i}", model="m", slots=1) for i in range(3)]
        self.seq = 0
        self.held: dict[int, int] = {}  # id(queue) → slots held by holders (not waiters)
        self.live: list[herd.Waiter] = []

    def teardown(self) -> None:
        self.loop.close()

    def _arm(self, w: herd.Waiter) -> None:
        if w.granted is None and w.fut is None:
            w.fut = self.loop.create_future()

    def _queue_heads(self) -> dict[int, list[int]]:
        return {id(q): list(q.waiters) for q in self.queues}

    def _check_grant_order(self, before: dict[int, list[int]], granted_now: set[int]) -> None:
        for w in self.live:
            if id(w) in granted_now and w.granted is not None:
                q = w.granted
                ahead = [s for s in before.get(id(q), []) if s < w.seq]
                still = [s for s in ahead if s in q.waiters]
                assert not still, f"{w.seq} got {q.node_id} before waiters {still}"

    def _step(self, action: Any) -> None:
        before = self._queue_heads()
        was = {id(w) for w in self.live if w.granted is not None}
        action()
        now = {id(w) for w in self.live if w.granted is not None}
        self._check_grant_order(before, now - was)

    @rule(
        target=waiting,
        which=st.sets(st.integers(0, 2), min_size=1, max_size=3),
        armed=st.booleans(),
    )
    def arrive(self, which: set[int], armed: bool) -> herd.Waiter:
        self.seq += 1
        w = herd.Waiter(self.seq)
        self.live.append(w)
        if armed:
            self._arm(w)
        self._step(lambda: w.register(self.queues[i] for i in sorted(which)))
        return w

    @rule(w=waiting, which=st.sets(st.integers(0, 2), min_size=1, max_size=3))
    def rescore(self, w: herd.Waiter, which: set[int]) -> None:
        """A fleet change: the waiter waits on another set, keeping its place."""
        if w not in self.live or w.granted is not None:
            return
        self._step(lambda: w.register(self.queues[i] for i in sorted(which)))

    @rule(target=holding, w=waiting)
    def take_grant(self, w: herd.Waiter) -> Any:  # a SlotQueue, or nothing
        if w not in self.live or w.granted is None:
            return multiple()
        q = w.take()
        assert q is not None
        self.live.remove(w)
        w.leave()
        self.held[id(q)] = self.held.get(id(q), 0) + 1
        return q

    @rule(w=waiting)
    def give_up(self, w: herd.Waiter) -> None:
        """Cancelled or timed out, maybe holding a slot handed over but not yet taken."""
        if w not in self.live:
            return
        self.live.remove(w)
        self._step(w.leave)

    @rule(i=st.integers(0, 2))
    def newcomer(self, i: int) -> None:
        """A request scored ``i`` free: it takes the slot directly."""
        q = self.queues[i]
        if q.in_flight < max(1, q.slots):
            q.take()
            self.held[id(q)] = self.held.get(id(q), 0) + 1

    @rule(q=consumes(holding))
    def finish(self, q: herd.SlotQueue) -> None:
        self.held[id(q)] -= 1
        self._step(q.release)

    @rule(i=st.integers(0, 2), slots=st.integers(1, 4))
    def resize(self, i: int, slots: int) -> None:
        self._step(lambda: self.queues[i].resize(slots))

    @invariant()
    def no_lost_wakeups(self) -> None:
        for q in self.queues:
            assert not (q.in_flight < max(1, q.slots) and q.waiters), "free slot, waiters idle"
        for w in self.live:
            if w.granted is not None:
                assert w.fut is None or w.fut.done(), "granted but not woken"

    @invariant()
    def order_and_membership(self) -> None:
        for q in self.queues:
            seqs = list(q.waiters)
            assert seqs == sorted(seqs), "queue out of arrival order"
            for seq, w in q.waiters.items():
                assert w.seq == seq and q in w.queues and w.granted is None
        for w in self.live:
            for q in w.queues:
                assert q.waiters.get(w.seq) is w

    @invariant()
    def no_slot_leaks(self) -> None:
        for q in self.queues:
            granted = sum(1 for w in self.live if w.granted is q)
            assert q.in_flight == self.held.get(id(q), 0) + granted


Admission.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_admission_state_machine = Admission.TestCase


# ------------------------------------------------------- cancellation, under a loop ----


async def _client(
    w: herd.Waiter, queues: list[herd.SlotQueue], hold: int, served: list[int]
) -> None:
    """What ``Router.acquire`` does around its wait, then the request, then release."""
    try:
        w.register(queues)
        while w.granted is None:
            await w.wait()
        q = w.take()
        assert q is not None
    finally:
        w.leave()
    served.append(w.seq)
    try:
        for _ in range(hold):
            await asyncio.sleep(0)
    finally:
        q.release()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.tuples(
            st.sets(st.integers(0, 2), min_size=1, max_size=3),  # queues it waits on
            st.integers(0, 3),  # ticks it holds the slot
            st.one_of(st.none(), st.integers(0, 6)),  # cancelled after that many ticks
        ),
        min_size=1,
        max_size=25,
    ),
    slots=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)
def test_no_slot_leaks_or_lost_wakeups_under_cancellation(
    plan: list[tuple[set[int], int, int | None]], slots: tuple[int, int, int]
) -> None:
    async def run() -> None:
        queues = [herd.SlotQueue(node_id=f"n{i}", model="m", slots=s) for i, s in enumerate(slots)]
        blockers = list(queues)  # every queue starts full: everyone has to wait
        for q in blockers:
            for _ in range(q.slots):
                q.take()
        served: list[int] = []
        tasks = []
        for seq, (which, hold, _cancel) in enumerate(plan, 1):
            w = herd.Waiter(seq)
            tasks.append(
                asyncio.ensure_future(_client(w, [queues[i] for i in sorted(which)], hold, served))
            )
        await asyncio.sleep(0)
        for q in blockers:  # the first requests finish: slots start to free
            for _ in range(q.slots):
                q.release()
        for tick in range(8):
            for task, (_w, _h, cancel) in zip(tasks, plan, strict=True):
                if cancel == tick:
                    task.cancel()
            await asyncio.sleep(0)
        async with asyncio.timeout(2):  # a lost wake-up hangs here
            await asyncio.gather(*tasks, return_exceptions=True)
        for q in queues:
            assert q.in_flight == 0 and not q.waiters, (q.node_id, q.in_flight, list(q.waiters))
        for task, (_w, _h, cancel) in zip(tasks, plan, strict=True):
            if cancel is None:
                assert not task.cancelled()

    asyncio.run(run())


def test_one_queue_serves_in_arrival_order() -> None:
    """Single queue, random releases and arrivals: grants come out in arrival order."""
    rng = random.Random(7)
    q = herd.SlotQueue(node_id="n", model="m", slots=2)
    q.take()
    q.take()
    order: list[int] = []
    waiters: list[herd.Waiter] = []
    seq = 0
    for _ in range(500):
        if rng.random() < 0.5:
            seq += 1
            w = herd.Waiter(seq)
            waiters.append(w)
            w.register([q])
        elif q.in_flight:
            q.release()
        for w in [w for w in waiters if w.granted is not None]:
            order.append(w.seq)
            waiters.remove(w)
            w.take()
    assert order == sorted(order) and len(order) > 100


def _score(node: str, total: float, free: bool, eligible: bool = True) -> scoring.Score:
    return scoring.Score(node, total, eligible, "", (), 0, free)


def test_wait_targets_are_the_nodes_whose_slot_the_waiter_takes() -> None:
    policy = scoring.Policy(wait_margin=5.0)
    all_full = scoring.Choice("wait", None, reason="", ranked=(
        _score("a", 80, False), _score("b", 40, False), _score("c", 0, True, eligible=False)))
    assert scoring.wait_targets(all_full, policy) == ("a", "b")  # any full eligible node
    better_full = scoring.Choice("wait", None, reason="", ranked=(
        _score("a", 80, False), _score("b", 74, False), _score("c", 60, True),
        _score("d", 66, False)))
    # waiting for a better node while c is free: only the ones leading c by > 5 points
    assert scoring.wait_targets(better_full, policy) == ("a", "b", "d")
    assert scoring.wait_targets(better_full, scoring.Policy(wait_margin=10.0)) == ("a", "b")
    assert scoring.wait_targets(scoring.Choice("wait", None, reason="", ranked=()), policy) == ()


# ------------------------------------------------------------------ through the router --


def _node(r: RunningRouter, fake: FakeOllama) -> str:
    for n in r.router.fleet.nodes.values():
        if n.url == f"http://127.0.0.1:{fake.port}":
            return n.node_id
    raise AssertionError("fake not in fleet")


def _body(prompt: str, num_predict: int | None = None, node: str | None = None) -> bytes:
    body: dict[str, Any] = {"model": "llama3.2:3b", "prompt": prompt, "stream": False}
    if num_predict is not None:
        body["options"] = {"num_predict": num_predict}
    if node is not None:
        body["node_id"] = node
    return json.dumps(body).encode()


def _prompts(fake: FakeOllama) -> list[str]:
    return [json.loads(q.body)["prompt"] for q in fake.requests if q.path == "/api/generate"]


async def _queued(r: RunningRouter, n: int) -> None:
    async with asyncio.timeout(5):
        while sum(q.pending for q in r.router.admission.queues.values()) < n:
            await asyncio.sleep(0.005)


@pytest.mark.both_loops
async def test_waiter_that_cannot_use_a_slot_keeps_its_place(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """A (1 slot) and B (1 slot) busy; w1 pinned to A, w2 for either, w3 pinned to A. B
    frees first: w1 cannot use it and keeps its place, w2 takes it. A frees: it is w1's
    (longest waiting), not w3's."""
    a = await make_fake([LLAMA], num_parallel=1, tokens_per_s=100, response_tokens=40)
    b = await make_fake([LLAMA], num_parallel=1, tokens_per_s=100, response_tokens=40)
    r = await make_router([a.url, b.url], policy={"max_queue_wait_s": 30.0}, poll_interval_s=30.0)
    await r.wait_ready(nodes=2)
    node_a = _node(r, a)
    for fake in (a, b):  # told 1 slot each (agentless nodes otherwise start probing at 2)
        r.router.config.slots[_node(r, fake)] = 1
    busy = [
        asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate",
                                          _body("busy-a", 40, node_a))),
        asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate",
                                          _body("busy-b", 10, _node(r, b)))),
    ]
    async with asyncio.timeout(5):
        while sum(q.in_flight for q in r.router.admission.queues.values()) < 2:
            await asyncio.sleep(0.005)
    w1 = asyncio.ensure_future(
        raw_request(r.port, "POST", "/api/generate", _body("w1", 2, node_a)))
    await _queued(r, 1)
    w2 = asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate", _body("w2", 40)))
    await _queued(r, 2)
    w3 = asyncio.ensure_future(
        raw_request(r.port, "POST", "/api/generate", _body("w3", 2, node_a)))
    await _queued(r, 3)
    results = await asyncio.gather(*busy, w1, w2, w3)
    assert [s for s, _, _ in results] == [200] * 5
    assert _prompts(a) == ["busy-a", "w1", "w3"]  # w3 did not take w1's slot on A
    assert results[3][1]["x-herd-node"] == _node(r, b)
    assert all(q.in_flight == 0 and q.pending == 0 for q in r.router.admission.queues.values())


@pytest.mark.both_loops
async def test_fifo_under_saturation_no_barging(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """One node told 1 slot (so the node sees requests in dispatch order), 10 requests
    queued in a known order, then newcomers pour in from 6 clients while the queue drains:
    the queued ones reach the node first, in order; no newcomer barges in."""
    fake = await make_fake([LLAMA], num_parallel=1, tokens_per_s=400, response_tokens=800)
    r = await make_router([fake.url], policy={"max_queue_wait_s": 60.0}, poll_interval_s=30.0)
    await r.wait_ready()
    r.router.config.slots[_node(r, fake)] = 1
    fill = [asyncio.ensure_future(
        raw_request(r.port, "POST", "/api/generate", _body("fill", 800)))]
    async with asyncio.timeout(5):
        while sum(q.in_flight for q in r.router.admission.queues.values()) < 1:
            await asyncio.sleep(0.005)
    queued = []
    for i in range(10):
        queued.append(asyncio.ensure_future(
            raw_request(r.port, "POST", "/api/generate", _body(f"q{i}", 2))))
        await _queued(r, i + 1)
    stop = asyncio.Event()

    async def newcomer(c: int) -> int:
        n = 0
        while not stop.is_set() and n < 40:  # bounded
            status, _, _ = await raw_request(r.port, "POST", "/api/generate",
                                             _body(f"new{c}-{n}", 1))
            assert status == 200
            n += 1
        return n

    pressure = [asyncio.ensure_future(newcomer(c)) for c in range(6)]
    results = await asyncio.gather(*fill, *queued)
    stop.set()
    sent = await asyncio.gather(*pressure)
    assert [s for s, _, _ in results] == [200] * 11 and sum(sent) > 0
    order = [p for p in _prompts(fake) if not p.startswith("fill")]
    assert order[:10] == [f"q{i}" for i in range(10)], order[:16]
    assert all(q.in_flight == 0 and q.pending == 0 for q in r.router.admission.queues.values())


@pytest.mark.both_loops
async def test_newcomer_does_not_take_the_slot_freed_for_a_waiter(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """The router's own acquire/release on a real fleet: a request arriving in the same
    moment a slot frees (its first step runs before the waiter wakes) must queue behind the
    waiter, not take the slot and send the waiter to the back."""
    fake = await make_fake([LLAMA], num_parallel=1)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready()
    router = r.router
    router.config.slots[_node(r, fake)] = 1
    rreq = scoring.RouteRequest(model="llama3.2:3b")
    _, first, _, _ = await router.admission.acquire(rreq)
    waiter = asyncio.ensure_future(router.admission.acquire(rreq))
    async with asyncio.timeout(5):
        while first.pending < 1:
            await asyncio.sleep(0.001)
    newcomer = asyncio.ensure_future(router.admission.acquire(rreq))  # scheduled before the wake-up
    router.admission.release(first, True)
    done, _ = await asyncio.wait([waiter, newcomer], timeout=5,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert done == {waiter}
    _, q, choice, queue_ms = waiter.result()
    assert q is first and choice.action == "dispatch" and queue_ms >= 0
    assert first.in_flight == 1 and first.pending == 1  # the newcomer waits
    router.admission.release(q, True)
    _, q2, _, _ = await asyncio.wait_for(newcomer, 5)
    router.admission.release(q2, True)
    assert first.in_flight == 0 and first.pending == 0


async def test_polls_that_change_nothing_wake_no_waiter(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Waiters re-score on events only: a poll that finds the node as it was wakes nobody;
    one that finds something new (another model loaded) wakes every waiter."""
    qwen = FakeModel(name="qwen2.5:7b", size=4_700_000_000, family="qwen2")
    fake = await make_fake([LLAMA, qwen], num_parallel=1)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready(models=2)
    router = r.router
    node = router.fleet.nodes[_node(r, fake)]
    router.config.slots[node.node_id] = 1  # told 1 slot, so the second request waits
    rreq = scoring.RouteRequest(model="llama3.2:3b")
    _, held, _, _ = await router.admission.acquire(rreq)
    task = asyncio.ensure_future(router.admission.acquire(rreq))
    async with asyncio.timeout(5):
        waiters = router.admission.waiters
        while not waiters or next(iter(waiters.values())).fut is None:
            await asyncio.sleep(0.001)
    waiter = next(iter(router.admission.waiters.values()))
    first = waiter.fut
    assert first is not None
    for _ in range(3):
        assert await router.fleet.refresh_node(node)
    await asyncio.sleep(0.01)
    assert waiter.fut is first and not first.done()  # still asleep, same wait
    status, _, _ = await raw_request(fake.port, "POST", "/api/generate",
                                     b'{"model":"qwen2.5:7b","prompt":"x","stream":false}')
    assert status == 200
    assert await router.fleet.refresh_node(node)
    assert first.done()  # the fleet changed: it re-scores (and waits again)
    await asyncio.sleep(0.01)
    assert not task.done() and held.pending == 1
    router.admission.release(held, True)
    _, q, _, _ = await asyncio.wait_for(task, 5)
    router.admission.release(q, True)
    assert held.in_flight == 0 and held.pending == 0 and not router.admission.waiters
