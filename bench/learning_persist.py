"""What keeping learned state across restarts costs the router's event loop (issue 15).

    python bench/learning_persist.py          # ~10 s, prints a table, exit 1 on a miss

A router with a full learned state — the prompt-cache affinity map at its bound
(``Policy.affinity_max_entries``, 20,000 entries), slot bounds and service stats for 400
node:models, memory bounds for 40 nodes — saved by ``LearningKeeper`` into a real
``latency.db`` in a temporary directory:

1. Event-loop time of one periodic save's diff (``LearningKeeper.changes``: which facts
   changed since the last save), with nothing changed and with 1 % of the facts changed,
   side by side with the baseline a simple implementation would pay on the loop every
   time: serialising every fact to JSON (``json.dumps(asdict(fact))``).
2. The longest event-loop gap while a full save (every fact, the first save) and a 1 %
   save run through the store's writer thread, against the gaps of the same ticker idle.
3. Restore at start: reading and parsing every fact back (before the listener opens).

Targets: the 1 % diff costs the loop <= 0.25x the baseline's full serialisation; the
longest loop gap during a save <= 3x the idle ticker's longest gap + 5 ms. Timings on a
shared machine are noisy; the ratios are what the verdict reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import herd  # noqa: E402
import scoring  # noqa: E402

TARGET_DIFF_RATIO = 0.25
TARGET_GAP_RATIO = 3.0
GAP_SLACK_MS = 5.0
NODES, MODELS_PER_NODE = 40, 10
REPEATS = 7


def fill(router: herd.Router, rng: random.Random, now: float) -> None:
    """A full learned state, as weeks of traffic would leave it."""
    learner = router.learner
    for n in range(NODES):
        node = f"node-{n}"
        learner.memory_bounds[node] = scoring.MemoryBounds(
            fits=rng.randrange(8, 80) * 10**9, polls=rng.randrange(10**5),
            vanished={f"m{i}": now - i for i in range(3)})
        for m in range(MODELS_PER_NODE):
            key = (node, f"model-{m}:latest")
            learner.slot_bounds[key] = scoring.SlotBounds(
                lo=rng.randrange(1, 5), hi=rng.randrange(0, 6), hi_at=now, clean=rng.randrange(99),
                last_at=now)
            router.fleet.stats[key] = scoring.ServiceStats(
                count=rng.randrange(10**4), load_ms_ewma=rng.random() * 9000,
                eval_tps_ewma=rng.random() * 80, prompt_tps_ewma=rng.random() * 900,
                completion_tokens_ewma=rng.random() * 500, total_ms_ewma=rng.random() * 20000)
    for i in range(router.policy.affinity_max_entries):
        learner.remember_prefix(f"{rng.getrandbits(128):032x}{i}", f"node-{i % NODES}",
                                rng.randrange(50, 8000), now - rng.random() * 600)


def touch(router: herd.Router, rng: random.Random, share: float, now: float) -> int:
    """Change ``share`` of the facts as traffic would (new objects for what changed)."""
    learner, stats = router.learner, router.fleet.stats
    changed = 0
    for key in rng.sample(list(stats), max(1, int(len(stats) * share))):
        stats[key] = dataclasses.replace(stats[key], count=stats[key].count + 1)
        changed += 1
    for key in rng.sample(list(learner.affinity), int(len(learner.affinity) * share)):
        e = learner.affinity[key]
        learner.remember_prefix(key, e.node_id, e.tokens + 10, now)
        changed += 1
    return changed


def full_dump(router: herd.Router) -> int:
    """The baseline: every fact serialised on the loop, as a naive periodic save would."""
    size = 0
    for table in [*router.learning.tables().values(), router.learner.affinity]:
        for value in table.values():
            size += len(json.dumps(dataclasses.asdict(value)))  # type: ignore[call-overload]
    return size


def best_ms(fn: object, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return min(times)


async def longest_gap_ms(work: object) -> float:
    """The longest gap between 1 ms ticks of a ticker while ``work`` (a coroutine) runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            t = time.perf_counter()
            gaps.append((t - last) * 1000)
            last = t

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    gaps.clear()
    await work  # type: ignore[misc]
    done.set()
    await tick
    return max(gaps) if gaps else 0.0


async def run() -> int:
    rng = random.Random(1)
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="herd-learning-bench-") as tmp:
        cfg = herd.Config(host="127.0.0.1", port=0, data_dir=Path(tmp), local_ollama=None,
                          mdns=False)
        router = herd.Router(cfg)
        await router.store.open()
        try:
            keeper = router.learning
            herd.tune_gc()  # as serve() does once the router started, before it learns
            fill(router, rng, now)
            facts = sum(map(len, keeper.tables().values())) + len(router.learner.affinity)
            baseline_ms = best_ms(lambda: full_dump(router))
            idle_gap = max([await longest_gap_ms(asyncio.sleep(0.2)) for _ in range(3)])
            first_gap = await longest_gap_ms(keeper.save())
            assert keeper.facts_written == facts, (keeper.facts_written, facts)
            quiet_ms = best_ms(keeper.changes)
            diff_ms: list[float] = []
            gaps: list[float] = []
            for _ in range(REPEATS):
                changed = touch(router, rng, 0.01, time.time())
                t0 = time.perf_counter()
                got, _gone, _snap, _writes = keeper.changes()
                diff_ms.append((time.perf_counter() - t0) * 1000)
                assert sum(map(len, got.values())) == changed, (got, changed)
                gaps.append(await longest_gap_ms(keeper.save()))
            t0 = time.perf_counter()
            rows = await router.store.load_learned(now=time.time(), limits=keeper.limits())
            fresh = herd.Router(cfg)
            got_back = fresh.learner.restore_state(rows, fresh.fleet.stats, time.time())
            restore_ms = (time.perf_counter() - t0) * 1000
            assert got_back.affinity == len(router.learner.affinity) and not got_back.skipped
        finally:
            await router.store.close()
    diff = statistics.median(diff_ms)
    diff_ratio = diff / baseline_ms
    gap = max(gaps)
    gap_limit = TARGET_GAP_RATIO * idle_gap + GAP_SLACK_MS
    print(f"learned facts: {facts:,} ({len(router.learner.affinity):,} affinity entries)")
    print(f"{'':44}{'loop ms':>10}{'x baseline':>12}")
    print(f"{'baseline: serialise every fact (JSON)':44}{baseline_ms:>10.2f}{1.0:>12.2f}")
    print(f"{'diff, nothing changed':44}{quiet_ms:>10.2f}{quiet_ms / baseline_ms:>12.2f}")
    print(f"{'diff, 1 % changed (median)':44}{diff:>10.2f}{diff_ratio:>12.2f}")
    print(f"longest loop gap: idle {idle_gap:.1f} ms, during the first (full) save "
          f"{first_gap:.1f} ms, during 1 % saves {gap:.1f} ms (limit {gap_limit:.1f} ms)")
    print(f"restore at start: {restore_ms:.0f} ms for {len(rows):,} rows")
    ok_diff = diff_ratio <= TARGET_DIFF_RATIO
    ok_gap = max(gap, first_gap) <= gap_limit
    print(f"target diff <= {TARGET_DIFF_RATIO}x baseline: {'ok' if ok_diff else 'MISS'}; "
          f"loop gap <= {TARGET_GAP_RATIO}x idle + {GAP_SLACK_MS} ms: "
          f"{'ok' if ok_gap else 'MISS'}")
    return exit_code(diff_ratio, max(gap, first_gap), idle_gap)


def exit_code(diff_ratio: float, gap_ms: float, idle_gap_ms: float) -> int:
    """0 when both targets are met; a NaN (a broken run) is no pass."""
    ok = (diff_ratio <= TARGET_DIFF_RATIO
          and gap_ms <= TARGET_GAP_RATIO * idle_gap_ms + GAP_SLACK_MS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(run()))
