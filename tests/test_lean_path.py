"""herd's per-request work, fourth round (issue 16): what each cheaper path must keep
exactly as it was."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import operator
import pickle
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import herd
import scoring
import store
from scoring import Observation, Policy, ServiceStats
from tests.conftest import FakeFactory, RouterFactory
from tests.fake_ollama import FakeModel

# ---------------------------------------------------------------------------------------
# learning: a finished request folded into its statistics without ``replace``
# ---------------------------------------------------------------------------------------


def reference_observe(
    stats: ServiceStats | None, obs: Observation, policy: Policy
) -> ServiceStats:
    """``observe`` as it was before issue 16's fourth round: one generic ``replace``."""
    s = stats if stats is not None else ServiceStats()
    a = policy.ewma_alpha
    count = s.count + 1
    failures = s.failures + (0 if obs.ok else 1)
    ch: dict[str, float | int] = {
        "count": count,
        "failures": failures,
        "failure_rate": scoring._ewma(s.failure_rate, s.count, 0.0 if obs.ok else 1.0, a),
    }
    if not obs.ok:
        return dataclasses.replace(s, **ch)  # type: ignore[arg-type]
    ok_n = count - 1 - failures
    load_ms = max(0.0, obs.load_ms)
    loaded = load_ms >= policy.load_observed_min_ms
    if loaded and not obs.load_queued:
        ch["load_ms_ewma"] = scoring._ewma(s.load_ms_ewma, s.load_n, load_ms, a)
        ch["load_n"] = s.load_n + 1
    if obs.prompt_tokens > 0 and obs.prompt_eval_ms > 0:
        tps = obs.prompt_tokens / (obs.prompt_eval_ms / 1000.0)
        ch["prompt_tps_ewma"] = scoring._ewma(s.prompt_tps_ewma, s.prompt_tps_n, tps, a)
        ch["prompt_tps_n"] = s.prompt_tps_n + 1
    if obs.completion_tokens > 0 and obs.eval_ms > 0:
        tps = obs.completion_tokens / (obs.eval_ms / 1000.0)
        ch["eval_tps_ewma"] = scoring._ewma(s.eval_tps_ewma, s.eval_tps_n, tps, a)
        ch["eval_tps_n"] = s.eval_tps_n + 1
        if obs.streams is not None and obs.streams >= 0:
            k = float(obs.streams)
            y = obs.eval_ms / 1000.0 / obs.completion_tokens
            b, n = policy.slowdown_alpha, s.conc_n
            ch.update(
                conc_n=n + 1,
                eval_k_ewma=scoring._ewma(s.eval_k_ewma, n, k, a),
                conc_k=scoring._ewma(s.conc_k, n, k, b),
                conc_kk=scoring._ewma(s.conc_kk, n, k * k, b),
                conc_y=scoring._ewma(s.conc_y, n, y, b),
                conc_ky=scoring._ewma(s.conc_ky, n, k * y, b),
            )
    ch["completion_tokens_ewma"] = scoring._ewma(
        s.completion_tokens_ewma, ok_n, float(max(0, obs.completion_tokens)), a
    )
    ch["prompt_tokens_ewma"] = scoring._ewma(
        s.prompt_tokens_ewma, ok_n, float(max(0, obs.prompt_tokens)), a
    )
    if obs.ttft_ms is not None and obs.ttft_ms >= 0:
        ch["ttft_ms_ewma"] = scoring._ewma(s.ttft_ms_ewma, s.ttft_n, obs.ttft_ms, a)
        ch["ttft_n"] = s.ttft_n + 1
    total = max(0.0, obs.total_ms)
    if total > 0:
        n = s.total_n
        mean = scoring._ewma(s.total_ms_ewma, n, total, a)
        var = 0.0 if n == 0 else (1 - a) * (s.total_ms_var + a * (total - s.total_ms_ewma) ** 2)
        service = max(0.0, total - (load_ms if loaded else 0.0))
        if obs.eval_ms > 0:
            # what a request queued behind this one waits for: its prefill and decode, not
            # the time it spent queued inside Ollama itself (that would count queues twice)
            service = min(service, max(0.0, obs.prompt_eval_ms) + obs.eval_ms)
        tmax = max(s.total_max, total)
        if n == 0:
            q = total
        else:
            # stochastic-approximation quantile; the step scales with the spread seen so far
            step = a * max(var**0.5, 0.05 * mean, 1.0)
            tau = policy.quantile
            if total > s.total_p:
                q = s.total_p + step * tau
            elif total < s.total_p:
                q = s.total_p - step * (1.0 - tau)
            else:
                q = s.total_p
        ch.update(
            total_ms_ewma=mean,
            total_ms_var=var,
            service_ms_ewma=scoring._ewma(s.service_ms_ewma, n, service, a),
            total_n=n + 1,
            total_max=tmax,
            total_p=min(max(q, 0.0), tmax),
        )
    return dataclasses.replace(s, **ch)  # type: ignore[arg-type]


def test_stats_copy_copies_every_field() -> None:
    """``_stats_copy`` is written out field by field: a field added to ``ServiceStats``
    but not to the copy fails here."""
    spec = dataclasses.fields(ServiceStats)
    assert scoring._StatsFields.__slots__ == tuple(f.name for f in spec)
    values: dict[str, Any] = {f.name: i + 1 if f.type == "int" else i + 0.5
                              for i, f in enumerate(spec)}
    src = ServiceStats(**values)
    twin = scoring._stats_copy(src)
    assert type(twin) is scoring._StatsFields
    assert all(getattr(twin, f.name) == getattr(src, f.name) for f in spec)


def test_observe_builds_no_record_through_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    """One finished request costs no ``dataclasses.replace`` (it collected all 25 fields by
    name through ``object.__setattr__``); the result is a real, frozen ``ServiceStats``."""
    calls: list[int] = []
    real = dataclasses.replace

    def counting(obj: Any, /, **changes: Any) -> Any:
        calls.append(1)
        return real(obj, **changes)

    monkeypatch.setattr(scoring, "replace", counting)
    policy = Policy()
    stats = None
    for ok in (True, False, True):
        stats = scoring.observe(stats, Observation(ok=ok, prompt_tokens=9, prompt_eval_ms=3.0,
                                                   completion_tokens=12, eval_ms=40.0,
                                                   ttft_ms=8.0, total_ms=55.0, streams=1),
                                policy)
    assert calls == []
    assert type(stats) is ServiceStats and stats.count == 3 and stats.failures == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.count = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(stats)) == stats == copy.deepcopy(stats)
    assert hash(stats) == hash(dataclasses.replace(stats))


_obs = st.builds(
    Observation,
    ok=st.booleans(),
    load_ms=st.sampled_from([0.0, 50.0, 900.0, 4000.0]),
    prompt_tokens=st.integers(0, 5000),
    prompt_eval_ms=st.floats(0, 5000, allow_nan=False, allow_subnormal=False),
    completion_tokens=st.integers(0, 2000),
    eval_ms=st.floats(0, 60000, allow_nan=False, allow_subnormal=False),
    ttft_ms=st.none() | st.floats(-1, 9000, allow_nan=False, allow_subnormal=False),
    total_ms=st.floats(-1, 90000, allow_nan=False, allow_subnormal=False),
    streams=st.none() | st.integers(-1, 8),
    load_queued=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_obs, min_size=1, max_size=40), st.floats(0.01, 0.5))
def test_observe_folds_exactly_like_replace(obs: list[Observation], alpha: float) -> None:
    """Field for field, bit for bit the record the generic ``replace`` built, along any
    sequence of attempts; the record passed in is left as it was (observe stays pure)."""
    policy = dataclasses.replace(Policy(), ewma_alpha=alpha)
    new: ServiceStats | None = None
    ref: ServiceStats | None = None
    for o in obs:
        before = new
        kept = dataclasses.astuple(before) if before is not None else None
        new = scoring.observe(before, o, policy)
        ref = reference_observe(ref, o, policy)
        # repr: exact for floats, and nan (inf - inf in an EWMA) equals itself
        assert repr(dataclasses.astuple(new)) == repr(dataclasses.astuple(ref))
        assert before is None or dataclasses.astuple(before) == kept


# ---------------------------------------------------------------------------------------
# store: usage rollups summed on the writer over an interval, merged into the rows at once
# ---------------------------------------------------------------------------------------

D0 = 20717 * store.DAY  # 2026-09-21 00:00 UTC
NOW = D0 + 12 * store.HOUR + 1800


def _traces(n: int, start: int = 0) -> list[store.TraceRecord]:
    """Varied traces: three nodes, two models, tags, failures, two hours."""
    out = []
    for i in range(start, start + n):
        ok = i % 7 != 0
        out.append(store.TraceRecord(
            f"r{i}", NOW - (i % 2) * store.HOUR - i, model=f"m{i % 2}", node_id=f"n{i % 3}",
            status="completed" if ok else "failed", http_status=200 if ok else 502,
            latency_ms=5.0 + 3 * (i % 11), time_to_first_token_ms=2.0 + i % 5,
            prompt_tokens=10 + i % 4, completion_tokens=12, eval_ms=30.0, load_ms=None,
            queue_ms=float(i % 3), tags=[f"t{i % 4}"] if i % 2 else []))
    return out


def _requests(models: list[dict[str, object]]) -> int:
    return sum(int(m["requests"]) for m in models)  # type: ignore[call-overload]


async def _written(s: store.Store, n: int) -> None:
    """Until the writer committed ``n`` traces on its own (no flush), bounded."""
    deadline = time.monotonic() + 10
    while s.stats().records_written < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert s.stats().records_written == n


async def assert_same_rollups(got: store.Store, want: store.Store) -> None:
    """Every rollup read (usage, models, apps, node_model_stats, trends) of ``got`` equals
    ``want``'s."""
    for query in ("usage", "models", "apps", "node_model_stats"):
        mine = await getattr(got, query)(days=2, now=NOW)
        assert mine == await getattr(want, query)(days=2, now=NOW), query
    assert await got.trends(48, now=NOW) == await want.trends(48, now=NOW)


async def test_rollups_wait_for_their_interval_then_equal_the_per_batch_ones(
    tmp_path: Path,
) -> None:
    """Rollups merged once per ``rollup_interval_s`` (here: never by the clock) hold, once a
    flush merges them, exactly what merging every batch into them (interval 0, the old
    way) holds; until then the traces are written and the rollups wait."""
    now_store = store.Store(tmp_path / "a", prune_interval_s=None, flush_interval_s=0.02,
                            rollup_interval_s=0)
    later = store.Store(tmp_path / "b", prune_interval_s=None, flush_interval_s=0.02,
                        rollup_interval_s=3600)
    await now_store.open()
    await later.open()
    try:
        for part in range(4):  # several batches
            for s in (now_store, later):
                for r in _traces(25, part * 25):
                    s.record_trace(r)
            await _written(later, 25 * (part + 1))
        await _written(now_store, 100)
        assert len(await later.traces(limit=1000)) == 100
        assert await later.models(days=2, now=NOW) == []  # summed, not merged yet
        assert _requests(await now_store.models(days=2, now=NOW)) == 100
        await later.flush()  # a task: the waiting sums are merged before it runs
        await assert_same_rollups(later, now_store)
    finally:
        await now_store.close()
        await later.close()


async def _opened(path: Path, traces: int, *, rollup_interval_s: float) -> store.Store:
    """An open store (no pruning, 20 ms flushes) with ``traces`` traces recorded."""
    s = store.Store(path, prune_interval_s=None, flush_interval_s=0.02,
                    rollup_interval_s=rollup_interval_s)
    await s.open()
    for r in _traces(traces):
        s.record_trace(r)
    return s


async def test_waiting_rollups_are_merged_by_the_clock_and_at_close(tmp_path: Path) -> None:
    s = await _opened(tmp_path / "d", 30, rollup_interval_s=0.1)
    try:
        deadline = time.monotonic() + 10
        while not await s.models(days=2, now=NOW) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # no flush: the writer's clock merges them
        assert _requests(await s.models(days=2, now=NOW)) == 30
    finally:
        await s.close()
    slow = await _opened(tmp_path / "e", 30, rollup_interval_s=3600)
    await _written(slow, 30)
    await slow.close()  # shutdown merges what waits
    reopened = store.Store(tmp_path / "e", prune_interval_s=None)
    await reopened.open()
    try:
        assert _requests(await reopened.models(days=2, now=NOW)) == 30
    finally:
        await reopened.close()


# ---------------------------------------------------------------------------------------
# the rollup watermark: a crash between a batch and the rollup merge loses no usage
# ---------------------------------------------------------------------------------------


_REPO = Path(__file__).resolve().parent.parent


def _crash_child(data: str, merged: int, pending: int) -> None:
    """A store process that merges ``merged`` traces into the rollups, commits ``pending``
    more whose sums wait for the (hour-long) rollup clock, says so and waits to be killed."""

    async def main() -> None:
        s = store.Store(Path(data), prune_interval_s=None, flush_interval_s=0.02,
                        rollup_interval_s=3600)
        await s.open()
        for r in _traces(merged):
            s.record_trace(r)
        await s.flush()  # merged, the watermark moved past them
        for r in _traces(pending, merged):
            s.record_trace(r)
        await _written(s, merged + pending)
        print("written", flush=True)
        await asyncio.sleep(60)  # SIGKILLed here, the pending sums never merged

    asyncio.run(main())


def _watermark_and_requests(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        (mark,) = conn.execute("SELECT trace_id FROM rollup_watermark").fetchone()
        (n,) = conn.execute(
            "SELECT COALESCE(SUM(completed + failed), 0) FROM rollups "
            "WHERE span = ? AND tag = ''", (store.DAY,)
        ).fetchone()
        return int(mark), int(n)
    finally:
        conn.close()


async def test_a_killed_store_reopens_with_usage_equal_to_merging_every_batch(
    tmp_path: Path,
) -> None:
    """SIGKILL after traces were committed but before their rollup sums were merged: the
    database holds the traces and rollups of the merged ones only (the watermark says
    which); reopening folds the rest once, so every rollup read equals what a store that
    merged each batch in its own transaction reports, and a second reopen adds nothing."""
    merged, pending = 40, 60
    data = tmp_path / "killed"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        f"from tests.test_lean_path import _crash_child; "
        f"_crash_child({str(data)!r}, {merged}, {pending})",
        cwd=_REPO, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    db = data / store.DB_FILENAME
    # What the crash left: every trace, the rollups of the merged ones only.
    assert _watermark_and_requests(db) == (merged, merged)

    reference = store.Store(tmp_path / "every-batch", prune_interval_s=None,
                            flush_interval_s=0.02, rollup_interval_s=0)
    await reference.open()
    try:
        for r in _traces(merged + pending):
            reference.record_trace(r)
        await reference.flush()
        for _ in range(2):  # the second reopen finds nothing above the watermark
            s = store.Store(data, prune_interval_s=None, rollup_interval_s=3600)
            await s.open()
            try:
                assert len(await s.traces(limit=1000)) == merged + pending
                await assert_same_rollups(s, reference)
            finally:
                await s.close()
            assert _watermark_and_requests(db) == (merged + pending, merged + pending)
    finally:
        await reference.close()


async def test_trace_ids_stay_above_the_watermark_after_pruning_every_trace(
    tmp_path: Path,
) -> None:
    """Pruning may delete every trace below the watermark; new traces must still get ids
    above it, or a crash before their merge would leave them out of the rollups for good."""
    s = await _opened(tmp_path / "p", 20, rollup_interval_s=3600)
    try:
        await s.flush()
        assert await s.prune(now=NOW + 60 * store.DAY) == 20
        for r in _traces(5, 20):
            s.record_trace(r)
        await _written(s, 25)
        ids = [int(t["id"]) for t in await s.traces(limit=100)]  # type: ignore[call-overload]
        assert sorted(ids) == list(range(21, 26))
    finally:
        await s.close()


async def test_a_failed_rollup_merge_is_folded_again_from_the_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's sums live in memory only: when its transaction fails (rolled back), the
    next merge folds the traces above the watermark from the database instead."""
    real = store._write_rollups
    failures = []

    def fail_once(*args: Any, **kwargs: Any) -> None:
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        real(*args, **kwargs)

    monkeypatch.setattr(store, "_write_rollups", fail_once)
    s = await _opened(tmp_path / "f", 30, rollup_interval_s=3600)
    try:
        await s.flush()  # this merge fails
        assert failures and s.stats().write_errors == 1
        assert await s.models(days=2, now=NOW) == []
        for r in _traces(10, 30):
            s.record_trace(r)
        await s.flush()  # folds all 40 from the traces
        assert _requests(await s.models(days=2, now=NOW)) == 40
    finally:
        await s.close()
    assert _watermark_and_requests(tmp_path / "f" / store.DB_FILENAME) == (40, 40)


def _reference_fold(traces: list[store.TraceRecord]) -> dict[Any, tuple[Any, ...]]:
    """The hourly sums as they were folded before: a 0-padded vector per trace, added
    elementwise to every key it feeds; histograms by bin."""
    out: dict[Any, tuple[list[float], float, float, list[int], list[int]]] = {}
    ix = store._I
    for r in traces:
        v = [0.0] * len(store.ROLLUP_SUMS)
        v[store._STATUS_INDEX.get(r.status, ix["failed"])] = 1
        lat: list[int] = []
        ttft: list[int] = []
        if r.prompt_tokens is not None:
            v[ix["prompt_tokens"]] = int(r.prompt_tokens)
        if r.completion_tokens is not None:
            v[ix["completion_tokens"]] = int(r.completion_tokens)
            if r.eval_ms is not None and r.eval_ms > 0:
                v[ix["eval_tokens"]], v[ix["eval_ms"]] = int(r.completion_tokens), r.eval_ms
        if r.status == "completed":
            v[ix["latency_sum"]], v[ix["latency_n"]] = float(r.latency_ms), 1
            lat.append(store._bin(r.latency_ms))
            if r.time_to_first_token_ms is not None:
                v[ix["ttft_sum"]], v[ix["ttft_n"]] = float(r.time_to_first_token_ms), 1
                ttft.append(store._bin(r.time_to_first_token_ms))
        if r.load_ms is not None:
            v[ix["load_ms_sum"]], v[ix["load_n"]] = float(r.load_ms), 1
            v[ix["cold_loads"]] = float(r.load_ms) >= store.COLD_LOAD_MS
        v[ix["queue_ms_sum"]] = float(r.queue_ms)
        v[ix["fallbacks"]] = bool(r.fallback_used)
        bucket = store._floor(r.timestamp, store.HOUR)
        keys = [(store.HOUR, bucket, r.node_id, r.model, "")]
        keys += [(store.HOUR, bucket, "", "", t) for t in store._clean_tags(r.tags)]
        for key in keys:
            sums, first, last, lats, ttfts = out.get(
                key, ([0.0] * len(v), math.inf, -math.inf, [], []))
            out[key] = (list(map(operator.add, sums, v)), min(first, r.timestamp),
                        max(last, r.timestamp), lats + lat, ttfts + ttft)
    return {k: (sums, first, last, sorted(lats), sorted(ttfts))
            for k, (sums, first, last, lats, ttfts) in out.items()}


def _bins(h: Any) -> list[int]:
    return sorted(b for i, n in enumerate(h.counts) for b in [h.lo + i] * n)


_trace = st.builds(
    store.TraceRecord,
    request_id=st.just("r"),
    timestamp=st.floats(NOW - 3 * store.HOUR, NOW),
    model=st.sampled_from(["a", "b"]),
    node_id=st.sampled_from(["n1", "n2"]),
    status=st.sampled_from([*store.STATUSES, "odd"]),
    latency_ms=st.floats(-1, 1e6, allow_nan=False, allow_subnormal=False),
    time_to_first_token_ms=st.none() | st.floats(0, 1e5, allow_nan=False),
    queue_ms=st.floats(-0.0, 1e4, allow_nan=False),
    prompt_tokens=st.none() | st.integers(0, 10**6),
    completion_tokens=st.none() | st.integers(0, 10**6),
    load_ms=st.none() | st.floats(0, 1e5, allow_nan=False),
    eval_ms=st.none() | st.floats(-1, 1e5, allow_nan=False),
    fallback_used=st.booleans(),
    tags=st.lists(st.sampled_from(["x", "y", " z "]), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_trace, max_size=30))
def test_hourly_fold_in_place_equals_the_vector_fold(traces: list[store.TraceRecord]) -> None:
    """Each sum, bound and histogram bin exactly as the per-trace vector fold made them."""
    got = store._prepare(traces, fleet=False).hourly
    want = _reference_fold(traces)
    assert set(got) == set(want)
    for key, agg in got.items():
        sums, first, last, lats, ttfts = want[key]
        assert agg.sums == sums and (agg.first_ts, agg.last_ts) == (first, last), key
        assert _bins(agg.latency_hist) == lats and _bins(agg.ttft_hist) == ttfts


# ---------------------------------------------------------------------------------------
# the request: its body taken from h11's buffer, its headers looked up in one map
# ---------------------------------------------------------------------------------------

CHAT = FakeModel(name="chat:1b", size=1_000_000_000)


async def _post(port: int, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Write ``parts`` on one connection (``pause`` between them); the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _head(length: int, *extra: bytes) -> bytes:
    return (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: %d\r\n\r\n" % length)


async def test_a_body_that_came_with_its_head_is_read_from_the_buffer(
    make_router: RouterFactory, make_fake: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small body in the head's packet is taken from h11's buffer (no async generator,
    no wait); one still on its way is waited for with the same limits, counted from the
    bytes that came first."""
    fake = await make_fake([CHAT], tokens_per_s=0, load_delay_s=0)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready()
    waits: list[int] = []
    real = herd.Request.body_chunks

    def counting(self: herd.Request, limit: int, **kw: Any) -> Any:
        waits.append(kw.get("_total", 0))
        return real(self, limit, **kw)

    monkeypatch.setattr(herd.Request, "body_chunks", counting)
    body = json.dumps({"model": "chat:1b", "prompt": "hi", "stream": False}).encode()
    answer = await _post(r.port, [_head(len(body)) + body])
    assert answer.startswith(b"HTTP/1.1 200") and b'"done":true' in answer
    assert waits == []
    cut = len(body) // 2  # half with the head, half 0.2 s later
    answer = await _post(r.port, [_head(len(body)) + body[:cut], body[cut:]], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200") and b'"done":true' in answer
    assert waits == [cut]
    r.router.limits.max_json_bytes = len(body) - 1  # chunked: no length to refuse up front
    chunked = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    first, rest = body[:cut], body[cut:]
    answer = await _post(r.port, [chunked + b"%x\r\n%s\r\n" % (len(first), first),
                                  b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest)], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request body too large" in answer and waits == [cut, cut]


async def test_a_repeated_request_header_counts_with_its_first_value(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([CHAT], tokens_per_s=0, load_delay_s=0)
    r = await make_router([fake.url], poll_interval_s=30.0)
    await r.wait_ready()
    body = json.dumps({"model": "chat:1b", "prompt": "hi", "stream": False}).encode()
    answer = await _post(r.port, [_head(len(body), b"X-Request-Id: first-one\r\n",
                                        b"x-request-id: second\r\n") + body])
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"x-request-id: first-one\r\n" in answer.lower()


async def test_a_trace_handed_over_is_queued_as_it_is(tmp_path: Path) -> None:
    """``record_trace(owned=True)``: the caller's record itself goes to the writer (the
    router makes one per trace); without it the record is copied, as before."""
    s = store.Store(tmp_path / "o", prune_interval_s=None, flush_interval_s=3600)
    await s.open()
    try:
        mine = store.TraceRecord("own", NOW, node_id="n1", tags=["a"])
        kept = store.TraceRecord("copy", NOW, node_id="n1", tags=["a"])
        s.record_trace(mine, owned=True)
        s.record_trace(kept)
        assert s._pending[0] is mine and s._pending[1] is not kept
        kept.node_id, kept.tags[0] = "changed", "changed"  # the caller's to change
        await s.flush()
        rows = {row["request_id"]: row for row in await s.traces(limit=10)}
        assert rows["copy"]["node_id"] == "n1" and rows["copy"]["tags"] == ["a"]
        assert rows["own"]["node_id"] == "n1"
    finally:
        await s.close()


# ---------------------------------------------------------------------------------------
# the per-request copies of RouteRequest and SlotBounds made by position, not replace()
# ---------------------------------------------------------------------------------------


def test_the_completion_estimate_keeps_every_other_field_of_the_request() -> None:
    """``with_completion_estimate`` builds its copy by position: with every field set
    (none at its default, so a field added later fails here until it is passed too), the
    result is ``replace(req, completion_tokens=...)``."""
    req = scoring.RouteRequest(
        model="m:1b", kind="text", est_tokens=7, num_ctx=4096, needs_vision=True,
        exclude=frozenset({"x"}), pinned_node="p", cache_node="c", cached_tokens=5,
        max_tokens=30,
    )
    for f in dataclasses.fields(scoring.RouteRequest):
        if f.name not in ("kind", "completion_tokens"):  # "text": the only kind estimated
            assert getattr(req, f.name) != f.default, f.name
    stats = {("n1", "m:1b"): ServiceStats(count=10, eval_tps_ewma=50.0,
                                          completion_tokens_ewma=20.0)}
    got = scoring.with_completion_estimate(req, stats)
    assert got == dataclasses.replace(req, completion_tokens=20.0)
    capped = scoring.with_completion_estimate(dataclasses.replace(req, max_tokens=8), stats)
    assert capped == dataclasses.replace(req, max_tokens=8, completion_tokens=8.0)
    assert scoring.with_completion_estimate(req, {}) is req  # nothing known: unchanged


@given(
    lo=st.integers(0, 8), hi=st.integers(0, 10), suspect=st.integers(0, 10),
    clean=st.integers(0, 100), queued=st.integers(0, 100), k=st.integers(1, 40),
)
def test_a_clean_observation_folds_into_the_slot_bounds_as_replace_did(
    lo: int, hi: int, suspect: int, clean: int, queued: int, k: int
) -> None:
    """``learn_slots``' usual outcome (a request that did not queue) by position: equal to
    the ``replace`` it was, every other field kept."""
    policy = Policy()
    b = scoring.SlotBounds(lo=lo, hi=hi, hi_at=5.0, suspect=suspect, clean=clean,
                           queued=queued, last_at=1.0)
    got = scoring.learn_slots(b, concurrency=k, concurrency_clean=k, queue_ms=0.0,
                              work_ms=100.0, now=9.0, policy=policy)
    kk = min(k, policy.max_slots)
    new_lo = max(lo, kk)
    assert got == dataclasses.replace(
        b, lo=new_lo, hi=hi if hi > new_lo else 0, suspect=suspect if suspect > kk else 0,
        clean=clean + 1, last_at=9.0)


def test_factor_json_remembers_a_factor_by_its_fields() -> None:
    """``FactorJson`` keyed by the fields as a tuple: equal factors made apart (each request
    makes its own) share one entry, found as the Factor's own equality would find it."""
    memo = herd.FactorJson()
    a = scoring.Factor("wait", 0.25, -0.5, "queue 1 ahead")
    b = scoring.Factor("wait", 0.25, -0.5, "queue 1 ahead")
    c = scoring.Factor("wait", 0.25, -0.5, "queue 2 ahead")
    assert a is not b and a == b and a != c
    assert [memo(f) for f in (a, b, c)] == [a.to_json(), a.to_json(), c.to_json()]
    assert len(memo.memo) == 2
    nan = scoring.Factor("x", float("nan"), 0.0, "")
    assert memo(nan) == nan.to_json() == memo(nan)


# ---------------------------------------------------------------------------------------
# scoring at 20 nodes (issue 16, sixth round): every decision and stored breakdown exactly
# as the code before it made them
# ---------------------------------------------------------------------------------------

GOLDEN = Path(__file__).with_name("scoring_golden.json")
GOLDEN_CASES = 1000
_MODELS = ("m0:1b", "m1:7b", "m2:70b", "emb:latest", "vis:7b")
_GB = 1_000_000_000
_POLICIES = (
    Policy(),
    Policy(hot_load_factor=3.0, fit_load_credit=0.5, impact_weight=1.0),
    Policy(uncertain_evict_p=0.5, predict_uncertain_evictions=True, wait_for_better=False),
    Policy(drain_aware=False, serial_loads=False, stall_aware=False, slot_probe=False,
           prewarm_spares_busy=False, prewarm_needs_room=True),
)


def _stats_for(rnd: Any, policy: Policy) -> ServiceStats | None:
    """A node:model's statistics after a few random observations (or none at all)."""
    out: ServiceStats | None = None
    for _ in range(rnd.choice((0, 0, 1, 3, 12))):
        ok = rnd.random() > 0.15
        obs = Observation(
            ok=ok, load_ms=rnd.choice((0.0, 100.0, 2500.0, 9000.0)),
            prompt_tokens=rnd.choice((0, 12, 800)), prompt_eval_ms=rnd.choice((0.0, 40.0)),
            completion_tokens=rnd.choice((0, 30, 300)), eval_ms=rnd.choice((0.0, 900.0, 6000.0)),
            ttft_ms=rnd.choice((None, 120.0)), total_ms=rnd.uniform(50, 9000),
            streams=rnd.choice((None, 0, 1, 3, 6)), load_queued=rnd.random() < 0.2)
        out = scoring.observe(out, obs, policy)
    return out


def golden_case(seed: int) -> tuple[Any, ...]:
    """Scoring inputs drawn from ``seed`` (``random.Random``: the same on every run):
    1-20 nodes of every status, memory kind and residency, queues full and free, learned
    statistics, breakers, loads under way and every request field."""
    import random

    rnd = random.Random(seed)
    now = 1_790_000_000.0
    policy = _POLICIES[seed % len(_POLICIES)]
    n_nodes = rnd.choice((1, 2, 3, 5, 8, 20))
    nodes: list[scoring.NodeSnapshot] = []
    queues: dict[tuple[str, str], scoring.QueueSnapshot] = {}
    stats: dict[tuple[str, str], ServiceStats] = {}
    breakers: dict[str, scoring.BreakerState] = {}
    for i in range(n_nodes):
        nid = f"n{i}"
        names = [m for m in _MODELS if rnd.random() < 0.6]
        available = {}
        for m in names:
            size = rnd.choice((0, 1, 5, 40)) * _GB // 2
            caps = rnd.choice(((), ("completion",), ("completion", "vision"), ("embedding",)))
            available[m] = scoring.AvailableModel(m, size, capabilities=caps)
        loaded = {}
        for m in names:
            if rnd.random() < 0.45:
                exp = rnd.choice((None, now + 200, now + 3000, now - 5))
                loaded[m] = scoring.LoadedModel(
                    m, max(1, available[m].size) + rnd.choice((0, _GB)), 0,
                    rnd.choice((None, 2048, 8192)), exp)
        ram = rnd.choice((0, 0, 16, 64, 192)) * _GB
        vram = rnd.choice((0, 0, 0, 24)) * _GB
        nodes.append(scoring.NodeSnapshot(
            node_id=nid,
            status=rnd.choice(("online",) * 6 + ("degraded", "offline", "draining")),
            ram_total=ram, ram_available=int(ram * rnd.random()),
            vram_total=vram, vram_available=int(vram * rnd.random()),
            memory_pressure=rnd.choice(("normal",) * 6 + ("warn", "critical")),
            loaded=loaded, available=available,
            recently_unloaded={m: now - rnd.choice((30, 900)) for m in names
                               if m not in loaded and rnd.random() < 0.2},
            num_parallel=rnd.choice((None, 1, 4)),
            reachable=rnd.random() > 0.05,
            loading={m: now + rnd.choice((-600, -3, 4)) for m in names
                     if rnd.random() < 0.12},
            memory_learned=rnd.choice(("",) * 4 + ("learned_fit", "learned")),
            keep_alive_s=rnd.choice((0.0, 300.0)),
            max_loaded=rnd.choice((0, 0, 2, 3)),
        ))
        for m in names:
            if rnd.random() < 0.7:
                slots = rnd.choice((1, 2, 4, 8))
                queues[(nid, m)] = scoring.QueueSnapshot(
                    pending=rnd.choice((0, 0, 1, 5)), in_flight=rnd.randint(0, slots + 1),
                    slots=slots, sure=rnd.choice((0, 0, 1, slots)),
                    progress_at=rnd.choice((0.0, now - 1, now - 60)),
                    oldest_at=rnd.choice((0.0, now - 2, now - 90)))
            st = _stats_for(rnd, policy)
            if st is not None:
                stats[(nid, m)] = st
        for key in (nid, f"{nid}:{rnd.choice(_MODELS)}"):
            if rnd.random() < 0.08:
                breakers[key] = scoring.BreakerState(
                    state=rnd.choice(tuple(scoring.CircuitState)),
                    consecutive_failures=rnd.randint(0, 4), trips=rnd.randint(0, 3),
                    open_until=now + rnd.choice((-5, 20)), probe_in_flight=rnd.random() < 0.5,
                    probe_deadline=now + rnd.choice((-5, 20)))
    model = rnd.choice((*_MODELS, "absent:1b"))
    ids = [n.node_id for n in nodes]
    req = scoring.RouteRequest(
        model=model, kind="embed" if model.startswith("emb") else "text",
        est_tokens=rnd.choice((0, 10, 3000, 20000)), num_ctx=rnd.choice((None, 2048, 8192)),
        needs_vision=rnd.random() < 0.15,
        exclude=frozenset(i for i in ids if rnd.random() < 0.05),
        pinned_node=rnd.choice(ids) if rnd.random() < 0.04 else None,
        cache_node=rnd.choice(ids) if rnd.random() < 0.3 else None,
        cached_tokens=rnd.choice((0, 500)), max_tokens=rnd.choice((None, 20)))
    waited = rnd.choice((0.0, 0.0, 5.0, 31.0))
    return req, nodes, queues, stats, breakers, now, rnd.random(), policy, waited


def golden_text(case: tuple[Any, ...], memo: scoring.ScoreMemo | None = None) -> str:
    """Everything a decision hands on: the choice, each score's exact fields (repr), the
    breakdown the trace stores, the waiting targets and the pre-warm."""
    req, nodes, queues, stats, breakers, now, rand, policy, waited = case
    ch = scoring.choose(req, nodes, queues, stats, breakers, now, rand, policy, waited,
                        memo=memo)
    return "\n".join((
        repr((ch.action, ch.node_id, ch.reason, ch.retry_after_s, ch.wait_for,
              ch.reject_kind)),
        repr(ch.ranked),
        ch.breakdown_json(),
        json.dumps(ch.breakdown(), sort_keys=True),
        repr(scoring.wait_targets(ch, policy) if ch.action == "wait" else ()),
        repr(scoring.prewarm_target(req, ch, queues, policy, nodes)),
    ))


def golden_digests(memos: Callable[[int], scoring.ScoreMemo | None] = lambda _seed: None
                   ) -> list[str]:
    """One digest per case; ``memos(seed)``: the ``ScoreMemo`` that case scores with."""
    import hashlib

    return [hashlib.sha256(golden_text(golden_case(seed), memos(seed)).encode())
            .hexdigest()[:16] for seed in range(GOLDEN_CASES)]


def test_scoring_decides_and_explains_exactly_as_before() -> None:
    """1,000 random fleets (1-20 nodes, every state scoring knows): each choice, every score
    to the last bit and the stored breakdown equal what the scoring code made before its
    20-node fast paths (``tests/scoring_golden.json``, written by ``python -m
    tests.test_lean_path --write-golden`` by the scoring code before the fast paths:
    6f6fbf4, rewritten at 7cf93da, whose ``hot_backlog_s`` and honest wait reason changed
    331 of the 1,000 cases). A scoring change that is meant to change decisions rewrites
    the file, and says so.

    Three ways: no ``ScoreMemo`` (each request its own); one memo per policy kept across
    its 250 cases, as the router keeps one (one of them with a limit of 40 factors, so it
    empties often); one memo for all, its policy changing every case."""
    want = json.loads(GOLDEN.read_text())
    per_policy = [scoring.ScoreMemo(limit=40 if k == 1 else 4096) for k in range(4)]
    shared = scoring.ScoreMemo()
    for name, memos in (("no memo", lambda _seed: None),
                        ("a memo per policy", lambda seed: per_policy[seed % len(_POLICIES)]),
                        ("one memo, policy changing", lambda _seed: shared)):
        got = golden_digests(memos)
        bad = [seed for seed, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert not bad, f"{name}: {len(bad)} of {GOLDEN_CASES} cases differ, e.g. {bad[:5]}"
    assert 0 < len(per_policy[1].factors) <= 40 and len(per_policy[0].factors) > 40


def test_the_trace_encodes_kept_factors_as_their_own_text() -> None:
    """``FactorJson`` finds a factor, and a score's whole list of factors, by the records'
    ids (scoring keeps them from request to request): over the 1,000 golden fleets scored
    with kept memos, with a limit of 64 so the maps empty often and records die and their
    ids come back, every breakdown equals the one encoded from scratch (each fleet scored
    twice, so that the second finds kept records)."""
    memos = [scoring.ScoreMemo() for _ in _POLICIES]
    fj = herd.FactorJson(limit=64)
    hits = 0
    for seed in range(GOLDEN_CASES):
        req, nodes, queues, stats, breakers, now, rand, policy, waited = golden_case(seed)
        for _again in range(2):  # the same fleet twice: the second finds kept records
            ch = scoring.choose(req, nodes, queues, stats, breakers, now, rand, policy,
                                waited, memo=memos[seed % len(_POLICIES)])
            hits += sum(tuple(map(id, s.factors)) in fj.lists for s in ch.ranked if s.factors)
            assert ch.breakdown_json(fj, fj.listed) == ch.breakdown_json()
    assert hits > 50, hits  # lists found again, not only encoded


@pytest.mark.parametrize("seed", range(30))
def test_kept_scores_equal_fresh_ones_while_the_fleet_changes(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ScoreMemo`` keeps the score of a hot node with a free slot (``KeptScore``). A
    fleet of hot nodes changes step by step (the clock passes expiries, queues fill and
    drain, statistics, snapshots, loads under way, breakers, requests in flight, the
    prompt): every choice made with the kept memo equals one made from scratch."""
    import random

    rnd = random.Random(seed)
    policy = _POLICIES[seed % 2]  # the default, and one that reads rates in the hot path
    now = 1_790_000_000.0
    model, other = "m:1b", "o:7b"
    names = [f"n{i}" for i in range(6)]
    nodes = {
        nid: scoring.NodeSnapshot(
            node_id=nid, status=scoring.NodeStatus.ONLINE, ram_total=64 * _GB,
            ram_available=20 * _GB,
            loaded={m: scoring.LoadedModel(m, 2 * _GB, 0, 4096, now + rnd.choice((5, 30, 900)))
                    for m in (model, other) if m == model or rnd.random() < 0.5},
            available={m: scoring.AvailableModel(m, 2 * _GB) for m in (model, other)},
            max_loaded=3)
        for nid in names}
    queues: dict[tuple[str, str], scoring.QueueSnapshot] = {}
    table = herd.StatsTable()
    view: scoring.FleetStats | None = None
    breakers: dict[str, scoring.BreakerState] = {}
    in_flight = dict.fromkeys(names, 0)
    memo = scoring.ScoreMemo()
    est = 10
    cache_node = rnd.choice((None, "n1"))  # the prompt's prefix is cached there
    found: list[scoring.Score] = []
    kept_score = scoring._kept_score

    def counted(*args: Any) -> scoring.Score | None:
        s = kept_score(*args)
        if s is not None:
            found.append(s)
        return s

    monkeypatch.setattr(scoring, "_kept_score", counted)
    for step in range(60):
        nid = rnd.choice(names)
        what = rnd.randrange(9)
        if what == 0:
            now += rnd.choice((1.0, 7.0, 26.0))
        elif what == 1:
            slots = rnd.choice((1, 2, 4))
            queues[(nid, model)] = scoring.QueueSnapshot(
                pending=rnd.choice((0, 0, 2)), in_flight=rnd.randint(0, slots),
                slots=slots, sure=rnd.choice((0, 1, slots)),
                progress_at=now - rnd.choice((0, 40)), oldest_at=now - rnd.choice((0, 50)))
        elif what == 2:
            obs = Observation(ok=rnd.random() < 0.9, prompt_tokens=10, prompt_eval_ms=4.0,
                              completion_tokens=50, eval_ms=rnd.uniform(500, 3000),
                              total_ms=3000.0, streams=rnd.randint(0, 3))
            key = (nid, rnd.choice((model, other)))
            table[key] = scoring.observe(table.get(key), obs, policy)
        elif what == 3:
            n = nodes[nid]
            loaded = dict(n.loaded)
            loaded[model] = scoring.LoadedModel(model, 2 * _GB, 0, rnd.choice((4096, 8192)),
                                                now + rnd.choice((5, 60)))
            nodes[nid] = dataclasses.replace(n, loaded=loaded)
        elif what == 4:
            n = nodes[nid]
            nodes[nid] = dataclasses.replace(
                n, loading={} if n.loading else {other: now - 1})
        elif what == 5:  # none; one after a recovery (says nothing); a streak; open
            breakers.clear()
            state = rnd.choice((None, scoring.BreakerState(trips=2, opened_at=now - 50),
                                scoring.BreakerState(consecutive_failures=1),
                                scoring.BreakerState(state=scoring.CircuitState.OPEN,
                                                     trips=1, open_until=now + 30)))
            if state is not None:
                breakers[rnd.choice((nid, f"{nid}:{model}"))] = state
        elif what == 6:
            in_flight[nid] = rnd.randint(0, 5)
        elif what == 7:
            est = rnd.choice((10, 10, 900))
        else:
            nodes[nid] = dataclasses.replace(nodes[nid], status=rnd.choice(
                (scoring.NodeStatus.ONLINE, scoring.NodeStatus.DEGRADED)))
        view = scoring.FleetStats(table, view, table.take_changes())
        req = scoring.RouteRequest(model, est_tokens=est, cache_node=cache_node,
                                   cached_tokens=300)
        fleet = list(nodes.values())
        got = scoring.choose(req, fleet, queues, view, breakers, now, 0.3, policy,
                             node_in_flight=in_flight, memo=memo)
        want = scoring.choose(req, fleet, dict(queues), scoring.FleetStats(dict(table)),
                              dict(breakers), now, 0.3, policy, node_in_flight=in_flight)
        assert repr(got) == repr(want), f"step {step}"
        assert got.breakdown_json() == want.breakdown_json()
    assert len(found) >= 10  # kept scores were found, and used


def test_a_kept_wait_factor_tells_a_zero_from_a_negative_zero() -> None:
    """``ScoreMemo`` keys the wait factor by its seconds; 0.0 and -0.0 are equal floats but
    print apart ("-0.0s queue"), so each gets its own record, equal to one made afresh."""
    policy = Policy()
    memo = scoring.ScoreMemo().bind(policy)
    for at in range(4):  # expected, queue, load, run seconds
        for zero in (0.0, -0.0, 0.0, -0.0):
            seconds = [1.5, 0.5, 0.25, 0.75]
            seconds[at] = zero
            args = (*seconds, True, False, 0.0, 0.0, 0.0, policy)
            kept = scoring._wait_record(*args, memo)
            fresh = scoring._wait_record(*args, None)
            assert repr(kept) == repr(fresh) and kept.reason == fresh.reason
    assert len(memo.factors) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2), st.integers(0, 3),
                          st.sets(st.integers(0, 4))), min_size=1, max_size=25))
def test_a_carried_stats_view_equals_a_fresh_one(
    steps: list[tuple[int, int, int, set[int]]]
) -> None:
    """``Fleet.stats_view`` carries what was derived from the nodes whose statistics did
    not change into the next view (``FleetStats(previous=, changed=)``): after any run of
    sets and deletes, each view reading only some nodes, every node's group, rates,
    slowdown, the answer length per model and the scores equal a view built fresh."""
    policy = Policy()
    names = ["m0:1b", "m1:7b", "m2:1b"]
    snaps = loaded_fleet(5, names)
    table = herd.StatsTable()
    view = None
    for nid, mid, op, reads in steps:
        key = (f"n{nid}", names[mid])
        if op == 0 and key in table:
            del table[key]
        elif op == 1:
            table.pop(key, None)
        else:
            obs = Observation(ok=True, load_ms=3000.0 * op, prompt_tokens=10,
                              prompt_eval_ms=5.0 + nid, completion_tokens=40 + 10 * mid,
                              eval_ms=900.0 + 37 * nid * op, total_ms=1200.0,
                              streams=(nid + op) % 4)
            for _ in range(op * 4):
                table[key] = scoring.observe(table.get(key), obs, policy)
        changed = table.take_changes()
        view = scoring.FleetStats(table, view, changed)
        fresh = scoring.FleetStats(dict(table))
        for r in sorted(reads):  # a view reads only the nodes it scores
            n = snaps[r]
            assert list(view.node_items(n.node_id)) == list(fresh.node_items(n.node_id))
            assert (scoring.node_rates(n.node_id, n.available, view)
                    == scoring.node_rates(n.node_id, n.available, fresh))
            assert (scoring.stream_slowdown(n.node_id, view, policy)
                    == scoring.stream_slowdown(n.node_id, fresh, policy))
        for m in names:
            req = scoring.RouteRequest(m, est_tokens=30)
            assert (scoring.with_completion_estimate(req, view)
                    == scoring.with_completion_estimate(req, fresh))
            if reads:
                assert (scoring.score_nodes(req, snaps, {}, view, {}, 1000.0, policy)
                        == scoring.score_nodes(req, snaps, {}, fresh, {}, 1000.0, policy))


def loaded_fleet(nodes: int, names: list[str]) -> list[scoring.NodeSnapshot]:
    """``nodes`` online snapshots, each with ``names`` loaded (sizes 1-3 GB)."""
    sizes = {m: (1 + j) << 30 for j, m in enumerate(names)}
    return [
        scoring.NodeSnapshot(
            node_id=f"n{i}", status=scoring.NodeStatus.ONLINE, ram_total=64 << 30,
            ram_available=32 << 30,
            loaded={m: scoring.LoadedModel(m, sizes[m], sizes[m], 4096, None) for m in names},
            available={m: scoring.AvailableModel(m, sizes[m]) for m in names},
        )
        for i in range(nodes)
    ]


def test_the_stats_table_names_what_changed_since_the_last_view() -> None:
    """What ``Fleet.stats_view`` may carry over: the keys set or deleted since the last
    view; a change it cannot name (update, clear, popitem) carries nothing over."""
    table = herd.StatsTable()
    assert table.take_changes() is None  # nothing taken yet: unknown
    table[("a", "m")] = ServiceStats(count=1)
    table.setdefault(("b", "m"), ServiceStats())
    table.pop(("c", "m"), None)
    assert table.take_changes() == {("a", "m"), ("b", "m"), ("c", "m")}
    del table[("a", "m")]
    assert table.take_changes() == {("a", "m")}
    assert table.take_changes() == set()
    for change in (lambda: table.update({("d", "m"): ServiceStats()}), table.clear,
                   lambda: table.__ior__({("e", "m"): ServiceStats()}), table.popitem):
        version = table.version
        change()
        assert table.version > version and table.take_changes() is None


if __name__ == "__main__" and sys.argv[1:] == ["--write-golden"]:
    GOLDEN.write_text(json.dumps(golden_digests(), indent=0) + "\n")
    print(f"wrote {GOLDEN}")
