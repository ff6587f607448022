"""Health checks and recommendations: pure table tests, properties, and one run through
a real router in front of fake Ollama nodes."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import scoring as s
from tests.conftest import RouterFactory
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

G = 1_000_000_000
NOW = 1_800_000_000.0
HOUR = 3600.0
POL = s.HealthPolicy()


def node(node_id: str = "a", **kw: Any) -> s.NodeFacts:
    base: dict[str, Any] = {
        "status": "online",
        "source": "agent",
        "url": f"http://{node_id}:11434",
        "seconds_since_seen": 1.0,
        "ram_total": 64 * G,
        "ram_available": 20 * G,
        "agent_version": "1.0",
        "ollama_version": "0.12.6",
        "disk_total": 1000 * G,
        "disk_free": 500 * G,
    }
    base.update(kw)
    return s.NodeFacts(node_id, **base)


def use(node_id: str = "a", model: str = "m:latest", **kw: Any) -> s.ModelUse:
    return s.ModelUse(node_id, model, **kw)


def inp(*nodes: s.NodeFacts, **kw: Any) -> s.HealthInput:
    return s.HealthInput(now=NOW, nodes=tuple(nodes) or (node(),), router_version="1.0", **kw)


def cards(hi: s.HealthInput, cid: str | None = None) -> list[s.HealthCheck]:
    found = [c for c in s.health_checks(hi).checks if c.severity != "ok"]
    return [c for c in found if cid is None or c.id == cid]


def sev(hi: s.HealthInput, cid: str) -> list[str]:
    return [c.severity for c in cards(hi, cid)]


def incident(status: str, age_s: float, **kw: Any) -> s.Incident:
    base: dict[str, Any] = {"node_id": "a", "model": "m:latest"}
    base.update(kw)
    return s.Incident(NOW - age_s, status=status, **base)


# -- healthy fleet and score --------------------------------------------------------------


def test_healthy_fleet_is_all_ok_and_scores_100() -> None:
    busy = use(requests=500, attempts=500, completed=500, cold_loads=1, prompt_tokens=50_000)
    hi = inp(
        node(
            "a",
            loaded=(s.LoadedModel("m:latest", 5 * G, 5 * G, 4096, None),),
            on_disk=(s.DiskModel("m:latest", 4 * G),),
        ),
        node("b"),
        usage_24h=(busy,),
        usage_recent=(replace(busy, requests=20, attempts=20, completed=20, cold_loads=0),),
        settings={"context_protection": True},
    )
    report = s.health_checks(hi)
    assert [c for c in report.checks if c.severity != "ok"] == []
    assert report.score == 100 and report.vitals["health_score"] == 100
    assert len(report.checks) >= 15
    assert report.vitals["total_requests_24h"] == 500
    d = report.to_dict()
    assert set(d) == {"score", "checks", "vitals", "generated_at"}
    assert set(report.checks[0].to_dict()) == {
        "id",
        "name",
        "severity",
        "reason",
        "fix",
        "node_id",
        "model",
    }


def test_nodes_waiting_for_approval_make_one_warning_card() -> None:
    one = s.PendingNode("studio", "10.0.0.7", "http://10.0.0.7:11434", NOW - 600, "new node")
    assert sev(inp(), "nodes_pending") == []
    (card,) = cards(inp(pending_nodes=(one,)), "nodes_pending")
    assert (card.severity, card.name, card.node_id) == (
        "warning",
        "Nodes waiting for approval",
        "studio",
    )
    assert "studio from 10.0.0.7" in card.reason and "10 min" in card.reason
    assert "Approve" in card.fix and "--fleet-key" in card.fix
    # a burst of strangers is still one card (the score drops once), the oldest named first
    crowd = tuple(
        s.PendingNode(f"n{i}", f"10.0.1.{i}", f"http://10.0.1.{i}:11434", NOW - i)
        for i in range(40)
    )
    report = s.health_checks(inp(pending_nodes=crowd))
    (card,) = [c for c in report.checks if c.id == "nodes_pending"]
    assert card.reason.startswith("40 node(s)") and "and 35 more" in card.reason
    assert card.reason.index("n39 from") < card.reason.index("n38 from")
    assert card.node_id is None and report.score == 90


def test_score_formula_and_floor() -> None:
    def c(sev_: str) -> s.HealthCheck:
        return s.HealthCheck("x", "x", sev_, "")

    assert s.health_score([]) == 100
    assert s.health_score([c("critical"), c("warning"), c("info"), c("ok")]) == 100 - 20 - 10 - 3
    assert s.health_score([c("critical")] * 6) == 0


def test_checks_sorted_by_severity() -> None:
    hi = inp(
        node("a", status="offline"), node("b", status="degraded"), node("c", errors=("gpu: x",))
    )
    order = [c.severity for c in s.health_checks(hi).checks]
    ranks = [s.SEVERITIES.index(x) for x in order]
    assert ranks == sorted(ranks) and order[0] == "critical"


def test_severity_is_an_enum_worst_first_and_cards_carry_the_plain_word() -> None:
    assert [str(x) for x in s.SEVERITIES] == ["critical", "warning", "info", "ok"]
    hi = inp(
        node("a", status="offline"), node("b", status="degraded"), node("c", status="draining")
    )
    checks = s.health_checks(hi).checks
    assert {c.severity for c in checks} == set(s.Severity)  # every level occurs here
    assert all(type(c.severity) is s.Severity for c in checks)
    assert all(type(c.to_dict()["severity"]) is str for c in checks)


_SEV = st.sampled_from(s.SEVERITIES)


@given(st.lists(_SEV, max_size=30), _SEV)
def test_score_bounds_and_more_critical_never_raises(sevs: list[str], extra: str) -> None:
    checks = [s.HealthCheck("x", "x", v, "") for v in sevs]
    score = s.health_score(checks)
    assert 0 <= score <= 100
    assert s.health_score([*checks, s.HealthCheck("y", "y", "critical", "")]) <= score
    assert s.health_score([*checks, s.HealthCheck("y", "y", extra, "")]) <= score


@given(
    st.lists(
        st.sampled_from(["online", "degraded", "offline", "draining"]), min_size=1, max_size=5
    ),
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 40),
)
def test_report_score_bounds_on_random_fleets(
    statuses: list[str], attempts: int, errors: int, loads: int
) -> None:
    nodes = [node(f"n{i}", status=x) for i, x in enumerate(statuses)]
    u = use(
        "n0",
        attempts=attempts,
        requests=attempts,
        errors=min(errors, attempts),
        completed=attempts - min(errors, attempts),
        cold_loads=loads,
    )
    base = inp(*nodes, usage_24h=(u,), usage_recent=(u,))
    report = s.health_checks(base)
    assert 0 <= report.score <= 100
    worse = replace(base, nodes=(*base.nodes, node("dead", status="offline")))
    assert s.health_checks(worse).score <= report.score


# -- 1. node status / reachability ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [("online", []), ("offline", ["critical"]), ("degraded", ["warning"]), ("draining", ["info"])],
)
def test_node_status(status: str, expected: list[str]) -> None:
    found = [c for c in cards(inp(node("a", status=status))) if c.id.startswith("node_")]
    assert [c.severity for c in found if c.id != "node_unreachable"] == expected
    for c in found:
        assert c.node_id == "a" and c.fix


def test_agent_heartbeats_but_router_cannot_reach_ollama() -> None:
    hi = inp(node("a", reachable=False))
    (c,) = cards(hi, "node_unreachable")
    assert c.severity == "critical" and "OLLAMA_HOST=0.0.0.0" in c.fix
    # the same through traffic only: retried attempts, nothing completed, breaker opened
    br = s.BreakerState(state="open", consecutive_failures=3, trips=1, open_until=NOW + 5)
    ev = s.FleetEvent(NOW - 60, "breaker_open", "a", {"key": "a", "kind": "connect"})
    r = use(attempts=4, requests=0, retried=4, errors=4)
    hi = inp(node("a", breaker=br), events=(ev,), usage_recent=(r,), usage_24h=(r,))
    assert sev(hi, "node_unreachable") == ["critical"]
    assert sev(hi, "breaker_open") == []  # one card for one cause
    # a polled node that fails its polls is reported by node status only
    assert (
        sev(inp(node("a", source="static", status="degraded", reachable=False)), "node_unreachable")
        == []
    )


# -- 2. memory, swap, underutilisation, KV cache -------------------------------------------


@pytest.mark.parametrize(
    ("pressure", "available", "expected"),
    [
        ("normal", 20 * G, []),
        ("warn", 20 * G, ["warning"]),
        ("critical", 1 * G, ["critical"]),
        ("normal", 3 * G, ["warning"]),  # < 5 % of 64 GB free although "normal"
        ("normal", 4 * G, []),
    ],
)
def test_memory_pressure(pressure: str, available: int, expected: list[str]) -> None:
    assert (
        sev(inp(node(memory_pressure=pressure, ram_available=available)), "memory_pressure")
        == expected
    )


@pytest.mark.parametrize(
    ("swap_used", "expected"), [(15 * G, []), (16 * G, ["warning"]), (1 * G, [])]
)
def test_swap(swap_used: int, expected: list[str]) -> None:
    assert sev(inp(node(swap_total=32 * G, swap_used=swap_used)), "swap_usage") == expected


def _cold_fleet(**kw: Any) -> s.HealthInput:
    """Node b reloads m all day; node a has 50 GB free and m on disk."""
    a = node("a", ram_available=50 * G, on_disk=(s.DiskModel("m:latest", 4 * G),), **kw)
    b = node("b", ram_available=2 * G, ram_total=16 * G, memory_pressure="normal")
    day = use("b", requests=40, attempts=40, completed=40, cold_loads=3)
    return inp(a, b, usage_24h=(day,))


def test_underutilized_memory_needs_unmet_demand() -> None:
    # lots of free memory on an idle fleet is correct behaviour
    assert sev(inp(node(ram_available=60 * G)), "underutilized_memory") == []
    (c,) = cards(
        _cold_fleet(max_loaded_models=1, loaded=(s.LoadedModel("x:latest", G, G, 4096, None),)),
        "underutilized_memory",
    )
    assert c.severity == "info" and c.node_id == "a" and "m:latest" in c.reason
    assert "OLLAMA_MAX_LOADED_MODELS" in c.fix and "=-1" not in c.fix
    assert "OLLAMA_KEEP_ALIVE" in c.fix
    # suppressed on a node with memory pressure
    assert sev(_cold_fleet(memory_pressure="warn"), "underutilized_memory") == []


def test_underutilized_suppressed_when_thrashing() -> None:
    hi = _cold_fleet()
    thrash = use("a", "z:latest", requests=10, attempts=10, completed=10, cold_loads=6)
    hi = replace(hi, usage_24h=(*hi.usage_24h, thrash))
    assert sev(hi, "model_thrashing") and sev(hi, "underutilized_memory") == []


def _kv(size: int, **kw: Any) -> s.HealthInput:
    lm = s.LoadedModel("m:latest", size, size, 131072, None)
    return inp(node(loaded=(lm,), on_disk=(s.DiskModel("m:latest", 4 * G),), **kw))


@pytest.mark.parametrize(
    ("size", "kw", "expected"),
    [
        (6 * G, {}, []),  # exactly 1.5x: not bloat
        (7 * G, {}, ["info"]),  # bloat that costs nothing: informational
        (30 * G, {"memory_pressure": "warn"}, ["warning"]),
        (40 * G, {"memory_pressure": "warn"}, ["critical"]),
    ],
)
def test_kv_cache_bloat(size: int, kw: dict[str, Any], expected: list[str]) -> None:
    found = cards(_kv(size, **kw), "kv_cache_bloat")
    assert [c.severity for c in found] == expected
    for c in found:
        assert "OLLAMA_KV_CACHE_TYPE" in c.fix and c.model == "m:latest"


def test_kv_bloat_with_unused_context_warns() -> None:
    hi = _kv(30 * G)
    u = use(requests=20, attempts=20, completed=20, prompt_tokens=20 * 300)
    assert sev(replace(hi, usage_24h=(u,)), "kv_cache_bloat") == ["warning"]


# -- 3. VRAM fallback / offload, versions ----------------------------------------------------


def test_vram_fallback_and_offload() -> None:
    assert sev(inp(usage_24h=(use(requests=5, fallbacks=2),)), "vram_fallback_active") == ["info"]
    lm = s.LoadedModel("m:latest", 10 * G, 7 * G, 4096, None)
    gpu = node(vram_total=8 * G, vram_available=0, loaded=(lm,))
    assert sev(inp(gpu), "gpu_offload") == ["warning"]
    # unified memory / CPU only: size_vram says nothing
    assert sev(inp(node(loaded=(replace(lm, size_vram=0),))), "gpu_offload") == []
    full = node(vram_total=24 * G, loaded=(replace(lm, size_vram=10 * G),))
    assert sev(inp(full), "gpu_offload") == []


def test_versions() -> None:
    assert sev(inp(node(agent_version="0.9")), "version_mismatch") == ["warning"]
    assert sev(inp(node(agent_version="")), "version_unknown") == ["info"]
    assert sev(inp(node(source="static", agent_version="")), "version_unknown") == []
    two = inp(node("a"), node("b", ollama_version="0.11.0"))
    (c,) = cards(two, "ollama_version_mismatch")
    assert "b 0.11.0" in c.reason


# -- 4. context, reaper, image, transcription ------------------------------------------------


def test_context_protection() -> None:
    lm = s.LoadedModel("m:latest", 5 * G, 5 * G, 4096, None)
    full = use(requests=10, attempts=10, completed=10, prompt_tokens=10 * 3700)
    half = replace(full, prompt_tokens=10 * 2000)
    assert sev(inp(node(loaded=(lm,)), usage_24h=(full,)), "context_protection_insufficient") == [
        "warning"
    ]
    assert sev(inp(node(loaded=(lm,)), usage_24h=(half,)), "context_protection_insufficient") == []
    few = replace(full, requests=9, attempts=9, completed=9)
    assert sev(inp(node(loaded=(lm,)), usage_24h=(few,)), "context_protection_insufficient") == []
    assert sev(inp(settings={"context_protection": False}), "context_protection_disabled") == [
        "info"
    ]


@pytest.mark.parametrize(
    ("ages", "expected"),
    [
        ([], []),
        ([5 * HOUR], ["info"]),
        ([60.0], ["warning"]),
        ([60.0] * 11, ["critical"]),
        ([30 * HOUR], []),
    ],
)
def test_zombie_reaper(ages: list[float], expected: list[str]) -> None:
    hi = inp(incidents=tuple(incident("reaped", a) for a in ages))
    found = cards(hi, "zombie_reaper_active")
    assert [c.severity for c in found] == expected
    for c in found:
        assert "--stall-timeout" in c.fix


def test_image_and_transcription() -> None:
    holder = node("a", image_models=("flux:latest",), stt_models=("whisper:latest",))
    spare = node("b", ram_available=40 * G)
    ok = use("a", "flux:latest", requests=3, attempts=3, completed=3)
    hi = inp(holder, spare, usage_24h=(ok,))
    assert sev(hi, "image_generation") == ["info"]
    (exp,) = cards(hi, "mflux_expansion")
    assert "b" in exp.reason
    bad = use("a", "whisper:latest", requests=2, attempts=2, completed=1, failures=1)
    assert sev(inp(holder, usage_24h=(bad,)), "transcription_activity") == ["warning"]
    assert sev(inp(holder, settings={"image_generation": False}), "image_generation_disabled") == [
        "info"
    ]
    assert sev(inp(node()), "image_generation") == []


# -- 5. load timeouts, thrashing ---------------------------------------------------------------


def _timeouts(ages: list[float], model: str = "m:latest") -> tuple[s.Incident, ...]:
    return tuple(incident("retried", a, latency_ms=130_000, model=model) for a in ages)


@pytest.mark.parametrize(
    ("ages", "expected"),
    [([60, 60], []), ([60, 2 * HOUR, 3 * HOUR], ["warning"]), ([2 * HOUR] * 3, ["info"])],
)
def test_model_load_timeout(ages: list[float], expected: list[str]) -> None:
    assert sev(inp(incidents=_timeouts(ages)), "model_load_timeout") == expected


def test_load_timeouts_on_two_models_with_free_memory_mean_wedged() -> None:
    hi = inp(
        node(ram_available=40 * G), incidents=_timeouts([60] * 3) + _timeouts([60] * 3, "n:latest")
    )
    found = cards(hi, "model_load_timeout")
    assert len(found) == 2 and all("wedged" in c.reason and "Restart" in c.fix for c in found)
    fast = inp(incidents=tuple(incident("retried", 60, latency_ms=5_000) for _ in range(5)))
    assert sev(fast, "model_load_timeout") == []


@pytest.mark.parametrize(
    ("loads", "requests", "recent", "expected"),
    [
        (1, 100, 0, []),  # the first load is not thrashing
        (4, 10, 0, []),  # 3 reloads: below the floor
        (5, 10, 0, ["info"]),  # 4 reloads, 40 % of requests, nothing recent
        (5, 10, 2, ["warning"]),
        (5, 100, 2, []),  # 4 reloads for 100 requests: fine
    ],
)
def test_model_thrashing(loads: int, requests: int, recent: int, expected: list[str]) -> None:
    day = use(requests=requests, attempts=requests, completed=requests, cold_loads=loads)
    r = use(requests=3, attempts=3, completed=3, cold_loads=recent)
    assert sev(inp(usage_24h=(day,), usage_recent=(r,)), "model_thrashing") == expected


# -- 6. error rate, retries, streams ------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "errors", "recent_errors", "expected"),
    [
        (21, 1, 1, []),  # 4.8 %: below 5 %
        (21, 2, 1, ["warning"]),  # 9.5 % at the sample floor, still failing
        (21, 2, 0, ["info"]),  # resolved
        (20, 2, 1, []),  # below the floor and not mostly failing
        (6, 4, 1, ["info"]),  # below the floor but most attempts fail
        (40, 12, 3, ["critical"]),
    ],
)
def test_high_error_rate(
    attempts: int, errors: int, recent_errors: int, expected: list[str]
) -> None:
    day = use(attempts=attempts, requests=attempts, errors=errors, completed=attempts - errors)
    rec = use(attempts=10, requests=10, errors=recent_errors, completed=10 - recent_errors)
    found = cards(inp(usage_24h=(day,), usage_recent=(rec,)), "high_error_rate")
    assert [c.severity for c in found] == expected


def test_retried_attempts_count_as_errors() -> None:
    # every request was served, but each first went to a broken node: that node is unhealthy
    day = use(attempts=30, requests=0, retried=30, errors=30)
    (c,) = cards(inp(usage_24h=(day,), usage_recent=(day,)), "high_error_rate")
    assert c.severity == "critical" and "30 retried" in c.reason


@pytest.mark.parametrize(
    ("requests", "retried", "recent", "expected"),
    [
        (10, 2, 1, []),
        (10, 3, 1, ["info"]),
        (10, 5, 1, ["warning"]),
        (10, 5, 0, ["info"]),
        (9, 9, 1, []),
    ],
)
def test_high_retry_rate(requests: int, retried: int, recent: int, expected: list[str]) -> None:
    day = use(requests=requests, attempts=requests + retried, retried=retried)
    rec = use(requests=1, attempts=1 + recent, retried=recent)
    assert sev(inp(usage_24h=(day,), usage_recent=(rec,)), "high_retry_rate") == expected


def test_stream_reliability() -> None:
    day = use(requests=100, attempts=100, completed=95, client_disconnected=3)
    assert sev(inp(usage_24h=(day,)), "client_disconnects") == ["info"]
    assert sev(inp(usage_24h=(day,), usage_recent=(day,)), "client_disconnects") == ["warning"]
    assert sev(inp(usage_24h=(replace(day, client_disconnected=2),)), "client_disconnects") == []
    inc = (incident("incomplete", 60), incident("incomplete", 5 * HOUR))
    assert sev(inp(usage_24h=(day,), incidents=inc), "incomplete_streams") == ["warning"]
    assert sev(inp(usage_24h=(day,), incidents=inc[1:] * 2), "incomplete_streams") == ["info"]
    assert sev(inp(usage_24h=(day,), incidents=inc[:1]), "incomplete_streams") == []


# -- 7. extras -------------------------------------------------------------------------------


def test_breakers_store_disk_collectors() -> None:
    br = s.BreakerState(state="open", consecutive_failures=3, trips=1, open_until=NOW + 9)
    assert sev(inp(node(model_breakers={"m:latest": br})), "breaker_open") == ["warning"]
    assert sev(inp(store_write_errors=3), "trace_store_write_failures") == ["warning"]
    assert sev(inp(store_write_errors=50), "trace_store_write_failures") == ["critical"]
    assert sev(inp(store_dropped=1), "trace_store_dropped") == ["warning"]
    assert sev(inp(node(disk_free=9 * G)), "disk_space_low") == ["warning"]
    assert sev(inp(node(errors=("gpu: nvidia-smi not found",))), "agent_collector_errors") == [
        "info"
    ]


# -- recommendations -----------------------------------------------------------------------


def rec_node(node_id: str, ram_gb: float, *disk: tuple[str, float], **kw: Any) -> s.NodeFacts:
    return node(
        node_id,
        ram_total=int(ram_gb * G),
        ram_available=int(ram_gb * G / 2),
        on_disk=tuple(s.DiskModel(m, int(gb * G), modified_at=0.0) for m, gb in disk),
        **kw,
    )


def plan(report: s.RecommendationReport) -> dict[str, dict[str, str]]:
    return {n.node_id: {r.model: r.action for r in n.recommendations} for n in report.nodes}


def recommend(
    nodes: list[s.NodeFacts], demand: dict[tuple[str, str], int], **kw: Any
) -> s.RecommendationReport:
    rows = [use(n, m, requests=r) for (n, m), r in demand.items()]
    kw.setdefault("history_s", 30 * 86400.0)
    return s.recommendations(NOW, nodes, rows, rows, **kw)


def test_small_laptop_vs_big_studio() -> None:
    laptop = rec_node("laptop", 16, ("big:70b", 40), ("small:3b", 2))
    studio = rec_node("studio", 192)
    r = recommend([laptop, studio], {("laptop", "big:70b"): 50, ("laptop", "small:3b"): 20})
    p = plan(r)
    assert p["studio"]["big:70b"] == "pull"  # does not fit the laptop's 12 GB usable
    assert p["laptop"]["small:3b"] == "load"
    assert "big:70b" not in p["laptop"] or p["laptop"]["big:70b"] != "keep"
    laptop_entry = r.nodes[0]
    assert laptop_entry.usable_bytes == 12 * G  # 16 GB - max(4 GB, 15 %)
    assert laptop_entry.planned_bytes <= laptop_entry.usable_bytes
    big = next(x for x in r.nodes[1].recommendations if x.model == "big:70b")
    assert "50 requests in 24 h" in big.reason and big.bytes > 40 * G


def test_demand_ordering_when_only_one_fits() -> None:
    n = rec_node("a", 24, ("x:latest", 10), ("y:latest", 10))  # 19.6 GB usable
    p = plan(recommend([n], {("a", "x:latest"): 5, ("a", "y:latest"): 80}))
    assert p["a"] == {"y:latest": "load"}
    r = recommend([n], {("a", "x:latest"): 5, ("a", "y:latest"): 80})
    (unmet,) = r.unmet_demand
    assert unmet.model == "x:latest" and "no node has room" in unmet.reason


def test_no_needless_duplicates_but_hot_models_twice() -> None:
    a = rec_node("a", 64, ("m:latest", 5))
    b = rec_node("b", 64, ("m:latest", 5))
    p = plan(recommend([a, b], {("a", "m:latest"): 30}))
    assert p["a"]["m:latest"] == "load" and p["b"].get("m:latest") == "remove"
    p = plan(recommend([a, b], {("a", "m:latest"): 600}))
    assert p["a"]["m:latest"] == "load" and p["b"]["m:latest"] == "load"
    # resident copies are kept in preference to loading elsewhere
    hot = replace(b, loaded=(s.LoadedModel("m:latest", 6 * G, 6 * G, 4096, None),))
    p = plan(recommend([a, hot], {("a", "m:latest"): 30}))
    assert p["b"]["m:latest"] == "keep"
    assert "m:latest" not in p["a"]  # one copy is enough; a's copy served recently: kept


def test_remove_idle_only_when_history_and_age_allow() -> None:
    a = rec_node("a", 64, ("old:latest", 30), ("used:latest", 5))
    p = plan(recommend([a], {("a", "used:latest"): 3}))
    assert p["a"] == {"used:latest": "load", "old:latest": "remove"}
    assert plan(recommend([a], {("a", "used:latest"): 3}, history_s=86400))["a"] == {
        "used:latest": "load"
    }
    fresh = replace(a, on_disk=(s.DiskModel("old:latest", 30 * G, modified_at=NOW - 3600),))
    assert plan(recommend([fresh], {}))["a"] == {}
    r = recommend([a], {("a", "used:latest"): 3})
    rm = next(x for x in r.nodes[0].recommendations if x.action == "remove")
    assert rm.bytes == 30 * G and "ollama rm old:latest" in rm.reason


def test_unmet_not_found_and_disk_space() -> None:
    a = rec_node("a", 64, disk_free=15 * G)
    b = rec_node("b", 32, ("m:latest", 8))
    r = recommend([a, b], {("b", "m:latest"): 900}, not_found_7d={"typo:latest": 7})
    p = plan(r)
    # the hot model wants a 2nd copy but a has only 5 GB above its disk reserve
    assert "m:latest" not in p["a"] and p["b"]["m:latest"] == "load"
    assert [u.model for u in r.unmet_demand] == ["typo:latest"]
    assert r.unmet_demand[0].not_found_7d == 7 and r.unmet_demand[0].suggested_node == "a"
    d = r.to_dict()
    assert set(d) == {"nodes", "unmet_demand", "generated_at"}
    assert {"node_id", "memory_total_bytes", "usable_bytes", "recommendations"} <= set(
        r.nodes[0].to_dict()
    )


def test_node_without_memory_facts_keeps_what_it_holds() -> None:
    lm = s.LoadedModel("m:latest", 3 * G, 3 * G, 4096, None)
    polled = node(
        "p",
        source="static",
        ram_total=0,
        ram_available=0,
        loaded=(lm,),
        on_disk=(s.DiskModel("m:latest", 2 * G),),
    )
    r = recommend([polled], {("p", "m:latest"): 5})
    assert plan(r)["p"] == {"m:latest": "keep"} and r.nodes[0].usable_bytes == 3 * G


# -- end to end ----------------------------------------------------------------------------


async def get_json(port: int, path: str) -> Any:
    status, _, body = await raw_request(port, "GET", path, b"")
    assert status == 200, body
    return json.loads(body)


async def test_health_and_recommendations_through_the_router(make_router: RouterFactory) -> None:
    llama = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")
    a = FakeOllama([llama], tokens_per_s=0)
    b = FakeOllama([llama], tokens_per_s=0)
    await a.start()
    await b.start()
    try:
        r = await make_router([a.url, b.url])
        await r.wait_ready(models=1, nodes=2)
        gen = b'{"model":"llama3.2:3b","prompt":"hi","stream":false}'
        for _ in range(6):
            status, _, _ = await raw_request(r.port, "POST", "/api/generate", gen)
            assert status == 200
        status, _, _ = await raw_request(
            r.port, "POST", "/api/generate", b'{"model":"nosuch:1b","prompt":"x"}'
        )
        assert status == 404
        healthy = await get_json(r.port, "/dashboard/api/health")
        assert 0 <= healthy["score"] <= 100 and healthy["vitals"]["nodes_online"] == 2
        assert not [c for c in healthy["checks"] if c["id"] == "node_offline"]

        a.refuse_connections()
        dead = next(n.node_id for n in r.router.fleet.nodes.values() if n.url == a.url)
        async with asyncio.timeout(10):
            while r.router.fleet.nodes[dead].status != "offline":
                await asyncio.sleep(0.05)
        await r.router.store.flush()
        cached = await get_json(r.port, "/dashboard/api/health")
        assert cached["generated_at"] == healthy["generated_at"]  # cached for 10 s
        r.router.dashboard._analytics_cache.clear()
        health = await get_json(r.port, "/dashboard/api/health")
        mine = [
            c
            for c in health["checks"]
            if c["node_id"] == dead and c["severity"] in ("critical", "warning")
        ]
        assert mine and all(c["fix"] for c in mine)
        assert any(c["id"] == "node_offline" and c["severity"] == "critical" for c in mine)
        assert health["score"] < healthy["score"]
        assert health["vitals"]["nodes_offline"] == 1
        assert health["vitals"]["total_requests_24h"] >= 6

        recs = await get_json(r.port, "/dashboard/api/recommendations")
        by_node = {n["node_id"]: n for n in recs["nodes"]}
        assert set(by_node) == set(r.router.fleet.nodes)
        alive = next(n for n in by_node if n != dead)
        assert any(
            x["model"] == "llama3.2:3b" and x["action"] in ("keep", "load")
            for x in by_node[alive]["recommendations"]
        )
        assert [u["model"] for u in recs["unmet_demand"]] == ["nosuch:1b"]
    finally:
        await a.stop()
        await b.stop()


# -- the analytics half of scoring.py lists what it holds ---------------------------------


def _analytics_half() -> tuple[str, set[str], set[str], set[str]]:
    """The banner block's text, the public names defined below the banner, and the names
    defined above it that the code below uses."""
    src = Path(s.__file__).read_text()
    tree = ast.parse(src)
    banner = src.splitlines().index("# Fleet analytics: health checks and recommendations") + 1
    block = []
    for line in src.splitlines()[banner:]:
        if not line.startswith("#"):
            break
        block.append(line)
    above: set[str] = set()
    below: set[str] = set()
    body_below: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.ClassDef):
            names = [stmt.name]
        elif isinstance(stmt, ast.Assign):
            names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            names = [stmt.target.id]
        else:
            continue
        if stmt.lineno < banner:
            above.update(names)
        else:
            below.update(names)
            body_below.append(stmt)
    used = {
        x.id
        for stmt in body_below
        for x in ast.walk(stmt)
        if isinstance(x, ast.Name) and x.id in above
    }
    return "\n".join(block), {n for n in below if not n.startswith("_")}, used, above


def test_the_analytics_banner_lists_its_public_names_and_what_it_borrows() -> None:
    block, public, borrowed, _ = _analytics_half()
    listed, shared = block.split("Names it takes from the routing half:")
    assert set(re.findall(r"`(\w+)`", listed)) == public
    assert set(re.findall(r"`(\w+)`", shared)) == borrowed


def test_the_routing_half_never_calls_the_analytics_half() -> None:
    src = Path(s.__file__).read_text()
    banner = src.index("# Fleet analytics: health checks and recommendations")
    _, public, _, _ = _analytics_half()
    routing = ast.parse(src[:banner])
    named = {x.id for x in ast.walk(routing) if isinstance(x, ast.Name)}
    assert named & public == set()
