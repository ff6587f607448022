"""What herd learned survives a router restart (issue 15): slot and memory bounds, service
statistics and prompt-cache affinity are kept in latency.db (``learned_facts``) by
``LearningKeeper``, restored before the first request, aged out, and not kept at all with
``--no-persist-learning``. Real routers on loopback, fake Ollama nodes, real SQLite files."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import herd
import scoring
import store
from tests.child_process import start_herd, stop
from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

MODEL = "llama3.2:3b"
SLOW = FakeModel(name=MODEL, size=2_000_000_000, family="llama")
DAY = 86400.0
T = TypeVar("T")


def facts_in(data_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The learned_facts rows of a data dir, read with a connection of the test's own."""
    conn = sqlite3.connect(data_dir / "latency.db")
    try:
        rows = conn.execute(
            "SELECT kind, key, node_id, value, updated_at FROM learned_facts"
        ).fetchall()
    finally:
        conn.close()
    return {(k, key): {"node_id": n, "value": v, "updated_at": t} for k, key, n, v, t in rows}


async def two_nodes(make_fake: FakeFactory) -> tuple[FakeOllama, FakeOllama]:
    """`big` runs 4 requests at once, `small` 1; the same speed, neither says so."""
    big = await make_fake([SLOW], num_parallel=4, tokens_per_s=40, response_tokens=12,
                          load_delay_s=0.0)
    small = await make_fake([SLOW], num_parallel=1, tokens_per_s=40, response_tokens=12,
                            load_delay_s=0.0)
    return big, small


def node_ids(r: RunningRouter, *fakes: FakeOllama) -> list[str]:
    ids = {n.url: n.node_id for n in r.router.fleet.nodes.values()}
    return [ids[f.url.rstrip("/")] for f in fakes]


async def burst(client: httpx.AsyncClient, n: int, tag: str = "q") -> list[str]:
    async def one(i: int) -> str:
        raw = await client.post("/api/generate", json={"model": MODEL, "prompt": f"{tag}{i}",
                                                       "stream": False})
        assert raw.status_code == 200, raw.text
        return raw.headers["x-herd-node"]
    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def chat(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(node that served, the assistant's reply)."""
    raw = await client.post("/api/chat", json={"model": MODEL, "messages": messages,
                                               "stream": False})
    assert raw.status_code == 200, raw.text
    return raw.headers["x-herd-node"], raw.json()["message"]["content"]


async def sampled(work: Awaitable[T], fake: FakeOllama) -> tuple[T, int]:
    """``work``'s result and the most requests ``fake`` held at once (running or queued
    inside it), sampled every few milliseconds while it ran (bounded by ``work``)."""
    most = 0
    task = asyncio.ensure_future(work)
    while not task.done():
        most = max(most, fake.active + fake.queued)
        await asyncio.wait([task], timeout=0.002)
    return task.result(), most


async def learn_slots(r: RunningRouter, client: httpx.AsyncClient, bid: str, sid: str) -> None:
    """Bursts until herd knows both nodes' slots (as test_learning drives it)."""
    await burst(client, 2)
    for i in range(8):
        await burst(client, 6, f"b{i}-")
        learner = r.router.learner
        if (learner.learned_slots(sid, MODEL) == 1
                and (learner.learned_slots(bid, MODEL) or 0) >= 4):
            return
    pytest.fail(f"slots not learned: {learner.slot_bounds}")


async def test_learned_slots_memory_stats_and_affinity_survive_a_restart(
    make_router: RouterFactory, make_fake: FakeFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Learn both nodes' slots, their memory, speeds and a chat's cache node; stop the
    router; a new one on the same data dir knows all of it before any request (Learner and
    /fleet/status, marked restored), and routes by it: the one-slot node never gets two
    requests at once, and the chat's next turn goes back to the node holding its cache."""
    big, small = await two_nodes(make_fake)
    data = tmp_path / "shared-data"
    r = await make_router([big.url, small.url], data_dir=data)
    await r.wait_ready(nodes=2)
    bid, sid = node_ids(r, big, small)
    async with httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        await learn_slots(r, client, bid, sid)
        first = [{"role": "user", "content": "remember the number 42"}]
        cache_node, reply = await chat(client, first)
    learner = r.router.learner
    before_slots = dict(learner.slot_bounds)
    before_memory = dict(learner.memory_bounds)
    assert before_memory[bid].fits >= SLOW.size
    before_stats = dict(r.router.fleet.stats)
    before_affinity = dict(learner.affinity)
    assert [e.node_id for e in before_affinity.values()].count(cache_node) >= 1
    await r.router.stop()

    caplog.set_level(logging.INFO, logger="herd")
    # one poll at start, then none for a minute: what it knows is what it restored
    r2 = await make_router([big.url, small.url], data_dir=data, poll_interval_s=60.0)
    restored = [m for m in caplog.messages if m.startswith("restored learning for")]
    assert restored == ["restored learning for 2 nodes: slots for 2 models, memory for 2 "
                        f"nodes, {len(before_affinity)} affinity entries, service stats for "
                        f"2 node:models"], caplog.messages
    learner2 = r2.router.learner
    assert learner2.slot_bounds == before_slots
    assert learner2.memory_bounds[bid] == before_memory[bid]
    assert dict(r2.router.fleet.stats) == before_stats
    assert dict(learner2.affinity) == before_affinity
    assert learner2.learned_slots(sid, MODEL) == 1
    assert (learner2.learned_slots(bid, MODEL) or 0) >= 4
    assert learner2.node_slot_bounds[sid] == learner.node_slot_bounds[sid]
    async with httpx.AsyncClient(base_url=r2.url, timeout=30) as client:
        status = (await client.get("/fleet/status")).json()
        learned = {n["node_id"]: n["learned"] for n in status["nodes"]}
        assert learned[sid]["slots"]["source"] == "learned"
        assert learned[sid]["models"][MODEL]["slots"]["estimate"] == 1
        assert learned[sid]["models"][MODEL]["slots"]["restored"] is True
        assert learned[sid]["models"][MODEL]["stats_restored"] is True
        assert learned[bid]["models"][MODEL]["answer_tokens"] == 12
        assert learned[bid]["memory"]["fits_bytes"] == before_memory[bid].fits
        assert learned[bid]["memory"]["restored"] is True
        await r2.wait_ready(nodes=2)  # its own first poll; nothing routed yet
        assert r2.router.admission.queue_for(sid, MODEL, "text").slots == 1
        assert r2.router.admission.queue_for(bid, MODEL, "text").slots >= 4
        served, most_at_small = await sampled(burst(client, 6, "after"), small)
        # `small` never got a second request to queue inside Ollama: no probing again
        assert most_at_small == 1, served
        assert served.count(bid) >= 4, served
        status = (await client.get("/fleet/status")).json()
        learned = {n["node_id"]: n["learned"] for n in status["nodes"]}
        # what this run observed replaces the restored statistics
        assert any(not learned[n]["models"][MODEL]["stats_restored"] for n in (bid, sid))
        node, _ = await chat(client, [*first, {"role": "assistant", "content": reply},
                                      {"role": "user", "content": "which number?"}])
        assert node == cache_node


async def test_learning_is_saved_periodically_and_only_what_changed(
    make_router: RouterFactory, make_fake: FakeFactory, tmp_path: Path
) -> None:
    """The background save writes the facts while the router runs (a crash keeps them);
    a save with nothing new writes nothing, and one request rewrites only its own facts."""
    big, small = await two_nodes(make_fake)
    data = tmp_path / "data"
    r = await make_router([big.url, small.url], data_dir=data, learning_save_interval_s=0.1)
    await r.wait_ready(nodes=2)
    bid, _sid = node_ids(r, big, small)
    async with httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        await burst(client, 4)
        async with asyncio.timeout(10):
            while not any(k == "stats" for k, _ in facts_in(data)):
                await asyncio.sleep(0.05)
        keeper = r.router.learning
        # stop the periodic task: from here on the test saves by hand
        for task in list(r.router.background):
            if task.get_name() == "herd-learning":
                task.cancel()
        await keeper.save()
        # polls go on (every 0.2 s) and each counts itself in the node's memory bounds
        quiet = await keeper.save()
        assert quiet <= 2, quiet
        served = await burst(client, 1, "one")
        written = await keeper.save()
        # that request's stats (and slot bounds, if they changed), the polls' memory rows
        assert 1 <= written <= 4, written
        rows = facts_in(data)
        key = json.dumps([served[0], MODEL])
        assert json.loads(rows[("stats", key)]["value"]) == dataclasses.asdict(
            r.router.fleet.stats[(served[0], MODEL)])
        assert ("memory", bid) in rows


async def test_affinity_saves_only_what_was_written_since_and_stays_bounded(
    make_router: RouterFactory, tmp_path: Path
) -> None:
    """The affinity map is saved by its write order: a save writes the entries written
    since the last one (not the whole map); rows of evicted entries go by the map's bound."""
    data = tmp_path / "data"
    r = await make_router([], data_dir=data, poll_interval_s=60.0,
                          policy={"affinity_max_entries": 5})
    keeper, learner = r.router.learning, r.router.learner
    now = time.time()
    for i in range(5):
        learner.remember_prefix(f"k{i}", "gpu", 100 + i, now - 50 + i)
    assert await keeper.save() == 5
    assert await keeper.save() == 0
    learner.remember_prefix("k1", "gpu", 500, now)  # served again
    learner.remember_prefix("k5", "cpu", 10, now)  # new: k0, the least recent, is evicted
    assert "k0" not in learner.affinity
    assert await keeper.save() == 2
    rows = {key: json.loads(v["value"]) for (kind, key), v in facts_in(data).items()
            if kind == "affinity"}
    assert rows == {"k1": {"node_id": "gpu", "at": now, "tokens": 500},
                    "k2": {"node_id": "gpu", "at": now - 48, "tokens": 102},
                    "k3": {"node_id": "gpu", "at": now - 47, "tokens": 103},
                    "k4": {"node_id": "gpu", "at": now - 46, "tokens": 104},
                    "k5": {"node_id": "cpu", "at": now, "tokens": 10}}


async def test_no_persist_learning_keeps_nothing(
    make_router: RouterFactory, make_fake: FakeFactory, tmp_path: Path
) -> None:
    big, small = await two_nodes(make_fake)
    data = tmp_path / "data"
    r = await make_router([big.url, small.url], data_dir=data, persist_learning=False,
                          learning_save_interval_s=0.05)
    await r.wait_ready(nodes=2)
    async with httpx.AsyncClient(base_url=r.url, timeout=30) as client:
        await burst(client, 4)
    assert r.router.fleet.stats and r.router.learner.memory_bounds
    await asyncio.sleep(0.2)
    await r.router.stop()
    assert facts_in(data) == {}
    r2 = await make_router([big.url, small.url], data_dir=data, poll_interval_s=60.0)
    assert r2.router.learning.restored is not None
    assert r2.router.learning.restored.nodes == 0
    assert not r2.router.fleet.stats and not r2.router.learner.slot_bounds


def test_the_off_flag_and_its_environment_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert herd.config_from_args([]).persist_learning is True
    assert herd.config_from_args(["--no-persist-learning"]).persist_learning is False
    monkeypatch.setenv("HERD_PERSIST_LEARNING", "0")
    assert herd.config_from_args([]).persist_learning is False
    assert "--no-persist-learning" in herd.build_parser().format_help()


async def saved(data: Path, facts: list[store.LearnedFact], now: float) -> None:
    s = store.Store(data, prune_interval_s=None)
    await s.open()
    try:
        limits = dict.fromkeys(["slots", "memory", "stats", "affinity"], (30 * DAY, 1000))
        assert await s.save_learned(facts, now=now, limits=limits)
    finally:
        await s.close()


async def test_rows_that_do_not_parse_are_skipped_and_dropped(
    make_router: RouterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hand-edited, older or newer rows: each one that does not parse is skipped with a
    log line (the router starts and restores the rest), then deleted at the next save."""
    data = tmp_path / "data"
    now = time.time()
    good = scoring.SlotBounds(lo=2, hi=3, hi_at=now - 10, clean=5, queued=2, last_at=now - 10)
    fact = store.LearnedFact
    await saved(data, [
        fact("slots", json.dumps(["gpu", MODEL]), "gpu", good, now),
        fact("slots", json.dumps(["gpu", "new:1b"]), "gpu", {"lo": 2, "colour": "red"}, now),
        fact("slots", json.dumps(["gpu", "neg:1b"]), "gpu", {"lo": -3}, now),
        fact("slots", json.dumps(["gpu", "str:1b"]), "gpu", {"lo": "2"}, now),
        fact("slots", "gpu", "gpu", {"lo": 1}, now),  # not [node, model]
        fact("memory", "gpu", "gpu", [1, 2, 3], now),
        fact("memory", "old", "old", {"fits": 8_000_000_000}, now),  # older herd: defaults
        fact("affinity", "k1", "gpu", {"node_id": "gpu", "at": now - 5}, now),  # no tokens
        fact("affinity", "k2", "gpu", {"node_id": "gpu", "at": now - 5, "tokens": 300}, now),
        fact("nonsense", "x", "gpu", {}, now),
    ], now)
    conn = sqlite3.connect(data / "latency.db")
    with conn:
        conn.execute("INSERT INTO learned_facts VALUES ('memory', 'gpu2', 'gpu2', '{nope', ?)",
                     (now,))
        conn.execute("INSERT INTO learned_facts VALUES ('stats', ?, 'gpu', ?, ?)",
                     (json.dumps(["gpu", MODEL]), '{"count": 3, "total_p": 1e999}', now))
    conn.close()
    caplog.set_level(logging.INFO)
    r = await make_router([], data_dir=data, poll_interval_s=60.0)
    learner = r.router.learner
    assert learner.slot_bounds == {("gpu", MODEL): good}
    assert learner.memory_bounds == {"old": scoring.MemoryBounds(fits=8_000_000_000)}
    assert dict(learner.affinity) == {"k2": scoring.AffinityEntry("gpu", now - 5, 300)}
    assert not r.router.fleet.stats  # 1e400 is not a finite number
    assert learner.learned_slots("gpu", MODEL) == 2
    restored = r.router.learning.restored
    assert restored is not None and len(restored.skipped) == 8
    skipped = [m for m in caplog.messages if m.startswith("learning: skipped a saved")]
    assert len(skipped) == 8, caplog.messages
    assert any("unknown fields ['colour']" in m for m in skipped)
    assert any("is not JSON" in m and "'gpu2'" in m for m in caplog.messages)  # the store's
    assert ("memory", "gpu2") not in facts_in(data)  # deleted by the load
    await r.router.stop()
    left = facts_in(data)
    assert set(left) == {("slots", json.dumps(["gpu", MODEL])), ("memory", "old"),
                         ("affinity", "k2")}


async def test_old_rows_are_dropped_on_load_and_stale_bounds_still_expire(
    make_router: RouterFactory, tmp_path: Path
) -> None:
    """A node that did not come back keeps its facts until they are older than the age
    limit (7 days); an affinity entry past its TTL is not restored; an upper slot bound
    restored with its old timestamp is probed again by the usual TTL rule."""
    data = tmp_path / "data"
    now = time.time()
    fact = store.LearnedFact
    stale_hi = scoring.SlotBounds(lo=1, hi=2, hi_at=now - 3600, clean=3, queued=2,
                                  last_at=now - 3600)
    await saved(data, [
        fact("memory", "gone", "gone", scoring.MemoryBounds(fits=4_000_000_000), now - 8 * DAY),
        fact("memory", "away", "away", scoring.MemoryBounds(fits=6_000_000_000), now - 6 * DAY),
        fact("slots", json.dumps(["away", MODEL]), "away", stale_hi, now - 3600),
        fact("affinity", "cold", "away", scoring.AffinityEntry("away", now - 7200, 10), now),
    ], now)
    assert len(facts_in(data)) == 4
    r = await make_router([], data_dir=data, poll_interval_s=60.0)
    learner = r.router.learner
    assert set(learner.memory_bounds) == {"away"}
    assert learner.slot_bounds[("away", MODEL)] == stale_hi
    # an hour-old upper bound is older than slot_bound_ttl_s: probe one more again
    assert learner.learned_slots("away", MODEL) == 2
    assert not learner.affinity
    assert ("memory", "gone") not in facts_in(data)  # deleted on load
    await r.router.stop()
    assert set(facts_in(data)) == {("memory", "away"), ("slots", json.dumps(["away", MODEL]))}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"lo": True}, "not a valid int"),
        ({"hi_at": float("nan")}, "not a valid float"),
        ({"lo": 1.5}, "not a valid int"),
        ({"extra": 1}, "unknown fields"),
        ("lo=1", "not a JSON object"),
    ],
)
def test_learned_value_refuses_what_it_cannot_trust(raw: object, why: str) -> None:
    import typing

    hints = typing.get_type_hints(scoring.SlotBounds)
    with pytest.raises(ValueError, match=why):
        herd.learned_value(scoring.SlotBounds, hints, raw)
    assert herd.learned_value(scoring.SlotBounds, hints, {"lo": 2, "hi_at": 5}) == (
        scoring.SlotBounds(lo=2, hi_at=5.0))


async def test_python_herd_py_restores_after_sigterm_and_the_flag_turns_it_off(
    make_fake: FakeFactory, tmp_path: Path
) -> None:
    """The real program: learn, SIGTERM (saved on the way out), start again (restored and
    said so before it listens); with ``--no-persist-learning`` nothing is restored."""
    node = await make_fake([SLOW], num_parallel=2, tokens_per_s=200, response_tokens=5,
                           load_delay_s=0.0)
    args = ["--no-mdns", "--data-dir", str(tmp_path), "--node", node.url,
            "--poll-interval", "0.2"]
    proc, port = await start_herd(args)
    try:
        async with asyncio.timeout(10):
            while not json.loads((await raw_request(port, "GET", "/api/tags"))[2])["models"]:
                await asyncio.sleep(0.05)
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
        for _ in range(3):
            status, _, _ = await raw_request(port, "POST", "/api/generate", body)
            assert status == 200
    finally:
        code, err = await stop(proc)
    assert code == 0, err
    assert re.search(r"learning saved at stop: [1-9]\d* facts", err), err
    proc, _ = await start_herd(args)
    code, err = await stop(proc)
    assert code == 0, err
    assert re.search(r"restored learning for 1 nodes: slots for [01] models, memory for 1 "
                     r"nodes, 0 affinity entries, service stats for 1 node:models", err), err
    proc, _ = await start_herd([*args, "--no-persist-learning"])
    code, err = await stop(proc)
    assert "restored learning" not in err
    assert "learning is not kept across restarts (--no-persist-learning)" in err
