"""herd's own per-request work: what it does once instead of per request (issue 16)."""

from __future__ import annotations

from typing import Any

import herd
import scoring


def test_queue_snapshot_is_reused_while_unchanged_and_follows_every_change() -> None:
    q = herd.SlotQueue(node_id="n1", model="m:1b", slots=8)
    first = q.snapshot()
    assert first == scoring.QueueSnapshot(pending=0, in_flight=0, slots=8)
    assert q.snapshot() is first  # unchanged: no new object per request
    q.take()
    assert q.snapshot() == scoring.QueueSnapshot(pending=0, in_flight=1, slots=8)
    q.pending += 1
    assert q.snapshot() == scoring.QueueSnapshot(pending=1, in_flight=1, slots=8)
    q.resize(4)
    assert q.snapshot() == scoring.QueueSnapshot(pending=1, in_flight=1, slots=4)
    q.pending -= 1
    q.release()
    again = q.snapshot()
    assert again == scoring.QueueSnapshot(pending=0, in_flight=0, slots=4)
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
