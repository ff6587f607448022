"""States as enums (issue 14): node status, breaker state, answer kind, trace status.

They are ``StrEnum``s, so a member equals its old string: JSON, SQLite rows, event names and
the tests' string comparisons read exactly as before."""

from __future__ import annotations

import json
import sqlite3

import pytest

import herd
import scoring
import store
from scoring import AnswerKind, CircuitState, NodeStatus, Policy, TraceStatus

NOW = 1_790_000_000.0


def test_each_state_set_is_a_str_enum_with_the_old_strings() -> None:
    assert {s.value for s in NodeStatus} == {
        "online", "degraded", "offline", "draining", "pending", "rejected"
    }
    assert {s.value for s in CircuitState} == {"closed", "open", "half_open"}
    assert set(AnswerKind) == set(scoring.FAILURE_KINDS) | {"ok"}
    assert set(TraceStatus) == set(store.STATUSES)
    for enum in (NodeStatus, CircuitState, AnswerKind, TraceStatus):
        for member in enum:
            assert member == member.value and f"{member}" == member.value
    assert json.dumps({"status": NodeStatus.DRAINING}) == '{"status": "draining"}'
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (s TEXT)")
    db.execute("INSERT INTO t VALUES (?)", (TraceStatus.CLIENT_ERROR,))
    assert db.execute("SELECT s, typeof(s) FROM t").fetchone() == ("client_error", "text")


def test_decisions_return_enum_members() -> None:
    policy = Policy()
    opened = scoring.breaker_on_failure(None, NOW, policy, 0.0, "connect")
    assert opened.state is CircuitState.OPEN
    probing = scoring.breaker_begin_probe(opened, opened.open_until, policy)
    assert probing.state is CircuitState.HALF_OPEN
    assert scoring.breaker_on_success(probing, NOW, policy).state is CircuitState.CLOSED
    assert scoring.BreakerState().state is CircuitState.CLOSED
    table = {
        (0, "connect"): (AnswerKind.CONNECT, TraceStatus.FAILED),
        (200, ""): (AnswerKind.OK, TraceStatus.COMPLETED),
        (503, ""): (AnswerKind.BUSY, TraceStatus.FAILED),
        (400, ""): (AnswerKind.STATUS_4XX, TraceStatus.CLIENT_ERROR),
        (500, ""): (AnswerKind.STATUS_5XX, TraceStatus.FAILED),
    }
    for (status, no_answer), (kind, trace) in table.items():
        verdict = scoring.classify_answer(status, no_answer=no_answer)
        assert verdict.kind is kind and verdict.trace_status is trace


def test_router_node_status_and_failure_kinds_are_enum_members() -> None:
    node = herd.Node("n1", "http://127.0.0.1:1", "static")
    assert node.status is NodeStatus.OFFLINE
    assert herd.UpstreamFailure("reset", "gone").kind is AnswerKind.RESET
    with pytest.raises(ValueError, match="no_such_kind"):
        herd.UpstreamFailure("no_such_kind", "a typo in a failure kind fails loudly")
