"""herd's own per-request work: what it does once instead of per request (issue 16)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

import h11
import httpx
import pytest

import herd
import scoring
import store


def test_queue_snapshot_is_reused_while_unchanged_and_follows_every_change() -> None:
    q = herd.SlotQueue(node_id="n1", model="m:1b", slots=8)
    first = q.snapshot()
    assert first == scoring.QueueSnapshot(pending=0, in_flight=0, slots=8)
    assert q.snapshot() is first  # unchanged: no new object per request
    q.take()
    busy = q.progress_at  # the queue became busy: the stall clock starts
    assert busy > 0
    assert q.snapshot() == scoring.QueueSnapshot(pending=0, in_flight=1, slots=8,
                                                 progress_at=busy, oldest_at=busy)
    q.pending += 1
    assert q.snapshot() == scoring.QueueSnapshot(pending=1, in_flight=1, slots=8,
                                                 progress_at=busy, oldest_at=busy)
    q.resize(4)
    assert q.snapshot() == scoring.QueueSnapshot(pending=1, in_flight=1, slots=4,
                                                 progress_at=busy, oldest_at=busy)
    q.sure = 2
    assert q.snapshot().sure == 2
    q.pending -= 1
    q.release()
    again = q.snapshot()
    assert again == scoring.QueueSnapshot(pending=0, in_flight=0, slots=4, sure=2,
                                          progress_at=q.progress_at)
    assert q.snapshot() is again


# ---------------------------------------------------------------------------------------
# score_nodes: per-node learning reads its own node's statistics, not the whole fleet's
# ---------------------------------------------------------------------------------------


class CountingStats(dict[tuple[str, str], scoring.ServiceStats]):
    """A stats mapping that counts every entry handed out by ``items()``."""

    visited = 0

    def items(self) -> Any:
        for kv in super().items():
            self.visited += 1
            yield kv


def fleet_of(nodes: int, models: int) -> tuple[list[scoring.NodeSnapshot],
                                               CountingStats]:
    names = [f"m{j}:1b" for j in range(models)]
    snaps = [
        scoring.NodeSnapshot(
            node_id=f"n{i}", status="online", ram_total=64 << 30, ram_available=32 << 30,
            loaded={m: scoring.LoadedModel(m, 1 << 30, 1 << 30, 4096, None) for m in names},
            available={m: scoring.AvailableModel(m, 1 << 30) for m in names},
        )
        for i in range(nodes)
    ]
    stats = CountingStats()
    for i in range(nodes):
        for j, m in enumerate(names):
            obs = scoring.Observation(ok=True, prompt_tokens=10, prompt_eval_ms=5.0,
                                      completion_tokens=100, eval_ms=1000.0 + i + j,
                                      total_ms=1100.0, streams=j % 4)
            st = None
            for _ in range(12):
                st = scoring.observe(st, obs, scoring.Policy())
            assert st is not None
            stats[(f"n{i}", m)] = st
    return snaps, stats


def test_score_nodes_reads_each_stats_entry_once_not_once_per_node() -> None:
    """20 nodes x 8 models: ``node_rates`` and ``stream_slowdown`` used to scan all 160
    entries for each of the 20 nodes (6,400 reads per request); now each entry once."""
    snaps, stats = fleet_of(20, 8)
    req = scoring.RouteRequest(model="m3:1b", est_tokens=20)
    ranked = scoring.score_nodes(req, snaps, {}, stats, {}, 1000.0, scoring.Policy())
    assert stats.visited <= len(stats)
    # and the same ranking, reasons and factors as with every entry scanned per node
    by_node = scoring.FleetStats(dict(stats))
    assert ranked == scoring.score_nodes(req, snaps, {}, by_node, {}, 1000.0,
                                         scoring.Policy())
    for n in snaps:
        assert (scoring.node_rates(n.node_id, n.available, dict(stats))
                == scoring.node_rates(n.node_id, n.available, by_node))
        assert (scoring.stream_slowdown(n.node_id, dict(stats), scoring.Policy())
                == scoring.stream_slowdown(n.node_id, by_node, scoring.Policy()))


# ---------------------------------------------------------------------------------------
# Node.snapshot: one frozen snapshot while nothing it is built from changed
# ---------------------------------------------------------------------------------------

T0 = 1_790_000_000.0


def static_node() -> herd.Node:
    node = herd.Node(node_id="n1", url="http://127.0.0.1:1", source="static",
                     status="online", reachable=True)
    node.available = [{"name": "a:1b", "size": 1 << 30}, {"name": "b:1b", "size": 2 << 30}]
    node.set_loaded([{"name": "a:1b", "size": 1 << 30, "size_vram": 0,
                      "expires_at": herd.rfc3339(T0 + 100)}], T0)
    return node


def test_node_snapshot_is_reused_while_unchanged() -> None:
    node = static_node()
    first = node.snapshot(T0)
    assert node.snapshot(T0 + 5) is first
    assert node.snapshot(T0 + 99) is first


@pytest.mark.parametrize("change", [
    "status", "reachable", "loaded", "available", "hardware", "capabilities",
    "num_parallel", "loading", "loading_gone", "unloaded", "expiry", "loading_age",
    "clock_back",
])
def test_node_snapshot_follows_every_change(change: str) -> None:
    """After any change the snapshot is rebuilt, equal to one built from scratch."""
    node = static_node()
    now = T0 + 10
    node.loading["b:1b"] = T0
    before = node.snapshot(now)
    if change == "status":
        node.status = "degraded"
    elif change == "reachable":
        node.reachable = False
    elif change == "loaded":
        node.set_loaded([], now)
    elif change == "available":
        node.available = [{"name": "c:1b", "size": 1}]
    elif change == "hardware":
        node.hardware_report = herd.HardwareReport.parse(
            {"memory": {"total_bytes": 64 << 30, "available_bytes": 1 << 30}})
    elif change == "capabilities":
        node.capabilities_report = herd.CapabilitiesReport.parse(
            {"image": [{"name": "flux"}]})
    elif change == "num_parallel":
        node.num_parallel = 4
    elif change == "loading":
        node.loading["c:1b"] = now
    elif change == "loading_gone":
        del node.loading["b:1b"]
    elif change == "unloaded":
        node.recently_unloaded["z:1b"] = now
    elif change == "expiry":
        now = T0 + 100.5  # a:1b's keep-alive ran out: no longer hot
    elif change == "loading_age":
        now = T0 + 900.5  # the load sent at T0 is no longer "loading"
    elif change == "clock_back":
        now = T0 + 1  # the wall clock stepped back: rebuilt, not trusted
    after = node.snapshot(now)
    assert after is not before
    assert after == node._build_snapshot(now)
    assert after != before or change == "clock_back"
    assert node.snapshot(now) is after  # and reused again from there


async def test_learned_snapshot_is_reused_while_unchanged(
        make_router: Any, make_fake: Any) -> None:
    fake = await make_fake()
    r = await make_router([fake.url])
    await r.wait_ready()
    fleet = r.router.fleet
    now = time.time()
    first = fleet._snapshots(now)
    assert all(a is b for a, b in zip(first, fleet._snapshots(now + 1), strict=True))
    node = next(iter(fleet.nodes.values()))
    node.max_loaded_models = 7  # a reported model cap is folded in: a new snapshot
    again = fleet._snapshots(now + 1)
    assert again[0] is not first[0] and again[0].max_loaded == 7
    assert fleet._snapshots(now + 2)[0] is again[0]


# ---------------------------------------------------------------------------------------
# Slot learning reads the answers that ended during this one, not all 256 remembered
# ---------------------------------------------------------------------------------------


class CountingDeque(deque[float]):
    pulled = 0

    def __iter__(self) -> Any:
        for t in super().__iter__():
            self.pulled += 1
            yield t

    def __reversed__(self) -> Any:
        for t in super().__reversed__():
            self.pulled += 1
            yield t


def test_ended_since_reads_only_the_newest_entries() -> None:
    ends = CountingDeque([float(t) for t in range(250)], maxlen=256)
    ends.extend([300.0, 301.5, 303.0])
    assert herd.ended_since(ends, since=299.0, run_start=301.6, tol=0.25) == (2, True)
    assert ends.pulled <= 4  # the 3 newer ones and the first older one, not 2 x 253


@pytest.mark.parametrize("seed", range(40))
def test_ended_since_matches_a_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    ends = deque(sorted(rng.uniform(0, 100) for _ in range(rng.randint(0, 256))),
                 maxlen=256)
    since, run_start, tol = rng.uniform(0, 100), rng.uniform(0, 110), rng.uniform(0, 3)
    finished = sum(1 for t in ends if since < t <= run_start)
    freed = any(abs(t - run_start) <= tol for t in ends if t > since)
    assert herd.ended_since(ends, since, run_start, tol) == (finished, freed)


# ---------------------------------------------------------------------------------------
# HttpStream.send waits for the peer only past the transport's high-water mark
# ---------------------------------------------------------------------------------------


async def test_send_drains_only_past_the_high_water_mark() -> None:
    """Small writes to a reading peer do not call ``drain()`` each (a coroutine per
    chunk); a peer that stops reading still holds the sender once the transport is full."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer_reader, peer_writer = await accepted.get()
    stream = herd.HttpStream(reader, writer, h11.CLIENT)
    drains = 0
    real_drain = writer.drain

    async def counting_drain() -> None:
        nonlocal drains
        drains += 1
        await real_drain()

    writer.drain = counting_drain  # type: ignore[method-assign]
    try:
        await stream.send(h11.Request(method="POST", target="/", headers=[
            (b"host", b"x"), (b"transfer-encoding", b"chunked")]))
        for _ in range(100):
            await stream.send(h11.Data(data=b'{"response":"tok","done":false}\n'))
        got = b""
        while got.count(b"done") < 100:
            got += await peer_reader.read(65536)
        assert drains == 0
        # the peer stops reading: sends fill the socket, then the transport, then wait
        big = b"x" * 65536
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.0):
                for _ in range(10_000):  # bounded: ~650 MB would never fit in buffers
                    await stream.send(h11.Data(data=big))
        assert drains >= 1
        assert writer.transport.get_write_buffer_size() <= stream.drain_above + len(big) * 2
    finally:
        stream.close()
        peer_writer.close()
        server.close()


# ---------------------------------------------------------------------------------------
# What scoring derives from the statistics is shared by requests until they change
# ---------------------------------------------------------------------------------------


def test_a_kept_stats_view_scores_the_next_request_without_rereading_stats() -> None:
    snaps, stats = fleet_of(20, 8)
    view = scoring.FleetStats(stats)
    req = scoring.RouteRequest(model="m3:1b", est_tokens=20)
    first = scoring.score_nodes(req, snaps, {}, view, {}, 1000.0, scoring.Policy())
    read = stats.visited
    assert read <= len(stats)
    other = scoring.RouteRequest(model="m5:1b", est_tokens=200)
    second = scoring.score_nodes(other, snaps, {}, view, {}, 1001.0, scoring.Policy())
    assert stats.visited == read  # per-node rates and slowdowns came from the view
    assert first == scoring.score_nodes(req, snaps, {}, dict(stats), {}, 1000.0,
                                        scoring.Policy())
    assert second == scoring.score_nodes(other, snaps, {}, dict(stats), {}, 1001.0,
                                         scoring.Policy())


def test_stats_table_counts_every_change() -> None:
    t = herd.StatsTable()
    st = scoring.ServiceStats()
    seen = [t.version]

    def changed() -> None:
        assert t.version > seen[-1]
        seen.append(t.version)

    t[("a", "m")] = st
    changed()
    t.update({("b", "m"): st})
    changed()
    t.setdefault(("c", "m"), st)
    changed()
    t.pop(("c", "m"))
    changed()
    del t[("b", "m")]
    changed()
    t |= {("d", "m"): st}
    changed()
    t.popitem()
    changed()
    t.clear()
    changed()


async def test_fleet_stats_view_lasts_until_the_stats_change(
        make_router: Any, make_fake: Any) -> None:
    fake = await make_fake()
    r = await make_router([fake.url])
    await r.wait_ready()
    fleet = r.router.fleet
    view = fleet.stats_view()
    assert fleet.stats_view() is view
    async with httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        resp = await c.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi",
                                                   "stream": False})
        assert resp.status_code == 200
    fresh = fleet.stats_view()
    assert fresh is not view  # the answer's timings were learned: a new view
    assert dict(fresh.items()) == dict(fleet.stats)
    assert fleet.stats_view() is fresh


# ---------------------------------------------------------------------------------------
# The trace's scores breakdown: JSON text built straight from the scores
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_breakdown_json_is_the_stores_encoding_of_breakdown(seed: int) -> None:
    rng = random.Random(seed)
    snaps, stats = fleet_of(rng.randint(1, 20), rng.randint(1, 8))
    breakers = {snaps[0].node_id: scoring.BreakerState(state="open", open_until=1e12)}
    req = scoring.RouteRequest(model="m0:1b", est_tokens=rng.randint(0, 50_000),
                               exclude=frozenset({snaps[-1].node_id}) if seed % 3 else
                               frozenset())
    queues = {(n.node_id, "m0:1b"): scoring.QueueSnapshot(in_flight=rng.randint(0, 9),
                                                          slots=8) for n in snaps}
    choice = scoring.choose(req, snaps, queues, dict(stats), breakers, 1000.0,
                            rng.random(), scoring.Policy())
    memo = herd.FactorJson(limit=16)  # small: the bound is exercised too
    text = choice.breakdown_json(memo)
    assert text == store._dumps(choice.breakdown())  # byte for byte
    assert choice.breakdown_json(memo) == text  # and again from remembered factors
    assert len(memo.memo) <= 16


def test_a_factor_with_odd_text_and_numbers_encodes_like_json() -> None:
    for f in (scoring.Factor("wait", -0.0, -0.00001, 'quote " backslash \\ tab\t é ✓'),
              scoring.Factor("x", float("inf"), float("nan"), ""),
              scoring.Factor("y", 1e-7, 123456789.123456, "\u2028")):
        assert f.to_json() == store._dumps(f.to_dict())


async def test_trace_rows_store_the_breakdown_text(make_router: Any, make_fake: Any) -> None:
    fake = await make_fake()
    r = await make_router([fake.url])
    await r.wait_ready()
    async with httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        resp = await c.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi",
                                                   "stream": False})
        assert resp.status_code == 200
        rid = resp.headers["x-request-id"]
        async with asyncio.timeout(10):
            while True:
                got = (await c.get("/dashboard/api/traces?limit=5")).json()
                rows = [t for t in got.get("traces", got) if t["request_id"] == rid]
                if rows:
                    break
                await asyncio.sleep(0.05)
    sb = rows[0]["scores_breakdown"]
    assert sb["winner"]["node_id"] == rows[0]["node_id"]
    assert [f["name"] for f in sb["winner"]["factors"]][:2] == ["thermal", "memory"]
    assert sb["runner_up"] is None and sb["others"] == []


# ---------------------------------------------------------------------------------------
# LineRelay: a held partial record and the next chunk leave together in one copy
# ---------------------------------------------------------------------------------------


def test_line_relay_joins_a_held_record_with_the_chunk_that_ends_it() -> None:
    relay = herd.LineRelay("ndjson")
    assert relay.feed(b'{"a":1}\n{"b"') == b'{"a":1}\n'
    assert relay.feed(b':2}\n{"c":3}\n{"d"') == b'{"b":2}\n{"c":3}\n'
    assert relay.feed(b":4") == b""  # still no end: held
    assert relay.feed(b'}\n{"done":true}\n') == b'{"d":4}\n{"done":true}\n'
    assert relay.final_object() == {"done": True}
    assert relay.tail() == b""


def test_line_relay_finds_an_sse_separator_split_across_chunks() -> None:
    relay = herd.LineRelay("sse")
    assert relay.feed(b"data: 1\n\ndata: 2\n") == b"data: 1\n\n"
    # the blank line ending event 2 arrives as the next chunk's first byte
    assert relay.feed(b"\ndata: 3") == b"data: 2\n\n"
    assert relay.feed(b"\n\n") == b"data: 3\n\n"
