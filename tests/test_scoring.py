"""Table tests and properties for scoring.py (pure: no I/O, no clock, no randomness)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import (
    AvailableModel,
    BreakerState,
    Choice,
    LoadedModel,
    NodeSnapshot,
    Observation,
    Policy,
    QueueSnapshot,
    RouteRequest,
    Score,
    ServiceStats,
    breaker_allows,
    breaker_backoff_s,
    breaker_begin_probe,
    breaker_on_failure,
    breaker_on_success,
    choose,
    expected_service_s,
    fallback_chain,
    normalize_model,
    observe,
    prewarm_target,
    protect_context,
    retry_decision,
    score_nodes,
    slot_count,
    vram_fallback,
    wait_targets,
)

GB = 1_000_000_000
NOW = 1_790_000_000.0
P = Policy()
M = "llama3:latest"


def avail(name: str = M, size: float = 5, **kw: object) -> AvailableModel:
    return AvailableModel(name, int(size * GB), **kw)  # type: ignore[arg-type]


def loaded(name: str = M, size: float = 6, ctx: int | None = 8192, expires: float | None = None):
    return LoadedModel(name, int(size * GB), int(size * GB), ctx, expires)


def node(
    nid: str = "n1",
    *,
    hot: bool = False,
    ram: float = 64,
    free: float = 48,
    models: tuple[AvailableModel, ...] = (avail(),),
    loaded_models: tuple[LoadedModel, ...] = (),
    **kw: object,
) -> NodeSnapshot:
    lm = {m.name: m for m in loaded_models}
    if hot:
        lm.setdefault(M, loaded())
    return NodeSnapshot(
        node_id=nid,
        status=str(kw.pop("status", "online")),
        ram_total=int(ram * GB),
        ram_available=int(free * GB),
        loaded=lm,
        available={m.name: m for m in models},
        **kw,  # type: ignore[arg-type]
    )


def req(**kw: object) -> RouteRequest:
    return RouteRequest(M, **kw)  # type: ignore[arg-type]


def scores(nodes, queues=None, stats=None, breakers=None, r=None, now=NOW, policy=P):
    out = score_nodes(r or req(), nodes, queues or {}, stats or {}, breakers or {}, now, policy)
    return {s.node_id: s for s in out}


def total(n: NodeSnapshot, **kw: object) -> float:
    s = scores([n], **kw)[n.node_id]  # type: ignore[arg-type]
    assert s.eligible, s.reason
    return s.total


def pick(nodes, queues=None, stats=None, breakers=None, r=None, rand=0.0, waited=0.0, policy=P):
    return choose(
        r or req(), nodes, queues or {}, stats or {}, breakers or {}, NOW, rand, policy, waited
    )


# ---------------------------------------------------------------------------------------
# names, slots
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Llama3.2", "llama3.2:latest"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("qwen2.5:7b", "qwen2.5:7b"),
        ("hf.co/Org/Model:Q4", "hf.co/org/model:q4"),
        ("registry:5000/ns/model", "registry:5000/ns/model:latest"),
    ],
)
def test_normalize_model(raw: str, norm: str) -> None:
    assert normalize_model(raw) == norm


@pytest.mark.parametrize(
    ("reported", "configured", "expected"),
    [(None, None, 1), (4, None, 4), (4, 2, 2), (None, 3, 3), (0, None, 1), (1000, None, 32)],
)
def test_slot_count(reported: int | None, configured: int | None, expected: int) -> None:
    assert slot_count(node(num_parallel=reported), configured, P) == expected


# ---------------------------------------------------------------------------------------
# each signal moves the ranking the right way
# ---------------------------------------------------------------------------------------


def test_thermal_hot_beats_warm_beats_cold() -> None:
    hot = node("hot", hot=True)
    warm = node("warm", recently_unloaded={M: NOW - 60})
    stale = node("stale", recently_unloaded={M: NOW - 5000})
    cold = node("cold")
    s = scores([hot, warm, stale, cold])
    assert s["hot"].total > s["warm"].total > s["cold"].total
    assert s["stale"].total == pytest.approx(s["cold"].total)
    assert s["hot"].factor("thermal").contribution == P.hot_bonus  # type: ignore[union-attr]
    assert pick([cold, warm, hot]).node_id == "hot"


def test_expired_loaded_model_is_not_hot() -> None:
    gone = node("gone", loaded_models=(loaded(expires=NOW - 10),))
    live = node("live", loaded_models=(loaded(expires=NOW + 100),))
    s = scores([gone, live])
    assert s["gone"].factor("thermal").value < 1.0  # type: ignore[union-attr]
    assert s["live"].total > s["gone"].total


def test_loading_model_is_joined_not_loaded_twice() -> None:
    loading = node("loading", loading={M: NOW - 1})
    cold = node("cold")
    assert pick([cold, loading]).node_id == "loading"


@pytest.mark.parametrize(("free_lo", "free_hi"), [(6, 20), (1, 6), (0.5, 3), (20, 60)])
def test_memory_more_free_scores_higher_or_equal(free_lo: float, free_hi: float) -> None:
    assert total(node(free=free_hi)) >= total(node(free=free_lo))


def test_memory_does_not_fit_is_ineligible_with_reason() -> None:
    big = avail(size=80)
    s = scores([node(ram=64, free=60, models=(big,))])["n1"]
    assert not s.eligible
    assert "does not fit" in s.reason


def test_memory_gpu_offload_is_eligible_but_penalised() -> None:
    mid = avail(size=30)
    gpu = node("gpu", ram=64, free=60, models=(mid,), vram_total=24 * GB, vram_available=24 * GB)
    mac = node("mac", ram=64, free=60, models=(mid,))
    s = scores([gpu, mac])
    assert s["gpu"].eligible
    assert "offload" in s["gpu"].factor("memory").reason  # type: ignore[union-attr]
    assert s["mac"].total > s["gpu"].total


def test_memory_evicting_a_recently_used_model_costs_more_than_an_idle_one() -> None:
    other = "qwen2.5:7b"
    fresh = node("fresh", free=2, loaded_models=(loaded(other, 20, expires=NOW + 290),))
    old = node("old", free=2, loaded_models=(loaded(other, 20, expires=NOW + 5),))
    s = scores([fresh, old])
    assert s["old"].total > s["fresh"].total
    assert "evicts qwen2.5:7b" in s["fresh"].factor("memory").reason  # type: ignore[union-attr]


def test_memory_held_by_busy_model_means_the_load_waits() -> None:
    other = "qwen2.5:7b"
    n_busy = node("busy", free=2, loaded_models=(loaded(other, 20),))
    n_idle = node("idle", free=2, loaded_models=(loaded(other, 20),))
    q = {("busy", other): QueueSnapshot(0, 1, 1)}
    s = scores([n_busy, n_idle], queues=q)
    assert s["idle"].total > s["busy"].total
    assert "load waits" in s["busy"].factor("memory").reason  # type: ignore[union-attr]


def test_critical_memory_pressure_withholds_cold_loads_only() -> None:
    s = scores(
        [
            node("cold", memory_pressure="critical"),
            node("hot", hot=True, memory_pressure="critical"),
        ]
    )
    assert not s["cold"].eligible and "pressure" in s["cold"].reason
    assert s["hot"].eligible


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_queue_full_node_loses_to_idle(in_flight: int) -> None:
    a, b = node("a", hot=True, num_parallel=4), node("b", hot=True, num_parallel=4)
    q = {("a", M): QueueSnapshot(0, in_flight, 4)}
    s = scores([a, b], queues=q)
    assert s["b"].total > s["a"].total
    assert pick([a, b], queues=q).node_id == "b"


def test_queue_other_models_on_the_same_node_slow_it_down() -> None:
    a, b = node("a", hot=True, num_parallel=4), node("b", hot=True, num_parallel=4)
    q = {("a", "other:latest"): QueueSnapshot(0, 3, 4)}
    assert pick([a, b], queues=q).node_id == "b"


def test_wait_uses_measured_decode_speed() -> None:
    a, b = node("a", hot=True), node("b", hot=True)
    fast = ServiceStats(count=10, eval_tps_n=10, eval_tps_ewma=100, completion_tokens_ewma=200)
    slow = replace(fast, eval_tps_ewma=10)
    s = scores([a, b], stats={("a", M): slow, ("b", M): fast})
    assert s["b"].total > s["a"].total
    assert "measured" in s["a"].factor("wait").reason  # type: ignore[union-attr]


def test_wait_uses_measured_load_time_for_cold_nodes() -> None:
    a, b = node("a"), node("b")
    quick = ServiceStats(count=3, load_n=3, load_ms_ewma=1_000)
    slow = replace(quick, load_ms_ewma=60_000)
    s = scores([a, b], stats={("a", M): slow, ("b", M): quick})
    assert s["b"].total > s["a"].total


def test_wait_prior_grows_with_model_size() -> None:
    small, big = avail(size=2), avail(size=40)
    t_small = expected_service_s(None, req(), True, P, model_bytes=small.size)
    t_big = expected_service_s(None, req(), True, P, model_bytes=big.size)
    assert t_big > t_small > 0
    assert expected_service_s(None, req(), True, P) > expected_service_s(None, req(), False, P)
    warm = expected_service_s(None, req(), True, P, model_bytes=big.size, warm=True)
    assert t_small < warm < t_big


@pytest.mark.parametrize(
    ("size", "winner"),
    [(40, "big"), (2, "small")],
)
def test_role_affinity(size: float, winner: str) -> None:
    m = avail(size=size)
    big = node("big", ram=192, free=100, models=(m,))
    small = node("small", ram=64, free=50, models=(m,))
    s = scores([big, small])
    loser = "small" if winner == "big" else "big"
    assert (
        s[winner].factor("affinity").contribution  # type: ignore[union-attr]
        > s[loser].factor("affinity").contribution  # type: ignore[union-attr]
    )


@pytest.mark.parametrize(
    ("breaker", "stats", "kw"),
    [
        (None, ServiceStats(count=10, failures=3, failure_rate=0.4), {}),
        (BreakerState("half_open"), None, {}),
        (BreakerState("closed", consecutive_failures=2), None, {}),
        (None, None, {"status": "degraded"}),
        (None, None, {"memory_pressure": "warn"}),
    ],
)
def test_availability_penalties(breaker, stats, kw) -> None:
    healthy = node("ok", hot=True)
    sick = node("sick", hot=True, **kw)
    s = scores(
        [healthy, sick],
        stats={("sick", M): stats} if stats else {},
        breakers={"sick": breaker} if breaker else {},
    )
    assert s["sick"].eligible
    assert s["ok"].total > s["sick"].total
    assert s["sick"].factor("availability").contribution < 0  # type: ignore[union-attr]


def test_context_long_prompt_avoids_small_window() -> None:
    small = node("small", loaded_models=(loaded(ctx=2048),))
    large = node("large", loaded_models=(loaded(ctx=32768),))
    r = req(est_tokens=8000)
    s = scores([small, large], r=r)
    assert s["large"].total > s["small"].total
    assert s["small"].factor("context").contribution < 0  # type: ignore[union-attr]
    assert pick([small, large], r=r).node_id == "large"


def test_context_num_ctx_mismatch_means_reload() -> None:
    same = node("same", loaded_models=(loaded(ctx=8192),))
    other = node("other", loaded_models=(loaded(ctx=4096),))
    s = scores([same, other], r=req(num_ctx=8192))
    assert "reload" in s["other"].factor("thermal").reason  # type: ignore[union-attr]
    assert s["same"].total > s["other"].total


# ---------------------------------------------------------------------------------------
# eligibility
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "r", "breakers", "reason"),
    [
        (node(status="offline"), req(), {}, "offline"),
        (node(status="draining"), req(), {}, "draining"),
        (node(reachable=False), req(), {}, "unreachable"),
        (node(), req(), {"n1": BreakerState("open", 3, 1, NOW + 30)}, "circuit open (node)"),
        (node(), req(), {f"n1:{M}": BreakerState("open", 3, 1, NOW + 9)}, "node:model"),
        (
            node(),
            req(),
            {"n1": BreakerState("half_open", probe_in_flight=True, probe_deadline=NOW + 9)},
            "probe in flight",
        ),
        (node(models=(avail("other:latest"),)), req(), {}, "not on this node"),
        (node(ram=8, free=8, models=(avail(size=20),)), req(), {}, "does not fit"),
        (node(), req(exclude=frozenset({"n1"})), {}, "already tried"),
        (node(), req(pinned_node="n2"), {}, "pinned"),
        (node(models=(avail(capabilities=("completion",)),)), req(needs_vision=True), {}, "vision"),
    ],
)
def test_ineligible_reasons(n: NodeSnapshot, r: RouteRequest, breakers, reason: str) -> None:
    s = scores([n], r=r, breakers=breakers)["n1"]
    assert not s.eligible
    assert reason in s.reason
    ch = pick([n], r=r, breakers=breakers)
    assert ch.action == "reject" and ch.node_id is None


def test_open_breaker_past_backoff_is_eligible_as_probe() -> None:
    b = {"n1": BreakerState("open", 3, 1, NOW - 1)}
    s = scores([node(hot=True)], breakers=b)["n1"]
    assert s.eligible
    assert "probing" in s.factor("availability").reason  # type: ignore[union-attr]


def test_ineligible_rows_are_listed_after_eligible() -> None:
    ch = pick([node("off", status="offline"), node("on", hot=True), node("cold")])
    assert [s.node_id for s in ch.ranked] == ["on", "cold", "off"]
    assert [s.eligible for s in ch.ranked] == [True, True, False]


def test_pinned_node_is_the_only_candidate() -> None:
    ch = pick([node("a", hot=True), node("b")], r=req(pinned_node="b"))
    assert ch.node_id == "b"


# ---------------------------------------------------------------------------------------
# ties
# ---------------------------------------------------------------------------------------


def test_tie_breaks_by_fewest_outstanding() -> None:
    a, b = node("a", hot=True, num_parallel=4), node("b", hot=True, num_parallel=4)
    # same total by construction: policy with zero queue/wait weights
    flat = replace(P, queue_weight=0.0, wait_weight=0.0)
    q = {("a", M): QueueSnapshot(0, 2, 4)}
    for rand in (0.0, 0.5, 0.99):
        assert pick([a, b], queues=q, rand=rand, policy=flat).node_id == "b"


def test_tie_breaks_at_random_when_outstanding_equal() -> None:
    ns = [node(f"n{i}", hot=True) for i in range(3)]
    chosen = {pick(ns, rand=x).node_id for x in (0.0, 0.34, 0.67, 0.999)}
    assert chosen == {"n0", "n1", "n2"}
    assert pick(ns, rand=0.0).node_id == pick(ns, rand=0.0).node_id  # deterministic


# ---------------------------------------------------------------------------------------
# dispatch / wait / reject
# ---------------------------------------------------------------------------------------


def test_wait_when_all_full_then_reject_with_retry_after() -> None:
    ns = [node("a", hot=True, num_parallel=2), node("b", hot=True, num_parallel=2)]
    q = {("a", M): QueueSnapshot(1, 2, 2), ("b", M): QueueSnapshot(0, 2, 2)}
    ch = pick(ns, queues=q)
    assert ch.action == "wait" and ch.node_id is None and ch.wait_for in {"a", "b"}
    ch = pick(ns, queues=q, waited=P.max_queue_wait_s)
    assert ch.action == "reject" and ch.reject_kind == "saturated"
    assert ch.retry_after_s is not None
    assert P.retry_after_min_s <= ch.retry_after_s <= P.retry_after_max_s + 1


def test_third_request_goes_elsewhere_with_two_slots() -> None:
    a, b = node("a", hot=True, num_parallel=2), node("b", hot=True, num_parallel=2)
    q = {("a", M): QueueSnapshot(0, 2, 2)}
    ch = pick([a, b], queues=q)
    assert ch.action == "dispatch" and ch.node_id == "b"


def test_waits_for_a_hot_full_node_rather_than_a_long_cold_load() -> None:
    big = avail(size=40)
    hot = node("hot", ram=192, free=100, models=(big,), loaded_models=(loaded(size=42),))
    cold = node("cold", ram=192, free=150, models=(big,))
    quick = ServiceStats(
        count=20, service_ms_ewma=2000, eval_tps_ewma=100, eval_tps_n=20, completion_tokens_ewma=150
    )
    q = {("hot", M): QueueSnapshot(0, 1, 1)}
    stats = {("hot", M): quick}
    ch = pick([hot, cold], queues=q, stats=stats)
    assert ch.action == "wait" and ch.wait_for == "hot"
    # never stuck: at the bound it takes the free node
    ch = pick([hot, cold], queues=q, stats=stats, waited=P.max_queue_wait_s)
    assert ch.action == "dispatch" and ch.node_id == "cold"
    # and with wait_for_better off it dispatches at once
    ch = pick([hot, cold], queues=q, stats=stats, policy=replace(P, wait_for_better=False))
    assert ch.node_id == "cold"


def test_a_backlog_on_the_hot_node_shrinks_its_residency_bonus() -> None:
    """hot_backlog_s: the queue a request would wait for where its model is hot wears the
    residency bonus down, so a quick load elsewhere wins over a long line; without a
    backlog, or with the knob off, the hot node keeps the request."""
    small = avail(size=2)
    hot = node("hot", models=(small,), loaded_models=(loaded(size=2.5),))
    cold = node("cold", models=(small,))
    st = ServiceStats(
        count=20, service_ms_ewma=4000, eval_tps_ewma=60, eval_tps_n=20, completion_tokens_ewma=200
    )
    stats = {("hot", M): st, ("cold", M): st}
    line = {("hot", M): QueueSnapshot(2, 1, 1)}  # 2 waiting behind 1 busy slot: ~12 s
    on = replace(P, hot_backlog_s=20.0)
    ch = pick([hot, cold], queues=line, stats=stats, policy=on)
    assert ch.action == "dispatch" and ch.node_id == "cold"
    t = scores([hot, cold], queues=line, stats=stats, policy=on)["hot"].factor("thermal")
    assert t is not None and t.contribution < P.hot_bonus and "backlog" in t.reason
    # the knob off: the full bonus holds the request for the hot node (it waits for a slot)
    off = replace(P, hot_backlog_s=0.0)
    ch = pick([hot, cold], queues=line, stats=stats, policy=off)
    assert ch.action == "wait" and ch.wait_for == "hot"
    assert "expected later (~15.3s against ~5.7s)" in ch.reason  # not "sooner"
    # no backlog: the hot node wins with the knob on, and keeps its whole bonus
    assert pick([hot, cold], stats=stats, policy=on).node_id == "hot"
    t = scores([hot, cold], stats=stats, policy=on)["hot"].factor("thermal")
    assert t is not None and t.contribution == P.hot_bonus


@pytest.mark.parametrize(
    ("nodes", "kind", "needle"),
    [
        ([], "no_nodes", "no nodes"),
        ([node(models=(avail("other:latest"),))], "not_found", "not found on any node"),
        ([node(status="offline"), node("b", reachable=False)], "offline", "all nodes offline"),
        ([node(ram=8, free=8, models=(avail(size=20),))], "ineligible", "does not fit"),
    ],
)
def test_reject_when_nothing_is_eligible(nodes, kind: str, needle: str) -> None:
    ch = pick(nodes)
    assert ch.action == "reject" and ch.reject_kind == kind and needle in ch.reason
    assert ch.retry_after_s is None
    assert ch.winner is None and ch.runner_up is None


def test_reject_when_only_breakers_block_gives_retry_after() -> None:
    b = {"n1": BreakerState("open", 3, 1, NOW + 12)}
    ch = pick([node(hot=True)], breakers=b)
    assert ch.action == "reject" and ch.retry_after_s == 12


def test_breakdown_is_json_and_names_winner_and_runner_up() -> None:
    ch = pick([node("a", hot=True), node("b"), node("c", status="offline")])
    bd = ch.breakdown()
    json.dumps(bd, allow_nan=False)
    assert set(bd) == {"winner", "runner_up", "others"}
    assert bd["winner"]["node_id"] == "a"  # type: ignore[index]
    assert bd["runner_up"]["node_id"] == "b"  # type: ignore[index]
    assert [s["node_id"] for s in bd["others"]] == ["c"]  # type: ignore[attr-defined]
    names = {f["name"] for f in bd["winner"]["factors"]}  # type: ignore[index]
    assert names == {"thermal", "memory", "queue", "wait", "affinity", "availability", "context"}
    assert ch.winner is not None and ch.winner.total == sum(
        f.contribution for f in ch.winner.factors
    )


def test_prewarm_runner_up_when_queue_is_deep() -> None:
    a, b = node("a", hot=True, num_parallel=4), node("b", num_parallel=4)
    deep = {("a", M): QueueSnapshot(0, 3, 4)}
    ch = pick([a, b], queues=deep)
    assert ch.node_id == "a"
    assert prewarm_target(req(), ch, deep, P) == "b"
    shallow = {("a", M): QueueSnapshot(0, 1, 4)}
    assert prewarm_target(req(), pick([a, b], queues=shallow), shallow, P) is None
    # two outstanding are enough (prewarm_queue_depth 2; 3 measured worse, #15)
    two = {("a", M): QueueSnapshot(in_flight=2, slots=4)}
    assert prewarm_target(req(), pick([a, b], queues=two), two, P) == "b"
    both_hot = [a, node("b", hot=True, num_parallel=4)]
    ch = pick(both_hot, queues=deep)
    assert prewarm_target(req(), ch, deep, P) is None


def test_prewarm_only_where_the_model_is_known_to_fit() -> None:
    """With ``prewarm_needs_room`` a pre-warm nobody asked for must not evict: a runner-up
    whose memory is unknown, or known only as a lower bound the load would pass, is
    pre-warmed only when nothing is resident or loading there. Off by default (#15: the
    pre-warms that may evict are how herd spreads a busy model)."""
    strict = replace(P, prewarm_needs_room=True)
    a = node("a", hot=True, num_parallel=4)
    deep = {("a", M): QueueSnapshot(0, 3, 4)}
    other = loaded("other", 2)
    unknown = node("b", ram=0, free=0, num_parallel=4, loaded_models=(other,))
    lower_bound = node("b", ram=3, free=1, num_parallel=4, loaded_models=(other,),
                       memory_learned="learned_fit")
    roomy = node("b", ram=64, free=48, num_parallel=4, loaded_models=(other,))
    empty = node("b", ram=0, free=0, num_parallel=4)
    for runner_up, want in ((unknown, None), (lower_bound, None), (roomy, "b"),
                            (empty, "b")):
        ch = pick([a, runner_up], queues=deep, policy=strict)
        assert ch.node_id == "a"
        assert prewarm_target(req(), ch, deep, strict, [a, runner_up]) == want, runner_up
    # the default: a runner-up that does not evict for sure, and where the model is not
    # known to fit, only while its resident models are idle and it loads nothing
    ch = pick([a, unknown], queues=deep)
    assert prewarm_target(req(), ch, deep, P, [a, unknown]) == "b"
    busy = {**deep, ("b", "other"): QueueSnapshot(in_flight=1, slots=4)}
    ch = pick([a, unknown], queues=busy)
    assert prewarm_target(req(), ch, busy, P, [a, unknown]) is None
    ch = pick([a, roomy], queues=busy)  # known to fit: busy neighbours do not matter
    assert prewarm_target(req(), ch, busy, P, [a, roomy]) == "b"
    loading = replace(unknown, loading={"third": NOW})
    ch = pick([a, loading], queues=deep)
    assert prewarm_target(req(), ch, deep, P, [a, loading]) is None
    loose = replace(P, prewarm_spares_busy=False)
    ch = pick([a, unknown], queues=busy, policy=loose)
    assert prewarm_target(req(), ch, busy, loose, [a, unknown]) == "b"


# ---------------------------------------------------------------------------------------
# circuit breaker
# ---------------------------------------------------------------------------------------


def test_breaker_full_cycle() -> None:
    s = BreakerState()
    for i in range(P.breaker_threshold - 1):
        s = breaker_on_failure(s, NOW + i, P, ejected_share=0.25)
        assert s.state == "closed" and breaker_allows(s, NOW + i)
    s = breaker_on_failure(s, NOW + 5, P, ejected_share=0.25)
    assert s.state == "open" and s.trips == 1
    assert s.open_until == NOW + 5 + P.breaker_base_backoff_s
    assert not breaker_allows(s, NOW + 6)
    t = s.open_until
    assert breaker_allows(s, t)  # back-off over: one probe may go
    s = breaker_begin_probe(s, t, P)
    assert s.state == "half_open" and not breaker_allows(s, t + 1)
    assert breaker_allows(s, t + P.breaker_probe_timeout_s)  # a lost probe does not wedge it
    s = breaker_on_success(s, t + 2, P)
    assert s.state == "closed" and s.consecutive_failures == 0 and breaker_allows(s, t + 2)


def test_breaker_failed_probe_reopens_with_doubled_backoff_capped() -> None:
    s = BreakerState()
    t = NOW
    backoffs = []
    for _ in range(12):
        s = breaker_on_failure(s, t, P, 0.25, kind="connect")
        assert s.state == "open"
        backoffs.append(s.open_until - t)
        t = s.open_until
        s = breaker_begin_probe(s, t, P)
    assert backoffs[:4] == [5.0, 10.0, 20.0, 40.0]
    assert max(backoffs) == P.breaker_max_backoff_s
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(backoffs))


@pytest.mark.parametrize(
    ("kind", "share", "opens"),
    [
        ("connect", 0.25, True),  # unreachable: out after the first failure
        ("unreachable", 0.5, True),
        ("error", 0.25, False),  # one ordinary failure is not enough
        ("connect", 0.75, False),  # would eject more than half the fleet
    ],
)
def test_breaker_immediate_open_and_max_ejected_share(kind: str, share: float, opens: bool) -> None:
    s = breaker_on_failure(BreakerState(), NOW, P, share, kind=kind)
    assert (s.state == "open") is opens


def test_breaker_threshold_respects_max_ejected_share() -> None:
    s = BreakerState()
    for i in range(10):
        s = breaker_on_failure(s, NOW + i, P, ejected_share=1.0)
    assert s.state == "closed" and s.consecutive_failures == 10


def test_breaker_straggler_failure_keeps_it_open_and_trips_are_forgotten() -> None:
    s = breaker_on_failure(BreakerState(), NOW, P, 0.1, kind="connect")
    s2 = breaker_on_failure(s, NOW + 1, P, 0.1)
    assert s2.state == "open" and s2.open_until == s.open_until and s2.trips == 1
    later = NOW + P.breaker_reset_after_s + 10
    s3 = breaker_on_failure(breaker_on_success(s, later, P), later, P, 0.1, kind="connect")
    assert s3.trips == 1 and s3.open_until - later == P.breaker_base_backoff_s


def test_breaker_backoff_table() -> None:
    assert [breaker_backoff_s(n, P) for n in (1, 2, 3, 7, 50)] == [5, 10, 20, 300, 300]


# ---------------------------------------------------------------------------------------
# retry decisions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "failure", "sent", "retry"),
    [
        (0, "connect", False, True),
        (0, "reset", False, True),
        (0, "timeout_first_byte", False, True),
        (0, "status_5xx", False, True),
        (0, "busy", False, True),
        (1, "status_5xx", False, True),
        (2, "status_5xx", False, False),  # budget: 2 retries
        (0, "model_not_found", False, True),
        (0, "status_4xx", False, False),
        (0, "connect", True, False),  # a byte reached the client: never
        (0, "reset", True, False),
        (0, "mystery", False, False),
    ],
)
def test_retry_decision(attempt: int, failure: str, sent: bool, retry: bool) -> None:
    d = retry_decision(attempt, failure, sent, P)
    assert d.retry is retry and d.reason


# ---------------------------------------------------------------------------------------
# service-time statistics
# ---------------------------------------------------------------------------------------


def test_observe_converges_to_a_steady_rate() -> None:
    s: ServiceStats | None = None
    for _ in range(60):
        s = observe(
            s,
            Observation(True, 0, 400, 1000, 200, 4000, ttft_ms=1100, total_ms=5000),
            P,
        )
    assert s is not None
    assert s.count == 60 and s.failures == 0
    assert s.prompt_tps_ewma == pytest.approx(400)
    assert s.eval_tps_ewma == pytest.approx(50)
    assert s.total_ms_ewma == pytest.approx(5000)
    assert s.total_ms_var == pytest.approx(0, abs=1e-6)
    assert s.load_n == 0  # a hot request's tiny load_duration is not a load
    assert s.total_p == pytest.approx(5000)
    assert expected_service_s(s, req(est_tokens=400), False, P) == pytest.approx(1 + 200 / 50)


def test_observe_first_sample_is_taken_as_is_and_loads_only_when_loaded() -> None:
    s = observe(None, Observation(True, load_ms=12_000, total_ms=15_000), P)
    assert s.load_ms_ewma == 12_000 and s.load_n == 1
    assert s.service_ms_ewma == 3_000
    s = observe(s, Observation(True, load_ms=5, total_ms=3_000), P)
    assert s.load_n == 1 and s.load_ms_ewma == 12_000


def test_observe_tracks_failures() -> None:
    s = None
    for ok in (True, False, False, True):
        s = observe(s, Observation(ok, total_ms=100), P)
    assert s is not None and s.count == 4 and s.failures == 2 and 0 < s.failure_rate < 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1, max_value=1e6), min_size=1, max_size=200))
def test_observe_is_bounded(totals: list[float]) -> None:
    s = None
    for t in totals:
        s = observe(s, Observation(True, total_ms=t, completion_tokens=10, eval_ms=t / 2), P)
    assert s is not None
    lo, hi = min(totals), max(totals)
    assert lo - 1e-6 <= s.total_ms_ewma <= hi + 1e-6
    assert 0 <= s.total_p <= hi + 1e-6
    assert s.total_ms_var >= 0 and math.isfinite(s.total_ms_var)
    assert len(ServiceStats.__slots__) == len(ServiceStats().__slots__)  # fixed size


def test_p95_estimate_tracks_a_tail() -> None:
    s = None
    for i in range(2000):
        s = observe(s, Observation(True, total_ms=10_000.0 if i % 10 == 0 else 1_000.0), P)
    assert s is not None
    assert s.total_p > 1_500  # well above the median: it sees the 10 % tail
    assert s.total_p <= 10_000


# ---------------------------------------------------------------------------------------
# fallbacks, context protection, VRAM fallback
# ---------------------------------------------------------------------------------------


def test_fallback_chain() -> None:
    assert fallback_chain(
        "Llama3", ["llama3:latest", "qwen2.5:7b", "", "bad name!", "QWEN2.5:7b"]
    ) == (
        "llama3:latest",
        "qwen2.5:7b",
    )


def ctx_nodes() -> list[NodeSnapshot]:
    small = avail("llama3:8b", 5, family="llama")
    large = avail("llama3:70b", 40, family="llama")
    other = avail("qwen2.5:72b", 45, family="qwen2")
    return [
        node(
            "a",
            ram=192,
            models=(small, large, other),
            loaded_models=(
                loaded("llama3:8b", 6, ctx=8192),
                loaded("llama3:70b", 45, ctx=32768),
                loaded("qwen2.5:72b", 50, ctx=65536),
            ),
        )
    ]


@pytest.mark.parametrize(
    ("num_ctx", "est", "upgrade", "action", "model", "ctx"),
    [
        (None, 100, False, "keep", "llama3:8b", None),  # absent: Ollama keeps an auto runner
        (2048, 100, False, "set", "llama3:8b", 8192),  # smaller than resident: no reload
        (8192, 100, False, "keep", "llama3:8b", 8192),
        (16384, 100, True, "upgrade", "llama3:70b", 32768),  # same family, bigger window
        (16384, 100, False, "keep", "llama3:8b", 16384),  # not allowed: Ollama reloads
        (None, 20000, True, "upgrade", "llama3:70b", 32768),  # long prompt
        (50000, 100, True, "keep", "llama3:8b", 50000),  # no same-family model big enough
    ],
)
def test_protect_context(num_ctx, est, upgrade, action, model, ctx) -> None:
    d = protect_context("llama3:8b", num_ctx, est, ctx_nodes(), upgrade)
    assert (d.action, d.model, d.num_ctx) == (action, model, ctx), d.reason
    assert d.reason


def test_protect_context_untouched_when_not_resident_or_ambiguous() -> None:
    assert protect_context("llama3:8b", 4096, 10, [node()], True).action == "keep"
    two = [
        node("a", loaded_models=(loaded("llama3:8b", ctx=4096),)),
        node("b", loaded_models=(loaded("llama3:8b", ctx=8192),)),
    ]
    d = protect_context("llama3:8b", None, 10, two, False)
    assert d.action == "keep" and d.num_ctx is None


def fb_nodes() -> list[NodeSnapshot]:
    text_small = avail("llama3.2:3b", 2, family="llama", capabilities=("completion",))
    text_mid = avail("mistral:7b", 4.5, family="llama", capabilities=("completion",))
    qwen = avail("qwen2.5:7b", 4.7, family="qwen2", capabilities=("completion",))
    qwen14 = avail("qwen2.5:14b", 9, family="qwen2", capabilities=("completion",))
    vision = avail("llava:7b", 4.7, family="llama", capabilities=("completion", "vision"))
    emb = avail("nomic-embed-text:latest", 0.3, family="nomic-bert", capabilities=("embedding",))
    emb2 = avail("mxbai-embed-large:latest", 0.7, family="bert", capabilities=("embedding",))
    llama8 = avail("llama3.1:8b", 4.9, family="llama", capabilities=("completion",))
    everything = (text_small, text_mid, qwen, qwen14, vision, emb, emb2, llama8)
    return [
        node(
            "a",
            models=everything,
            loaded_models=(
                loaded("llama3.2:3b", 2.5),
                loaded("mistral:7b", 5),
                loaded("llava:7b", 5),
                loaded("nomic-embed-text:latest", 0.4),
            ),
        ),
        node("b", models=everything, loaded_models=(loaded("qwen2.5:14b", 10),)),
    ]


@pytest.mark.parametrize(
    ("model", "vision", "kind", "served"),
    [
        ("qwen2.5:7b", False, "text", "qwen2.5:14b"),  # same family first
        ("llama3.1:8b", False, "text", "mistral:7b"),  # same family, closest size
        ("phi3:mini", False, "text", "llama3.2:3b"),  # unknown model: same category
        ("mxbai-embed-large:latest", False, "embed", "nomic-embed-text:latest"),
        ("qwen2.5:7b", True, "text", "llava:7b"),  # vision requests only to vision models
        ("llama3.2:3b", False, "text", None),  # already loaded: nothing to do
    ],
)
def test_vram_fallback(model: str, vision: bool, kind: str, served: str | None) -> None:
    out = vram_fallback(model, fb_nodes(), vision, kind)
    if served is None:
        assert out is None
    else:
        assert out is not None and out[0] == served and model in out[1]


def test_vram_fallback_never_crosses_category() -> None:
    only_text = [
        node(
            "a",
            loaded_models=(loaded("llama3.2:3b", 2),),
            models=(avail("llama3.2:3b", 2, capabilities=("completion",)),),
        )
    ]
    assert vram_fallback("nomic-embed-text:latest", only_text, False, "embed") is None
    assert vram_fallback("llava:7b", only_text, True, "text") is None


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------

queue_st = st.builds(
    QueueSnapshot,
    pending=st.integers(0, 6),
    in_flight=st.integers(0, 6),
    slots=st.integers(1, 4),
)


@st.composite
def fleets(draw) -> tuple[list[NodeSnapshot], dict[tuple[str, str], QueueSnapshot]]:
    n = draw(st.integers(1, 5))
    nodes: list[NodeSnapshot] = []
    queues: dict[tuple[str, str], QueueSnapshot] = {}
    for i in range(n):
        nid = f"n{i}"
        ram = draw(st.sampled_from([8, 16, 24, 64, 192]))
        free = draw(st.floats(0, 1)) * ram
        size = draw(st.sampled_from([0.5, 2, 5, 9, 20, 40]))
        hot = draw(st.booleans())
        status = draw(st.sampled_from(["online", "online", "online", "degraded", "offline"]))
        has = draw(st.booleans()) or hot
        nodes.append(
            node(
                nid,
                hot=hot,
                ram=ram,
                free=free,
                models=(avail(size=size),) if has else (),
                status=status,
                num_parallel=draw(st.integers(1, 4)),
                reachable=draw(st.sampled_from([True, True, True, False])),
            )
        )
        if draw(st.booleans()):
            q = draw(queue_st)
            queues[(nid, M)] = q
    return nodes, queues


breaker_st = st.builds(
    BreakerState,
    state=st.sampled_from(["closed", "open", "half_open"]),
    consecutive_failures=st.integers(0, 5),
    trips=st.integers(0, 4),
    open_until=st.sampled_from([NOW - 5, NOW + 5]),
    probe_in_flight=st.booleans(),
    probe_deadline=st.sampled_from([NOW - 5, NOW + 5]),
)


@settings(max_examples=150, deadline=None)
@given(
    fleets(),
    st.floats(0, 0.999),
    st.floats(0, 60),
    st.dictionaries(st.sampled_from(["n0", "n1", "n2", f"n0:{M}"]), breaker_st, max_size=3),
    st.booleans(),
)
def test_choose_never_picks_ineligible_or_full_nodes(
    fleet, rand: float, waited: float, breakers, wait_for_better: bool
) -> None:
    nodes, queues = fleet
    policy = replace(P, wait_for_better=wait_for_better)
    ch = choose(req(est_tokens=300), nodes, queues, {}, breakers, NOW, rand, policy, waited)
    assert isinstance(ch, Choice)
    assert ch.action in {"dispatch", "wait", "reject"}
    elig = [s for s in ch.ranked if s.eligible]
    assert ch.ranked == tuple(sorted(ch.ranked, key=lambda s: not s.eligible))  # eligible first
    if ch.action == "dispatch":
        w = ch.winner
        assert w is not None and w.eligible and w.free_slot
        assert breaker_allows(breakers.get(w.node_id), NOW)
        assert breaker_allows(breakers.get(f"{w.node_id}:{M}"), NOW)
        assert next(n for n in nodes if n.node_id == w.node_id).status in ("online", "degraded")
        q = queues.get((w.node_id, M))
        if q is not None:
            assert q.in_flight < q.slots
    else:
        assert ch.node_id is None
        if ch.action == "wait":
            assert elig and waited < P.max_queue_wait_s
            if not wait_for_better:
                assert not any(s.free_slot for s in elig)
        if ch.action == "reject" and elig:
            assert waited >= P.max_queue_wait_s
            assert not any(s.free_slot for s in elig)
    json.dumps(ch.breakdown(), allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.booleans(),
    queue_st,
    st.integers(0, 5),
    st.integers(0, 5),
    st.floats(0.5, 60),
    st.sampled_from([0.5, 2, 5, 9, 20]),
)
def test_more_queue_never_raises_the_score(
    hot, q, more_pending, more_in_flight, free, size
) -> None:
    n = node(hot=hot, free=free, models=(avail(size=size),))
    base = scores([n], queues={("n1", M): q})["n1"]
    more = replace(q, pending=q.pending + more_pending, in_flight=q.in_flight + more_in_flight)
    after = scores([n], queues={("n1", M): more})["n1"]
    assert base.eligible and after.eligible
    assert after.total <= base.total + 1e-9


@settings(max_examples=200, deadline=None)
@given(queue_st, st.floats(0, 64), st.sampled_from([0.5, 2, 5, 9, 20]), st.integers(0, 9000))
def test_hot_never_scores_below_cold(q, free, size, est) -> None:
    """With the flat residency bonus. A backlog wears the bonus down (hot_backlog_s, the
    property below): a hot node with a long line may then score below a cold one, which
    is the point — another node's cold load relieves that line."""
    flat = replace(P, hot_backlog_s=0.0)
    m = avail(size=size)
    hot = node("n1", models=(m,), free=free, loaded_models=(loaded(size=size * 1.1),))
    cold = node("n1", models=(m,), free=free)
    r = req(est_tokens=est)
    sh = scores([hot], queues={("n1", M): q}, r=r, policy=flat)["n1"]
    sc = scores([cold], queues={("n1", M): q}, r=r, policy=flat)["n1"]
    assert sh.eligible
    if sc.eligible:
        assert sh.total >= sc.total


@settings(max_examples=200, deadline=None)
@given(queue_st, st.integers(0, 8), st.sampled_from([0.5, 2, 9, 20]))
def test_a_backlog_wears_the_residency_bonus_down_never_below_nothing(q, more, size) -> None:
    """hot_backlog_s: the hot node's bonus is within [0, hot_bonus], and a longer line
    never raises it."""
    m = avail(size=size)
    n = node("n1", models=(m,), loaded_models=(loaded(size=size * 1.1),))
    longer = replace(q, pending=q.pending + more)

    def bonus(qs: QueueSnapshot) -> float:
        t = scores([n], queues={("n1", M): qs})["n1"].factor("thermal")
        assert t is not None
        return t.contribution

    b, b_longer = bonus(q), bonus(longer)
    assert 0.0 <= b_longer <= b + 1e-9 <= P.hot_bonus + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.booleans(),
    st.floats(0, 64),
    st.floats(0, 64),
    st.sampled_from([0.5, 2, 5, 9, 20, 40]),
    st.booleans(),
    st.booleans(),
)
def test_more_free_memory_never_lowers_the_score(hot, f1, f2, size, gpu, neighbour) -> None:
    lo, hi = sorted((f1, f2))
    extra = (loaded("other:latest", 10, expires=NOW + 100),) if neighbour else ()

    def mk(free: float) -> NodeSnapshot:
        kw: dict[str, object] = {}
        if gpu:
            kw = {"vram_total": 48 * GB, "vram_available": int(free * 0.75 * GB)}
        lm = (loaded(size=size * 1.1),) if hot else ()
        return node(models=(avail(size=size),), free=free, ram=64, loaded_models=lm + extra, **kw)

    a, b = scores([mk(lo)])["n1"], scores([mk(hi)])["n1"]
    assert a.eligible == b.eligible
    if a.eligible:
        assert b.total >= a.total - 1e-9


def test_score_is_frozen_and_pure() -> None:
    n = node(hot=True)
    s1 = score_nodes(req(), [n], {}, {}, {}, NOW, P)
    s2 = score_nodes(req(), [n], {}, {}, {}, NOW, P)
    assert s1 == s2
    with pytest.raises(AttributeError):
        s1[0].total = 3  # type: ignore[misc]
    assert isinstance(s1[0], Score)


def test_never_waits_for_a_full_node_that_is_not_expected_sooner_than_a_free_hot_one() -> None:
    """The full node leads on points that are not time (a big machine for a large model, a
    cached prefix), but its queue makes it finish later than a free node with the model hot:
    dispatch to the free node instead of queueing."""
    big = avail(size=24)
    full = node("full", ram=128, free=60, models=(big,), loaded_models=(loaded(size=26),))
    free = node("free", ram=40, free=10, models=(big,), loaded_models=(loaded(size=26),))
    st = ServiceStats(
        count=20, service_ms_ewma=3000, eval_tps_ewma=100, eval_tps_n=20, completion_tokens_ewma=250
    )
    q = {("full", M): QueueSnapshot(0, 1, 1), ("free", M): QueueSnapshot(0, 0, 1)}
    stats = {("full", M): st, ("free", M): st}
    r = req(est_tokens=2000, cache_node="full", cached_tokens=1500)
    flat = replace(P, hot_backlog_s=0.0)  # the full residency bonus despite its line
    s = scores([full, free], queues=q, stats=stats, r=r, policy=flat)
    assert s["full"].total > s["free"].total  # it does lead on points ...
    wait_full, wait_free = s["full"].factor("wait"), s["free"].factor("wait")
    assert wait_full is not None and wait_free is not None
    assert wait_full.value > wait_free.value  # ... but is expected to finish later
    ch = pick([full, free], queues=q, stats=stats, r=r, policy=flat)
    assert ch.action == "dispatch" and ch.node_id == "free"
    ranked = tuple(sorted(s.values(), key=lambda x: -x.total))
    assert wait_targets(Choice("wait", None, ranked, "", wait_for="full"), flat) == ()


# -- _score_node: eligibility plus one function per factor (issue 14) -------------------


def test_score_node_is_eligibility_plus_one_small_function_per_factor() -> None:
    """``_score_node`` only combines: ``_eligibility`` decides, one small pure function per
    factor scores; none of them grows back into the old 255-line function."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parent.parent / "scoring.py").read_text())
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    parts = [
        "_eligibility",
        "_memory_factor",
        "_queue_factor",
        "_wait_factor",
        "_cache_factor",
        "_affinity_factor",
        "_availability_factor",
        "_context_factor",
    ]
    combiner = fns["_score_node"]
    called = {
        c.func.id
        for c in ast.walk(combiner)
        if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
    }
    assert set(parts) <= called
    assert combiner.end_lineno is not None and combiner.end_lineno - combiner.lineno < 50
    for name in parts:
        fn = fns[name]
        assert fn.end_lineno is not None and fn.end_lineno - fn.lineno < 70, name


def test_eligibility_returns_a_reason_or_the_facts() -> None:
    from scoring import _eligibility, _Facts

    q = QueueSnapshot(pending=1, in_flight=2, slots=2)
    n = node(hot=True)
    facts = _eligibility(RouteRequest(M), n, q, {}, NOW, P)
    assert isinstance(facts, _Facts)
    assert (facts.state, facts.outstanding, facts.slots, facts.resident) == ("hot", 3, 2, True)
    assert facts.thermal.name == "thermal" and facts.thermal.value == 1.0
    assert _eligibility(RouteRequest("nope"), n, q, {}, NOW, P) == "model 'nope' not on this node"
    assert _eligibility(RouteRequest(M, pinned_node="n9"), n, q, {}, NOW, P) == (
        "not the pinned node (n9)"
    )
    tripped = {"n1": BreakerState("open", 3, 1, NOW + 30)}
    assert _eligibility(RouteRequest(M), n, q, tripped, NOW, P) == (
        "circuit open (node) for 30s more"
    )
