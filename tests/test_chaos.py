"""Chaos: kill, stop, break and stall nodes under load; nothing that could be saved is lost."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.chaos import run_scenario


@pytest.mark.timeout(180)
async def test_chaos_loses_nothing(tmp_path: Path) -> None:
    result = await run_scenario(tmp_path, requests=120, concurrency=12)
    assert len(result.outcomes) == 120
    assert result.lost == [], [(o.request_id, o.status, o.detail) for o in result.lost]
    # every non-streaming request succeeded: failures before the first byte were retried
    generates = [o for o in result.outcomes if o.kind == "generate"]
    assert all(o.ok for o in generates), [(o.request_id, o.detail) for o in generates if not o.ok]
    # every stream completed or ended with an error record in its dialect
    for o in result.outcomes:
        assert o.ok or o.clean_error
    # the traces account for every request exactly once (retried attempts aside)
    final = collections.Counter(t["request_id"] for t in result.traces if t["status"] != "retried")
    assert set(final) == {o.request_id for o in result.outcomes}
    assert set(final.values()) == {1}
    for t in result.traces:
        o = next(x for x in result.outcomes if x.request_id == t["request_id"])
        if t["status"] == "completed":
            assert o.ok
    # the router is back to baseline: nothing in flight, no leftover tasks
    assert result.in_flight_after == 0 and result.pending_after == 0
    assert result.tasks_after <= result.tasks_before
