"""herd's own per-request work: what it does once instead of per request (issue 16)."""

from __future__ import annotations

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
