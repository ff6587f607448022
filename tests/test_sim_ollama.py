"""bench/lib/sim_ollama.py, the simulated Ollama node of the end-to-end routing benchmark, over
real HTTP: the mechanics the benchmark's verdict rests on."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bench.lib.sim_ollama import BUSY_ERROR, GB, NodeSpec, SimModel, SimNode, SimServer

TOKEN_S = 0.02  # decode time per token of a 1 GB model at 50 GB/s


def spec(**kw: Any) -> NodeSpec:
    base: dict[str, Any] = {
        "name": "n",
        "memory": 8 * GB,
        "slots": 1,
        "bandwidth": 50 * GB,
        "prefill_x": 10.0,
        "load_bps": 10 * GB,
        "load_overhead_s": 0.05,
        "num_ctx": 2048,
        "chunk_s": 0.0,
        "models": (
            SimModel("a:1b", 1 * GB, kv_per_token=1),
            SimModel("b:1b", 1 * GB, kv_per_token=1),
            SimModel("c:2b", int(1.5 * GB), kv_per_token=1),
        ),
    }
    base.update(kw)
    return NodeSpec(**base)


async def started(s: NodeSpec) -> AsyncIterator[tuple[SimServer, httpx.AsyncClient]]:
    async with SimServer(SimNode(s)) as srv, httpx.AsyncClient(
        base_url=srv.url, timeout=10
    ) as client:
        yield srv, client


async def chat(client: httpx.AsyncClient, model: str, messages: list[dict[str, str]],
               predict: int = 4) -> dict[str, Any]:
    """A streamed /api/chat: the final line, with the whole answer under ``text``."""
    body = {"model": model, "messages": messages, "options": {"num_predict": predict}}
    text = ""
    async with client.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"] == "application/x-ndjson"
        async for line in r.aiter_lines():
            obj = json.loads(line)
            text += obj["message"]["content"]
            if obj["done"]:
                obj["text"] = text
                return dict(obj)
    raise AssertionError("stream ended without done")


def queued_s(final: dict[str, Any]) -> float:
    """Time inside the node not spent loading, prefilling or decoding."""
    parts = ("load_duration", "prompt_eval_duration", "eval_duration")
    return (final["total_duration"] - sum(final.get(k, 0) for k in parts)) / 1e9


async def load(client: httpx.AsyncClient, model: str) -> None:
    r = await client.post("/api/generate", json={"model": model, "prompt": ""})
    assert r.json()["done_reason"] == "load"


async def timed(client: httpx.AsyncClient, i: int) -> tuple[dict[str, Any], float]:
    final = await chat(client, "a:1b", [{"role": "user", "content": f"hi {i}"}], predict=10)
    return final, asyncio.get_running_loop().time()


async def test_slots_fifo_queue_time_in_total_duration() -> None:
    async for _srv, client in started(spec(slots=2)):
        await load(client, "a:1b")
        tasks = []
        for i in range(5):  # in this order: two run at once, three wait
            tasks.append(asyncio.create_task(timed(client, i)))
            await asyncio.sleep(0.03)
        done = await asyncio.gather(*tasks)
        finals = [f for f, _ in done]
        ends = [t for _, t in done]
        q = [queued_s(f) for f in finals]
        assert q[0] < 0.05 and q[1] < 0.05  # two slots: both ran at once
        # the others waited for a slot (~10 tokens x 20 ms, slowed by sharing), and the
        # wait is part of total_duration
        assert min(q[2:]) > 0.1
        assert all("load_duration" not in f for f in finals)  # hot: no load
        assert ends[2] < ends[3] < ends[4]  # FIFO: served in arrival order


async def test_one_slot_serialises_and_cold_load_is_reported() -> None:
    async for _srv, client in started(spec(slots=1, load_overhead_s=0.2)):
        msgs = [{"role": "user", "content": "hello"}]
        a, b = await asyncio.gather(chat(client, "a:1b", msgs, 5), chat(client, "a:1b", msgs, 5))
        for f in (a, b):
            assert f["load_duration"] / 1e9 >= 0.25  # both waited for the one cold load
        assert max(queued_s(a), queued_s(b)) > 4 * TOKEN_S


async def test_lru_eviction_under_memory_pressure() -> None:
    async for srv, client in started(spec(memory=3 * GB)):
        await load(client, "a:1b")
        await load(client, "b:1b")
        await chat(client, "a:1b", [{"role": "user", "content": "x"}])  # b is now the LRU
        await load(client, "c:2b")  # 1.5 GB more than fits: evicts b only
        ps = (await client.get("/api/ps")).json()["models"]
        assert sorted(m["name"] for m in ps) == ["a:1b", "c:2b"]
        stats = (await client.get("/sim/stats")).json()
        assert stats["evictions"] == 1 and stats["loads"] == 3
        assert srv.node.used() <= 3 * GB


async def test_busy_model_waits_instead_of_being_evicted_midway() -> None:
    async for _srv, client in started(spec(memory=int(2.6 * GB))):
        await load(client, "a:1b")
        long = asyncio.create_task(chat(client, "a:1b", [{"role": "user", "content": "x"}], 15))
        await asyncio.sleep(0.05)
        c = await chat(client, "c:2b", [{"role": "user", "content": "y"}], 2)
        a = await long
        # c could only load after a's request finished: its wait shows in its timings
        assert (c["total_duration"] - c["eval_duration"]) / 1e9 > 0.15
        assert a["eval_count"] == 15


async def test_503_server_busy_past_max_queue() -> None:
    async for _srv, client in started(spec(slots=1, max_queue=1)):
        await load(client, "a:1b")
        msgs = [{"role": "user", "content": "x"}]
        first = asyncio.create_task(chat(client, "a:1b", msgs, 20))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(chat(client, "a:1b", msgs, 2))
        await asyncio.sleep(0.05)
        r = await client.post("/api/chat", json={"model": "a:1b", "messages": msgs})
        assert r.status_code == 503
        assert r.json() == {"error": BUSY_ERROR}
        await asyncio.gather(first, second)
        assert (await client.get("/sim/stats")).json()["busy_503"] == 1


async def test_prompt_cache_skips_the_prefix_a_slot_processed() -> None:
    async for _srv, client in started(spec(slots=1, prefill_x=200.0)):
        history = [{"role": "system", "content": "s" * 2000},
                   {"role": "user", "content": "u" * 400}]
        t1 = await chat(client, "a:1b", history, 8)
        assert t1["prompt_eval_count"] > 550
        history += [{"role": "assistant", "content": t1["text"]},
                    {"role": "user", "content": "v" * 200}]
        t2 = await chat(client, "a:1b", history, 8)
        assert t2["prompt_eval_count"] < 70  # only the new turn (~50 tokens + tags)
        assert t2["prompt_eval_duration"] < t1["prompt_eval_duration"] / 4
        other = await chat(client, "a:1b", [{"role": "user", "content": "w" * 2400}], 2)
        assert other["prompt_eval_count"] > 550  # a different conversation: full prefill
        stats = (await client.get("/sim/stats")).json()
        assert stats["prompt_cached"] > 600


async def test_ps_tags_version_and_keep_alive_expiry() -> None:
    async for _srv, client in started(spec(keep_alive_s=30.0)):
        r = await client.post("/api/generate", json={
            "model": "a:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert r.status_code == 200 and r.json()["done"] is True
        (entry,) = (await client.get("/api/ps")).json()["models"]
        assert entry["name"] == "a:1b" and entry["context_length"] == 2048
        assert entry["size"] == 1 * GB + 2048 * 1 and entry["size_vram"] == entry["size"]
        expires = dt.datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
        left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
        assert 25 < left <= 30
        tags = (await client.get("/api/tags")).json()["models"]
        assert {t["name"] for t in tags} == {"a:1b", "b:1b", "c:2b"}
        assert {"size", "digest", "details", "modified_at"} <= set(tags[0])
        assert (await client.get("/api/version")).json()["version"]
        # keep_alive from the request (last writer wins): 0.2 s, then it is gone
        await client.post("/api/generate", json={"model": "a:1b", "prompt": "x",
                                                 "keep_alive": "200ms", "stream": False,
                                                 "options": {"num_predict": 2}})
        await asyncio.sleep(0.4)
        assert (await client.get("/api/ps")).json()["models"] == []
        assert (await client.get("/sim/stats")).json()["expiries"] == 1


async def test_errors_in_ollama_dialect() -> None:
    async for _srv, client in started(spec()):
        r = await client.post("/api/chat", json={"model": "nope", "messages": []})
        assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}
        r = await client.post("/api/chat", content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
        r = await client.post("/api/generate", json={"model": "a:1b", "prompt": "x",
                                                     "keep_alive": "-1"})
        assert r.status_code == 400
        r = await client.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        huge = spec(memory=1 * GB, models=(SimModel("big:9b", 2 * GB),))
        async for _s2, c2 in started(huge):
            r = await c2.post("/api/generate", json={"model": "big:9b", "prompt": "x"})
            assert r.status_code == 500 and "more system memory" in r.json()["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_chat(stream: bool) -> None:
    async for _srv, client in started(spec()):
        body = {"model": "a:1b", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3, "stream": stream}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        if stream:
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.json()["usage"]["completion_tokens"] == 3
