"""herd's per-request and per-line work, cut to what routing needs (issue 16, third round):
what each shortcut must keep exactly as it was."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import pickle
import random
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import herd
import scoring
from tests.conftest import FakeFactory, RouterFactory
from tests.fake_ollama import FakeModel
from tests.http_helpers import raw_request
from tests.test_router_cost import fleet_of

# ---------------------------------------------------------------------------------------
# scoring: the model spread is built only when an eviction cost reads it
# ---------------------------------------------------------------------------------------


def _count_spreads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scoring.model_spread

    def counting(nodes: Any, now: float) -> dict[str, tuple[int, int]]:
        calls.append(1)
        return real(nodes, now)

    monkeypatch.setattr(scoring, "model_spread", counting)
    return calls


def test_spread_is_not_built_when_the_model_is_resident_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snaps, stats = fleet_of(20, 8)  # every model loaded on every node
    calls = _count_spreads(monkeypatch)
    ranked = scoring.score_nodes(scoring.RouteRequest(model="m3:1b", est_tokens=20), snaps,
                                 {}, stats, {}, 1000.0, scoring.Policy())
    assert all(s.eligible for s in ranked)
    assert calls == []


def _evicting_fleet(seed: int) -> list[scoring.NodeSnapshot]:
    """Nodes full of loaded models (some idle, some not everywhere), so that the asked
    model's load must evict: the eviction cost reads the spread of the victims."""
    rng = random.Random(seed)
    names = [f"v{j}:1b" for j in range(6)]
    snaps = []
    for i in range(6):
        loaded = {m: scoring.LoadedModel(m, 8 << 30, 8 << 30, 4096,
                                         1000.0 + rng.uniform(-10, 600))
                  for m in rng.sample(names, rng.randint(1, 4))}
        snaps.append(scoring.NodeSnapshot(
            node_id=f"n{i}", status="online", ram_total=32 << 30,
            ram_available=rng.choice([1, 4, 20]) << 30, loaded=loaded,
            available={m: scoring.AvailableModel(m, 8 << 30) for m in [*names, "ask:1b"]},
            max_loaded=rng.choice([0, 2, 3]),
        ))
    return snaps


@pytest.mark.parametrize("seed", range(12))
def test_lazy_spread_scores_exactly_like_the_eager_one(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    snaps = _evicting_fleet(seed)
    req = scoring.RouteRequest(model="ask:1b", est_tokens=50)
    pol = scoring.Policy()
    lazy = scoring.score_nodes(req, snaps, {}, {}, {}, 1000.0, pol)
    eager = tuple(
        scoring._score_node(req, n, {}, {}, {}, 1000.0, pol, 0,
                            scoring.model_spread(snaps, 1000.0))
        for n in snaps
    )
    assert sorted(lazy, key=lambda s: s.node_id) == sorted(eager, key=lambda s: s.node_id)
    calls = _count_spreads(monkeypatch)
    scoring.score_nodes(req, snaps, {}, {}, {}, 1000.0, pol)
    assert len(calls) <= 1  # built once per request at most, however many nodes evict
    if any("evict" in f.reason for s in lazy for f in s.factors):
        assert calls == [1]


# ---------------------------------------------------------------------------------------
# Factor and Score: hand-written __init__ (a mutable twin while filled), same records
# ---------------------------------------------------------------------------------------

SAMPLES: dict[type, list[tuple[Any, ...]]] = {
    scoring.Factor: [("wait", 1.5, -3.25, "~1.5s expected"), ("memory", -0.0, 0.0, "")],
    scoring.Score: [("n1", 12.5, True, "hot", (scoring.Factor("a", 1.0, 2.0, "b"),), 3, False),
                    ("n2", 0.0, False, "offline")],
}


@pytest.mark.parametrize("cls", [scoring.Factor, scoring.Score])
def test_hand_written_init_is_the_generated_one(cls: type) -> None:
    """Same parameters and defaults as the frozen dataclass's own ``__init__`` (a field
    added to the class but not to its ``__init__`` fails here), same slots in its twin,
    and the same records: equal, hashable, frozen, replaceable, picklable."""
    spec = dataclasses.fields(cls)
    stock = dataclasses.make_dataclass(
        cls.__name__, [(f.name, f.type, dataclasses.field(default=f.default)) for f in spec],
        frozen=True, slots=True)

    def params(c: type) -> list[tuple[str, object, object]]:
        return [(p.name, p.default, p.kind) for p in inspect.signature(c).parameters.values()]

    assert params(cls) == params(stock)
    twin = scoring._FactorFields if cls is scoring.Factor else scoring._ScoreFields
    assert sorted(twin.__slots__) == sorted(f.name for f in spec)
    for args in SAMPLES[cls]:
        built, ref = cls(*args), stock(*args)
        assert type(built) is cls
        assert dataclasses.astuple(built) == dataclasses.astuple(ref)
        by_name = cls(**{f.name: getattr(built, f.name) for f in spec})
        assert by_name == built and hash(by_name) == hash(built)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(built, spec[0].name, "changed")
        changed = dataclasses.replace(built, reason="other")
        assert type(changed) is cls and changed.reason == "other" and changed != built
        assert pickle.loads(pickle.dumps(built)) == built == copy.deepcopy(built)
        assert repr(built) == repr(ref).replace(stock.__qualname__, cls.__qualname__, 1)
    with pytest.raises(TypeError):
        cls()


# ---------------------------------------------------------------------------------------
# per-node requests in flight: kept by the queues, not summed over every queue
# ---------------------------------------------------------------------------------------


def test_score_nodes_with_counts_ranks_like_summing_the_queues() -> None:
    snaps, stats = fleet_of(20, 8)
    rng = random.Random(7)
    queues = {(f"n{i}", f"m{j}:1b"): scoring.QueueSnapshot(in_flight=rng.randint(0, 8), slots=8)
              for i in range(20) for j in range(8)}
    counts: dict[str, int] = {}
    for (nid, _m), q in queues.items():
        counts[nid] = counts.get(nid, 0) + q.in_flight
    req = scoring.RouteRequest(model="m2:1b", est_tokens=20)
    pol = scoring.Policy()
    summed = scoring.choose(req, snaps, queues, stats, {}, 1000.0, 0.3, pol)
    given_counts = scoring.choose(req, snaps, queues, stats, {}, 1000.0, 0.3, pol,
                                  node_in_flight=counts)
    assert summed == given_counts
    # the counts are what the wait factor reads: different counts, different scores
    other = scoring.choose(req, snaps, queues, stats, {}, 1000.0, 0.3, pol,
                           node_in_flight={k: v + 5 for k, v in counts.items()})
    assert other.ranked != summed.ranked


OPS = st.lists(
    st.tuples(st.sampled_from(["take", "release", "wait", "leave", "resize"]),
              st.integers(0, 3), st.integers(1, 3)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_node_counts_equal_the_sum_of_their_queues(ops: list[tuple[str, int, int]]) -> None:
    """Slots taken, freed, handed over to waiters (on several queues of two nodes), waiters
    leaving with a slot handed but not taken, capacity changes: each node's count is
    always the sum of its queues' ``in_flight``."""
    counts: dict[str, int] = {}
    queues = [herd.SlotQueue(node_id=f"n{i // 2}", model=f"m{i % 2}", slots=1,
                             node_in_flight=counts) for i in range(4)]
    waiters: list[herd.Waiter] = []
    held: list[herd.SlotQueue] = []
    seq = 0
    for op, i, n in ops:
        q = queues[i]
        if op == "take":
            q.take()
            held.append(q)
        elif op == "release" and held:
            held.pop(i % len(held)).release()
        elif op == "wait":
            seq += 1
            w = herd.Waiter(seq)
            w.register(queues[(i + k) % 4] for k in range(n))
            waiters.append(w)
        elif op == "leave" and waiters:
            waiters.pop(i % len(waiters)).leave()  # a granted slot goes on
        elif op == "resize":
            q.resize(n)
        for w in waiters:  # a granted waiter takes its slot
            got = w.take()
            if got is not None:
                held.append(got)
        waiters = [w for w in waiters if w.queues]
        for node in ("n0", "n1"):
            assert counts.get(node, 0) == sum(x.in_flight for x in queues if x.node_id == node)


def test_queue_view_snapshots_only_what_is_looked_up() -> None:
    queues = {(f"n{i}", "m"): herd.SlotQueue(node_id=f"n{i}", model="m", slots=4)
              for i in range(3)}
    queues[("n1", "m")].take()
    view = herd.QueueView(queues)
    assert dict(view) == {k: q.snapshot() for k, q in queues.items()}
    assert view.get(("n1", "m")) == scoring.QueueSnapshot(
        in_flight=1, slots=4, progress_at=queues[("n1", "m")].progress_at,
        oldest_at=queues[("n1", "m")].starts[0])
    assert view.get(("n9", "m")) is None and ("n9", "m") not in view
    queues[("n2", "m")].take()  # live: the next lookup sees the change
    assert view[("n2", "m")].in_flight == 1


CHAT = FakeModel(name="chat:1b", size=1_000_000_000)
CODE = FakeModel(name="code:1b", size=1_000_000_000)


@pytest.mark.both_loops
async def test_streams_at_dispatch_count_the_other_models_on_the_node(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """A request dispatched while another model's request runs on the same node learns
    that it ran beside one other stream (``Observation.streams``), and the per-node count
    is back to zero after."""
    fake = await make_fake([CHAT, CODE], num_parallel=4, tokens_per_s=50, response_tokens=30)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready(models=2)
    body = {"model": "chat:1b", "prompt": "long", "stream": False}
    first = asyncio.ensure_future(
        raw_request(r.port, "POST", "/api/generate", json.dumps(body).encode()))
    async with asyncio.timeout(5):
        while not r.router.admission.node_in_flight.get(next(iter(r.router.fleet.nodes))):
            await asyncio.sleep(0.005)
    short = {"model": "code:1b", "prompt": "short", "stream": False,
             "options": {"num_predict": 2}}
    status, headers, _ = await raw_request(r.port, "POST", "/api/generate",
                                           json.dumps(short).encode())
    assert status == 200
    assert (await first)[0] == 200
    node = headers["x-herd-node"]
    stats = r.router.fleet.stats
    assert stats[(node, "code:1b")].conc_k == 1.0  # beside the chat request
    assert stats[(node, "chat:1b")].conc_k == 0.0  # alone when it was dispatched
    assert r.router.admission.node_in_flight[node] == 0


# ---------------------------------------------------------------------------------------
# per-connection kept bounds (HttpStream.watch): keep-alive idle and the node's first byte
# ---------------------------------------------------------------------------------------


class Quiet:
    """A loopback peer that sends a byte only when asked."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def connect(self) -> herd.HttpStream:
        async def conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.writers.append(w)

        self.server = await asyncio.start_server(conn, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            while not self.writers:
                await asyncio.sleep(0.005)
        return herd.HttpStream(reader, writer, herd.h11.CLIENT)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()


@pytest.mark.both_loops
async def test_a_kept_watch_bounds_every_wait_even_after_a_timeout() -> None:
    peer = Quiet()
    stream = await peer.connect()
    loop = asyncio.get_running_loop()
    try:
        watch = stream.watch(0.2)
        assert stream.watch(0.2) is watch  # one per bound and connection
        for _ in range(2):  # a timed-out watch bounds the next wait just the same
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await stream.read_watched(watch)
            assert 0.15 < loop.time() - t0 < 1.5
        loop.call_later(0.1, peer.writers[0].write, b"x")
        assert await stream.read_watched(watch) == b"x"  # in time: the bytes
        # waits that are each short but add up to more than the bound never time out
        for i in range(6):
            loop.call_later(0.08, peer.writers[0].write, b"%d" % i)
            assert await stream.read_watched(watch) == b"%d" % i
        # an outside cancellation stays a cancellation
        task = asyncio.ensure_future(stream.read_watched(watch))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        stream.close_watches()
        assert stream.watches is None
        stream.close()
        peer.close()


@pytest.mark.both_loops
async def test_keep_alive_requests_arm_no_timer_each(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """40 requests on one keep-alive connection: the idle bound between requests and the
    bound on the node's first byte are the connection's kept watches, not a timer made
    and cancelled per request (asyncio.timeout armed two per request before)."""
    fake = await make_fake([CHAT], tokens_per_s=0, load_delay_s=0)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready()
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_at = loop.call_at

    def counting_call_at(when: float, cb, *args, **kwargs):  # type: ignore[no-untyped-def]
        frame = sys._getframe(1)
        while frame is not None:  # herd's timers only (the fake node arms its own)
            if frame.f_code.co_filename == herd.__file__:
                armed.append(when)
                break
            frame = frame.f_back
        return real_call_at(when, cb, *args, **kwargs)

    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    body = json.dumps({"model": "chat:1b", "prompt": "hi", "stream": False}).encode()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    async def one() -> None:
        writer.write(head + body)
        conn_head = await reader.readuntil(b"\r\n\r\n")
        assert conn_head.startswith(b"HTTP/1.1 200"), conn_head
        length = int(conn_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)

    try:
        await one()  # warm: the pool's connection, the watches
        async with asyncio.timeout(5):  # and the /api/ps read its cold load asked for
            while r.router.fleet.refreshing:
                await asyncio.sleep(0.01)
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        for _ in range(40):
            await one()
    finally:
        loop.call_at = real_call_at  # type: ignore[method-assign]
        writer.close()
    assert len(armed) <= 2, f"{len(armed)} timers armed for 40 keep-alive requests"


# ---------------------------------------------------------------------------------------
# bench/instructions.py: a verdict that can fail
# ---------------------------------------------------------------------------------------


def test_instructions_bench_misses_when_herd_costs_more_than_its_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_bench_exit import bench

    instr = bench("instructions")
    assert instr.report([("relay", 1.0e6), ("herd", 2.6e6)]) is False
    assert "MISS" in capsys.readouterr().out
    assert instr.report([("relay", 1.0e6), ("herd", 1.4e6), ("herd, 20 nodes", 9e6)]) is True
    assert "PASS" in capsys.readouterr().out
