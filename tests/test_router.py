"""End-to-end tests of the router core: real sockets, fake Ollama nodes, official clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

pytestmark = pytest.mark.both_loops

LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")
QWEN = FakeModel(name="qwen2.5:7b", size=4_700_000_000, family="qwen2")
EMBED = FakeModel(
    name="nomic-embed-text:latest",
    size=270_000_000,
    family="nomic-bert",
    capabilities=["embedding"],
)


@pytest.fixture
async def fleet(make_router: RouterFactory, make_fake: FakeFactory) -> Any:
    """Two fake nodes: A has llama + embed, B has llama + qwen; a router in front."""
    a = await make_fake([LLAMA, EMBED], version="0.12.6", tokens_per_s=0)
    b = await make_fake([LLAMA, QWEN], version="0.11.10", tokens_per_s=0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(models=3, nodes=2)
    yield r, a, b


def node_id(r: RunningRouter, fake: FakeOllama) -> str:
    for n in r.router.fleet.nodes.values():
        if n.url == f"http://127.0.0.1:{fake.port}":
            return n.node_id
    raise AssertionError("fake not in fleet")


# ------------------------------------------------------------------ local answers ------


async def test_root_head_version_and_unknown_paths(fleet: Any) -> None:
    r, _, _ = fleet
    status, headers, body = await raw_request(r.port, "GET", "/")
    assert (status, body) == (200, b"Ollama is running")
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = await raw_request(r.port, "HEAD", "/")
    assert status == 200 and body == b""
    status, _, body = await raw_request(r.port, "GET", "/api/version")
    assert json.loads(body) == {"version": "0.11.10"}  # the lowest node version
    status, headers, body = await raw_request(r.port, "GET", "/no/such/path")
    assert (status, body) == (404, b"404 page not found")
    status, headers, body = await raw_request(r.port, "GET", "/api/chat")
    assert (status, body) == (405, b"405 method not allowed")


async def test_tags_union_and_v1_models(fleet: Any) -> None:
    r, _, _ = fleet
    _status, _, body = await raw_request(r.port, "GET", "/api/tags")
    names = [m["name"] for m in json.loads(body)["models"]]
    assert sorted(names) == sorted(["llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest"])
    entry = next(m for m in json.loads(body)["models"] if m["name"] == "llama3.2:3b")
    for key in ("name", "model", "modified_at", "size", "digest", "details"):
        assert key in entry
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama")
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == sorted(names)
    got = await client.models.retrieve("qwen2.5:7b")
    assert got.id == "qwen2.5:7b"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope:1b")
    await client.close()


# ------------------------------------------------------------------ official clients ----


async def test_ollama_async_client_end_to_end(fleet: Any) -> None:
    r, _, _ = fleet
    client = ollama.AsyncClient(host=r.url)
    reply = await client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content and reply.done and reply.eval_count
    parts = []
    async for part in await client.chat(
        model="Llama3.2:3B", messages=[{"role": "user", "content": "hello there"}], stream=True
    ):
        parts.append(part)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content or "" for p in parts)
    gen = await client.generate(model="qwen2.5:7b", prompt="why is the sky blue")
    assert gen.response and gen.context
    emb = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2
    listed = await client.list()
    assert {m.model for m in listed.models} >= {"llama3.2:3b", "qwen2.5:7b"}
    shown = await client.show("qwen2.5:7b")
    assert shown.details is not None and shown.details.family == "qwen2"
    ps = await client.ps()
    assert any(m.model == "llama3.2:3b" for m in ps.models)
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="missing:1b", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    await client._client.aclose()


async def test_ollama_sync_client_end_to_end(fleet: Any) -> None:
    r, _, _ = fleet

    def run() -> tuple[str, int]:
        client = ollama.Client(host=r.url)
        text = "".join(
            p.response for p in client.generate(model="llama3.2:3b", prompt="count", stream=True)
        )
        emb = client.embeddings(model="nomic-embed-text", prompt="hello")
        client._client.close()
        return text, len(emb.embedding)

    text, dims = await asyncio.to_thread(run)
    assert text and dims > 0


async def test_openai_client_end_to_end(fleet: Any) -> None:
    r, _, _ = fleet
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama")
    done = await client.chat.completions.create(
        model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}]
    )
    assert done.choices[0].message.content and done.usage and done.usage.completion_tokens
    stream = await client.chat.completions.create(
        model="qwen2.5:7b",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    emb = await client.embeddings.create(model="nomic-embed-text", input="hello")
    assert len(emb.data[0].embedding) > 0
    comp = await client.completions.create(model="llama3.2:3b", prompt="once upon")
    assert comp.choices[0].text
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(
            model="missing:1b", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 404
    await client.close()


# ------------------------------------------------------------------ framing -------------


async def test_ndjson_stream_lines_and_headers(fleet: Any) -> None:
    r, _a, b = fleet
    body = json.dumps({"model": "qwen2.5:7b", "prompt": "tell me a story"}).encode()
    status, headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["x-herd-node"] == node_id(r, b)  # only B has qwen
    assert headers["x-herd-model"] == "qwen2.5:7b"
    assert headers["x-herd-retries"] == "0"
    assert data.endswith(b"\n") and b"\n\n" not in data
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[-1]["done"] is True and "eval_count" in lines[-1] and "context" in lines[-1]
    # same content as going direct to the node (the fake is deterministic per prompt)
    _, _, direct = await raw_request(b.port, "POST", "/api/generate", body)
    strip = [
        {k: v for k, v in json.loads(x).items() if "duration" not in k and k != "created_at"}
        for x in direct.splitlines()
    ]
    assert strip == [
        {k: v for k, v in x.items() if "duration" not in k and k != "created_at"} for x in lines
    ]


async def test_sse_stream_framing(fleet: Any) -> None:
    r, _, _ = fleet
    body = json.dumps(
        {"model": "llama3.2:3b", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    ).encode()
    status, headers, data = await raw_request(r.port, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith(b"data: ")
        json.loads(ev[6:])


async def test_stream_false_gives_one_object(fleet: Any) -> None:
    r, _, _ = fleet
    body = json.dumps({"model": "llama3.2:3b", "prompt": "x", "stream": False}).encode()
    status, headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    obj = json.loads(data)
    assert obj["done"] is True and obj["response"]


# ------------------------------------------------------------------ errors --------------


async def test_body_bytes_forwarded_as_sent_unless_herd_strips_fields(fleet: Any) -> None:
    r, _, b = fleet
    # Spacing and number spelling a re-serialisation would change ("1e0" -> 1.0).
    sent = (b'{ "model" : "qwen2.5:7b", "prompt": "x", "stream": false,\n'
            b' "options": {"temperature": 1e0} }')
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", sent)
    assert status == 200
    assert b.requests_to("/api/generate")[-1].body == sent
    tagged = (b'{"model": "qwen2.5:7b", "prompt": "x", "stream": false,'
              b' "metadata": {"tags": ["app:x"], "keep": 1}}')
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", tagged)
    assert status == 200
    forwarded = b.requests_to("/api/generate")[-1].body
    assert json.loads(forwarded) == {"model": "qwen2.5:7b", "prompt": "x", "stream": False,
                                     "metadata": {"keep": 1}}
    # UTF-16 is valid JSON for herd's parser but not for Ollama's: re-encoded as UTF-8
    utf16 = json.dumps({"model": "qwen2.5:7b", "prompt": "x", "stream": False}).encode("utf-16-le")
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", utf16)
    assert status == 200
    assert b.requests_to("/api/generate")[-1].body.startswith(b'{"model"')


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", b"{not json", 400, "invalid JSON"),
        ("/api/chat", b"[1,2]", 400, "JSON object"),
        ("/api/generate", b'{"prompt": "x"}', 400, "model is required"),
        ("/api/generate", b'{"model": "ghost:7b", "prompt": "x"}', 404, "not found"),
    ],
)
async def test_native_errors(
    fleet: Any, path: str, body: bytes, status: int, fragment: str
) -> None:
    r, _, _ = fleet
    got, _headers, data = await raw_request(r.port, "POST", path, body)
    assert got == status
    assert fragment in json.loads(data)["error"]


async def test_openai_error_shape(fleet: Any) -> None:
    r, _, _ = fleet
    got, _, data = await raw_request(r.port, "POST", "/v1/chat/completions", b"{oops")
    err = json.loads(data)["error"]
    assert got == 400 and set(err) == {"message", "type", "param", "code"}
    got, _, data = await raw_request(
        r.port, "POST", "/v1/chat/completions", b'{"model":"ghost","messages":[]}'
    )
    assert got == 404 and json.loads(data)["error"]["type"] == "not_found_error"


async def test_body_limit_gives_413(make_router: RouterFactory, make_fake: FakeFactory) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url], limits={"max_json_bytes": 1000})
    await r.wait_ready()
    body = json.dumps({"model": "llama3.2:3b", "prompt": "x" * 5000}).encode()
    status, _, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 413 and "too large" in json.loads(data)["error"]


# ------------------------------------------------------------------ routing -------------


async def test_hot_model_wins_and_headers_name_the_node(fleet: Any) -> None:
    r, _a, b = fleet
    # Warm llama on B only (direct), then let the router's poll see it.
    _, _, _ = await raw_request(
        b.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"warm"}'
    )
    async with asyncio.timeout(5):
        while "llama3.2:3b" not in r.router.fleet.nodes[node_id(r, b)].loaded_names():
            await asyncio.sleep(0.05)
    for _ in range(3):
        status, headers, _ = await raw_request(
            r.port,
            "POST",
            "/api/generate",
            b'{"model":"llama3.2:3b","prompt":"x","stream":false}',
        )
        assert status == 200 and headers["x-herd-node"] == node_id(r, b)


async def test_5xx_passes_through_when_no_other_node_has_the_model(fleet: Any) -> None:
    r, _a, b = fleet
    b.fail_next(500, "boom", count=1, path="/api/chat")
    status, headers, data = await raw_request(
        r.port,
        "POST",
        "/api/chat",
        b'{"model":"qwen2.5:7b","messages":[{"role":"user","content":"x"}],"stream":false}',
    )
    # only B has qwen: nothing to retry on, so the node's own failure reaches the client
    assert status == 500 and "boom" in json.loads(data)["error"]
    assert headers["x-herd-node"] == node_id(r, b) and headers["x-herd-retries"] == "0"


async def test_every_node_failing_gives_the_last_failure(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    a = await make_fake([LLAMA], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(nodes=2)
    a.fail_next(500, "a is broken", count=100, path="/api/generate")
    b.fail_next(503, count=100, path="/api/generate")
    status, headers, data = await raw_request(
        r.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"x"}'
    )
    # both nodes tried once (one retry), then the second node's answer is passed through
    assert headers["x-herd-retries"] == "1"
    second = headers["x-herd-node"]
    expected = (500, "a is broken") if second == node_id(r, a) else (503, "server busy")
    assert status == expected[0] and expected[1] in json.loads(data)["error"]


async def test_dead_node_is_retried_transparently(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    a = await make_fake([LLAMA], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url], poll_interval_s=30.0)
    await r.wait_ready(nodes=2)
    a.refuse_connections()
    served = set()
    for _ in range(4):
        status, headers, _ = await raw_request(
            r.port,
            "POST",
            "/api/generate",
            b'{"model":"llama3.2:3b","prompt":"x","stream":false}',
        )
        assert status == 200
        served.add(headers["x-herd-node"])
    assert served == {node_id(r, b)}


async def test_midstream_death_ends_with_error_line(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready()
    fake.die_after_chunks = 3
    status, _, data = await raw_request(
        r.port,
        "POST",
        "/api/generate",
        b'{"model":"llama3.2:3b","prompt":"x","options":{"num_predict":50}}',
    )
    assert status == 200
    lines = [json.loads(x) for x in data.splitlines()]
    assert "error" in lines[-1] and "disconnected" in lines[-1]["error"]
    assert all("error" not in x for x in lines[:-1])
    fake.die_after_chunks = 3
    status, _, data = await raw_request(
        r.port,
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {
                "model": "llama3.2:3b",
                "stream": True,
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "x"}],
            }
        ).encode(),
    )
    events = [e for e in data.split(b"\n\n") if e]
    assert json.loads(events[-1][6:])["error"]["message"]
    await r.router.store.flush()
    rows = await r.router.store.traces(limit=10, status="incomplete")
    assert len(rows) == 2


async def open_generate(
    port: int, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST /api/generate on a raw keep-alive connection, left open for the caller."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    return reader, writer


async def test_client_disconnect_cancels_upstream(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=20)
    r = await make_router([fake.url])
    await r.wait_ready()
    reader, writer = await open_generate(
        r.port, b'{"model":"llama3.2:3b","prompt":"x","options":{"num_predict":1000}}'
    )
    await reader.readuntil(b'"done":false')
    writer.close()
    async with asyncio.timeout(5):
        while fake.cancelled < 1:
            await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        while any(q.in_flight for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.02)
    await r.router.store.flush()
    rows = await r.router.store.traces(limit=5, status="client_disconnected")
    assert rows


async def test_client_hanging_up_before_any_byte_cancels_the_node_request(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Non-streaming: herd has written nothing to the client yet, so only the hang-up
    itself (EOF on the socket) can tell herd to stop waiting on the node."""
    fake = await make_fake([LLAMA], tokens_per_s=20)
    r = await make_router([fake.url])
    await r.wait_ready()
    _reader, writer = await open_generate(
        r.port,
        b'{"model":"llama3.2:3b","prompt":"x","stream":false,"options":{"num_predict":1000}}',
    )
    async with asyncio.timeout(5):
        while not fake.requests_to("/api/generate"):
            await asyncio.sleep(0.02)
    writer.close()
    async with asyncio.timeout(5):  # the answer would take ~50 s at 20 tokens/s
        while fake.cancelled < 1 or any(q.in_flight for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.02)
    await r.router.store.flush()
    (row,) = await r.router.store.traces(limit=5, status="client_disconnected")
    assert row["model"] == "llama3.2:3b"


async def test_pipelined_requests_are_answered_in_order(fleet: Any) -> None:
    r, _, _ = fleet
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    gen = b'{"model":"qwen2.5:7b","prompt":"x","stream":false}'
    writer.write(
        b"GET /api/version HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(gen)).encode() + b"\r\n\r\n" + gen
        + b"GET /api/tags HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read(-1)
    writer.close()
    heads = data.split(b"HTTP/1.1 ")[1:]
    assert [h[:3] for h in heads] == [b"200", b"200", b"200"]
    assert b'"version"' in heads[0] and b'"done":true' in heads[1] and b'"models"' in heads[2]


async def test_saturation_gives_503_with_retry_after(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=10, num_parallel=1)
    # slot_probe off: herd admits 1 (not a probing 2nd) on a node whose slots it never saw
    r = await make_router([fake.url], policy={"max_queue_wait_s": 0.3, "slot_probe": False})
    await r.wait_ready()
    slow = asyncio.ensure_future(
        raw_request(
            r.port,
            "POST",
            "/api/generate",
            b'{"model":"llama3.2:3b","prompt":"x","options":{"num_predict":20}}',
        )
    )
    async with asyncio.timeout(5):
        while not any(q.in_flight for q in r.router.admission.queues.values()):
            await asyncio.sleep(0.01)
    status, headers, data = await raw_request(
        r.port,
        "POST",
        "/v1/chat/completions",
        b'{"model":"llama3.2:3b","messages":[{"role":"user","content":"x"}]}',
    )
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert headers.get("x-should-retry") == "true"
    assert json.loads(data)["error"]["message"]
    assert (await slow)[0] == 200
    assert fake.max_present_seen == 1


async def test_loopback_host_check_is_satisfied(fleet: Any) -> None:
    r, _, _ = fleet
    status, _, _ = await raw_request(
        r.port,
        "POST",
        "/api/generate",
        b'{"model":"llama3.2:3b","prompt":"x","stream":false}',
        headers={"host": "herd.example.com:11435"},
    )
    assert status == 200


# ------------------------------------------------------------------ fleet semantics -----


async def test_unload_fans_out(fleet: Any) -> None:
    r, a, b = fleet
    for fake in (a, b):
        await raw_request(fake.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    for n in r.router.fleet.nodes.values():
        await r.router.fleet.refresh_node(n)
    status, _, data = await raw_request(
        r.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","keep_alive":0}'
    )
    assert status == 200 and json.loads(data)["done_reason"] == "unload"
    assert "llama3.2:3b" not in a.loaded and "llama3.2:3b" not in b.loaded


async def test_delete_and_copy_broadcast(fleet: Any) -> None:
    r, a, b = fleet
    client = ollama.AsyncClient(host=r.url)
    await client.copy("llama3.2:3b", "mine:latest")
    for fake in (a, b):
        _, _, data = await raw_request(fake.port, "GET", "/api/tags")
        assert "mine:latest" in {m["name"] for m in json.loads(data)["models"]}
    await client.delete("llama3.2:3b")
    for fake in (a, b):
        _, _, data = await raw_request(fake.port, "GET", "/api/tags")
        assert "llama3.2:3b" not in {m["name"] for m in json.loads(data)["models"]}
    with pytest.raises(ollama.ResponseError) as err:
        await client.delete("ghost:1b")
    assert err.value.status_code == 404
    await client._client.aclose()


async def test_fleet_status_and_metrics(fleet: Any) -> None:
    r, _, _ = fleet
    await raw_request(
        r.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"x","stream":false}'
    )
    _, _, data = await raw_request(r.port, "GET", "/fleet/status")
    status = json.loads(data)
    assert status["fleet"]["nodes_total"] == 2 and status["fleet"]["nodes_online"] == 2
    assert {"node_id", "status", "loaded_models", "available_models"} <= set(status["nodes"][0])
    assert any(q["done"] == 1 for q in status["queues"].values())
    _, _headers, data = await raw_request(r.port, "GET", "/metrics")
    text = data.decode()
    assert 'herd_requests_total{endpoint="/api/generate",kind="text",status="completed"} 1' in text
    assert "herd_node_up" in text


async def test_traces_are_queryable_with_sqlite(fleet: Any) -> None:
    r, _, _ = fleet
    await raw_request(
        r.port,
        "POST",
        "/api/generate",
        b'{"model":"llama3.2:3b","prompt":"x","stream":false}',
        headers={"x-herd-tags": "app:test"},
    )
    await raw_request(r.port, "POST", "/api/generate", b'{"model":"ghost:1b","prompt":"x"}')
    await r.router.store.flush()
    db = r.router.config.data_dir / "latency.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT request_id, model, status, error_message, node_id, tags FROM request_traces"
            " ORDER BY timestamp"
        ).fetchall()
    assert rows[0][2] == "completed" and rows[0][4] and "app:test" in rows[0][5]
    assert rows[1][1] == "ghost:1b" and rows[1][2] == "failed" and "not found" in rows[1][3]


async def test_pull_goes_to_the_named_node_with_progress(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    gemma = FakeModel(name="gemma3:1b", size=800_000_000, family="gemma3")
    a = await make_fake([LLAMA], tokens_per_s=0, pullable={"gemma3:1b": gemma})
    b = await make_fake([LLAMA], tokens_per_s=0, pullable={"gemma3:1b": gemma})
    r = await make_router([a.url, b.url])
    await r.wait_ready(nodes=2)
    client = ollama.AsyncClient(host=r.url, headers={"X-Herd-Node": node_id(r, b)})
    progress = [p async for p in await client.pull("gemma3:1b", stream=True)]
    assert progress[-1].status == "success"
    assert any(p.total for p in progress)
    assert "gemma3:1b" in b.models and "gemma3:1b" not in a.models
    await client._client.aclose()
    async with asyncio.timeout(5):
        while "gemma3:1b" not in {m["name"] for m in r.router.merged_tags()}:
            await asyncio.sleep(0.05)


async def test_blob_and_create_land_on_the_same_node(fleet: Any, tmp_path: Path) -> None:
    r, a, b = fleet
    client = ollama.AsyncClient(host=r.url)
    blob = b"GGUF" + bytes(range(256)) * 64
    path = tmp_path / "model.gguf"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert await client.create_blob(path) == digest
    holder = r.router.model_admin.blob_pins[digest]
    await client.create(model="custom:1b", files={"model.gguf": digest})
    fake = a if holder == node_id(r, a) else b
    other = b if fake is a else a
    assert "custom:1b" in fake.models and "custom:1b" not in other.models
    status, _, _ = await raw_request(r.port, "HEAD", f"/api/blobs/{digest}")
    assert status == 200
    await client._client.aclose()


async def test_ps_has_one_entry_per_node_and_model(fleet: Any) -> None:
    r, a, b = fleet
    for fake in (a, b):
        await raw_request(fake.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')
    status, _, data = await raw_request(r.port, "GET", "/api/ps")
    assert status == 200
    models = json.loads(data)["models"]
    assert sorted(m["node"] for m in models) == sorted([node_id(r, a), node_id(r, b)])
    for m in models:
        assert {"expires_at", "size_vram", "context_length"} <= set(m)


async def test_trace_explains_the_choice_and_metrics_parse(fleet: Any) -> None:
    r, _, _ = fleet
    await raw_request(
        r.port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"x","stream":false}'
    )
    await r.router.store.flush()
    row = (await r.router.store.traces(limit=1))[0]
    breakdown = row["scores_breakdown"]
    assert breakdown["winner"]["node_id"] == row["node_id"]
    assert breakdown["runner_up"] is not None  # both nodes hold llama
    names = {f["name"] for f in breakdown["winner"]["factors"]}
    assert len(names) >= 7 and {"thermal", "memory"} <= names
    assert all(
        {"name", "value", "contribution", "reason"} <= set(f)
        for f in breakdown["winner"]["factors"]
    )
    assert row["score"] == pytest.approx(breakdown["winner"]["total"], abs=1e-6)
    from prometheus_client.parser import text_string_to_metric_families

    _, _, data = await raw_request(r.port, "GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(data.decode())}
    assert {"herd_requests", "herd_request_duration_seconds", "herd_node_up"} <= set(families)
