"""What herd learns about agentless nodes (issue 15): slots from Ollama's own timings,
memory capacity from /api/ps, prompt-cache affinity. Pure functions first, then the router
learning a fake node's slots from real traffic and routing by them."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import ollama
import pytest

import scoring
from scoring import (
    AffinityEntry,
    AvailableModel,
    Factor,
    LoadedModel,
    NodeSnapshot,
    Policy,
    QueueSnapshot,
    RouteRequest,
    SlotBounds,
)
from tests.conftest import FakeFactory, RouterFactory
from tests.fake_ollama import FakeModel

P = Policy()
GB = 1_000_000_000
NOW = 1_790_000_000.0


def learn(b: SlotBounds | None, k: int, queue_ms: float, *, clean_k: int | None = None,
          work_ms: float = 2000.0, now: float = NOW) -> SlotBounds:
    return scoring.learn_slots(b, concurrency=k, concurrency_clean=k if clean_k is None
                               else clean_k, queue_ms=queue_ms, work_ms=work_ms, now=now,
                               policy=P)


# ---------------------------------------------------------------------- slots ----------


def test_hidden_queue_time_is_total_minus_ollamas_own_parts() -> None:
    assert scoring.hidden_queue_ms(5000, 0, 1000, 2500, hot=False) == 1500
    # a cold load is not queueing ...
    assert scoring.hidden_queue_ms(5000, 3000, 500, 1500, hot=False) == 0
    # ... but on a resident model "load" time is the scheduler's (or slot's) wait
    assert scoring.hidden_queue_ms(5000, 3000, 500, 1500, hot=True) == 3000
    assert scoring.hidden_queue_ms(0, 0, 10, 10, hot=True) is None


def test_no_queueing_at_k_in_flight_means_at_least_k_slots() -> None:
    b = learn(None, 1, 5.0)
    assert (b.lo, b.hi, b.clean) == (1, 0, 1)
    b = learn(b, 3, 10.0)
    assert (b.lo, b.hi) == (3, 0)
    # only 2 of the 3 still ran when it started: evidence for 2, not 3
    assert learn(None, 3, 10.0, clean_k=2).lo == 2
    # no upper bound yet: admit one more than seen, to find the bound under load (or
    # slot_probe_growth x as many, faster but riskier)
    assert scoring.learned_slots(b, NOW, P) == 4
    assert scoring.learned_slots(b, NOW, dataclasses.replace(P, slot_probe_growth=2.0)) == 6
    assert scoring.learned_slots(learn(None, 1, 5.0), NOW, P) == 2  # at least one more


def test_queueing_at_k_in_flight_means_fewer_than_k_slots() -> None:
    b = learn(learn(None, 2, 0.0), 3, 1800.0)
    assert (b.lo, b.hi, b.suspect, b.queued) == (2, 0, 3, 1)  # one is a suspicion
    b = learn(b, 3, 900.0)
    assert (b.lo, b.hi, b.suspect, b.queued) == (2, 3, 0, 2)  # two confirm it
    assert b.tight()
    assert scoring.learned_slots(b, NOW, P) == 2
    # a lone request that waited says nothing about slots (a load elsewhere, say)
    assert learn(None, 1, 5000.0) == SlotBounds()
    # between the thresholds: no evidence either way
    assert learn(b, 4, 100.0) == b
    # a wait that did not end as another request ended was not for a slot
    assert scoring.learn_slots(None, concurrency=3, concurrency_clean=3, queue_ms=4000.0,
                               work_ms=2000.0, now=NOW, policy=P,
                               started_as_one_ended=False) == SlotBounds()


def test_newer_evidence_replaces_a_contradicted_bound() -> None:
    b = learn(learn(None, 4, 0.0), 3, 2000.0)  # ran 4 at once, then queued at 3 ...
    assert (b.lo, b.hi) == (4, 0)  # ... once: noise (a scheduler wait, say)
    assert learn(b, 4, 0.0).suspect == 0  # running 4 again clears the suspicion
    b = learn(b, 3, 2000.0)  # ... twice: the node changed
    assert (b.lo, b.hi) == (2, 3)
    b = learn(b, 5, 0.0)  # then 5 ran at once: the node was given more slots
    assert (b.lo, b.hi) == (5, 0)


def test_an_old_upper_bound_is_probed_again() -> None:
    b = learn(learn(learn(None, 1, 0.0), 2, 3000.0), 2, 3000.0)
    assert scoring.learned_slots(b, NOW + 10, P) == 1
    assert scoring.learned_slots(b, NOW + P.slot_bound_ttl_s + 1, P) == 2


def test_unknown_slots_probe_two_unless_disabled() -> None:
    assert scoring.learned_slots(None, NOW, P) == 2
    assert scoring.learned_slots(None, NOW, dataclasses.replace(P, slot_probe=False)) is None


def test_facts_override_what_was_learned() -> None:
    assert scoring.slots_for(None, None, P, learned=3) == 3
    assert scoring.slots_for(4, None, P, learned=3) == 4  # the agent reports it
    assert scoring.slots_for(4, 2, P, learned=3) == 2  # --slots
    assert scoring.slots_for(None, None, P, learned=None) == P.default_slots


def test_node_bounds_come_from_the_best_evidenced_model() -> None:
    loose = learn(None, 2, 0.0)
    tight = learn(learn(learn(None, 3, 0.0), 4, 2500.0), 4, 2500.0)
    assert scoring.node_slot_bounds([loose, loose, tight]) == tight
    assert scoring.node_slot_bounds([]) == SlotBounds()


def test_a_model_seen_running_k_at_once_lifts_the_nodes_lower_bound() -> None:
    many = learn(learn(None, 1, 0.0), 1, 0.0)  # best evidenced, but never ran 2 at once
    four = learn(None, 4, 0.0)
    node = scoring.node_slot_bounds([many, four])
    assert (node.lo, node.n) == (4, 2)
    # a rarely used model borrows the node's lower bound while its own evidence allows it
    rare = learn(None, 1, 0.0)
    assert scoring.lift_slot_bounds(rare, node).lo == 4
    assert scoring.learned_slots(scoring.lift_slot_bounds(rare, node), NOW, P) == 5
    # ... but its own upper bound wins: it queued at 2, so it has 1 (a big model, say)
    capped = learn(learn(learn(None, 1, 0.0), 2, 3000.0), 2, 3000.0)
    assert capped.hi == 2
    assert scoring.lift_slot_bounds(capped, node) == capped
    # a best-evidenced model that queued below the others' concurrency keeps its bound
    tight = learn(learn(learn(None, 1, 0.0), 2, 3000.0), 2, 3000.0)
    assert scoring.node_slot_bounds([tight, four]).lo == 1


# ---------------------------------------------------------------------- memory ---------


def lm(name: str, size_gb: float, expires_in: float) -> LoadedModel:
    return LoadedModel(name, int(size_gb * GB), int(size_gb * GB), 4096, NOW + expires_in)


def test_memory_lower_bound_is_the_largest_resident_set() -> None:
    b = scoring.learn_memory(None, {}, {"a": lm("a", 4, 300)}, NOW, P)
    b = scoring.learn_memory(b, {"a": lm("a", 4, 300)},
                             {"a": lm("a", 4, 300), "b": lm("b", 6, 300)}, NOW + 5, P)
    assert b.fits == 10 * GB and b.evicts_at == 0 and b.polls == 2
    assert b.capacity(NOW + 5, P) == (10 * GB, "learned_fit")
    # a model whose keep-alive ran out is no eviction
    b2 = scoring.learn_memory(b, {"a": lm("a", 4, -1), "b": lm("b", 6, 300)},
                              {"b": lm("b", 6, 300), "c": lm("c", 5, 300)}, NOW + 10, P)
    assert b2.evictions == 0 and b2.evicts_at == 0


def test_a_model_vanishing_before_its_keep_alive_bounds_memory() -> None:
    before = {"a": lm("a", 4, 200), "b": lm("b", 6, 250)}
    b = scoring.learn_memory(None, {}, before, NOW, P)
    after = {"b": lm("b", 6, 245), "c": lm("c", 8, 300)}  # c came, a went 200 s early
    b = scoring.learn_memory(b, before, after, NOW + 5, P)
    assert b.evictions == 1 and "a" in b.vanished
    assert b.evicts_at == 18 * GB  # a + b + c did not fit
    assert b.fits == 14 * GB
    assert b.capacity(NOW + 5, P) == (14 * GB, "learned")
    assert b.to_dict(NOW + 5, P)["tight"] is False
    assert b.capacity(NOW + 5 + P.memory_bound_ttl_s + 1, P)[1] == "learned_fit"


def node(nid: str, loaded: dict[str, LoadedModel], cap_gb: float, how: str) -> NodeSnapshot:
    used = sum(m.size for m in loaded.values())
    avail = {n: AvailableModel(n, int(4 * GB)) for n in ("a", "b", "c", "new")}
    return NodeSnapshot(nid, "online", int(cap_gb * GB), int(cap_gb * GB) - used,
                        loaded=loaded, available=avail, memory_learned=how)


def test_learned_memory_steers_a_cold_load_away_from_an_eviction() -> None:
    req = RouteRequest("new", est_tokens=100)
    full = node("full", {"a": lm("a", 6, 280)}, 8, "learned")  # loading evicts hot "a"
    roomy = node("roomy", {"b": lm("b", 6, 280)}, 20, "learned")
    queues = {("full", "new"): QueueSnapshot(slots=2), ("roomy", "new"): QueueSnapshot(slots=2)}
    choice = scoring.choose(req, [full, roomy], queues, {}, {}, NOW, 0.0, P)
    assert choice.node_id == "roomy"
    w = choice.ranked[1]
    mem = w.factor("memory")
    assert mem is not None and "evicts a" in mem.reason and mem.contribution < 0


def test_a_load_past_a_learned_lower_bound_is_unknown_or_priced_as_a_maybe_eviction() -> None:
    """"The most seen at once" does not say what else fits: by default a load past it is
    as unknown as no memory figure at all, and predicts no eviction. With
    ``uncertain_evict_p`` it costs that share of the eviction (the rest as unknown memory),
    and with ``predict_uncertain_evictions`` its would-be victims stop counting as hot."""
    req = RouteRequest("new", est_tokens=100)
    queues = {("n", "new"): QueueSnapshot(slots=1)}

    def memory(how: str, policy: scoring.Policy = P) -> scoring.Factor:
        snap = node("n", {"a": lm("a", 6, 280)}, 8, how)
        s = scoring.score_nodes(req, [snap], queues, {}, {}, NOW, policy)
        assert s[0].eligible
        f = s[0].factor("memory")
        assert f is not None
        return f

    fit, bounded = memory("learned_fit"), memory("learned")
    assert bounded.contribution < 0 and "evicts a" in bounded.reason
    assert fit.contribution == 0.5 * P.memory_weight and "lower bound" in fit.reason
    # only a bounded memory predicts which models a load evicts (the router drops them)
    assert scoring.predicted_evictions(
        req, node("n", {"a": lm("a", 6, 280)}, 8, "learned"), queues, P) == ("a",)
    assert scoring.predicted_evictions(
        req, node("n", {"a": lm("a", 6, 280)}, 8, "learned_fit"), queues, P) == ()
    assert scoring.predicted_evictions(
        req, node("n", {"a": lm("a", 2, 280)}, 20, "learned"), queues, P) == ()
    # the knobs on: priced as a maybe-eviction, and predicted
    on = dataclasses.replace(P, uncertain_evict_p=0.5, predict_uncertain_evictions=True)
    priced = memory("learned_fit", on)
    assert priced.contribution == pytest.approx(
        0.5 * 0.5 * P.memory_weight + 0.5 * bounded.contribution)
    assert "evicts a" in priced.reason
    assert scoring.predicted_evictions(
        req, node("n", {"a": lm("a", 6, 280)}, 8, "learned_fit"), queues, on) == ("a",)
    # a busy model is not spared: Ollama drains it (no new requests for it) and unloads it
    busy = {**queues, ("n", "a"): QueueSnapshot(in_flight=1)}
    assert scoring.predicted_evictions(
        req, node("n", {"a": lm("a", 6, 280)}, 8, "learned"), busy, P) == ("a",)
    # idle models go first; a busy one only when they are not enough
    two = node("n", {"a": lm("a", 3, 280), "b": lm("b", 3, 100)}, 8, "learned")
    assert scoring.predicted_evictions(req, two, busy, P) == ("b",)


# ---------------------------------------------------------------------- affinity -------


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_a_continued_chat_finds_the_key_its_previous_turn_stored() -> None:
    _, stored = scoring.prefix_keys("m:latest", chat("hi"), None, None, P)
    keys, stored2 = scoring.prefix_keys("m:latest", chat("hi", "hello!", "more"), None, None, P)
    assert stored is not None and stored in keys and stored2 not in keys
    # longest prefix first
    k_prev, _ = scoring.prefix_keys("m:latest", chat("hi", "hello!"), None, None, P)
    assert keys[0] == scoring.prefix_keys("m:latest", chat("hi", "hello!"), None, None, P)[1]
    assert k_prev[-1] == keys[-1]
    # another model or another conversation does not match
    other, _ = scoring.prefix_keys("x:latest", chat("hi", "hello!", "more"), None, None, P)
    assert stored not in other
    other2, _ = scoring.prefix_keys("m:latest", chat("yo", "hello!", "more"), None, None, P)
    assert stored not in other2


def test_a_longer_raw_prompt_finds_its_earlier_prefix() -> None:
    base = "word " * 200  # 1000 chars: 3 whole blocks
    _, stored = scoring.prefix_keys("m:latest", None, base, None, P)
    keys, _ = scoring.prefix_keys("m:latest", None, base + "and then some more " * 40, None, P)
    assert stored in keys
    assert scoring.prefix_keys("m:latest", None, "short", None, P) == ([], None)
    _, sys_key = scoring.prefix_keys("m:latest", None, base, "be brief", P)
    assert sys_key != stored


def test_affinity_table_lookup_and_pruning() -> None:
    table = {"k1": AffinityEntry("a", NOW - 10, 500), "k2": AffinityEntry("b", NOW - 5000, 9)}
    assert scoring.affinity_lookup(["zz", "k1"], table, NOW, P) == table["k1"]
    assert scoring.affinity_lookup(["k2"], table, NOW, P) is None  # stale
    assert scoring.affinity_evictions(table, NOW, P) == ["k2"]
    small = dataclasses.replace(P, affinity_max_entries=2)
    big = {f"k{i}": AffinityEntry("a", NOW - 10 + i, 1) for i in range(5)}
    assert scoring.affinity_evictions(big, NOW, small) == ["k0", "k1", "k2"]


def two_hot_nodes(slots: int = 2) -> tuple[list[NodeSnapshot], dict[tuple[str, str],
                                                                  QueueSnapshot]]:
    snaps = [
        NodeSnapshot(n, "online", 0, 0, loaded={"m:latest": LoadedModel(
            "m:latest", 4 * GB, 4 * GB, 8192, NOW + 300)},
            available={"m:latest": AvailableModel("m:latest", 4 * GB)})
        for n in ("a", "b")
    ]
    return snaps, {(n, "m:latest"): QueueSnapshot(slots=slots) for n in ("a", "b")}


def test_cache_affinity_wins_a_tie_but_not_a_long_queue() -> None:
    snaps, queues = two_hot_nodes()
    req = RouteRequest("m:latest", est_tokens=3000, cache_node="b", cached_tokens=2800)
    for rand in (0.0, 0.99):
        choice = scoring.choose(req, snaps, queues, {}, {}, NOW, rand, P)
        assert choice.node_id == "b"
        cache = choice.ranked[0].factor("cache")
        assert cache is not None and cache.value > 0 and "prefill saved" in cache.reason
    # b has a deep queue: clearly worse, the request goes to a
    queues[("b", "m:latest")] = QueueSnapshot(pending=6, in_flight=2, slots=2)
    assert scoring.choose(req, snaps, queues, {}, {}, NOW, 0.0, P).node_id == "a"
    # the cache is gone with the model: no pull
    snaps[1] = dataclasses.replace(snaps[1], loaded={})
    queues[("b", "m:latest")] = QueueSnapshot(slots=2)
    s = scoring.score_nodes(req, snaps, queues, {}, {}, NOW, P)
    b = next(x for x in s if x.node_id == "b")
    cache = b.factor("cache")
    assert cache is not None and cache.contribution == 0


# ---------------------------------------------------------------------- router ---------


SLOW = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")


async def test_router_learns_slots_from_timings_and_routes_by_them(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Two agentless nodes, the same speed: `big` has 4 slots, `small` 1. herd is told
    neither; after a few bursts it knows both, admits 4 on big and 1 on small, and so sends
    big the larger share of a burst without queueing anything inside `small`."""
    big = await make_fake([SLOW], num_parallel=4, tokens_per_s=40, response_tokens=12,
                          load_delay_s=0.0)
    small = await make_fake([SLOW], num_parallel=1, tokens_per_s=40, response_tokens=12,
                            load_delay_s=0.0)
    r = await make_router([big.url, small.url])
    await r.wait_ready(nodes=2)
    ids = {n.url: n.node_id for n in r.router.fleet.nodes.values()}
    bid, sid = ids[big.url.rstrip("/")], ids[small.url.rstrip("/")]
    client = ollama.AsyncClient(host=r.url)

    async def burst(n: int) -> list[str]:
        async def one(i: int) -> str:
            raw = await client._client.post(
                "/api/generate", json={"model": "llama3.2:3b", "prompt": f"q{i}",
                                       "stream": False})
            assert raw.status_code == 200, raw.text
            return raw.headers["x-herd-node"]
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    try:
        await burst(2)  # both models become resident
        for _ in range(6):
            await burst(6)
        model = "llama3.2:3b"
        assert r.router.learner.learned_slots(sid, model) == 1
        assert (r.router.learner.learned_slots(bid, model) or 0) >= 4
        assert r.router.admission.queue_for(bid, model, "text").slots >= 4
        assert r.router.admission.queue_for(sid, model, "text").slots == 1
        small.reset_stats()
        served = await burst(6)
        assert served.count(bid) >= 4, served
        assert small.max_present_seen <= 1  # none waited inside it
        status = r.router.fleet.fleet_status(r.router.started_at + 1)
        learned = {n["node_id"]: n["learned"] for n in status["nodes"]}
        assert learned[sid]["slots"]["source"] == "learned"
        assert learned[sid]["slots"]["tight"] is True
        assert learned[sid]["models"][model]["slots"]["estimate"] == 1
        assert learned[bid]["models"][model]["samples"] > 0
        assert learned[bid]["memory"]["fits_bytes"] >= SLOW.size  # seen in its /api/ps
        assert learned[bid]["models"][model]["answer_tokens"] == 12
        assert learned[bid]["decode_slowdown"]["basis"] in ("learned", "prior")
        assert learned[bid]["decode_slowdown"]["per_stream"] >= 0
    finally:
        await client._client.aclose()


def test_keep_alive_is_learned_and_scales_what_an_eviction_costs() -> None:
    b = scoring.learn_memory(None, {}, {"a": lm("a", 4, 58.0)}, NOW, P)
    b = scoring.learn_memory(b, {}, {"a": lm("a", 4, 60.0), "z": lm("z", 1, 1e9)}, NOW, P)
    assert b.keep_alive_s == 60.0  # "forever" (keep_alive -1) is not a keep-alive
    req = RouteRequest("new", est_tokens=100)
    snap = node("n", {"a": lm("a", 6, 50)}, 8, "learned")  # a used 10 s ago
    cost_default = scoring.score_nodes(req, [snap], {}, {}, {}, NOW, P)[0].factor("memory")
    learned = dataclasses.replace(snap, keep_alive_s=60.0)
    cost_learned = scoring.score_nodes(req, [learned], {}, {}, {}, NOW, P)[0].factor("memory")
    assert cost_default is not None and cost_learned is not None
    # with a 60 s keep-alive, a model used 10 s ago is as good as just used
    assert cost_learned.contribution < cost_default.contribution < 0


def test_evicting_the_only_copy_of_a_model_costs_more_than_a_spare_one() -> None:
    """A victim loaded on another node too costs half; one no other node has, double."""
    req = RouteRequest("new", est_tokens=100)
    here = node("here", {"a": lm("a", 6, 280)}, 8, "learned")
    other_hot = node("o", {"a": lm("a", 6, 280)}, 40, "learned")
    mem = [
        scoring.score_nodes(req, nodes, {}, {}, {}, NOW, P)
        for nodes in ([here], [here, other_hot])
    ]
    alone = next(s for s in mem[0] if s.node_id == "here").factor("memory")
    spare = next(s for s in mem[1] if s.node_id == "here").factor("memory")
    assert alone is not None and spare is not None
    assert alone.contribution < spare.contribution < 0
    spread = scoring.model_spread([here, other_hot], NOW)
    assert spread["a"] == (2, 2) and spread["new"] == (0, 2)


def test_an_eviction_with_memory_to_spare_teaches_the_model_count_cap() -> None:
    three = {"a": lm("a", 2, 200), "b": lm("b", 2, 250), "c": lm("c", 2, 280)}
    b = scoring.learn_memory(None, {}, {"x": lm("x", 20, 100)}, NOW, P)  # 20 GB fitted once
    b = scoring.learn_memory(b, {"x": lm("x", 20, 100)}, three, NOW + 150, P)  # x expired
    assert b.evictions == 0 and b.max_models == 3
    after = {"b": lm("b", 2, 245), "c": lm("c", 2, 275), "d": lm("d", 2, 300)}
    b = scoring.learn_memory(b, three, after, NOW + 155, P)  # a evicted, 8 GB < 20 GB
    assert b.model_cap == 3 and b.evicts_at == 0 and b.evictions == 1
    assert b.to_dict(NOW, P)["max_loaded_models"] == 3
    # the count is full: a fourth model evicts even with memory free, and the router is told
    req = RouteRequest("new", est_tokens=100)
    snap = dataclasses.replace(node("n", after, 20, "learned"), max_loaded=3)
    mem = scoring.score_nodes(req, [snap], {}, {}, {}, NOW + 156, P)[0].factor("memory")
    assert mem is not None and mem.contribution < 0 and "3 models loaded" in mem.reason
    assert scoring.predicted_evictions(req, snap, {}, P) == ("b",)
    # four resident at once later: the cap was wrong
    four = {**after, "e": lm("e", 1, 300)}
    assert scoring.learn_memory(b, after, four, NOW + 160, P).model_cap == 0



# ------------------------------------------------------------ stream slowdown ----------


def decode_obs(streams: int, c: float, tokens: int = 100, solo_tps: float = 50.0
               ) -> scoring.Observation:
    """A request that decoded beside ``streams`` others on a node where each extra stream
    slows decoding by ``c``."""
    eval_ms = tokens / solo_tps * (1.0 + c * streams) * 1000.0
    return scoring.Observation(ok=True, completion_tokens=tokens, eval_ms=eval_ms,
                               total_ms=eval_ms, streams=streams)


def test_slowdown_per_stream_is_learned_from_decode_speed_vs_streams() -> None:
    st: scoring.ServiceStats | None = None
    for i in range(40):
        st = scoring.observe(st, decode_obs(i % 4, 0.6), P)
    c, learned = scoring.stream_slowdown("a", {("a", "m:latest"): st}, P)  # type: ignore[dict-item]
    assert learned and abs(c - 0.6) < 0.05
    # another node, or too little evidence (streams never varied): the prior
    assert scoring.stream_slowdown("b", {("a", "m:latest"): st}, P) == (P.busy_slowdown, False)  # type: ignore[dict-item]
    flat: scoring.ServiceStats | None = None
    for _ in range(40):
        flat = scoring.observe(flat, decode_obs(2, 0.6), P)
    assert scoring.stream_slowdown("a", {("a", "m:latest"): flat}, P) == (P.busy_slowdown, False)  # type: ignore[dict-item]
    # unknown stream counts teach nothing
    blind = scoring.observe(None, dataclasses.replace(decode_obs(3, 0.6), streams=None), P)
    assert blind.conc_n == 0 and blind.eval_tps_n == 1


def test_a_learned_slowdown_makes_a_busy_node_expect_its_real_time() -> None:
    """Node a decodes 3.5x as fast solo but each extra stream costs 0.8, and it was measured
    beside 1 stream on average: with 3 other streams on it now, an idle b finishes sooner.
    The average speed times the prior slowdown (0.15 a stream) would pick a."""
    snaps, queues = two_hot_nodes(slots=4)
    queues[("a", "m:latest")] = QueueSnapshot(in_flight=3, slots=4)
    fast: scoring.ServiceStats | None = None
    slow: scoring.ServiceStats | None = None
    for i in range(42):
        fast = scoring.observe(fast, decode_obs(i % 3, 0.8, solo_tps=100.0), P)
        slow = scoring.observe(slow, decode_obs(0, 0.8, solo_tps=28.0), P)
    assert fast is not None and slow is not None
    req = RouteRequest("m:latest", est_tokens=100)
    stats = {("a", "m:latest"): fast, ("b", "m:latest"): slow}
    own = dataclasses.replace(P, impact_weight=0.0)  # the request's own time alone
    choice = scoring.choose(req, snaps, queues, stats, {}, NOW, 0.0, own)
    assert choice.node_id == "b"
    wait_a = next(s for s in choice.ranked if s.node_id == "a").factor("wait")
    assert wait_a is not None
    # (100 tokens at 100 tok/s solo + prefill) x (1 + 0.8 x 3) = ~3.2 s
    assert 3.0 < wait_a.value < 3.5
    # without the stream counts, herd only has the average speed and the prior
    blind = {k: dataclasses.replace(v, conc_n=0) for k, v in stats.items()}
    assert scoring.choose(req, snaps, queues, blind, {}, NOW, 0.0, own).node_id == "a"


async def test_router_feeds_the_streams_in_flight_into_what_it_learns(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Each answer is read against the other requests herd had on that node at dispatch:
    a burst of 3 after a lone request teaches decode samples beside different stream counts."""
    fake = await make_fake([SLOW], num_parallel=4, tokens_per_s=40, response_tokens=12,
                           load_delay_s=0.0)
    r = await make_router([fake.url])
    await r.wait_ready(nodes=1)
    (nid,) = [n.node_id for n in r.router.fleet.nodes.values()]
    client = ollama.AsyncClient(host=r.url)
    try:
        await client.generate(model="llama3.2:3b", prompt="warm")
        await asyncio.gather(*(client.generate(model="llama3.2:3b", prompt=f"q{i}")
                               for i in range(3)))
        st = r.router.fleet.stats[(nid, "llama3.2:3b")]
        assert st.conc_n == 4
        assert st.conc_kk - st.conc_k**2 > 0  # the stream counts differed
        assert 0.0 < st.conc_k < 2.0
    finally:
        await client._client.aclose()


# ---------------------------------------------------------------- estimates -------------


def test_service_time_excludes_the_time_queued_inside_ollama() -> None:
    """A request that waited 6 s inside Ollama for a slot, then ran 2 s: the next one queued
    behind it waits for ~2 s of work, not 8 (counting Ollama's queue in the service time
    made every queue look deeper the longer it was)."""
    queued = scoring.Observation(ok=True, prompt_tokens=100, prompt_eval_ms=500.0,
                                 completion_tokens=100, eval_ms=1500.0, total_ms=8000.0)
    st = scoring.observe(None, queued, P)
    assert st.service_ms_ewma == 2000.0
    assert st.total_ms_ewma == 8000.0  # the client's latency is still what it was
    # a proxy that hides Ollama's timings: only herd's own clock is left
    blind = scoring.observe(None, scoring.Observation(ok=True, total_ms=8000.0), P)
    assert blind.service_ms_ewma == 8000.0


def test_answer_length_comes_from_the_whole_fleet_and_the_clients_cap() -> None:
    """A node that never served the model expects the fleet's answer length (not the
    250-token prior), and a client's num_predict caps it."""
    obs = scoring.Observation(ok=True, completion_tokens=60, eval_ms=1200.0, total_ms=1300.0)
    st = scoring.observe(None, obs, P)
    stats = {("a", "m:latest"): st}
    req = RouteRequest("m:latest", est_tokens=100)
    assert scoring.with_completion_estimate(req, stats).completion_tokens == 60.0
    assert scoring.with_completion_estimate(
        dataclasses.replace(req, max_tokens=20), stats).completion_tokens == 20.0
    # nothing known: unchanged (the prior applies), even with a cap
    assert scoring.with_completion_estimate(dataclasses.replace(req, model="x"), stats) \
        .completion_tokens == 0.0
    # node b has no history: 60 tokens at b's prior speed, not the 250-token default
    lone = scoring.expected_service_s(None, dataclasses.replace(req, completion_tokens=60.0),
                                      False, P, model_bytes=2 * GB)
    prior = scoring.expected_service_s(None, req, False, P, model_bytes=2 * GB)
    assert prior / lone > 3.5
    bare = dataclasses.replace(req, est_tokens=0)  # decode only
    capped = scoring.expected_service_s(st, dataclasses.replace(bare, max_tokens=6), False, P)
    assert capped == scoring.expected_service_s(st, bare, False, P) / 10


def test_a_load_into_free_memory_can_beat_a_busy_hot_node_with_fit_credit() -> None:
    """Node "hot" has the model loaded, one slot and a queue; node "roomy" has the room to
    load it without evicting anything. Without credit the 50-point residency bonus keeps
    every request on "hot" (lock-in); with fit_load_credit a free load competes on time.
    A load that would evict a model earns no credit."""
    req = RouteRequest("new", est_tokens=100)
    hot = node("hot", {"new": lm("new", 4, 280)}, 8, "learned")
    roomy = node("roomy", {}, 20, "learned")
    queues = {("hot", "new"): QueueSnapshot(in_flight=1, slots=1),
              ("roomy", "new"): QueueSnapshot(slots=2)}
    locked = scoring.choose(req, [hot, roomy], queues, {}, {}, NOW, 0.0, P)
    assert (locked.action, locked.wait_for) == ("wait", "hot")
    credit = dataclasses.replace(P, fit_load_credit=0.8)
    choice = scoring.choose(req, [hot, roomy], queues, {}, {}, NOW, 0.0, credit)
    assert choice.node_id == "roomy"
    thermal = choice.ranked[0].factor("thermal")
    assert thermal is not None and "evicts nothing" in thermal.reason
    tight = node("roomy", {"a": lm("a", 6, 280)}, 8, "learned")  # the load evicts "a"
    choice = scoring.choose(req, [hot, tight], queues, {}, {}, NOW, 0.0, credit)
    tight_score = next(s for s in choice.ranked if s.node_id == "roomy")
    thermal = tight_score.factor("thermal")
    assert thermal is not None and "evicts nothing" not in thermal.reason


def test_the_clients_token_cap_is_read_in_every_dialect() -> None:
    import herd

    cases: list[tuple[dict[str, object], int | None]] = [
        ({"options": {"num_predict": 64}}, 64),
        ({"options": {"num_predict": -1}}, None),  # -1: no cap; -2: fill the context
        ({"options": {"num_predict": -2}}, None),
        ({"options": {"num_predict": True}}, None),
        ({"max_tokens": 300}, 300),
        ({"max_completion_tokens": 128, "max_tokens": 512}, 128),
        ({"max_output_tokens": 40}, 40),
        ({"max_tokens": "100"}, None),
        ({}, None),
        ({"options": "x"}, None),
    ]
    for body, want in cases:
        assert herd.requested_max_tokens(body) == want, body


def test_a_probe_slot_counts_the_risk_of_queueing_inside_ollama() -> None:
    """Node a has one request running and a second slot herd only admits to find out
    whether it exists (nothing ran two at once there yet); node b is idle. The probe's
    expected time carries half the rest of the running request, so a tie goes to b; a
    second slot that was seen (or told) carries nothing."""
    snaps, _ = two_hot_nodes()
    probe = {("a", "m:latest"): QueueSnapshot(in_flight=1, slots=2, sure=1),
             ("b", "m:latest"): QueueSnapshot(slots=2, sure=1)}
    req = RouteRequest("m:latest", est_tokens=100)
    choice = scoring.choose(req, snaps, probe, {}, {}, NOW, 0.0, P)
    assert choice.node_id == "b"
    a = next(s for s in choice.ranked if s.node_id == "a")
    wait_a = a.factor("wait")
    assert wait_a is not None and "probe" in wait_a.reason and "0.0s queue" not in wait_a.reason
    seen = {**probe, ("a", "m:latest"): QueueSnapshot(in_flight=1, slots=2, sure=2)}
    a2 = next(s for s in scoring.score_nodes(req, snaps, seen, {}, {}, NOW, P)
              if s.node_id == "a")
    w2 = a2.factor("wait")
    assert w2 is not None and "probe" not in w2.reason and "0.0s queue" in w2.reason
    assert a2.total > a.total
    assert scoring.sure_slots(None) == 1
    assert scoring.sure_slots(SlotBounds(lo=3, clean=2)) == 3


def test_a_probe_behind_a_long_running_request_risks_the_rest_of_it() -> None:
    """Probing a third slot beside two 20 s answers that started 4 s ago: if the node has
    only the two slots, the probe waits ~16 s for the older one, so its risk is priced
    from that, not from a share of a typical answer."""
    q = QueueSnapshot(in_flight=2, slots=3, sure=2, oldest_at=NOW - 4.0)
    wait, _stalled, probe = scoring._queue_wait_s(q, 2, 3, 20.0, NOW, P)
    assert probe and wait == pytest.approx(P.probe_risk * 16.0)
    overdue = dataclasses.replace(q, oldest_at=NOW - 30.0)  # past its time: a share
    wait, _stalled, probe = scoring._queue_wait_s(overdue, 2, 3, 20.0, NOW, P)
    assert probe and wait == pytest.approx(P.probe_risk * 20.0 / 3)


def test_the_model_count_cap_counts_loads_in_flight() -> None:
    """With Ollama's cap of 3 models, a node holding two and loading a third is full: a
    fourth model evicts one (it earns no fit credit and its victims are predicted)."""
    req = RouteRequest("new", est_tokens=100)
    snap = dataclasses.replace(
        node("n", {"a": lm("a", 2, 280), "b": lm("b", 2, 290)}, 64, "learned"),
        loading={"c": NOW - 1.0}, max_loaded=3)
    queues = {("n", "new"): QueueSnapshot(slots=1)}
    assert scoring.resident_count(snap, "new") == 3
    assert scoring.resident_count(snap, "a") == 2
    assert scoring.predicted_evictions(req, snap, queues, P) == ("a",)
    s = scoring.score_nodes(req, [snap], queues, {}, {}, NOW,
                            dataclasses.replace(P, fit_load_credit=0.8))[0]
    mem = s.factor("memory")
    assert mem is not None and "3 models loaded" in mem.reason and mem.contribution < 0
    thermal = s.factor("thermal")
    assert thermal is not None and "evicts nothing" not in thermal.reason


async def test_an_agentless_node_is_assumed_to_hold_ollamas_default_three_models(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Nobody reports the node's OLLAMA_MAX_LOADED_MODELS: herd assumes Ollama's default (3)
    while it has seen no more than that loaded at once, and drops the guess once it sees a
    fourth (the node was set higher)."""
    models = [FakeModel(name=f"m{i}:1b", size=500_000_000, family="llama") for i in range(4)]
    fake = await make_fake(models, max_loaded_models=5, tokens_per_s=200, response_tokens=4,
                           load_delay_s=0.0)
    r = await make_router([fake.url])
    await r.wait_ready(nodes=1)
    client = ollama.AsyncClient(host=r.url)
    fleet = r.router.fleet
    node_obj = next(iter(fleet.nodes.values()))
    try:
        assert fleet._snapshots(time.time())[0].max_loaded == 3
        for m in models:
            await client.generate(model=m.name, prompt="hi", keep_alive="5m")
        for _ in range(50):  # the next poll of /api/ps shows all four
            await fleet.refresh_node(node_obj)
            r.router.learner.learn_memory(node_obj, time.time())
            if len(node_obj.snapshot(time.time()).loaded) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(node_obj.snapshot(time.time()).loaded) == 4
        assert fleet._snapshots(time.time())[0].max_loaded == 0
    finally:
        await client._client.aclose()


def test_a_queue_whose_slots_stopped_freeing_expects_to_wait_that_long_again() -> None:
    """Node a's one slot has not freed for 12 s where requests take ~1 s (stuck behind a
    load or a drain inside Ollama): a request queued there expects >= 12 s, so an idle b
    with the model hot wins; a slot that freed a moment ago expects the usual ~1 s."""
    snaps, _ = two_hot_nodes()
    obs = scoring.Observation(ok=True, completion_tokens=50, eval_ms=900.0, total_ms=1000.0)
    st = scoring.observe(None, obs, P)
    stats = {("a", "m:latest"): st, ("b", "m:latest"): st}
    req = RouteRequest("m:latest", est_tokens=10)
    stuck = {("a", "m:latest"): QueueSnapshot(in_flight=1, slots=1, progress_at=NOW - 12.0),
             ("b", "m:latest"): QueueSnapshot(in_flight=1, slots=1, progress_at=NOW - 0.2)}
    ranked = scoring.score_nodes(req, snaps, stuck, stats, {}, NOW, P)
    wait = {s.node_id: s.factor("wait") for s in ranked}
    wa, wb = wait["a"], wait["b"]
    assert wa is not None and wb is not None
    assert wa.value >= 12.0 and "no slot freed for 12" in wa.reason
    assert wb.value < 3.0 and "no slot freed" not in wb.reason
    assert ranked[0].node_id == "b"
    off = dataclasses.replace(P, stall_aware=False)
    wa_off = next(s for s in scoring.score_nodes(req, snaps, stuck, stats, {}, NOW, off)
                  if s.node_id == "a").factor("wait")
    assert wa_off is not None and wa_off.value < 3.0


def test_slot_queue_records_when_a_slot_last_freed() -> None:
    import herd

    q = herd.SlotQueue(node_id="n", model="m:latest", slots=2)
    assert q.snapshot().progress_at == 0.0
    q.take()
    first = q.progress_at
    assert first > 0 and q.snapshot().progress_at == first
    time.sleep(0.01)
    q.take()  # a busy queue taking another request is no progress
    assert q.progress_at == first
    q.release()
    assert q.progress_at > first
    assert q.snapshot().progress_at == q.progress_at


def test_a_stream_counts_the_delay_it_adds_to_the_others_on_its_node() -> None:
    """Node a is faster for this request alone even with 5 streams on it (1.75 s against
    b's 2 s), but a sixth stream slows those 5 down: counting that delay (the "impact"
    factor, ~0.4 s here) sends the request to the idle node b; with impact_weight 0 (the
    default) only its own time counts and a wins. (The queue-depth factor is off to
    isolate the two.)"""
    snaps, queues = two_hot_nodes(slots=8)
    queues[("a", "m:latest")] = QueueSnapshot(in_flight=5, slots=8)
    fast: scoring.ServiceStats | None = None
    slow: scoring.ServiceStats | None = None
    for _ in range(30):
        fast = scoring.observe(fast, decode_obs(0, 0.0, solo_tps=100.0), P)
        slow = scoring.observe(slow, decode_obs(0, 0.0, solo_tps=50.0), P)
    assert fast is not None and slow is not None
    stats = {("a", "m:latest"): fast, ("b", "m:latest"): slow}
    req = RouteRequest("m:latest", est_tokens=0)
    pol = dataclasses.replace(P, queue_weight=0.0, impact_weight=1.0)
    alone = dataclasses.replace(pol, impact_weight=0.0)
    assert scoring.choose(req, snaps, queues, stats, {}, NOW, 0.0, alone).node_id == "a"
    choice = scoring.choose(req, snaps, queues, stats, {}, NOW, 0.0, pol)
    assert choice.node_id == "b"
    a = next(s for s in choice.ranked if s.node_id == "a")
    impact = a.factor("impact")
    assert impact is not None and impact.value > 0 and "other streams" in impact.reason
    assert choice.ranked[0].factor("impact") is None  # nobody else runs on b


def test_a_full_queue_expects_its_oldest_request_to_end_not_a_share_of_one() -> None:
    """Node a's 8 slots all started 0.5 s ago on 5 s requests (a burst): its first slot
    frees in ~4.5 s, not in 5/8 s, so a request does not wait there for the "better" node
    while b is free and expected to finish in ~3 s. A queue whose oldest request is nearly
    done still expects the short wait."""
    snaps, _ = two_hot_nodes(slots=8)
    five = scoring.observe(None, scoring.Observation(
        ok=True, completion_tokens=100, eval_ms=5000.0, total_ms=5000.0), P)
    req = RouteRequest("m:latest", est_tokens=0)
    stats = {("a", "m:latest"): five, ("b", "m:latest"): five}
    burst = {("a", "m:latest"): QueueSnapshot(in_flight=8, slots=8, progress_at=NOW - 0.5,
                                              oldest_at=NOW - 0.5),
             ("b", "m:latest"): QueueSnapshot(in_flight=0, slots=8)}
    wait = {s.node_id: s.factor("wait") for s in
            scoring.score_nodes(req, snaps, burst, stats, {}, NOW, P)}
    wa = wait["a"]
    assert wa is not None and "4.5s queue" in wa.reason
    nearly = {**burst, ("a", "m:latest"): QueueSnapshot(in_flight=8, slots=8,
                                                        progress_at=NOW - 0.5,
                                                        oldest_at=NOW - 4.9)}
    wn = next(s for s in scoring.score_nodes(req, snaps, nearly, stats, {}, NOW, P)
              if s.node_id == "a").factor("wait")
    assert wn is not None and "0.6s queue" in wn.reason  # 5/8 s: the steady-state share


def test_slot_queue_keeps_the_start_of_its_oldest_request() -> None:
    import herd

    q = herd.SlotQueue(node_id="n", model="m:latest", slots=2)
    q.take()
    first = q.snapshot().oldest_at
    time.sleep(0.01)
    q.take()
    assert q.snapshot().oldest_at == first
    q.release()
    assert q.snapshot().oldest_at > first
    q.release()
    assert q.snapshot().oldest_at == 0.0


def test_a_cold_load_waits_for_the_loads_already_sent_to_the_node() -> None:
    """Ollama loads one model at a time: a cold load sent while a 40 GB load is under way
    starts when that one ends, and a request joining a load waits for its place in line.
    (A trace showed a 7b load sent behind a 70b load take 18 s, not 2.)"""
    base = dataclasses.replace(
        node("n", {}, 96, "learned"),
        available={"big": AvailableModel("big", 40 * GB), "small": AvailableModel("small", 4 * GB),
                   "other": AvailableModel("other", 4 * GB)})
    req = RouteRequest("small", est_tokens=100)
    queues = {("n", "small"): QueueSnapshot(slots=1)}

    def load_part(snap: NodeSnapshot, policy: Policy = P) -> float:
        s = scoring.score_nodes(req, [snap], queues, {}, {}, NOW, policy)[0]
        w = s.factor("wait")
        assert w is not None
        return float(w.reason.split(" queue + ")[1].split("s load")[0])

    alone = load_part(base)
    behind = dataclasses.replace(base, loading={"big": NOW - 2.0})
    _bw, bps = scoring.node_rates("n", behind.available, {})
    big_left = scoring.load_ends(behind, {}, bps, P)["big"] - NOW
    assert big_left > 5.0
    assert load_part(behind) == pytest.approx(alone + big_left, abs=0.11)
    assert load_part(behind, dataclasses.replace(P, serial_loads=False)) == pytest.approx(
        alone, abs=0.05)
    # two loads in line: the second starts when the first ends, whenever it was sent
    line = dataclasses.replace(base, loading={"big": NOW - 2.0, "other": NOW - 1.0})
    ends = scoring.load_ends(line, {}, bps, P)
    assert ends["other"] == pytest.approx(ends["big"] + (alone), abs=0.05)
    joining = dataclasses.replace(line, loading={**line.loading, "small": NOW - 0.5})
    assert load_part(joining) == pytest.approx(scoring.load_ends(joining, {}, bps, P)["small"]
                                               - NOW, abs=0.11)
    assert scoring.other_load_under_way(line, "small", {}, NOW, P)
    assert not scoring.other_load_under_way(line, "small", {}, NOW + 3600, P)
    assert not scoring.other_load_under_way(
        dataclasses.replace(base, loading={"small": NOW}), "small", {}, NOW, P)


def test_a_load_that_waited_for_another_teaches_no_load_time() -> None:
    first = scoring.observe(None, scoring.Observation(ok=True, load_ms=2000.0,
                                                      total_ms=4000.0), P)
    assert first.load_ms_ewma == 2000.0 and first.load_n == 1
    queued = scoring.Observation(ok=True, load_ms=18000.0, total_ms=20000.0,
                                 load_queued=True)
    after = scoring.observe(first, queued, P)
    assert (after.load_ms_ewma, after.load_n) == (2000.0, 1)
    assert after.service_ms_ewma == 2000.0  # still not counted as service time


def test_a_rarely_used_model_gets_the_slots_its_node_has_shown() -> None:
    """The learner's slots for a model seen once (alone) on a node that ran 4 of another
    model at once: 4 proven, so no wait in herd's queue behind a slot count of 2."""
    import herd

    learner = herd.Learner(P, {})
    learner.slot_bounds[("big", "small")] = learn(None, 4, 0.0)
    learner.slot_bounds[("big", "rare")] = learn(None, 1, 0.0)
    learner.node_slot_bounds["big"] = scoring.node_slot_bounds(
        list(learner.slot_bounds.values()))
    learned, sure = learner.slots_and_sure("big", "rare")
    assert sure == 4 and learned == learner.learned_slots("big", "rare")
    assert (learned or 0) >= 5
    assert learner.learned_slots("big", "never") == learner.learned_slots("big", "small")
    # the rare model queued at 2 twice: its own bound wins
    t = time.time()
    learner.slot_bounds[("big", "rare")] = learn(learn(learn(None, 1, 0.0, now=t), 2, 3000.0,
                                                       now=t), 2, 3000.0, now=t)
    assert learner.learned_slots("big", "rare") == 1


def test_a_load_that_must_drain_a_busy_model_waits_for_it_and_blocks_the_node() -> None:
    """Ollama's cap of 3 models, all three busy: a fourth model's load waits until a victim's
    requests end (its scheduler takes nothing else meanwhile). The new request expects that
    wait, and once herd has sent such a load (its ``loading`` time is when the load can
    start), every other request to the node expects it too."""
    st = scoring.observe(None, scoring.Observation(ok=True, prompt_tokens=100,
                                                   prompt_eval_ms=1000.0, completion_tokens=100,
                                                   eval_ms=9000.0, total_ms=10000.0), P)
    loaded = {m: lm(m, 2, 280) for m in ("a", "b", "c")}
    snap = dataclasses.replace(node("n", loaded, 64, "learned"), max_loaded=3)
    busy = {("n", m): QueueSnapshot(in_flight=1, slots=2, oldest_at=NOW - 4.0)
            for m in ("a", "b", "c")}
    stats = {("n", m): st for m in ("a", "b", "c")}
    req = RouteRequest("new", est_tokens=100)
    assert scoring.predicted_evictions(req, snap, busy, P)
    assert scoring.drain_s(req, snap, busy, stats, NOW, P) == pytest.approx(6.0)  # 10 - 4
    assert scoring.drain_s(req, snap, busy, stats, NOW, dataclasses.replace(
        P, drain_aware=False)) == 0.0
    idle = {**busy, ("n", "a"): QueueSnapshot(slots=2)}  # an idle victim: no wait
    assert scoring.drain_s(req, snap, idle, stats, NOW, P) == 0.0

    def wait_of(r: RouteRequest, s: NodeSnapshot, policy: Policy = P) -> Factor:
        w = scoring.score_nodes(r, [s], busy, stats, {}, NOW, policy)[0].factor("wait")
        assert w is not None
        return w

    w = wait_of(req, snap)
    assert "6.0s for a busy model to drain first" in w.reason
    blind = wait_of(req, snap, dataclasses.replace(P, drain_aware=False))
    assert w.value - blind.value == pytest.approx(6.0, abs=0.01)
    # herd sent that load: it starts in 6 s, and a hot model's request waits for it
    sent = dataclasses.replace(snap, loading={"new": NOW + 6.0})
    assert scoring.node_blocked_s(sent, "a", NOW) == pytest.approx(6.0)
    assert scoring.node_blocked_s(sent, "new", NOW) == 0.0  # it waits through its load
    assert scoring.node_blocked_s(sent, "a", NOW + 7.0) == 0.0
    hot = wait_of(RouteRequest("a", est_tokens=100), sent)
    assert "blocked by a drain for 6.0s" in hot.reason and hot.value >= 6.0


async def test_the_router_dates_a_draining_load_to_when_it_can_start(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Fleet.note_evictions, for a load sent to a node whose three models are all busy,
    moves the load's start (``Node.loading``) to when a victim is expected to drain, so the
    node's other requests expect the wait too."""
    models = [FakeModel(name=n, size=1_000_000_000) for n in ("a:1b", "b:1b", "c:1b", "d:1b")]
    fake = await make_fake(models, max_loaded_models=3, tokens_per_s=100, response_tokens=20,
                           load_delay_s=0.0)
    r = await make_router([fake.url])
    await r.wait_ready(nodes=1)
    client = ollama.AsyncClient(host=r.url)
    try:
        for name in ("a:1b", "b:1b", "c:1b"):
            await client.generate(model=name, prompt="hi", stream=False)
    finally:
        await client._client.aclose()
    fleet = r.router.fleet
    (node,) = fleet.nodes.values()
    assert await fleet.refresh_node(node)
    now = time.time()
    assert set(node.snapshot(now).loaded) == {"a:1b", "b:1b", "c:1b"}
    busy = {(node.node_id, m): QueueSnapshot(in_flight=1, slots=2, oldest_at=now)
            for m in ("a:1b", "b:1b", "c:1b")}  # each just started a ~0.2 s answer
    rreq = RouteRequest("d:1b", est_tokens=10)
    node.loading["d:1b"] = now
    fleet.note_evictions(node, rreq, busy, now)
    assert node.loading["d:1b"] > now  # starts once a busy victim has drained
    assert scoring.node_blocked_s(node.snapshot(now), "a:1b", now) > 0
    # idle victims: nothing to wait for
    node.loading["d:1b"] = now
    idle = {k: QueueSnapshot(slots=2) for k in busy}
    assert await fleet.refresh_node(node)
    fleet.note_evictions(node, rreq, idle, now)
    assert node.loading["d:1b"] == now


async def test_a_predicted_victim_stays_out_of_the_resident_set_until_its_load_is_done(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """A model a load herd sent is expected to evict is draining: /api/ps lists it until
    the load starts, but Ollama serves it no new request (they wait for the load, then
    reload it). A poll listing it meanwhile does not make it hot again; memory learning
    still sees the listing; once the evicting load is done, the listing is the truth."""
    models = [FakeModel(name=n, size=1_000_000_000) for n in ("a:1b", "b:1b", "c:1b", "d:1b")]
    fake = await make_fake(models, max_loaded_models=3, tokens_per_s=100, response_tokens=20,
                           load_delay_s=0.0)
    r = await make_router([fake.url], poll_interval_s=3600.0)
    await r.wait_ready(nodes=1)
    async with ollama.AsyncClient(host=r.url) as client:
        for name in ("a:1b", "b:1b", "c:1b"):
            await client.generate(model=name, prompt="hi", stream=False)
    fleet = r.router.fleet
    (node,) = fleet.nodes.values()
    assert await fleet.refresh_node(node)
    now = time.time()
    busy = {(node.node_id, m): QueueSnapshot(in_flight=1, slots=2, oldest_at=now)
            for m in ("a:1b", "b:1b", "c:1b")}
    node.loading["d:1b"] = now
    fleet.note_evictions(node, RouteRequest("d:1b", est_tokens=10), busy, now)
    victims = set(node.evicting)
    assert len(victims) == 1 and victims < {"a:1b", "b:1b", "c:1b"}
    assert await fleet.refresh_node(node)  # still listed: nothing has loaded d yet
    assert victims <= node.ps_listed.names
    assert not victims & node.loaded_names()
    assert not victims & set(node.snapshot(time.time()).loaded)
    # Ollama lists a model from the start of its load: listed is not loaded
    async with ollama.AsyncClient(host=fake.url) as direct:
        await direct.generate(model="d:1b", prompt="", stream=False)  # load-only
    assert await fleet.refresh_node(node)
    assert "d:1b" in node.ps_listed.names and "d:1b" in node.loading and node.evicting
    # an answer for d through herd shows the load done; herd reads /api/ps then, and the
    # listing (Ollama evicted its least recently used model) is the truth again
    async with ollama.AsyncClient(host=r.url) as client:
        await client.generate(model="d:1b", prompt="hi", stream=False)
    async with asyncio.timeout(5):
        while fleet.refreshing or "d:1b" in node.loading:
            await asyncio.sleep(0.01)
    assert not node.evicting and "d:1b" not in node.loading
    assert node.loaded_names() == node.ps_listed.names
    assert "d:1b" in node.loaded_names() and len(node.loaded_names()) == 3


async def test_a_request_waiting_on_a_model_ps_stopped_listing_is_a_load_under_way(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """A model evicted behind herd's back (here by a client of the node itself) while herd
    still believes it resident: a request herd sends for it waits inside Ollama, which
    loads it again once memory frees. The next /api/ps no longer lists it while that
    request waits: from that reading on it is a load under way there ("loading", which
    later requests join and later loads queue behind), not a model merely gone; the load is
    done when the answer begins."""
    a, b = (FakeModel(name=n, size=1_000_000_000) for n in ("a:1b", "b:1b"))
    fake = await make_fake([a, b], max_loaded_models=1, tokens_per_s=20, response_tokens=20,
                           load_delay_s=0.0)
    r = await make_router([fake.url], poll_interval_s=3600.0)
    await r.wait_ready(nodes=1)
    fleet = r.router.fleet
    (node,) = fleet.nodes.values()
    async with ollama.AsyncClient(host=r.url) as client:
        await client.generate(model="a:1b", prompt="hi", stream=False)
    assert await fleet.refresh_node(node)
    assert node.loaded_names() == {"a:1b"} and not node.awaiting

    async def direct_b() -> None:  # evicts the idle a, then holds the node ~1 s
        async with ollama.AsyncClient(host=fake.url) as direct:
            await direct.generate(model="b:1b", prompt="hi", stream=False)

    async def via_herd_a() -> None:
        async with ollama.AsyncClient(host=r.url) as client:
            await client.generate(model="a:1b", prompt="hi", stream=False)

    other = asyncio.create_task(direct_b())
    async with asyncio.timeout(5):
        while "b:1b" not in {st.name for st in fake.loaded.values()}:
            await asyncio.sleep(0.01)
    assert "a:1b" in node.loaded_names()  # herd has not seen the eviction
    ours = asyncio.create_task(via_herd_a())
    async with asyncio.timeout(5):
        while not node.awaiting:
            await asyncio.sleep(0.01)
    assert node.awaiting == {"a:1b": 1}
    assert await fleet.refresh_node(node)
    assert node.ps_listed.names == {"b:1b"}
    assert "a:1b" in node.loading  # the reload Ollama owes that request
    snap = fleet._with_learned(node.snapshot(time.time()), time.time())
    thermal = scoring.score_nodes(RouteRequest("a:1b"), [snap], {}, {}, {}, time.time(),
                                  r.router.policy)[0].factor("thermal")
    assert thermal is not None and "being loaded" in thermal.reason
    await asyncio.gather(other, ours)
    assert not node.awaiting and "a:1b" not in node.loading  # its answer began: loaded
    # an attempt that ends without an answer byte (a node error) is not awaited either
    fake.fail_next(500, path="/api/generate")
    async with ollama.AsyncClient(host=r.url) as client:
        with pytest.raises(ollama.ResponseError):  # the only node: nowhere to retry
            await client.generate(model="a:1b", prompt="hi", stream=False)
    assert not node.awaiting


async def test_the_router_reads_ps_when_a_load_ends_or_a_resident_model_was_evicted_unseen(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Between polls herd's view of what is resident goes stale exactly when a load
    happens. It reads the node's /api/ps at once when a load it sent answers its first
    byte, and when a model it believed resident answered after a load of its own (it had
    been evicted unseen) — not a poll interval later."""
    fake = await make_fake([SLOW], load_delay_s=0.6, tokens_per_s=0, response_tokens=3)
    r = await make_router([fake.url], poll_interval_s=3600.0)
    await r.wait_ready()
    body = {"model": SLOW.name, "prompt": "hi", "stream": False}

    async def ps_reads_after(request: dict[str, object], target: str, before: int) -> int:
        async with ollama.AsyncClient(host=target) as client:
            await client.generate(**request)  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while len(fake.requests_to("/api/ps")) == before:
                await asyncio.sleep(0.01)
        return len(fake.requests_to("/api/ps"))

    reads = len(fake.requests_to("/api/ps"))
    reads = await ps_reads_after(body, r.url, reads)  # a cold load through herd
    node = next(iter(r.router.fleet.nodes.values()))
    assert SLOW.name in node.loaded_names()
    # evicted behind herd's back: herd still believes it resident (no poll comes)
    async with ollama.AsyncClient(host=fake.url) as direct:
        await direct.generate(model=SLOW.name, prompt="", keep_alive=0)
    assert SLOW.name in node.loaded_names()
    quiet = len(fake.requests_to("/api/ps"))
    await asyncio.sleep(0.3)
    assert len(fake.requests_to("/api/ps")) == quiet  # nothing else reads it
    reads = await ps_reads_after(body, r.url, quiet)  # answered after a reload: read now
    await r.router.store.flush()
    rows = await r.router.store.traces(limit=10, status="completed")
    assert len(rows) == 2 and all(row["load_ms"] >= 500 for row in rows)


def test_a_load_herd_sent_is_loading_while_ps_lists_the_model() -> None:
    """Ollama lists a model in /api/ps from the moment its load starts: a model herd sent a
    load for is "loading" (join it, expect the rest of the load) until an answer shows the
    load done, not "hot" at the first listing."""
    req = RouteRequest("a", est_tokens=100)
    listed = node("n", {"a": lm("a", 2, 280)}, 8, "learned")
    queues = {("n", "a"): QueueSnapshot(slots=1)}
    loading = dataclasses.replace(listed, loading={"a": NOW - 1})
    for snap, state in ((listed, "hot"), (loading, "loading")):
        (s,) = scoring.score_nodes(req, [snap], queues, {}, {}, NOW, P)
        thermal = s.factor("thermal")
        assert thermal is not None and thermal.value == (1.0 if state == "hot" else 0.75)
        assert ("being loaded" in thermal.reason) == (state == "loading")
