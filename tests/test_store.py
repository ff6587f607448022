"""store.py against real SQLite files in tmp_path: migrations, batching, filters, analytics
with known answers, pruning with rollups, settings, benchmarks, loop responsiveness, JSONL."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import store
from store import MIGRATIONS, Store, TraceRecord, setup_jsonl_logging
from tests.conftest import skip_or_fail

# A fixed clock, 12:30 UTC: every analytics call in these tests passes it as `now`.
D0 = 20717 * store.DAY  # 2026-09-21 00:00 UTC
NOW = D0 + 12 * store.HOUR + 1800
H0 = D0 + 12 * store.HOUR  # the hour containing NOW

OpenStore = Callable[..., Awaitable[Store]]

pytestmark = pytest.mark.both_loops  # every async test under asyncio and uvloop (conftest)


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Factory for opened stores (background pruning off: the data uses a fixed past clock)."""
    opened: list[Store] = []

    async def factory(**kwargs: object) -> Store:
        kwargs.setdefault("prune_interval_s", None)
        s = Store(tmp_path / "data", **kwargs)  # type: ignore[arg-type]
        await s.open()
        opened.append(s)
        return s

    yield factory
    for s in opened:
        await s.close()


def rec(request_id: str, ts: float, **fields: object) -> TraceRecord:
    return TraceRecord(request_id, ts, **fields)  # type: ignore[arg-type]


def approx(value: object, expected: float, rel: float = 0.011) -> bool:
    """Histogram percentiles are within ~1 % of the exact value."""
    assert isinstance(value, float | int)
    return abs(value - expected) <= rel * (expected + 1)


# ---------------------------------------------------------------------------------------
# Migrations
# ---------------------------------------------------------------------------------------


def user_version(path: Path) -> int:
    conn = store._connect_writer(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def write_before_v4(conn: sqlite3.Connection, records: list[TraceRecord]) -> None:
    """What ``_write_batch`` did before v4: traces, tags and ``rollups`` (no fleet rows)."""
    tags = [store._clean_tags(r.tags) for r in records]
    with store._atomic(conn):
        (first,) = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM request_traces").fetchone()
        rows = [
            (first + i, *store._trace_values(r, t))
            for i, (r, t) in enumerate(zip(records, tags, strict=True))
        ]
        store._insert_many(conn, store._INSERT_TRACE, len(store.TRACE_COLUMNS), rows)
        store._add_to_rollups(conn, records, tags)


def trends_from_node_rows(
    conn: sqlite3.Connection, hours: float, now: float, keep: float = 35
) -> list[dict[str, object]]:
    """Trends as computed before v4: every node x model row of each hour merged per query.
    The oracle the fleet-wide rows must reproduce."""
    hours = max(1, min(math.ceil(hours), math.ceil(keep * 24)))
    last = store._floor(now, store.HOUR)
    first = last - (hours - 1) * store.HOUR
    groups = store._aggregate(conn, store.HOUR, first, last, tagged=False, by=("bucket",))
    return [
        {"hour": b, "time": store._iso(b), **store._metrics(groups.get((b,), store._Agg()))}
        for b in range(first, last + 1, store.HOUR)
    ]


def fleet_dataset(n: int, *, span_days: float = 7.0, seed: int = 0) -> list[TraceRecord]:
    """``n`` traces spread (unsorted) over ``span_days`` before NOW on 5 nodes x 8 models, some
    rejected (no node), some tagged. Every float is a multiple of 1/4 and small, so sums are
    exact in any order and results can be compared with ==."""
    out = []
    statuses = ["completed"] * 6 + ["failed", "retried", "client_disconnected", "reaped"]
    for i in range(n):
        j = i * 7919 + seed
        rejected = i % 23 == 0
        latency = float(5 + j % 4000)
        out.append(
            rec(
                f"r{seed}-{i}",
                NOW - (j * 37 % int(span_days * store.DAY)),
                model=f"m{j % 8}" if i % 31 else "",
                node_id="" if rejected else f"n{j % 5}",
                status="rejected" if rejected else statuses[j % len(statuses)],
                latency_ms=latency,
                time_to_first_token_ms=None if i % 4 == 0 else latency / 4,
                queue_ms=(j % 9) * 0.25,
                prompt_tokens=j % 300,
                completion_tokens=None if i % 5 == 0 else j % 200,
                eval_ms=float(1 + j % 700),
                load_ms=None if i % 3 else float(j % 3000),
                fallback_used=i % 11 == 0,
                tags=[f"app:{j % 3}"] if i % 2 else [],
            )
        )
    return out


async def test_open_creates_and_migrates_from_empty(tmp_path: Path) -> None:
    s = Store(tmp_path / "new" / "dir", prune_interval_s=None)
    await s.open()
    await s.close()
    db = tmp_path / "new" / "dir" / "latency.db"
    assert db.exists()
    assert user_version(db) == len(MIGRATIONS)
    conn = store._connect_writer(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        conn.close()
    assert {
        "request_traces",
        "trace_tags",
        "events",
        "settings",
        "benchmark_runs",
        "rollups",
        "fleet_rollups",
    } <= tables
    assert {
        "idx_traces_timestamp",
        "idx_traces_model",
        "idx_traces_node",
        "idx_traces_status",
    } <= indexes


def store_at(
    tmp_path: Path, version: int, *, kept_trace: bool = False
) -> tuple[Path, sqlite3.Connection]:
    """A data dir whose database was migrated to ``version`` only (an older herd's), with
    one trace row ``kept`` when asked; returns the dir and the open writer connection."""
    data = tmp_path / "data"
    data.mkdir()
    conn = store._connect_writer(data / "latency.db")
    assert store._migrate(conn, MIGRATIONS[:version]) == version
    if kept_trace:
        conn.execute(
            "INSERT INTO request_traces (request_id, timestamp, model, node_id, status, "
            "latency_ms) VALUES ('kept', ?, 'm', 'a', 'completed', 1)",
            (NOW,),
        )
    return data, conn


async def test_migrates_from_previous_version_and_backfills_rollups(tmp_path: Path) -> None:
    data, conn = store_at(tmp_path, 1)
    conn.execute(
        "INSERT INTO request_traces (request_id, timestamp, model, node_id, status, latency_ms, "
        "tags) VALUES ('old-1', ?, 'llama3:latest', 'a', 'completed', 250, '[\"app:x\"]')",
        (NOW - 60,),
    )
    conn.close()

    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert [t["request_id"] for t in await s.traces()] == ["old-1"]
        (m,) = await s.models(days=1, now=NOW)
        assert (m["model"], m["requests"], m["nodes"]) == ("llama3:latest", 1, ["a"])
        assert approx(m["latency_p50_ms"], 250)
        assert [a["tag"] for a in await s.apps(days=1, now=NOW)] == ["app:x"]
    finally:
        await s.close()
    assert user_version(data / "latency.db") == len(MIGRATIONS)


async def test_v3_rewrites_old_histograms_dense_with_the_same_analytics(tmp_path: Path) -> None:
    _data, conn = store_at(tmp_path, 2)
    write_before_v4(
        conn,
        [
            rec(
                f"r{i}",
                NOW - i * 900,
                model=f"m{i % 3}",
                node_id=f"n{i % 2}",
                latency_ms=50 + 37 * i,
                time_to_first_token_ms=5 + i,
                tags=["app:x"],
            )
            for i in range(200)
        ],
    )
    # What v2 wrote: {"bin": count} (the dense form did not exist yet).
    for key, latency, ttft in conn.execute(
        "SELECT span || '/' || bucket || '/' || node_id || '/' || model || '/' || tag, "
        "latency_hist, ttft_hist FROM rollups"
    ).fetchall():
        old = [
            json.dumps({str(h.lo + i): n for i, n in enumerate(h.counts) if n})
            for h in map(store._Hist.from_json, (latency, ttft))
        ]
        conn.execute(
            "UPDATE rollups SET latency_hist = ?, ttft_hist = ? WHERE "
            "span || '/' || bucket || '/' || node_id || '/' || model || '/' || tag = ?",
            (*old, key),
        )
    assert (
        conn.execute("SELECT COUNT(*) FROM rollups WHERE latency_hist LIKE '[%'").fetchone()[0] == 0
    )

    def analytics() -> list[object]:
        return [
            store._select_usage(conn, 7, NOW),
            store._select_models(conn, 7, NOW, 35),
            store._select_models(conn, 1, NOW, 35),
            store._select_apps(conn, 7, NOW, 35),
            trends_from_node_rows(conn, 48, NOW),  # no fleet rows before v4
            store._select_node_model_stats(conn, 7, NOW, 35),
        ]

    before = analytics()
    assert store._migrate(conn) == len(MIGRATIONS)
    dense = conn.execute("SELECT COUNT(*) FROM rollups WHERE latency_hist LIKE '[%'").fetchone()
    assert dense[0] > 0
    assert analytics() == before
    assert store._select_trends(conn, 48, NOW, 35) == before[4]  # v4's fleet rows
    conn.close()


@pytest.mark.parametrize("chunk_hours", [None, 7])
async def test_v4_backfills_fleet_rollups_with_the_same_trends(
    tmp_path: Path, chunk_hours: int | None
) -> None:
    """From v3 (through ``_migrate``, or the step alone in chunks of 7 hours)."""
    data, conn = store_at(tmp_path, 3)
    # 40 days: more than the hourly retention (the backfill copies whatever hours exist).
    old = fleet_dataset(3000, span_days=40)
    for start in range(0, len(old), 250):
        write_before_v4(conn, old[start : start + 250])
    windows = (1, 24, 168, 35 * 24)
    before = {h: trends_from_node_rows(conn, h, NOW) for h in windows}
    hourly_buckets = {
        b for (b,) in conn.execute("SELECT DISTINCT bucket FROM rollups WHERE span = 3600")
    }
    if chunk_hours is None:
        assert store._migrate(conn, MIGRATIONS[:4]) == 4
    else:
        with store._atomic(conn):
            store._fleet_rollups_v4(conn, chunk_hours=chunk_hours)
            conn.execute("PRAGMA user_version = 4")

    # One hourly row per bucket that had node x model rows, none daily; counters equal the
    # SQL sums of those rows; trends read from them exactly what the old merge gave.
    fleet = conn.execute("SELECT span, bucket FROM fleet_rollups").fetchall()
    assert {span for span, _ in fleet} == {store.HOUR}
    assert {b for _, b in fleet} == hourly_buckets and len(fleet) == len(hourly_buckets)
    sums = ", ".join(f"SUM({c})" for c in store.ROLLUP_SUMS)
    assert (
        conn.execute(f"SELECT {sums} FROM fleet_rollups").fetchone()
        == conn.execute(f"SELECT {sums} FROM rollups WHERE span = 3600 AND tag = ''").fetchone()
    )
    for h in windows:
        assert store._select_trends(conn, h, NOW, 35) == before[h]
    assert sum(t["requests"] for t in before[35 * 24]) > 2000  # the data is really there
    conn.close()

    # The store goes on from there: new traces merge into the backfilled rows.
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        new = fleet_dataset(500, span_days=3, seed=1)
        for r in new:
            s.record_trace(r)
        await s.flush()
        for h in windows:
            assert await s.trends(hours=h, now=NOW) == await s._read(
                lambda c, h=h: trends_from_node_rows(c, h, NOW)
            )
    finally:
        await s.close()
    assert user_version(data / "latency.db") == len(MIGRATIONS)


async def test_v5_node_admissions_persist_and_migrate_from_v4(tmp_path: Path) -> None:
    """A v4 database gains ``node_admissions`` (traces kept); decisions survive a reopen and
    the last decision about a node id wins."""
    data, conn = store_at(tmp_path, 4, kept_trace=True)
    conn.close()
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert await s.node_admissions() == {}
        await s.set_node_admission(
            "studio", "approved", addr="10.0.0.7", ollama_url="http://10.0.0.7:11434", now=NOW
        )
        await s.set_node_admission("stranger", "rejected", addr="10.0.0.66", ollama_url="", now=NOW)
        await s.set_node_admission(
            "studio", "approved", addr="10.0.0.8", ollama_url="http://10.0.0.8:11434", now=NOW + 1
        )
        with pytest.raises(ValueError, match="decision"):
            await s.set_node_admission("x", "maybe", addr="", ollama_url="", now=NOW)
    finally:
        await s.close()
    assert user_version(data / "latency.db") == len(MIGRATIONS) == 8
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert [t["request_id"] for t in await s.traces()] == ["kept"]
        assert await s.node_admissions() == {
            "stranger": {
                "node_id": "stranger",
                "decision": "rejected",
                "addr": "10.0.0.66",
                "ollama_url": "",
                "decided_at": NOW,
            },
            "studio": {
                "node_id": "studio",
                "decision": "approved",
                "addr": "10.0.0.8",
                "ollama_url": "http://10.0.0.8:11434",
                "decided_at": NOW + 1,
            },
        }
    finally:
        await s.close()


@dataclass(frozen=True, slots=True)
class LearnedBounds:
    lo: int
    hi_at: float


async def test_v7_learned_facts_migrate_from_v6_and_keep_what_changed(tmp_path: Path) -> None:
    """A v6 database gains ``learned_facts`` (traces kept). Facts are upserted by (kind, key),
    deleted when gone, bounded per kind by age (``updated_at``) and count (the newest kept),
    on save and on load; values are the JSON of a dataclass's fields."""
    data, conn = store_at(tmp_path, 6, kept_trace=True)
    conn.close()
    fact = store.LearnedFact
    day = store.DAY
    limits = {"slots": (day, 10), "memory": (day, 10), "affinity": (600.0, 3)}
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert user_version(data / "latency.db") == len(MIGRATIONS) == 8
        assert await s.load_learned(now=NOW, limits=limits) == []
        bounds = LearnedBounds(lo=2, hi_at=NOW - 10)  # a frozen dataclass, as the router's
        ok = await s.save_learned(
            [fact("slots", '["a", "m"]', "a", bounds, NOW - 10),
             fact("memory", "a", "a", {"fits": 1}, NOW - 5),
             fact("memory", "old", "old", {"fits": 2}, NOW - 2 * day),
             fact("memory", "nan", "nan", {"fits": math.nan}, NOW)],
            now=NOW, limits=limits,
        )
        assert ok  # the NaN row is refused alone, with a log line; the old one aged out
        loaded = await s.load_learned(now=NOW, limits=limits)
        assert [(f.kind, f.key, f.node_id, f.updated_at) for f in loaded] == [
            ("slots", '["a", "m"]', "a", NOW - 10), ("memory", "a", "a", NOW - 5)]
        assert loaded[0].value == {"lo": 2, "hi_at": NOW - 10}
        assert loaded[1].value == {"fits": 1}
        await s.save_learned(
            [fact("memory", "a", "a", {"fits": 3}, NOW)],
            [("slots", '["a", "m"]')],
            now=NOW, limits=limits,
        )
        loaded = await s.load_learned(now=NOW, limits=limits)
        assert [(f.key, f.value) for f in loaded] == [("a", {"fits": 3})]
        many = [fact("affinity", f"k{i}", "a", {"i": i}, NOW + i) for i in range(5)]
        await s.save_learned(many, now=NOW + 5, limits=limits)
        kept = await s.load_learned(now=NOW + 5, limits=limits)
        assert [f.key for f in kept] == ["a", "k2", "k3", "k4"]  # the newest 3 affinity rows
        # 20 minutes later: the affinity rows are past their own age, memory is not
        kept = await s.load_learned(now=NOW + 1200, limits=limits)
        assert [f.key for f in kept] == ["a"]
        # a day later, on load: nothing was updated within the age limit
        assert await s.load_learned(now=NOW + 2 * day, limits=limits) == []
    finally:
        await s.close()
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert [t["request_id"] for t in await s.traces()] == ["kept"]
    finally:
        await s.close()


async def test_v8_watermark_starts_at_the_newest_trace_of_a_v7_database(tmp_path: Path) -> None:
    """A v7 database wrote each trace's rollups with it, so v8's watermark starts at its
    newest trace: opening it folds nothing twice, and new traces count once more each."""
    data, conn = store_at(tmp_path, 7)
    write_before_v4(conn, [rec(f"old-{i}", NOW - 60 - i, model="m", node_id="a",
                               status="completed", latency_ms=100) for i in range(5)])
    conn.close()
    s = Store(data, prune_interval_s=None)
    await s.open()
    try:
        assert user_version(data / "latency.db") == len(MIGRATIONS) == 8
        assert [m["requests"] for m in await s.models(days=1, now=NOW)] == [5]
        s.record_trace(rec("new", NOW - 1, model="m", node_id="a", status="completed",
                           latency_ms=100))
        await s.flush()
        assert [m["requests"] for m in await s.models(days=1, now=NOW)] == [6]
    finally:
        await s.close()
    conn = sqlite3.connect(data / "latency.db")
    try:
        assert conn.execute("SELECT trace_id FROM rollup_watermark").fetchall() == [(6,)]
    finally:
        conn.close()


async def test_migrations_are_idempotent_and_refuse_newer_schema(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        s = Store(data, prune_interval_s=None)
        await s.open()
        await s.close()
    conn = store._connect_writer(data / "latency.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await Store(data, prune_interval_s=None).open()


# ---------------------------------------------------------------------------------------
# Writes: batching, durability, bounds
# ---------------------------------------------------------------------------------------


async def test_burst_of_5000_commits_in_few_transactions(open_store: OpenStore) -> None:
    s = await open_store(batch_max=500, flush_interval_s=0.25)
    for i in range(5000):
        s.record_trace(rec(f"r{i}", NOW - i, model="m", node_id="a", latency_ms=10.0))
    await s.flush()
    st_ = s.stats()
    assert st_.records_written == 5000
    assert st_.batches_written <= 12  # 10 full batches, a little slack for timing
    rows = await s.traces(limit=10_000)
    assert len(rows) == 5000
    assert len({r["id"] for r in rows}) == 5000
    assert rows[0]["request_id"] == "r0"  # newest first
    (m,) = await s.models(days=1, now=NOW)
    assert m["requests"] == 5000


async def test_loop_records_reach_the_writer_as_one_batch_per_interval(
    open_store: OpenStore,
) -> None:
    s = await open_store(batch_max=500, flush_interval_s=0.2)
    for i in range(120):
        s.record_trace(rec(f"r{i}", NOW, model="m", node_id="a"))
        if i % 10 == 0:
            await asyncio.sleep(0)  # the loop runs between records, as under real load
    s.record_event("node_online", "a", {}, timestamp=NOW)
    assert s.stats().queue_depth == 121  # pending on the loop, not yet with the writer
    deadline = time.monotonic() + 5
    while s.stats().records_written < 120 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # no flush(): the hand-over timer alone delivers them
    st_ = s.stats()
    assert (st_.records_written, st_.events_written, st_.batches_written) == (120, 1, 1)
    assert st_.queue_depth == 0 and st_.writer_cpu_s > 0


async def test_records_from_another_thread_are_queued_directly(open_store: OpenStore) -> None:
    s = await open_store(flush_interval_s=0.05)
    await asyncio.to_thread(lambda: [s.record_trace(rec(f"t{i}", NOW)) for i in range(50)])
    s.record_trace(rec("loop", NOW))
    await s.flush()
    assert len(await s.traces(limit=100)) == 51


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
async def test_writer_thread_runs_nicer_than_the_loop(open_store: OpenStore) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    s = await open_store(writer_nice=5)
    assert s._writer is not None and s._writer.native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, s._writer.native_id) == min(19, base + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # loop unchanged


async def test_concurrent_producers_lose_nothing(open_store: OpenStore) -> None:
    s = await open_store(batch_max=100, flush_interval_s=0.01)

    async def producer(p: int) -> None:
        for i in range(250):
            s.record_trace(rec(f"p{p}-{i}", NOW, model="m", node_id=f"n{p % 3}"))
            if i % 25 == 0:
                await asyncio.sleep(0)
        await s.flush()

    await asyncio.gather(*(producer(p) for p in range(20)))
    assert len(await s.traces(limit=10_000)) == 5000
    assert sum(r["requests"] for r in await s.node_model_stats(now=NOW)) == 5000


async def test_close_flushes_and_restart_keeps_every_trace(tmp_path: Path) -> None:
    s = Store(tmp_path, flush_interval_s=60.0, prune_interval_s=None)  # never flushes by timer
    await s.open()
    for i in range(1234):
        s.record_trace(rec(f"r{i}", NOW, status="completed"))
    s.record_event("node_online", "a", {"address": "10.0.0.2"}, timestamp=NOW)
    await s.close()
    await s.close()  # idempotent
    s.record_trace(rec("late", NOW))  # after close: dropped, not raised
    assert s.stats().dropped == 1

    s2 = Store(tmp_path, prune_interval_s=None)
    await s2.open()
    try:
        assert len(await s2.traces(limit=5000)) == 1234
        assert (await s2.events())[0]["detail"] == {"address": "10.0.0.2"}
    finally:
        await s2.close()


async def test_records_before_open_are_written(tmp_path: Path) -> None:
    s = Store(tmp_path, prune_interval_s=None)
    s.record_trace(rec("early", NOW))
    await s.open()
    try:
        await s.flush()
        assert [t["request_id"] for t in await s.traces()] == ["early"]
    finally:
        await s.close()


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    s = Store(tmp_path, max_queue=10, prune_interval_s=None)  # not opened: nothing drains
    for i in range(15):
        s.record_trace(rec(f"r{i}", NOW))
    assert (s.stats().queue_depth, s.stats().dropped) == (10, 5)
    await s.open()
    try:
        await s.flush()
        assert len(await s.traces()) == 10
    finally:
        await s.close()


async def test_a_bad_record_costs_only_itself(open_store: OpenStore) -> None:
    s = await open_store()
    for i in range(9):
        s.record_trace(rec(f"ok{i}", NOW, latency_ms=5.0))
    s.record_trace(rec("bad", NOW, latency_ms="not a number"))
    await s.flush()
    assert len(await s.traces()) == 9
    assert s.stats().write_errors == 1


async def test_sqlite_cli_query_from_the_issue_works(open_store: OpenStore) -> None:
    cli = shutil.which("sqlite3")
    if cli is None:
        skip_or_fail("sqlite3 CLI not installed (apt-get install sqlite3; tests/setup.sh does)")
    s = await open_store()
    s.record_trace(rec("x1", NOW - 10, model="m", status="failed", error_message="boom"))
    s.record_trace(rec("x2", NOW, model="m", status="completed"))
    await s.flush()
    proc = await asyncio.create_subprocess_exec(
        cli,
        str(s.db_path),
        "SELECT request_id, model, status, error_message FROM request_traces "
        "WHERE status='failed' ORDER BY timestamp DESC LIMIT 10",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert out.decode().strip() == "x1|m|failed|boom"


# ---------------------------------------------------------------------------------------
# Traces and events
# ---------------------------------------------------------------------------------------


async def test_traces_filters_and_round_trip(open_store: OpenStore) -> None:
    s = await open_store()
    breakdown = {"winner": {"node_id": "a", "total": 81.5}, "runner_up": None, "others": []}
    s.record_trace(
        rec(
            "r1",
            NOW - 300,
            model="m1",
            node_id="a",
            status="failed",
            tags=["app:x", " app:x ", ""],
            scores_breakdown=breakdown,
            score=81.5,
            fallback_used=True,
            client_ip="10.0.0.9",
        )
    )
    s.record_trace(rec("r2", NOW - 200, model="m2", node_id="b", tags=["app:y"]))
    s.record_trace(rec("r3", NOW - 100, model="m1", node_id="b", tags=["app:x"]))
    await s.flush()

    async def ids(**kw: object) -> list[object]:
        return [t["request_id"] for t in await s.traces(**kw)]  # type: ignore[arg-type]

    assert await ids() == ["r3", "r2", "r1"]
    assert await ids(limit=2) == ["r3", "r2"]
    assert await ids(status="failed") == ["r1"]
    assert await ids(model="m1") == ["r3", "r1"]
    assert await ids(node_id="b") == ["r3", "r2"]
    assert await ids(tag="app:x") == ["r3", "r1"]
    assert await ids(tag="app:x", node_id="a") == ["r1"]
    assert await ids(since=NOW - 250) == ["r3", "r2"]
    assert await ids(tag="nope") == []
    (r1,) = await s.traces(status="failed")
    assert r1["tags"] == ["app:x"]  # cleaned: stripped, de-duplicated, empties dropped
    assert r1["scores_breakdown"] == breakdown
    assert (r1["fallback_used"], r1["score"], r1["client_ip"]) == (True, 81.5, "10.0.0.9")
    assert set(r1) == {"id", *TraceRecord.__dataclass_fields__}


async def test_events_recorded_and_filtered(open_store: OpenStore) -> None:
    s = await open_store()
    s.record_event("node_online", "a", {"n": 1}, timestamp=NOW - 20)
    s.record_event("breaker_opened", "b", {"failures": 5}, timestamp=NOW - 10)
    s.record_event("node_offline", "a", {}, timestamp=NOW)
    await s.flush()
    assert [e["kind"] for e in await s.events()] == [
        "node_offline",
        "breaker_opened",
        "node_online",
    ]
    assert [e["kind"] for e in await s.events(node_id="a")] == ["node_offline", "node_online"]
    assert [e["detail"] for e in await s.events(kind="breaker_opened")] == [{"failures": 5}]
    assert len(await s.events(since=NOW - 10)) == 2


# ---------------------------------------------------------------------------------------
# Analytics on crafted data with known answers
# ---------------------------------------------------------------------------------------


async def crafted(s: Store) -> None:
    """llama3 on a: 10 completed at latencies 100..1000 (4 tagged app:chat); llama3 on b:
    one retried attempt then its completed retry, one failed; qwen on b yesterday with a cold
    load, tagged; one rejected request for a model nobody has."""
    for i in range(10):
        lat = 100.0 * (i + 1)
        s.record_trace(
            rec(
                f"a{i}",
                H0 + 60 * i,
                model="llama3:8b",
                node_id="a",
                latency_ms=lat,
                time_to_first_token_ms=lat / 10,
                prompt_tokens=10,
                completion_tokens=20,
                eval_ms=200.0,
                queue_ms=4.0,
                tags=["app:chat"] if i < 4 else [],
            )
        )
    s.record_trace(rec("b1", H0 - 3000, model="llama3:8b", node_id="b", status="retried"))
    s.record_trace(
        rec("b1", H0 - 2990, model="llama3:8b", node_id="b", latency_ms=500.0, retry_count=1)
    )
    s.record_trace(
        rec("b2", H0 - 2 * store.HOUR + 5, model="llama3:8b", node_id="b", status="failed")
    )
    yesterday = D0 - store.DAY + 10 * store.HOUR
    for i, lat in enumerate((40.0, 60.0)):
        s.record_trace(
            rec(
                f"q{i}",
                yesterday + i,
                model="qwen:0.5b",
                node_id="b",
                latency_ms=lat,
                load_ms=2000.0 if i == 0 else 20.0,
                prompt_tokens=5,
                completion_tokens=7,
                tags=["app:batch", "user:bob"],
            )
        )
    s.record_trace(rec("g1", H0 + 5, model="ghost:1b", node_id="", status="rejected"))
    await s.flush()


async def test_models_known_answers(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    models = await s.models(days=7, now=NOW)
    assert [m["model"] for m in models] == ["llama3:8b", "qwen:0.5b", "ghost:1b"]
    llama, qwen, ghost = models
    assert llama["nodes"] == ["a", "b"]
    assert (llama["attempts"], llama["requests"], llama["completed"]) == (13, 12, 11)
    assert (llama["failures"], llama["retried"]) == (1, 1)
    assert llama["error_rate"] == pytest.approx(1 / 12, abs=1e-3)
    # completed latencies: 100..1000 and 500 -> avg 6000/11, p50 (rank 6) 500, p95 (rank 11) 1000
    assert llama["latency_avg_ms"] == pytest.approx(6000 / 11, abs=1e-3)
    assert approx(llama["latency_p50_ms"], 500)
    assert approx(llama["latency_p95_ms"], 1000)
    assert llama["ttft_avg_ms"] == pytest.approx(55.0)  # 10..100 on node a
    assert approx(llama["ttft_p50_ms"], 50)
    assert llama["tokens_per_s"] == pytest.approx(100.0)  # 20 tokens per 200 ms eval
    assert (llama["prompt_tokens"], llama["completion_tokens"]) == (100, 200)
    assert (qwen["nodes"], qwen["requests"], qwen["latency_avg_ms"]) == (["b"], 2, 50.0)
    assert approx(qwen["latency_p50_ms"], 40)
    assert qwen["tokens_per_s"] is None  # no eval durations reported
    assert (ghost["nodes"], ghost["requests"], ghost["error_rate"]) == ([], 1, 1.0)
    assert ghost["latency_avg_ms"] is None

    # A one-day sliding window drops yesterday's qwen.
    assert [m["model"] for m in await s.models(days=1, now=NOW)] == ["llama3:8b", "ghost:1b"]


async def test_apps_known_answers(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    apps = {a["tag"]: a for a in await s.apps(days=7, now=NOW)}
    assert set(apps) == {"app:chat", "app:batch", "user:bob"}
    chat = apps["app:chat"]
    assert (chat["requests"], chat["failures"]) == (4, 0)
    assert chat["latency_avg_ms"] == pytest.approx(250.0)
    assert approx(chat["latency_p95_ms"], 400)
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (40, 80)
    assert (apps["user:bob"]["requests"], apps["user:bob"]["cold_loads"]) == (2, 1)
    assert (await s.apps(days=7, now=NOW))[0]["tag"] == "app:chat"  # busiest first
    assert {a["tag"] for a in await s.apps(days=1, now=NOW)} == {"app:chat"}


async def test_trends_every_hour_present(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    trends = await s.trends(hours=24, now=NOW)
    assert len(trends) == 24
    assert [t["hour"] for t in trends] == [H0 - (23 - i) * store.HOUR for i in range(24)]
    assert trends[0]["time"] == "2026-09-20T13:00:00Z"
    last, prev, prev2 = trends[-1], trends[-2], trends[-3]
    assert (last["requests"], last["failures"], last["completed"]) == (11, 1, 10)
    assert last["latency_avg_ms"] == pytest.approx(550.0)
    assert approx(last["latency_p95_ms"], 1000)
    assert last["tokens_per_s"] == pytest.approx(100.0)
    assert (prev["requests"], prev["retried"], prev["attempts"]) == (1, 1, 2)
    assert (prev2["requests"], prev2["failures"]) == (1, 1)
    quiet = trends[:-3]
    assert all(t["requests"] == 0 and t["latency_avg_ms"] is None for t in quiet)
    assert sum(t["requests"] for t in await s.trends(hours=48, now=NOW)) == 15


async def test_trends_from_fleet_rows_equal_the_node_model_merge(open_store: OpenStore) -> None:
    """Trends read one fleet-wide row per hour; written batch by batch (many batches hit the
    same hours, rejected requests without node or model included), they give exactly what
    merging every node x model row of each hour gives."""
    s = await open_store(batch_max=97)
    for i, r in enumerate(fleet_dataset(4000)):
        s.record_trace(r)
        if i % 500 == 0:
            await s.flush()
    await s.flush()
    for hours in (1, 2.5, 24, 48, 168, 35 * 24):
        fleet = await s.trends(hours=hours, now=NOW)
        assert fleet == await s._read(lambda c, h=hours: trends_from_node_rows(c, h, NOW))
    month = await s.trends(hours=35 * 24, now=NOW)
    assert sum(t["attempts"] for t in month) == 4000
    assert sum(t["failures"] for t in month) > 0 and sum(t["retried"] for t in month) > 0


async def test_trends_known_answers_in_one_hour(open_store: OpenStore) -> None:
    """One hour, two nodes x two models and a rejected request, in separate batches."""
    s = await open_store()
    latencies = {("a", "m1"): [100.0, 300.0], ("a", "m2"): [200.0], ("b", "m1"): [400.0]}
    for (node, model), values in latencies.items():
        for i, lat in enumerate(values):
            s.record_trace(
                rec(
                    f"{node}{model}{i}",
                    H0 + 60 * i,
                    model=model,
                    node_id=node,
                    latency_ms=lat,
                    time_to_first_token_ms=lat / 10,
                    queue_ms=2.0,
                )
            )
        await s.flush()  # one batch per node x model: the fleet row is merged in steps
    s.record_trace(rec("x", H0 + 900, model="m3", status="rejected"))
    await s.flush()
    (hour,) = await s.trends(hours=1, now=NOW)
    assert hour["hour"] == H0
    assert (hour["requests"], hour["completed"], hour["failures"]) == (5, 4, 1)
    assert hour["latency_avg_ms"] == 250.0 and hour["ttft_avg_ms"] == 25.0
    assert approx(hour["latency_p50_ms"], 200) and approx(hour["latency_p99_ms"], 400)
    assert hour["queue_ms_avg"] == pytest.approx(8.0 / 5)
    assert (hour["first_used"], hour["last_used"]) == (H0, H0 + 900)


async def test_fleet_rows_never_count_in_other_analytics(open_store: OpenStore) -> None:
    """usage, models, apps and node_model_stats read nothing of ``fleet_rollups``: inflating
    every fleet row changes trends and none of them."""
    s = await open_store()
    await crafted(s)

    async def others() -> list[object]:
        return [
            await s.usage(days=7, now=NOW),
            await s.models(days=1, now=NOW),  # hourly rows
            await s.models(days=7, now=NOW),  # daily rows
            await s.apps(days=1, now=NOW),
            await s.apps(days=7, now=NOW),
            await s.node_model_stats(days=1, now=NOW),
            await s.node_model_stats(days=7, now=NOW),
        ]

    before, trends = await others(), await s.trends(hours=48, now=NOW)
    usage, models = before[0], before[2]
    assert isinstance(usage, dict) and usage["totals"]["requests"] == 15
    assert isinstance(models, list) and sum(m["requests"] for m in models) == 15
    assert [m["model"] for m in models] == ["llama3:8b", "qwen:0.5b", "ghost:1b"]
    await s._write(
        lambda c: c.execute(
            "UPDATE fleet_rollups SET completed = completed + 1000, latency_n = latency_n + 1000"
        )
    )
    assert await others() == before
    assert await s.trends(hours=48, now=NOW) != trends


async def test_usage_per_node_model_day(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    u = await s.usage(days=2, now=NOW)
    assert (u["days"], u["from"], u["to"]) == (2, D0 - store.DAY, NOW)
    assert isinstance(u["totals"], dict) and u["totals"]["requests"] == 15
    by_day = u["by_day"]
    assert isinstance(by_day, list)
    assert [(d["day"], d["requests"]) for d in by_day] == [("2026-09-20", 2), ("2026-09-21", 13)]
    rows = u["rows"]
    assert isinstance(rows, list)
    cells = {(r["day"], r["node_id"], r["model"]): r for r in rows}
    assert set(cells) == {
        ("2026-09-20", "b", "qwen:0.5b"),
        ("2026-09-21", "", "ghost:1b"),
        ("2026-09-21", "a", "llama3:8b"),
        ("2026-09-21", "b", "llama3:8b"),
    }
    b_llama = cells[("2026-09-21", "b", "llama3:8b")]
    assert (b_llama["requests"], b_llama["failures"], b_llama["retried"]) == (2, 1, 1)
    assert cells[("2026-09-20", "b", "qwen:0.5b")]["completion_tokens"] == 14
    assert cells[("2026-09-21", "a", "llama3:8b")]["latency_avg_ms"] == pytest.approx(550.0)
    by_node = u["by_node"]
    assert isinstance(by_node, list)
    assert [(n["node_id"], n["requests"]) for n in by_node] == [("a", 10), ("b", 4), ("", 1)]
    assert (await s.usage(days=1.5, now=NOW))["days"] == 2  # float days round up
    assert len(await s.trends(hours=2.5, now=NOW)) == 3
    # Days with no traffic are present with zeros.
    empty = await s.usage(days=5, now=NOW + 3 * store.DAY)
    assert [d["requests"] for d in empty["by_day"]] == [2, 13, 0, 0, 0]  # type: ignore[union-attr,index]


async def test_node_model_stats(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    stats = {(r["node_id"], r["model"]): r for r in await s.node_model_stats(days=7, now=NOW)}
    assert set(stats) == {("a", "llama3:8b"), ("b", "llama3:8b"), ("b", "qwen:0.5b")}
    b = stats[("b", "llama3:8b")]
    assert (b["attempts"], b["errors"], b["requests"]) == (3, 2, 2)
    assert b["attempt_error_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert b["last_used"] == H0 - 2990
    q = stats[("b", "qwen:0.5b")]
    assert (q["cold_loads"], q["load_ms_avg"]) == (1, 1010.0)
    a = stats[("a", "llama3:8b")]
    assert (a["errors"], a["queue_ms_avg"], a["first_used"]) == (0, 4.0, H0)


async def test_long_windows_read_daily_rollups(open_store: OpenStore) -> None:
    s = await open_store()
    await crafted(s)
    far = NOW + 60 * store.DAY
    assert await s.models(days=7, now=far) == []
    assert sum(m["requests"] for m in await s.models(days=90, now=far)) == 15


# ---------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------


async def test_prune_deletes_raw_traces_but_rollups_survive(open_store: OpenStore) -> None:
    s = await open_store(retention_days=1.0)
    old = H0 - 3 * store.DAY
    for i in range(10):
        s.record_trace(
            rec(f"old{i}", old + i, model="m", node_id="a", latency_ms=200.0, tags=["t"])
        )
    s.record_trace(rec("new", NOW - 60, model="m", node_id="a", latency_ms=100.0, tags=["t"]))
    s.record_event("node_online", "a", {}, timestamp=old)
    await s.flush()
    before = {
        "trends": await s.trends(hours=96, now=NOW),
        "usage": await s.usage(days=5, now=NOW),
        "models": await s.models(days=5, now=NOW),
        "apps": await s.apps(days=5, now=NOW),
    }

    assert await s.prune(now=NOW) == 10
    assert [t["request_id"] for t in await s.traces()] == ["new"]
    assert [t["request_id"] for t in await s.traces(tag="t")] == ["new"]
    assert await s.events() == []
    after = {
        "trends": await s.trends(hours=96, now=NOW),
        "usage": await s.usage(days=5, now=NOW),
        "models": await s.models(days=5, now=NOW),
        "apps": await s.apps(days=5, now=NOW),
    }
    assert after == before
    (old_hour,) = [t for t in after["trends"] if t["hour"] == old]  # type: ignore[index]
    assert (old_hour["requests"], old_hour["latency_avg_ms"]) == (10, 200.0)
    assert s.stats().pruned_total == 10
    assert await s.prune(now=NOW) == 0


async def test_hourly_rollups_expire_daily_ones_stay(open_store: OpenStore) -> None:
    s = await open_store(retention_days=1.0)
    s.record_trace(rec("r", NOW, model="m", node_id="a"))
    await s.flush()
    later = NOW + 60 * store.DAY
    await s.prune(now=later)
    assert sum(t["requests"] for t in await s.trends(hours=24 * 35, now=later)) == 0
    assert (await s.usage(days=90, now=later))["totals"]["requests"] == 1  # type: ignore[index]


async def test_fleet_rows_expire_with_the_hourly_rollups(open_store: OpenStore) -> None:
    s = await open_store(retention_days=1.0)  # hourly rollups: the default 35 days
    horizon = H0 - 35 * store.DAY  # the oldest hour prune(now=NOW) keeps
    for i, ts in enumerate((horizon - store.HOUR + 10, horizon + 10, H0 - 3 * store.DAY, NOW)):
        s.record_trace(rec(f"r{i}", ts, model="m", node_id="a", latency_ms=10.0, tags=["t"]))
    await s.flush()

    async def buckets(table: str) -> set[tuple[int, int]]:
        rows = await s._read(
            lambda c: c.execute(f"SELECT DISTINCT span, bucket FROM {table}").fetchall()
        )
        return {(r[0], r[1]) for r in rows}

    hours = {horizon - store.HOUR, horizon, H0 - 3 * store.DAY, H0}
    assert await buckets("fleet_rollups") == {(store.HOUR, b) for b in hours}
    await s.prune(now=NOW)
    kept = {(store.HOUR, b) for b in hours - {horizon - store.HOUR}}
    assert await buckets("fleet_rollups") == kept
    hourly = {(span, b) for span, b in await buckets("rollups") if span == store.HOUR}
    assert hourly == kept  # the same hours as the node x model and tag rows
    await s.prune(now=NOW + 60 * store.DAY)
    assert await buckets("fleet_rollups") == set()
    later = await s.usage(days=120, now=NOW + 60 * store.DAY)
    assert later["totals"]["requests"] == 4  # type: ignore[index]  # daily rows stay


async def test_background_prune_runs_on_writer(tmp_path: Path) -> None:
    s = Store(tmp_path, retention_days=1.0, prune_interval_s=0.05)
    await s.open()
    try:
        s.record_trace(rec("ancient", time.time() - 5 * store.DAY))
        s.record_trace(rec("fresh", time.time()))
        await s.flush()
        for _ in range(200):
            if s.stats().pruned_total:
                break
            await asyncio.sleep(0.01)
        assert [t["request_id"] for t in await s.traces()] == ["fresh"]
        assert s.stats().last_prune_at is not None
    finally:
        await s.close()


# ---------------------------------------------------------------------------------------
# Settings and benchmarks
# ---------------------------------------------------------------------------------------


async def test_settings_persist_across_restart(tmp_path: Path) -> None:
    s = Store(tmp_path, prune_interval_s=None)
    await s.open()
    assert await s.get_settings() == {}
    assert await s.set_settings({"auto_pull": True, "vram_fallback": False}) == {
        "auto_pull": True,
        "vram_fallback": False,
    }
    await s.set_settings({"vram_fallback": None, "limits": {"max": [1, 2]}})
    await s.close()

    s2 = Store(tmp_path, prune_interval_s=None)
    await s2.open()
    try:
        got = await s2.get_settings()
        assert got == {"auto_pull": True, "limits": {"max": [1, 2]}}
        got["auto_pull"] = False  # a copy: the store's view is unchanged
        assert (await s2.get_settings())["auto_pull"] is True
        with pytest.raises(TypeError):
            await s2.set_settings({"bad": object()})
    finally:
        await s2.close()


async def test_benchmark_runs(open_store: OpenStore) -> None:
    s = await open_store()
    r1 = await s.create_benchmark({"concurrency": 4, "requests": 100}, now=NOW)
    r2 = await s.create_benchmark({"concurrency": 8}, now=NOW + 1)
    updated = await s.update_benchmark(
        r1,
        status="done",
        progress=1.0,
        rps=12.5,
        latency_p95_ms=830.0,
        results={"per_node": {"a": 50}},
    )
    assert (updated["status"], updated["rps"], updated["results"]) == (
        "done",
        12.5,
        {"per_node": {"a": 50}},
    )
    runs = await s.benchmarks()
    assert [r["run_id"] for r in runs] == [r2, r1]
    assert runs[1]["params"] == {"concurrency": 4, "requests": 100}
    assert runs[0]["status"] == "pending"
    assert [r["run_id"] for r in await s.benchmarks(limit=1)] == [r2]
    with pytest.raises(ValueError, match="unknown"):
        await s.update_benchmark(r1, nonsense=1)
    with pytest.raises(KeyError):
        await s.update_benchmark(999, status="done")


async def test_methods_after_close_raise(tmp_path: Path) -> None:
    s = Store(tmp_path, prune_interval_s=None)
    await s.open()
    await s.close()
    with pytest.raises(RuntimeError):
        await s.traces()
    with pytest.raises(RuntimeError):
        await s.flush()


# ---------------------------------------------------------------------------------------
# The event loop is never blocked
# ---------------------------------------------------------------------------------------


async def test_event_loop_keeps_ticking_during_burst_and_big_query(open_store: OpenStore) -> None:
    s = await open_store(batch_max=500, flush_interval_s=0.05)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)
    t0 = time.perf_counter()
    for i in range(20_000):
        s.record_trace(
            rec(
                f"r{i}",
                NOW - i,
                model=f"m{i % 7}",
                node_id=f"n{i % 5}",
                latency_ms=float(i % 1000),
                scores_breakdown={"winner": {"total": i}},
                tags=[f"app:{i % 11}"],
            )
        )
        if i % 250 == 0:
            await asyncio.sleep(0)  # producers interleave with other work, as requests do
    await s.flush()
    rows = await s.traces(limit=10_000)
    await s.models(days=7, now=NOW)
    await s.trends(hours=24 * 7, now=NOW)
    elapsed = time.perf_counter() - t0
    stop.set()
    await beat
    assert len(rows) == 10_000
    assert len(gaps) > 10
    # Generous bound: the burst and queries took `elapsed`; the loop never stalled for long.
    assert max(gaps) < 0.25, (max(gaps), elapsed)


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200), st.floats(0, 1))
def test_histogram_quantile_within_one_percent(values: list[float], q: float) -> None:
    hist = store._Hist()
    for v in values:
        hist.add(store._bin(v))
    exact = sorted(values)[max(1, -(-int(q * 1e9) * len(values) // int(1e9))) - 1]
    got = store._quantile(hist, q)
    assert got is not None
    assert abs(got - exact) <= 0.0101 * (exact + 1) + 1e-3


def test_quantile_of_empty_histogram_is_none() -> None:
    assert store._quantile(store._Hist(), 0.5) is None
    assert store._Hist.from_json("{}").quantiles((0.5, 0.99)) == [None, None]
    assert store._Hist().to_json() == "{}"


def dict_quantile(hist: dict[str, int], q: float) -> float | None:
    """The pre-v3 percentile path: ``{"bin": count}`` dicts, one sort per quantile."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen >= rank:
            return round(math.expm1(int(b) * store._LOG_GAMMA), 3)
    return None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(min_value=0, max_value=1e7), max_size=60)
        | st.lists(st.sampled_from([0.0, 3.0, 9e6]), max_size=5),  # sparse: wide, few
        min_size=1,
        max_size=6,
    ),
    st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_dense_histograms_match_the_dict_path(parts: list[list[float]], qs: list[float]) -> None:
    """Parts are recorded, stored (either JSON form), parsed and merged in any order: the
    dense path gives exactly the percentiles the old dict merge + sort gave."""
    old: dict[str, int] = {}
    merged = store._Hist()
    for n, values in enumerate(parts):
        part = store._Hist()
        for v in values:
            b = store._bin(v)
            part.add(b)
            old[str(b)] = old.get(str(b), 0) + 1
        text = part.to_json()
        parsed = store._Hist.from_json(text)
        assert (parsed.lo, parsed.counts) == (part.lo, part.counts) or not part.counts
        sparse = json.dumps({str(part.lo + i): n for i, n in enumerate(part.counts) if n})
        merged.merge(store._Hist.from_json(sparse) if n % 2 else parsed)
    assert merged.quantiles(qs) == [dict_quantile(old, q) for q in qs]
    assert sum(merged.counts) == sum(old.values())


def test_histogram_json_picks_the_smaller_form() -> None:
    dense = store._Hist()
    for b in (100, 101, 101, 103):
        dense.add(b)
    assert dense.to_json() == "[100,1,2,0,1]"
    sparse = store._Hist()
    for b in (5, 700):
        sparse.add(b)
    assert sparse.to_json() == '{"5":1,"700":1}'
    for h in (dense, sparse):
        back = store._Hist.from_json(h.to_json())
        assert (back.lo, back.counts) == (h.lo, h.counts)


def test_clean_tags() -> None:
    raw: list[object] = [" a ", "a", "", "b", 3, "x" * 500]
    assert store._clean_tags(raw) == ["a", "b", "x" * store.MAX_TAG_LEN]
    assert len(store._clean_tags(str(i) for i in range(100))) == store.MAX_TAGS


# ---------------------------------------------------------------------------------------
# JSON-lines logging
# ---------------------------------------------------------------------------------------


def test_jsonl_handler_writes_json_lines_with_extras_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "herd.jsonl"
    name = "herd.test_store.jsonl"
    logger = logging.getLogger(name)
    handler = setup_jsonl_logging(path, logger_name=name, max_bytes=4000, backups=2)
    try:
        logger.info("proxy.done", extra={"request_id": "req-1", "node": "a", "model": "m"})
        logger.info("value %d of %s", 42, "x")
        try:
            raise ValueError("kaput")
        except ValueError:
            logger.exception("proxy.backend_failed", extra={"request_id": "req-2"})
        for i in range(200):
            logger.info("filler.line", extra={"i": i, "pad": "p" * 40})
    finally:
        logger.removeHandler(handler)
        handler.close()

    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["herd.jsonl", "herd.jsonl.1", "herd.jsonl.2"]
    assert all(f.stat().st_size <= 4000 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in lines)
    fillers = sorted(d["i"] for d in lines if d["msg"] == "filler.line")
    assert fillers[-1] == 199  # newest kept, oldest rotated away
    # The first lines rotated out; check them on a fresh file.
    path2 = tmp_path / "logs2" / "herd.jsonl"
    handler = setup_jsonl_logging(path2, logger_name=name)
    try:
        logger.info("proxy.done", extra={"request_id": "req-1", "node": "a", "model": "m"})
        logger.info("value %d of %s", 42, "x")
        try:
            raise ValueError("kaput")
        except ValueError:
            logger.exception("proxy.backend_failed", extra={"request_id": "req-2"})
    finally:
        logger.removeHandler(handler)
        handler.close()
    done, value, failed = (json.loads(line) for line in path2.read_text().splitlines())
    assert done["msg"] == "proxy.done" and done["level"] == "INFO" and done["logger"] == name
    assert (done["request_id"], done["node"], done["model"]) == ("req-1", "a", "m")
    assert done["ts"].endswith("Z")
    assert value["msg"] == "value 42 of x"
    assert failed["request_id"] == "req-2" and "ValueError: kaput" in failed["exception"]
