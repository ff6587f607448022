"""Resilience: retries, breaker, fallbacks, context protection, reaper, auto-pull, pre-warm.

Each mechanism is driven through a real router in front of fake Ollama nodes with faults.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")
LLAMA_BIG = FakeModel(name="llama3.1:8b", size=4_900_000_000, family="llama")
QWEN = FakeModel(name="qwen2.5:7b", size=4_700_000_000, family="qwen2")

GEN = b'{"model":"llama3.2:3b","prompt":"x","stream":false}'


def node_of(r: RunningRouter, fake: FakeOllama) -> str:
    for n in r.router.fleet.nodes.values():
        if n.url == f"http://127.0.0.1:{fake.port}":
            return n.node_id
    raise AssertionError("fake not in fleet")


async def traces(r: RunningRouter, **filters: Any) -> list[dict[str, Any]]:
    await r.router.store.flush()
    return await r.router.store.traces(limit=50, **filters)


@pytest.fixture
async def two_nodes(make_router: RouterFactory, make_fake: FakeFactory) -> Any:
    a = await make_fake([LLAMA, QWEN], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(models=2, nodes=2)
    yield r, a, b


async def test_5xx_before_first_byte_is_retried_elsewhere(two_nodes: Any) -> None:
    r, a, b = two_nodes
    # make A the obvious winner (hot), then break it for inference only
    await raw_request(a.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(r.router.fleet.nodes[node_of(r, a)])
    a.fail_next(500, count=1, path="/api/generate")
    status, headers, body = await raw_request(r.port, "POST", "/api/generate", GEN)
    assert status == 200 and json.loads(body)["done"] is True
    assert headers["x-herd-node"] == node_of(r, b) and headers["x-herd-retries"] == "1"
    rows = await traces(r)
    assert [row["status"] for row in rows[:2]] == ["completed", "retried"]
    assert rows[0]["retry_count"] == 1 and rows[1]["node_id"] == node_of(r, a)


async def test_server_busy_is_retried(two_nodes: Any) -> None:
    r, a, b = two_nodes
    for fake in (a, b):
        fake.fail_next(503, count=1, path="/api/chat")
    body = b'{"model":"llama3.2:3b","messages":[{"role":"user","content":"x"}],"stream":false}'
    status, headers, data = await raw_request(r.port, "POST", "/api/chat", body)
    # both nodes were busy once: two attempts failed, the third (a retry) cannot happen on a
    # new node, so the client gets the busy answer with its status
    assert status == 503 and "server busy" in json.loads(data)["error"]
    assert headers["x-herd-retries"] == "1"
    status, _, _ = await raw_request(r.port, "POST", "/api/chat", body)
    assert status == 200


async def test_first_byte_timeout_retries(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    a = await make_fake([LLAMA], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url], first_byte_timeout_s=0.5)
    await r.wait_ready(nodes=2)
    await raw_request(a.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(r.router.fleet.nodes[node_of(r, a)])  # A is hot: A wins
    a.stall_s = 5.0  # ...and hangs before its first byte; after 0.5 s B is tried
    served = []
    for _ in range(2):
        status, headers, _ = await raw_request(r.port, "POST", "/api/generate", GEN)
        assert status == 200
        served.append(headers["x-herd-node"])
    assert set(served) == {node_of(r, b)}
    rows = await traces(r, status="retried")
    assert rows and "0.5s" in rows[0]["error_message"]


async def test_breaker_ejects_unreachable_node(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    a = await make_fake([LLAMA], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url], poll_interval_s=60.0)
    await r.wait_ready(nodes=2)
    await raw_request(a.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(r.router.fleet.nodes[node_of(r, a)])  # A is hot: it would win
    a.refuse_connections()
    for _ in range(6):
        status, headers, _ = await raw_request(r.port, "POST", "/api/generate", GEN)
        assert status == 200 and headers["x-herd-node"] == node_of(r, b)
    attempts_on_a = [row for row in await traces(r) if row["node_id"] == node_of(r, a)]
    assert len(attempts_on_a) == 1  # it stopped winning after its first failure
    _, _, data = await raw_request(r.port, "GET", "/fleet/status")
    node_a = next(n for n in json.loads(data)["nodes"] if n["node_id"] == node_of(r, a))
    assert node_a["reachable"] is False


async def test_fallback_models_in_order(two_nodes: Any) -> None:
    r, _, _ = two_nodes
    body = json.dumps(
        {
            "model": "ghost:70b",
            "prompt": "x",
            "stream": False,
            "fallback_models": ["phantom:1b", "qwen2.5:7b"],
        }
    ).encode()
    status, headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200
    assert headers["x-herd-model"] == "qwen2.5:7b" and json.loads(data)["model"] == "qwen2.5:7b"
    row = (await traces(r))[0]
    assert row["fallback_used"] and row["original_model"] == "ghost:70b"
    assert row["model"] == "qwen2.5:7b"
    # OpenAI body too, and herd's fields never reach the node
    body = json.dumps(
        {
            "model": "ghost:70b",
            "messages": [{"role": "user", "content": "x"}],
            "fallback_models": ["llama3.2:3b"],
        }
    ).encode()
    status, headers, data = await raw_request(r.port, "POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(data)["model"] == "llama3.2:3b"


async def test_herd_fields_are_stripped(two_nodes: Any) -> None:
    r, a, _b = two_nodes
    body = json.dumps(
        {
            "model": "qwen2.5:7b",
            "prompt": "x",
            "stream": False,
            "metadata": {"tags": ["app:x"]},
            "fallback": False,
            "fallback_models": [],
        }
    ).encode()
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200
    sent = [q for q in a.requests if q.path == "/api/generate"][-1].json()
    assert not {"metadata", "fallback", "fallback_models", "node_id"} & set(sent)


async def test_vram_fallback_serves_loaded_model_and_can_be_refused(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA, LLAMA_BIG], tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready(models=2)
    await raw_request(fake.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(next(iter(r.router.fleet.nodes.values())))
    r.router.settings["vram_fallback"] = True
    body = b'{"model":"llama3.1:8b","prompt":"x","stream":false}'
    status, headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200 and headers["x-herd-model"] == "llama3.2:3b"
    assert json.loads(data)["model"] == "llama3.2:3b"  # the body names the served model
    status, headers, _ = await raw_request(
        r.port, "POST", "/api/generate", body, headers={"x-herd-no-fallback": "true"}
    )
    assert status == 200 and headers["x-herd-model"] == "llama3.1:8b"


async def test_context_protection_avoids_reload(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0, default_num_ctx=8192)
    fake.models["llama3.2:3b"].context_length = 32768
    r = await make_router([fake.url])
    await r.wait_ready()
    await raw_request(fake.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(next(iter(r.router.fleet.nodes.values())))
    loads_before = len(fake.load_events)
    body = b'{"model":"llama3.2:3b","prompt":"x","stream":false,"options":{"num_ctx":4096}}'
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200
    assert len(fake.load_events) == loads_before  # no reload for a smaller window
    sent = [q for q in fake.requests if q.path == "/api/generate"][-1].json()
    assert sent.get("options", {}).get("num_ctx") in (None, 8192)


async def test_reaper_cancels_stalled_stream(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url], stall_timeout_s=0.4)
    await r.wait_ready()
    fake.stall_mid_stream_s = 5.0
    status, _, data = await raw_request(
        r.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"x"}'
    )
    assert status == 200
    last = json.loads(data.splitlines()[-1])
    assert "reaped" in last["error"]
    assert all(q.in_flight == 0 for q in r.router.admission.queues.values())
    rows = await traces(r, status="reaped")
    assert rows and rows[0]["node_id"]


async def test_auto_pull_when_enabled(make_router: RouterFactory, make_fake: FakeFactory) -> None:
    gemma = FakeModel(name="gemma3:1b", size=800_000_000, family="gemma3")
    fake = await make_fake([LLAMA], tokens_per_s=0, pullable={"gemma3:1b": gemma})
    r = await make_router([fake.url])
    await r.wait_ready()
    body = b'{"model":"gemma3:1b","prompt":"x","stream":false}'
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 404  # off by default: downloads can be huge
    r.router.settings["auto_pull"] = True
    status, _headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200 and json.loads(data)["model"] == "gemma3:1b"
    assert "gemma3:1b" in fake.models


async def test_queue_waits_for_a_slot_then_serves(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=200, num_parallel=1, response_tokens=10)
    r = await make_router([fake.url])
    await r.wait_ready()
    results = await asyncio.gather(
        *(raw_request(r.port, "POST", "/api/generate", GEN) for _ in range(5))
    )
    assert [s for s, _, _ in results] == [200] * 5
    # nothing piled up inside Ollama: herd, not told the node's slots, probes a second one
    # once (to learn the count), and the other requests wait in herd's own queue
    assert fake.max_present_seen <= 2
    rows = await traces(r, status="completed")
    assert max(row["queue_ms"] for row in rows) > 0


async def test_runner_up_is_prewarmed_when_queue_is_deep(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    a = await make_fake([LLAMA], tokens_per_s=50, num_parallel=1, response_tokens=10)
    b = await make_fake([LLAMA], tokens_per_s=50, num_parallel=1, response_tokens=10)
    r = await make_router([a.url, b.url])
    await r.wait_ready(nodes=2)
    await raw_request(a.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(r.router.fleet.nodes[node_of(r, a)])
    results = await asyncio.gather(
        *(raw_request(r.port, "POST", "/api/generate", GEN) for _ in range(8))
    )
    assert all(s == 200 for s, _, _ in results)
    served = {h["x-herd-node"] for _, h, _ in results}
    assert served == {node_of(r, a), node_of(r, b)}  # the cold node took overflow


async def test_a_prewarm_is_a_load_like_any_other(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """While the runner-up loads the model for a pre-warm, herd counts that load (requests
    for the model join it; other loads there queue behind it), and forgets it once done."""
    a = await make_fake([LLAMA], tokens_per_s=50, num_parallel=1, response_tokens=10)
    b = await make_fake([LLAMA], tokens_per_s=50, num_parallel=1, response_tokens=10,
                        load_delay_s=1.0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(nodes=2)
    await raw_request(a.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    await r.router.fleet.refresh_node(r.router.fleet.nodes[node_of(r, a)])
    calls = [asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate", GEN))
             for _ in range(8)]
    node_b = r.router.fleet.nodes[node_of(r, b)]
    admission = r.router.admission
    async with asyncio.timeout(10):
        while not admission.prewarming:
            await asyncio.sleep(0.01)
    assert LLAMA.name in node_b.loading  # the pre-warm's load, counted from its start
    results = await asyncio.gather(*calls)
    assert all(s == 200 for s, _, _ in results)
    async with asyncio.timeout(10):
        while admission.prewarming:
            await asyncio.sleep(0.01)
    assert LLAMA.name not in node_b.loading and LLAMA.name in node_b.loaded_names()


async def test_concurrent_callers_share_one_auto_pull(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    gemma = FakeModel(name="gemma3:1b", size=800_000_000, family="gemma3")
    fake = await make_fake(
        [LLAMA], tokens_per_s=0, pullable={"gemma3:1b": gemma}, pull_step_delay_s=0.05
    )
    r = await make_router([fake.url])
    await r.wait_ready()
    r.router.settings["auto_pull"] = True
    body = b'{"model":"gemma3:1b","prompt":"x","stream":false}'
    results = await asyncio.gather(
        *(raw_request(r.port, "POST", "/api/generate", body) for _ in range(3))
    )
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert len(fake.requests_to("/api/pull")) == 1
    _, _, data = await raw_request(r.port, "GET", "/fleet/status")
    assert json.loads(data)["pulls"][0]["status"] == "done"


async def test_auto_pull_task_is_tracked_and_cancelled_on_stop(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """An auto-pull runs as a background task of the router: stop() cancels it."""
    gemma = FakeModel(name="gemma3:1b", size=800_000_000, family="gemma3")
    fake = await make_fake(
        [LLAMA], tokens_per_s=0, pullable={"gemma3:1b": gemma}, pull_step_delay_s=5
    )
    r = await make_router([fake.url])
    await r.wait_ready()
    r.router.settings["auto_pull"] = True
    body = b'{"model":"gemma3:1b","prompt":"x","stream":false}'
    client = asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate", body))
    admin = r.router.model_admin
    async with asyncio.timeout(5):
        while not admin.auto_pulls:
            await asyncio.sleep(0.01)
    task = next(iter(admin.auto_pulls.values()))
    assert task in r.router.background
    await r.router.stop()
    assert task.cancelled()
    client.cancel()
    await asyncio.gather(client, return_exceptions=True)


async def test_client_gone_while_queued_frees_everything(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=20, num_parallel=1, response_tokens=40)
    r = await make_router([fake.url], policy={"slot_probe": False})  # 1 slot: queue in herd
    await r.wait_ready()
    busy = asyncio.ensure_future(raw_request(r.port, "POST", "/api/generate", GEN))
    async with asyncio.timeout(5):
        while not any(q.in_flight for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.01)
    _reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: "
        + str(len(GEN)).encode()
        + b"\r\n\r\n"
        + GEN
    )
    await writer.drain()
    async with asyncio.timeout(5):
        while not any(q.pending for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.01)
    writer.close()
    async with asyncio.timeout(5):
        while any(q.pending for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.01)
    assert (await busy)[0] == 200
    rows = await traces(r, status="client_disconnected")
    assert rows and "queued" in rows[0]["error_message"]
    assert len([q for q in fake.requests if q.path == "/api/generate"]) == 1
