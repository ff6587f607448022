"""Store benchmark: trace write throughput, commit batching, event-loop stalls, query latency.

    python bench/store_bench.py [--rows 100000] [--naive-rows 3000]

``--naive-rows 0`` skips the naive baselines (e.g. for query timings on ``--rows 1000000``).

Writes ``--rows`` synthetic traces (8 models x 5 nodes, spread over 7 days, 0-2 tags each)
through ``Store.record_trace`` while a 1 ms heartbeat coroutine measures the event loop's
longest stall, then times the dashboard queries on the result. The baseline is what the
anchor does: one INSERT + COMMIT per record on the event-loop thread (same schema, same
rollup maintenance, so the difference is batching and threading alone), once with
``synchronous=NORMAL`` (our setting) and once with SQLite's default ``FULL``.
Bounded: well under 60 s at the defaults. Targets (exit 1 when one is missed): the store
spends >= 10x less event-loop time per record than the naive baseline in the same run, and
``trends(hours=168)`` answers in <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import store
from store import Store, TraceRecord

MODELS = [f"model-{i}:latest" for i in range(8)]
NODES = [f"node-{i}" for i in range(5)]
TAGS = ["app:chat", "app:rag", "app:agent", "user:alice", "user:bob"]
STATUSES = ["completed"] * 92 + ["failed"] * 3 + ["retried"] * 4 + ["client_disconnected"]


def make_records(n: int, now: float, seed: int = 7) -> list[TraceRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        latency = rng.lognormvariate(6.5, 0.8)
        out.append(
            TraceRecord(
                request_id=f"req-{i:08d}",
                timestamp=now - rng.random() * 7 * store.DAY,
                kind="text",
                endpoint="/api/chat",
                model=rng.choice(MODELS),
                original_model="",
                node_id=rng.choice(NODES),
                score=rng.uniform(40, 120),
                scores_breakdown={"winner": {"total": 80.0, "thermal": 50.0}, "runner_up": None},
                status=rng.choice(STATUSES),
                http_status=200,
                latency_ms=latency,
                time_to_first_token_ms=latency * 0.2,
                queue_ms=rng.random() * 5,
                prompt_tokens=rng.randint(20, 2000),
                completion_tokens=rng.randint(1, 800),
                load_ms=rng.choice([2.0, 3.0, 1800.0]),
                prompt_eval_ms=rng.random() * 100,
                eval_ms=latency * 0.7,
                tags=rng.sample(TAGS, rng.randint(0, 2)),
                client_ip="10.0.0.7",
            )
        )
    out.sort(key=lambda r: r.timestamp)  # a router records traces in arrival order
    return out


class Heartbeat:
    """Ticks every 1 ms; ``max_stall_ms`` is the worst lateness seen."""

    def __init__(self) -> None:
        self.max_stall_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.max_stall_ms = max(self.max_stall_ms, (time.perf_counter() - t - 0.001) * 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def timed(fn: Callable[[], Awaitable[object]], repeat: int = 5) -> float:
    """Median wall time in ms."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


async def bench_store(tmp: Path, records: list[TraceRecord], now: float) -> dict[str, float]:
    s = Store(tmp / "batched", prune_interval_s=None)
    await s.open()
    beat = Heartbeat()
    beat.start()
    loop_busy = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(records), 500):
        t = time.perf_counter()
        for r in records[start : start + 500]:
            s.record_trace(r)
        loop_busy += time.perf_counter() - t
        await asyncio.sleep(0)  # a router interleaves recording with serving requests
        if s.stats().queue_depth > s.max_queue // 2:
            await s.flush()  # a burst far beyond any router's rate: let the writer catch up
    await s.flush()
    elapsed = time.perf_counter() - t0
    await beat.stop()
    st = s.stats()
    out = {
        "records_per_s": len(records) / elapsed,
        "tx_per_10k": st.batches_written / (len(records) / 10_000),
        "loop_us_per_record": loop_busy / len(records) * 1e6,
        "max_stall_ms": beat.max_stall_ms,
        "db_mb_per_100k": st.db_bytes / 1e6 / (len(records) / 100_000),
        "dropped": float(st.dropped),
    }
    beat = Heartbeat()
    beat.start()
    out["q_traces_100_ms"] = await timed(lambda: s.traces(limit=100))
    out["q_traces_failed_ms"] = await timed(lambda: s.traces(limit=100, status="failed"))
    out["q_traces_tag_ms"] = await timed(lambda: s.traces(limit=100, tag="app:rag"))
    out["q_models_7d_ms"] = await timed(lambda: s.models(days=7, now=now))
    out["q_apps_7d_ms"] = await timed(lambda: s.apps(days=7, now=now))
    out["q_trends_24h_ms"] = await timed(lambda: s.trends(hours=24, now=now))
    out["q_trends_168h_ms"] = await timed(lambda: s.trends(hours=168, now=now))
    out["q_usage_7d_ms"] = await timed(lambda: s.usage(days=7, now=now))
    out["q_node_model_7d_ms"] = await timed(lambda: s.node_model_stats(days=7, now=now))
    await beat.stop()
    out["query_max_stall_ms"] = beat.max_stall_ms
    await s.close()
    return out


async def bench_naive(
    tmp: Path, records: list[TraceRecord], synchronous: str, budget_s: float
) -> dict[str, float]:
    """One INSERT + COMMIT per record, on the loop thread (the anchor's way)."""
    path = tmp / f"naive-{synchronous}"
    path.mkdir()
    conn = store._connect_writer(path / store.DB_FILENAME)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    store._migrate(conn)
    beat = Heartbeat()
    beat.start()
    done = 0
    t0 = time.perf_counter()
    for r in records:
        store._write_batch(conn, [r], [])
        done += 1
        await asyncio.sleep(0)  # fire-and-forget per request: yield between records
        if time.perf_counter() - t0 > budget_s:
            break
    elapsed = time.perf_counter() - t0
    await beat.stop()
    conn.close()
    return {
        "records_per_s": done / elapsed,
        "tx_per_10k": 10_000.0,
        "loop_us_per_record": elapsed / done * 1e6,
        "max_stall_ms": beat.max_stall_ms,
        "records": float(done),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--naive-rows", type=int, default=3_000)
    parser.add_argument("--naive-budget-s", type=float, default=6.0)
    parser.add_argument("--target-loop-x", type=float, default=10.0,
                        help="the store spends at least this many times less event-loop time "
                        "per record than the naive baseline (synchronous=NORMAL)")
    parser.add_argument("--target-trends-ms", type=float, default=200.0,
                        help="trends(hours=168), the dashboard's 7-day button, at most this")
    args = parser.parse_args()
    now = time.time()
    t = time.perf_counter()
    records = make_records(args.rows, now)
    print(f"generated {args.rows} records in {time.perf_counter() - t:.1f} s")
    # The pre-generated dataset is not part of the system under test: keep the cyclic GC
    # from re-walking it (a router holds a few hundred live records, not 100k).
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ours = await bench_store(tmp, records, now)
        naives = [
            (sync, await bench_naive(tmp, records[: args.naive_rows], sync, args.naive_budget_s))
            for sync in (("NORMAL", "FULL") if args.naive_rows > 0 else ())
        ]

    print(f"\nstore (batched writer thread), {args.rows} records")
    for key, value in ours.items():
        print(f"  {key:<22} {value:12.2f}")
    for name, result in naives:
        print(f"\nnaive baseline (commit per record on the loop, synchronous={name})")
        for key, value in result.items():
            print(f"  {key:<22} {value:12.2f}")
        print(
            f"  => store/naive records/s: {ours['records_per_s'] / result['records_per_s']:.1f}x;"
            f" loop time per record: "
            f"{result['loop_us_per_record'] / ours['loop_us_per_record']:.0f}x less with store"
        )

    missed = []
    if ours["q_trends_168h_ms"] > args.target_trends_ms:
        missed.append(f"trends(168h) {ours['q_trends_168h_ms']:.0f} ms > {args.target_trends_ms:g}")
    for name, result in naives[:1]:
        x = result["loop_us_per_record"] / ours["loop_us_per_record"]
        if x < args.target_loop_x:
            missed.append(f"loop time per record only {x:.1f}x less than naive ({name}), "
                          f"target {args.target_loop_x:g}x")
    for line in missed:
        print(f"MISSED {line}")
    print("VERDICT:", "PASS" if not missed else f"{len(missed)} target(s) missed")
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
