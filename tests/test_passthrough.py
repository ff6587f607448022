"""Pass-through features through herd, byte for byte (issue 13 point 8).

Every feature a client can ask of one Ollama goes through the router here: tool calls,
``think`` / thinking, images, ``format`` (JSON schema), ``logprobs``, ``keep_alive`` in every
form, the deprecated ``name`` field, ``/api/push``, ``/v1/responses`` and CORS. The oracle is
the fake node itself: it records the exact request body it received and the exact response
body it sent (``RecordedRequest.response_body``), so a test compares those bytes with what
the client sent and what the client got through herd.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import ollama
import openai
import pytest

import herd
from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import (
    CORS_ALLOW_HEADERS,
    FakeModel,
    FakeOllama,
    RecordedRequest,
    parse_keep_alive,
)
from tests.http_helpers import raw_request

pytestmark = pytest.mark.both_loops

SMART = "smart:8b"  # tools, thinking, vision
PLAIN = "plain:1b"  # completion only
PUSHABLE = "me/pushable:latest"
EMBED = "embedder:latest"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
# a small PNG (1x1), base64 — the node receives it exactly as sent
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ"
    "AAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def models() -> list[FakeModel]:
    return [
        FakeModel(
            SMART, family="qwen3", capabilities=["completion", "tools", "thinking", "vision"]
        ),
        FakeModel(PLAIN, size=800_000_000),
        FakeModel(PUSHABLE),
        FakeModel(EMBED, family="nomic-bert", capabilities=["embedding"], size=270_000_000),
    ]


@pytest.fixture
async def node(make_router: RouterFactory, make_fake: FakeFactory) -> Any:
    """One fake node behind a router (default settings, context protection on): whatever
    reaches the node came through herd."""
    fake = await make_fake(models(), tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready(models=4)
    yield r, fake


async def through(
    r: RunningRouter,
    fake: FakeOllama,
    path: str,
    body: bytes,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes, RecordedRequest]:
    """One request through herd; also returns what the node saw of it (exactly one)."""
    before = len(fake.requests_to(path))
    status, hdrs, data = await raw_request(r.port, method, path, body, headers)
    recs = fake.requests_to(path)
    assert len(recs) == before + 1, f"{len(recs) - before} requests reached the node"
    return status, hdrs, data, recs[-1]


async def verbatim(r: RunningRouter, fake: FakeOllama, path: str, body: bytes) -> bytes:
    """``body`` through the router to ``path``, passed verbatim both ways; the answer."""
    status, hdrs, data, rec = await through(r, fake, path, body)
    assert_verbatim(body, status, hdrs, data, rec)
    return data


def assert_verbatim(
    sent: bytes, status: int, hdrs: dict[str, str], got: bytes, rec: RecordedRequest
) -> None:
    """The node received the client's bytes; the client received the node's bytes."""
    assert rec.body == sent
    assert status == rec.status
    for name, value in rec.response_headers:  # every end-to-end header, as the node sent it
        if name.lower() not in ("connection", "transfer-encoding", "keep-alive"):
            assert hdrs.get(name.lower()) == value, name
    assert got == bytes(rec.response_body)


def ndjson(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n") and b"\n\n" not in data
    return [json.loads(line) for line in data.splitlines()]


def sse(data: bytes) -> list[tuple[str | None, Any]]:
    """(event name or None, decoded data) per SSE event; ``[DONE]`` stays a string."""
    assert data.endswith(b"\n\n")
    out: list[tuple[str | None, Any]] = []
    for record in data[:-2].split(b"\n\n"):
        name = None
        payload: Any = None
        for line in record.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            else:
                assert line.startswith(b"data: "), line
                raw = line[6:]
                payload = raw.decode() if raw == b"[DONE]" else json.loads(raw)
        out.append((name, payload))
    return out


# ------------------------------------------------------------------ bytes, every framing --

# Odd spacing, key order and a number spelling that any re-serialisation would change.
FRAMINGS = [
    pytest.param(
        "/api/chat",
        b'{ "messages": [{"role": "user", "content": "tell me"}], "model" : "smart:8b",'
        b' "options": {"temperature": 1e0} }',
        "application/x-ndjson",
        id="ndjson",
    ),
    pytest.param(
        "/api/generate",
        b'{"model":"smart:8b" , "prompt":"why","stream":false,"options":{"seed":42.0}}',
        "application/json; charset=utf-8",
        id="json",
    ),
    pytest.param(
        "/v1/chat/completions",
        b'{"model": "smart:8b", "stream": true, "stream_options": {"include_usage": true},'
        b' "messages": [{"role": "user", "content": "hi"}], "temperature": 0.50}',
        "text/event-stream",
        id="sse",
    ),
    pytest.param(
        "/v1/chat/completions",
        b'{"messages":[{"role":"user","content":"hi"}],"model":"smart:8b","top_p":1.0}',
        "application/json; charset=utf-8",
        id="openai-json",
    ),
    pytest.param(
        "/v1/completions",
        b'{"model": "plain:1b", "prompt": "once", "stream": true,'
        b' "stream_options": {"include_usage": true}}',
        "text/event-stream",
        id="openai-completions-sse",
    ),
    pytest.param(
        "/v1/responses",
        b'{"model": "smart:8b", "input": "hello there", "stream": true}',
        "text/event-stream",
        id="responses-sse",
    ),
    pytest.param(
        "/v1/responses",
        b'{"model": "smart:8b", "input": [{"role": "user", "content": "hello"}]}',
        "application/json; charset=utf-8",
        id="responses-json",
    ),
]


@pytest.mark.parametrize(("path", "body", "ctype"), FRAMINGS)
async def test_request_and_response_bytes_are_the_nodes(
    node: Any, path: str, body: bytes, ctype: str
) -> None:
    r, fake = node
    status, hdrs, data, rec = await through(r, fake, path, body)
    assert status == 200 and hdrs["content-type"] == ctype
    assert_verbatim(body, status, hdrs, data, rec)
    assert hdrs["x-herd-node"] and hdrs["x-herd-retries"] == "0"
    if ctype == "application/x-ndjson":
        assert ndjson(data)[-1]["done"] is True
    elif ctype == "text/event-stream":
        events = sse(data)
        if path == "/v1/responses":
            assert events[-1][0] == "response.completed"
            assert all(name == payload["type"] for name, payload in events)
        else:
            assert events[-1] == (None, "[DONE]")
    else:
        json.loads(data)


async def test_request_headers_reach_the_node(node: Any) -> None:
    r, fake = node
    sent = {
        "user-agent": "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7",
        "accept": "application/json",
        "authorization": "Bearer ollama",
        "x-stainless-lang": "python",
        "openai-beta": "assistants=v2",
    }
    body = b'{"model": "smart:8b", "messages": [{"role": "user", "content": "x"}]}'
    _, _, _, rec = await through(r, fake, "/v1/chat/completions", body, headers=sent)
    for k, v in sent.items():
        assert rec.header(k) == v, k
    assert rec.header("content-type") == "application/json"


async def test_large_image_body_reaches_the_node_byte_for_byte(node: Any) -> None:
    r, fake = node
    image = base64.b64encode(bytes(range(256)) * 12_000).decode()  # ~4 MB of base64
    body = json.dumps(
        {
            "model": SMART,
            "stream": False,
            "messages": [{"role": "user", "content": "what is this", "images": [image]}],
        },
        separators=(", ", ": "),
    ).encode()
    status, hdrs, data, rec = await through(r, fake, "/api/chat", body)
    assert status == 200
    assert_verbatim(body, status, hdrs, data, rec)


async def test_resident_model_body_is_still_forwarded_verbatim(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake(models(), tokens_per_s=0)
    r = await make_router([fake.url])  # default settings: context protection on
    await r.wait_ready(models=4)
    body = b'{"model": "plain:1b", "prompt": "first", "stream": false}'
    await through(r, fake, "/api/generate", body)
    await r.router.fleet.refresh_node(next(iter(r.router.fleet.nodes.values())))  # resident, 4096
    body = b'{"model": "plain:1b", "prompt": "second", "stream": false}'
    await verbatim(r, fake, "/api/generate", body)


# ------------------------------------------------------------------ tool calls ------------


async def test_tool_calls_native_and_openai(node: Any) -> None:
    r, fake = node
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    # native, non-stream: arguments are an object
    body = json.dumps(
        {"model": SMART, "messages": ask, "tools": [WEATHER_TOOL], "stream": False}
    ).encode()
    data = await verbatim(r, fake, "/api/chat", body)
    call = json.loads(data)["message"]["tool_calls"][0]
    assert call["function"] == {
        "index": 0,
        "name": "get_weather",
        "arguments": {"city": "Paris", "unit": "celsius"},
    }
    # native stream: the call arrives in a non-final chunk
    body = json.dumps({"model": SMART, "messages": ask, "tools": [WEATHER_TOOL]}).encode()
    data = await verbatim(r, fake, "/api/chat", body)
    lines = ndjson(data)
    assert any(x["message"].get("tool_calls") for x in lines[:-1])
    # the official clients: ollama (object arguments) and openai (JSON string arguments)
    client = ollama.AsyncClient(host=r.url)
    reply = await client.chat(model=SMART, messages=ask, tools=[WEATHER_TOOL])
    assert reply.message.tool_calls and reply.message.tool_calls[0].function.arguments == {
        "city": "Paris",
        "unit": "celsius",
    }
    await client._client.aclose()
    oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama", max_retries=0)
    done = await oa.chat.completions.create(
        model=SMART,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert done.choices[0].finish_reason == "tool_calls"
    fn = done.choices[0].message.tool_calls[0].function  # type: ignore[index, union-attr]
    assert json.loads(fn.arguments) == {"city": "Paris", "unit": "celsius"}
    stream = await oa.chat.completions.create(
        model=SMART,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
    assert any(d.tool_calls for d in deltas)
    await oa.close()
    # a model without tools: the node's 400 reaches the client unchanged
    body = json.dumps({"model": PLAIN, "messages": ask, "tools": [WEATHER_TOOL]}).encode()
    status, hdrs, data, rec = await through(r, fake, "/api/chat", body)
    assert status == 400
    assert json.loads(data) == {"error": '"plain:1b" does not support tools'}
    assert_verbatim(body, status, hdrs, data, rec)


# ------------------------------------------------------------------ thinking --------------


@pytest.mark.parametrize("think", [True, "high", "low"])
async def test_think_gives_thinking_native(node: Any, think: Any) -> None:
    r, fake = node
    body = json.dumps({"model": SMART, "prompt": "why is the sky blue", "think": think}).encode()
    data = await verbatim(r, fake, "/api/generate", body)
    lines = ndjson(data)
    assert any(x.get("thinking") for x in lines) and any(x["response"] for x in lines)
    body = json.dumps(
        {
            "model": SMART,
            "messages": [{"role": "user", "content": "hm"}],
            "think": think,
            "stream": False,
        }
    ).encode()
    data = await verbatim(r, fake, "/api/chat", body)
    msg = json.loads(data)["message"]
    assert msg["thinking"] and msg["content"]


async def test_think_openai_reasoning_and_refusal(node: Any) -> None:
    r, fake = node
    body = json.dumps(
        {
            "model": SMART,
            "messages": [{"role": "user", "content": "x"}],
            "reasoning_effort": "high",
            "stream": True,
        }
    ).encode()
    data = await verbatim(r, fake, "/v1/chat/completions", body)
    deltas = [p["choices"][0]["delta"] for _, p in sse(data)[:-1] if p.get("choices")]
    assert any(d.get("reasoning") for d in deltas)
    # a model without thinking: the node's refusal passes through in both dialects
    body = json.dumps({"model": PLAIN, "prompt": "x", "think": True}).encode()
    status, hdrs, data, rec = await through(r, fake, "/api/generate", body)
    assert (status, json.loads(data)) == (400, {"error": '"plain:1b" does not support thinking'})
    assert_verbatim(body, status, hdrs, data, rec)
    body = json.dumps(
        {"model": PLAIN, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"}
    ).encode()
    status, hdrs, data, rec = await through(r, fake, "/v1/chat/completions", body)
    assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    assert_verbatim(body, status, hdrs, data, rec)


# ------------------------------------------------------------------ images ----------------


async def test_images_native_and_openai(node: Any) -> None:
    r, fake = node
    for path, body in (
        ("/api/generate", {"model": SMART, "prompt": "describe", "images": [PNG_B64]}),
        (
            "/api/chat",
            {"model": SMART, "messages": [{"role": "user", "content": "?", "images": [PNG_B64]}]},
        ),
        (
            "/v1/chat/completions",
            {
                "model": SMART,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + PNG_B64},
                            },
                        ],
                    }
                ],
            },
        ),
    ):
        raw = json.dumps(body).encode()
        status, hdrs, data, rec = await through(r, fake, path, raw)
        assert status == 200, data
        assert_verbatim(raw, status, hdrs, data, rec)
    # the ollama client base64-encodes raw image bytes itself
    client = ollama.AsyncClient(host=r.url)
    reply = await client.chat(
        model=SMART,
        messages=[{"role": "user", "content": "?", "images": [base64.b64decode(PNG_B64)]}],
    )
    assert reply.message.content
    assert fake.requests_to("/api/chat")[-1].json()["messages"][0]["images"] == [PNG_B64]
    await client._client.aclose()
    # an http image URL: Ollama's own 400 on /v1, passed through
    body = json.dumps(
        {
            "model": SMART,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ],
        }
    ).encode()
    status, hdrs, data, rec = await through(r, fake, "/v1/chat/completions", body)
    assert status == 400 and "image URLs are not currently supported" in data.decode()
    assert_verbatim(body, status, hdrs, data, rec)


# ------------------------------------------------------------------ format ----------------


def assert_fits_schema(doc: Any) -> None:
    assert isinstance(doc["name"], str) and isinstance(doc["age"], int)
    assert isinstance(doc["tags"], list) and isinstance(doc["ok"], bool)


async def test_format_json_schema_native_and_openai(node: Any) -> None:
    r, fake = node
    body = json.dumps({"model": PLAIN, "prompt": "a person", "format": SCHEMA}).encode()
    data = await verbatim(r, fake, "/api/generate", body)
    assert_fits_schema(json.loads("".join(x["response"] for x in ndjson(data))))
    body = json.dumps(
        {
            "model": PLAIN,
            "messages": [{"role": "user", "content": "json"}],
            "format": "json",
            "stream": False,
        }
    ).encode()
    data = await verbatim(r, fake, "/api/chat", body)
    assert isinstance(json.loads(json.loads(data)["message"]["content"]), dict)
    oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama", max_retries=0)
    done = await oa.chat.completions.create(
        model=PLAIN,
        messages=[{"role": "user", "content": "a person"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA},
        },
    )
    assert_fits_schema(json.loads(done.choices[0].message.content or ""))
    assert (
        fake.requests_to("/v1/chat/completions")[-1].json()["response_format"]["json_schema"][
            "schema"
        ]
        == SCHEMA
    )
    await oa.close()
    # a format that is neither "json" nor a schema: the node's 400, unchanged
    body = b'{"model": "plain:1b", "prompt": "x", "format": "yaml"}'
    status, hdrs, data, rec = await through(r, fake, "/api/generate", body)
    assert status == 400 and "invalid format" in json.loads(data)["error"]
    assert_verbatim(body, status, hdrs, data, rec)


# ------------------------------------------------------------------ logprobs --------------


async def test_logprobs_native_and_openai(node: Any) -> None:
    r, fake = node
    body = json.dumps(
        {"model": PLAIN, "prompt": "count", "logprobs": True, "top_logprobs": 3}
    ).encode()
    data = await verbatim(r, fake, "/api/generate", body)
    lines = ndjson(data)
    lps = [lp for x in lines[:-1] for lp in x["logprobs"]]
    assert len(lps) == len(lines) - 1
    assert all(len(lp["top_logprobs"]) == 3 and lp["logprob"] <= 0 for lp in lps)
    body = json.dumps(
        {
            "model": PLAIN,
            "messages": [{"role": "user", "content": "c"}],
            "logprobs": True,
            "stream": False,
        }
    ).encode()
    data = await verbatim(r, fake, "/api/chat", body)
    obj = json.loads(data)
    assert "".join(lp["token"] for lp in obj["logprobs"]) == obj["message"]["content"]
    oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama", max_retries=0)
    done = await oa.chat.completions.create(
        model=PLAIN,
        messages=[{"role": "user", "content": "c"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    await oa.close()
    body = b'{"model": "plain:1b", "prompt": "x", "logprobs": true, "top_logprobs": 21}'
    status, hdrs, data, rec = await through(r, fake, "/api/generate", body)
    assert status == 400 and "top_logprobs" in json.loads(data)["error"]
    assert_verbatim(body, status, hdrs, data, rec)


# ------------------------------------------------------------------ keep_alive ------------

# Every form Ollama's api.Duration reads: numbers are whole seconds (0.9 -> 0), negative is
# forever, strings are Go durations ("-0s" and "0h0m" are zero, "0.0" and "-1" have no unit).
KEEP_ALIVE_FORMS: list[Any] = [
    300,
    2.5,
    -1,
    -0.5,
    "10m",
    "1h30m",
    "24h",
    "-1m",
    "+5s",
    "500ms",
    "1.5h",
    0,
    0.0,
    0.9,
    "0",
    "-0",
    "+0",
    "0s",
    "-0s",
    "0h0m",
    "0.0s",
    "0ms",
    "0.0",
    "00",
    "-1",
    "10",
    "5 m",
    "1d",
    "",
    True,
    [],
    {},
]


def expected_keep_alive(value: Any) -> float | None:
    """What Ollama makes of ``value``: seconds (inf = forever) or None for a 400."""
    try:
        return parse_keep_alive(value, 300.0)
    except ValueError:
        return None


@pytest.mark.parametrize("value", KEEP_ALIVE_FORMS, ids=repr)
async def test_keep_alive_forms_match_ollama(
    make_router: RouterFactory, make_fake: FakeFactory, value: Any
) -> None:
    """The same request through herd (two nodes hold the model) and straight to a lone
    node give the same status and the same done_reason; an unload empties every node."""
    a = await make_fake(models(), tokens_per_s=0)
    b = await make_fake(models(), tokens_per_s=0)
    direct = await make_fake(models(), tokens_per_s=0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(models=4, nodes=2)
    for fake in (a, b, direct):  # resident everywhere
        await raw_request(fake.port, "POST", "/api/generate", b'{"model": "plain:1b"}')
    for n in r.router.fleet.nodes.values():
        await r.router.fleet.refresh_node(n)
    expect = expected_keep_alive(value)
    for path, empty in (("/api/generate", {"prompt": ""}), ("/api/chat", {"messages": []})):
        body = json.dumps({"model": PLAIN, **empty, "keep_alive": value}).encode()
        want_status, _, want = await raw_request(direct.port, "POST", path, body)
        before = [len(f.requests_to(path)) for f in (a, b)]
        status, _, got = await raw_request(r.port, "POST", path, body)
        served = [f for f, n in zip((a, b), before, strict=True) if len(f.requests_to(path)) > n]
        assert status == want_status, (got, want)
        if expect is None:
            assert status == 400
            assert json.loads(got) == json.loads(want)
            continue
        assert json.loads(got)["done_reason"] == json.loads(want)["done_reason"]
        if expect == 0:
            assert json.loads(got)["done_reason"] == "unload" and len(served) == 2
            assert all(f.requests_to(path)[-1].body == body for f in served)  # as sent
            assert PLAIN not in a.loaded and PLAIN not in b.loaded and PLAIN not in direct.loaded
            for fake in (a, b, direct):  # load again for the next path
                await raw_request(fake.port, "POST", "/api/generate", b'{"model": "plain:1b"}')
            for n in r.router.fleet.nodes.values():
                await r.router.fleet.refresh_node(n)
        else:  # a load: one node got the request with the client's keep_alive, as sent
            assert len(served) == 1
            assert served[0].requests_to(path)[-1].json()["keep_alive"] == value
            assert served[0].loaded[PLAIN].keep_alive_s == expect
    # with a prompt, keep_alive is the client's business: forwarded verbatim, same outcome
    body = json.dumps({"model": PLAIN, "prompt": "hi", "stream": False, "keep_alive": value})
    want_status, _, want = await raw_request(direct.port, "POST", "/api/generate", body.encode())
    status, _, got = await raw_request(r.port, "POST", "/api/generate", body.encode())
    assert status == want_status
    if status == 400:
        assert json.loads(got) == json.loads(want)


def test_is_zero_keep_alive_follows_go() -> None:
    for value in KEEP_ALIVE_FORMS:
        assert herd.is_zero_keep_alive(value) == (expected_keep_alive(value) == 0), value


# ------------------------------------------------------------------ name, push, pull ------


async def test_deprecated_name_field(node: Any) -> None:
    r, fake = node
    body = b'{"name": "Smart:8B"}'
    status, hdrs, data, rec = await through(r, fake, "/api/show", body)
    assert status == 200 and json.loads(data)["capabilities"]
    assert_verbatim(body, status, hdrs, data, rec)
    body = b'{"name": "plain:1b", "stream": false}'
    status, hdrs, data, rec = await through(r, fake, "/api/pull", body)
    assert (status, json.loads(data)) == (200, {"status": "success"})
    assert_verbatim(body, status, hdrs, data, rec)
    body = b'{"name" : "me/pushable" }'
    status, hdrs, data, rec = await through(r, fake, "/api/push", body)
    assert status == 200 and ndjson(data)[-1] == {"status": "success"}
    assert_verbatim(body, status, hdrs, data, rec)
    body = b'{"name": "plain:1b", "from": "plain:1b", "system": "be brief", "stream": false}'
    status, hdrs, data, rec = await through(r, fake, "/api/create", body)
    assert status == 200
    assert_verbatim(body, status, hdrs, data, rec)
    body = b'{"name": "embedder"}'
    status, hdrs, data, rec = await through(r, fake, "/api/delete", body, method="DELETE")
    assert status == 200 and rec.body == body and EMBED not in fake.models


async def test_push_streams_progress_and_errors(node: Any) -> None:
    r, fake = node
    client = ollama.AsyncClient(host=r.url)
    statuses = [p.status async for p in await client.push(PUSHABLE, stream=True)]
    assert statuses[0] == "retrieving manifest" and statuses[-1] == "success"
    assert fake.requests_to("/api/push")[-1].json() == {
        "model": PUSHABLE,
        "insecure": False,
        "stream": True,
    }
    # a model outside a namespace you own: Ollama's error line inside a 200 stream
    body = b'{"model": "plain:1b"}'
    status, hdrs, data, rec = await through(r, fake, "/api/push", body)
    assert status == 200 and "not authorized" in ndjson(data)[-1]["error"]
    assert_verbatim(body, status, hdrs, data, rec)
    # a model no node has: herd's own 404 (nothing is forwarded)
    with pytest.raises(ollama.ResponseError) as err:
        await client.push("me/ghost:latest")
    assert err.value.status_code == 404
    await client._client.aclose()


async def test_pull_with_herd_field_is_rewritten_without_it(node: Any) -> None:
    r, fake = node
    nid = next(iter(r.router.fleet.nodes))
    body = b'{"model": "plain:1b", "stream": false, "node_id": "%s"}' % nid.encode()
    status, _, _, rec = await through(r, fake, "/api/pull", body)
    assert status == 200 and rec.json() == {"model": PLAIN, "stream": False}


# ------------------------------------------------------------------ /v1/responses ---------


async def test_responses_api_through_the_openai_sdk(node: Any) -> None:
    r, fake = node
    oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama", max_retries=0)
    resp = await oa.responses.create(model=SMART, input="hello", instructions="be nice")
    assert resp.status == "completed" and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens > 0
    events = [e async for e in await oa.responses.create(model=SMART, input="hi", stream=True)]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather",
        "parameters": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
    }
    called = await oa.responses.create(
        model=SMART,
        input="What is the weather in Oslo?",
        tools=[tool],  # type: ignore[list-item]
    )
    call = called.output[0]
    assert call.type == "function_call" and json.loads(call.arguments)["city"] == "Oslo"
    thought = await oa.responses.create(model=SMART, input="think", reasoning={"effort": "high"})
    assert thought.output[0].type == "reasoning"
    await oa.close()
    # the node's 400 for a bad reasoning value, and herd's own 404 for an unknown model
    body = b'{"model": "smart:8b", "input": "x", "reasoning": {"effort": "extreme"}}'
    status, hdrs, data, rec = await through(r, fake, "/v1/responses", body)
    assert status == 400 and "invalid reasoning value" in data.decode()
    assert_verbatim(body, status, hdrs, data, rec)
    status, _, data = await raw_request(
        r.port, "POST", "/v1/responses", b'{"model": "ghost:1b", "input": "x"}'
    )
    assert status == 404 and json.loads(data)["error"]["message"]


# ------------------------------------------------------------------ CORS ------------------


async def test_cors_preflight_like_ollama(node: Any) -> None:
    r, fake = node
    ask = {
        "origin": "http://localhost:3000",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-stainless-lang",
    }
    want_status, want, _ = await raw_request(fake.port, "OPTIONS", "/api/chat", headers=ask)
    status, got, body = await raw_request(r.port, "OPTIONS", "/api/chat", headers=ask)
    assert (status, want_status, body) == (204, 204, b"")
    assert got["access-control-allow-origin"] == "http://localhost:3000"
    allowed = {h.strip().lower() for h in got["access-control-allow-headers"].split(",")}
    assert {h.lower() for h in CORS_ALLOW_HEADERS} <= allowed
    assert {"content-type", "x-stainless-lang"} <= allowed
    assert "POST" in got["access-control-allow-methods"]
    assert got["access-control-max-age"] == want["access-control-max-age"]
    # an origin Ollama does not allow: refused, no CORS grant
    foreign = {**ask, "origin": "https://evil.example"}
    want_status, _, _ = await raw_request(fake.port, "OPTIONS", "/api/chat", headers=foreign)
    status, got, _ = await raw_request(r.port, "OPTIONS", "/api/chat", headers=foreign)
    assert status == want_status == 403 and "access-control-allow-origin" not in got


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/tags", b""),  # answered by herd itself
        ("GET", "/api/version", b""),
        ("GET", "/v1/models", b""),
        ("POST", "/api/chat", b'{"model": "smart:8b", "messages": [], "keep_alive": "5m"}'),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "smart:8b", "messages": [{"role": "user", "content": "x"}]}',
        ),
    ],
)
async def test_cors_actual_requests_carry_the_grant(
    node: Any, method: str, path: str, body: bytes
) -> None:
    """A browser page on an allowed origin can read every answer, local or forwarded."""
    r, _fake = node
    origin = {"origin": "http://127.0.0.1:5173"}
    status, got, _ = await raw_request(r.port, method, path, body, headers=origin)
    assert status == 200
    assert got["access-control-allow-origin"] == "http://127.0.0.1:5173"
    assert "origin" in got.get("vary", "").lower()


# ------------------------------------------------------------------ traces ----------------


@pytest.mark.parametrize(("path", "body", "ctype"), FRAMINGS)
async def test_trace_counts_the_tokens_of_every_framing(
    node: Any, path: str, body: bytes, ctype: str
) -> None:
    """What herd relays untouched it still reads for its trace: the token counts of the
    final chunk, the usage chunk, or the Responses API's ``response.completed`` event."""
    r, fake = node
    status, _, _, _ = await through(r, fake, path, body)
    assert status == 200
    await r.router.store.flush()
    row = (await r.router.store.traces(limit=1))[0]
    assert row["status"] == "completed"
    assert row["prompt_tokens"] and row["prompt_tokens"] > 0, row
    assert row["completion_tokens"] and row["completion_tokens"] > 0, row


async def test_responses_stream_cut_by_the_node_ends_with_an_error_the_sdk_raises(
    node: Any,
) -> None:
    r, fake = node
    fake.die_after_chunks = 4  # the node's connection drops after four SSE events
    oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="ollama", max_retries=0)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="disconnected mid-stream"):
        async for event in await oa.responses.create(model=SMART, input="hi", stream=True):
            seen.append(event.type)
    assert seen[:2] == ["response.created", "response.in_progress"]
    await oa.close()
    await r.router.store.flush()
    row = (await r.router.store.traces(limit=1))[0]
    assert row["status"] == "incomplete" and "mid-stream" in row["error_message"]


@pytest.mark.parametrize(
    ("body", "verbatim"),
    [
        # OpenAI's own metadata (no herd tags): the client's bytes
        (b'{"model": "smart:8b", "metadata": {"app": "notes"}, "messages": []}', True),
        (b'{"model": "smart:8b", "metadata": "opaque", "messages": []}', True),
        # herd's tags (or an empty metadata object herd drops): re-serialised without them
        (b'{"model": "smart:8b", "metadata": {"tags": ["a"]}, "messages": []}', False),
        (b'{"model": "smart:8b", "metadata": {}, "messages": []}', False),
        (b'{"model": "smart:8b", "fallback": false, "messages": []}', False),
    ],
)
async def test_metadata_without_herd_tags_is_forwarded_verbatim(
    node: Any, body: bytes, verbatim: bool
) -> None:
    r, fake = node
    status, _, _, rec = await through(r, fake, "/v1/chat/completions", body)
    assert status == 400  # the node's own "[] is too short" (any answer will do)
    assert (rec.body == body) is verbatim
    sent = json.loads(body)
    for key in ("fallback",):
        sent.pop(key, None)
    meta = sent.get("metadata")
    if isinstance(meta, dict):
        meta.pop("tags", None)
        if not meta:
            sent.pop("metadata")
    assert rec.json() == sent


@pytest.mark.parametrize("value", ["1h", 0, -1, "-1", 2.7])
async def test_keep_alive_on_embeddings_is_the_nodes_business(node: Any, value: Any) -> None:
    r, fake = node
    expect = expected_keep_alive(value)
    for path, body in (
        ("/api/embed", {"model": EMBED, "input": ["a"], "keep_alive": value}),
        ("/api/embeddings", {"model": EMBED, "prompt": "a", "keep_alive": value}),
    ):
        raw = json.dumps(body).encode()
        status, hdrs, data, rec = await through(r, fake, path, raw)
        assert_verbatim(raw, status, hdrs, data, rec)
        if expect is None:
            assert status == 400 and "missing unit" in json.loads(data)["error"]
        elif expect == 0:
            assert status == 200 and EMBED not in fake.loaded  # unloaded once answered
        else:
            assert status == 200 and fake.loaded[EMBED].keep_alive_s == expect
