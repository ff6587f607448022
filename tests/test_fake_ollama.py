"""Validate tests/fake_ollama.py against the Ollama API spec with the official clients
(ollama-python, openai) and raw sockets. Loopback only, port 0, every wait bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.fake_ollama import (
    BUSY_ERROR,
    FakeModel,
    FakeOllama,
    canonical_name,
    fake_tokens,
    parse_go_duration,
    run_in_thread,
)
from tests.http_helpers import Response, fetch, request_bytes, wait_until

# The project's conftest runs marked async tests under both asyncio and uvloop.
pytestmark = pytest.mark.both_loops

RFC3339_NS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
CHAT = "llama3.2:3b"
SMART = "qwen3:0.6b"
EMB = "nomic-embed-text:latest"


def models() -> list[FakeModel]:
    return [
        FakeModel(CHAT),
        FakeModel(
            SMART,
            family="qwen3",
            parameter_size="751.63M",
            size=522_653_767,
            capabilities=["completion", "tools", "thinking"],
            context_length=40960,
        ),
        FakeModel(
            "nomic-embed-text",
            family="nomic-bert",
            parameter_size="137M",
            size=274_302_450,
            quantization_level="F16",
            capabilities=["embedding"],
            embedding_length=768,
            context_length=2048,
        ),
    ]


def make_fake(**kw: Any) -> FakeOllama:
    kw.setdefault("tokens_per_s", 0)
    kw.setdefault("prompt_tokens_per_s", 0)
    kw.setdefault("load_delay_s", 0.01)
    return FakeOllama(models(), **kw)


async def raw_request(
    fake: FakeOllama,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection with ``Connection: close``; returns the parsed
    response, keeping chunk boundaries."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    hdrs = [("Host", host), ("Connection", "close"), *(headers or [])]
    if body is not None:
        hdrs.append(("Content-Length", str(len(body))))
    request = request_bytes(method, path, hdrs, body or b"")
    return await fetch(fake.port, request, method, timeout=timeout)


@contextlib.contextmanager
def _closing(closers: list[Callable[[], None]]) -> Iterator[None]:
    try:
        yield
    finally:
        for close in closers:
            close()


def post_bytes(path: str, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    hdrs = [("Host", "localhost"), ("Content-Type", "application/json")]
    return request_bytes("POST", path, [*hdrs, ("Content-Length", str(len(body)))], body)


def ndjson(resp: Response) -> list[dict[str, Any]]:
    text = resp.body.decode()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert all(line.strip() for line in lines), "blank line in NDJSON stream"
    return [json.loads(line) for line in lines]


# ----------------------------------------------------------------------------- framing


async def test_root_get_and_head() -> None:
    async with make_fake() as fake:
        r = await raw_request(fake, "GET", "/")
        assert r.status == 200
        assert r.body == b"Ollama is running"
        assert r.header("content-type") == "text/plain; charset=utf-8"
        h = await raw_request(fake, "HEAD", "/")
        assert h.status == 200 and h.body == b""
        assert h.header("content-length") == "17"
        v = await raw_request(fake, "GET", "/api/version")
        assert v.json() == {"version": "0.12.6"}
        assert v.header("content-type") == "application/json; charset=utf-8"


async def test_unknown_path_404_and_wrong_method_405() -> None:
    async with make_fake() as fake:
        r = await raw_request(fake, "GET", "/api/nope")
        assert (r.status, r.body) == (404, b"404 page not found")
        assert (r.header("content-type") or "").startswith("text/plain")
        r = await raw_request(fake, "GET", "/api/chat")
        assert (r.status, r.body) == (405, b"405 method not allowed")
        r = await raw_request(fake, "POST", "/api/delete", {"model": CHAT})
        assert r.status == 405
        r = await raw_request(fake, "POST", "/api/tags", b"{}")
        assert r.status == 405


async def test_host_check() -> None:
    async with make_fake() as fake:
        for host in ("evil.example.com", "example.com:11434", "8.8.8.8"):
            r = await raw_request(fake, "GET", "/api/tags", host=host)
            assert r.status == 403, host
            assert r.body == b""
        for host in ("localhost:11434", "127.0.0.1", "192.168.1.7:11434", "box.local", "[::1]:1"):
            r = await raw_request(fake, "GET", "/", host=host)
            assert r.status == 200, host
        r = await raw_request(fake, "OPTIONS", "/api/chat", host="localhost")
        assert r.status == 204
    async with make_fake(loopback_host_check=False) as fake:
        r = await raw_request(fake, "GET", "/", host="evil.example.com")
        assert r.status == 200


async def test_missing_and_malformed_body() -> None:
    async with make_fake() as fake:
        for path in ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/api/pull"):
            r = await raw_request(fake, "POST", path)
            assert r.status == 400
            assert r.json() == {"error": "missing request body"}
            r = await raw_request(fake, "POST", path, b"{not json")
            assert r.status == 400
            assert "error" in r.json()
        r = await raw_request(fake, "POST", "/api/chat", b"[1,2]")
        assert r.status == 400 and "cannot unmarshal array" in r.json()["error"]
        r = await raw_request(fake, "POST", "/v1/chat/completions", b"{bad")
        assert r.status == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] is None


async def test_ndjson_chat_stream_framing() -> None:
    async with make_fake() as fake:
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status == 200
        assert r.header("content-type") == "application/x-ndjson"
        assert r.header("transfer-encoding") == "chunked"
        assert r.complete
        objs = ndjson(r)
        # every NDJSON line is flushed as its own chunk
        assert len(r.chunks) == len(objs)
        assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in r.chunks)
        *tokens, final = objs
        assert len(tokens) == 12
        for t in tokens:
            assert set(t) == {"model", "created_at", "message", "done"}
            assert t["done"] is False and t["model"] == CHAT
            assert t["message"]["role"] == "assistant"
            assert RFC3339_NS.match(t["created_at"])
        text = "".join(t["message"]["content"] for t in tokens)
        msgs = [{"role": "user", "content": "hi"}]
        assert text == FakeOllama.expected_text(CHAT, messages=msgs)
        assert final["done"] is True and final["done_reason"] == "stop"
        assert final["message"] == {"role": "assistant", "content": ""}
        for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration"):
            assert isinstance(final[k], int) and final[k] > 0, k
        assert final["eval_count"] == 12 and final["eval_duration"] > 0
        assert "context" not in final


async def test_generate_stream_and_non_stream() -> None:
    async with make_fake() as fake:
        r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "prompt": "Why?"})
        objs = ndjson(r)
        assert all("response" in o for o in objs)
        final = objs[-1]
        assert final["done"] is True and final["response"] == ""
        assert isinstance(final["context"], list) and all(
            isinstance(i, int) for i in final["context"]
        )
        streamed = "".join(o["response"] for o in objs)
        r2 = await raw_request(
            fake, "POST", "/api/generate", {"model": CHAT, "prompt": "Why?", "stream": False}
        )
        assert r2.header("content-type") == "application/json; charset=utf-8"
        assert r2.header("content-length") == str(len(r2.body))
        one = r2.json()
        assert one["response"] == streamed == FakeOllama.expected_text(CHAT, "Why?")
        assert one["done_reason"] == "stop" and one["context"] == final["context"]
        raw = await raw_request(
            fake,
            "POST",
            "/api/generate",
            {"model": CHAT, "prompt": "x", "raw": True, "stream": False},
        )
        assert "context" not in raw.json()
        bad = await raw_request(
            fake,
            "POST",
            "/api/generate",
            {"model": CHAT, "prompt": "x", "raw": True, "system": "s"},
        )
        assert bad.status == 400
        assert bad.json()["error"] == "raw mode does not support template, system, or context"


async def test_num_predict_bounds_tokens_and_length_reason() -> None:
    async with make_fake() as fake:
        body = {"model": CHAT, "prompt": "p", "stream": False, "options": {"num_predict": 5}}
        one = (await raw_request(fake, "POST", "/api/generate", body)).json()
        assert one["eval_count"] == 5 and one["done_reason"] == "length"
        assert one["response"] == "".join(fake_tokens(CHAT, "p", 5))
        fake.response_tokens = 40
        body["options"] = {"num_predict": 30, "temperature": None}
        one = (await raw_request(fake, "POST", "/api/generate", body)).json()
        assert one["eval_count"] == 30 and one["done_reason"] == "length"
        body["options"] = {"num_predict": 100}
        one = (await raw_request(fake, "POST", "/api/generate", body)).json()
        assert one["eval_count"] == 40 and one["done_reason"] == "stop"


async def test_unknown_model_and_capability_errors() -> None:
    async with make_fake() as fake:
        r = await raw_request(fake, "POST", "/api/chat", {"model": "nope", "messages": []})
        assert r.status == 404 and r.json() == {"error": "model 'nope' not found"}
        r = await raw_request(fake, "POST", "/api/show", {"model": "nope"})
        assert r.status == 404 and r.json() == {"error": "model 'nope' not found"}
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": EMB, "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status == 400 and r.json()["error"] == f'"{EMB}" does not support chat'
        r = await raw_request(fake, "POST", "/api/generate", {"model": EMB, "prompt": "x"})
        assert r.status == 400 and r.json()["error"] == f'"{EMB}" does not support generate'
        r = await raw_request(
            fake, "POST", "/api/generate", {"model": CHAT, "prompt": "x", "think": True}
        )
        assert r.status == 400 and r.json()["error"] == f'"{CHAT}" does not support thinking'
        r = await raw_request(
            fake,
            "POST",
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status == 404
        assert r.json() == {
            "error": {
                "message": "model 'nope' not found",
                "type": "not_found_error",
                "param": None,
                "code": None,
            }
        }
        # names are case-insensitive, default tag latest, full registry form accepted
        r = await raw_request(fake, "POST", "/api/show", {"name": "NOMIC-embed-text"})
        assert r.status == 200
        r = await raw_request(
            fake, "POST", "/api/show", {"model": "registry.ollama.ai/library/llama3.2:3B"}
        )
        assert r.status == 200
        assert canonical_name("Llama3.2") == "llama3.2:latest"


async def test_tags_ps_show_fields() -> None:
    async with make_fake() as fake:
        tags = (await raw_request(fake, "GET", "/api/tags")).json()["models"]
        assert {t["name"] for t in tags} == {CHAT, SMART, EMB}
        for t in tags:
            assert set(t) >= {
                "name",
                "model",
                "modified_at",
                "size",
                "digest",
                "details",
                "capabilities",
            }
            assert t["name"] == t["model"] and re.fullmatch(r"[0-9a-f]{64}", t["digest"])
            assert RFC3339_NS.match(t["modified_at"])
            assert set(t["details"]) == {
                "parent_model",
                "format",
                "family",
                "families",
                "parameter_size",
                "quantization_level",
            }
        assert [t["modified_at"] for t in tags] == sorted(
            (t["modified_at"] for t in tags), reverse=True
        )
        assert (await raw_request(fake, "GET", "/api/ps")).json() == {"models": []}
        await raw_request(
            fake,
            "POST",
            "/api/generate",
            {"model": SMART, "prompt": "hi", "stream": False, "options": {"num_ctx": 8192}},
        )
        ps = (await raw_request(fake, "GET", "/api/ps")).json()["models"]
        assert len(ps) == 1
        p = ps[0]
        assert set(p) >= {
            "name",
            "model",
            "size",
            "digest",
            "details",
            "expires_at",
            "size_vram",
            "context_length",
        }
        assert p["context_length"] == 8192 and p["size_vram"] == p["size"] > 522_653_767
        assert RFC3339_NS.match(p["expires_at"])
        show = (await raw_request(fake, "POST", "/api/show", {"model": SMART})).json()
        assert show["model_info"]["qwen3.context_length"] == 40960
        assert show["capabilities"] == ["completion", "tools", "thinking"]
        for k in ("modelfile", "parameters", "template", "details", "modified_at"):
            assert k in show


# ----------------------------------------------------------------------------- lifecycle


async def test_load_only_and_unload() -> None:
    async with make_fake(load_delay_s=0.05) as fake:
        r = (await raw_request(fake, "POST", "/api/generate", {"model": CHAT})).json()
        assert r["done"] is True and r["done_reason"] == "load" and r["response"] == ""
        assert CHAT in fake.loaded and fake.loaded[CHAT].in_flight == 0
        r = (await raw_request(fake, "POST", "/api/chat", {"model": SMART, "messages": []})).json()
        assert r["done_reason"] == "load" and r["message"] == {"role": "assistant", "content": ""}
        assert set(fake.loaded) == {CHAT, SMART}
        r = (
            await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": 0})
        ).json()
        assert r["done_reason"] == "unload"
        r = (
            await raw_request(
                fake, "POST", "/api/chat", {"model": SMART, "messages": [], "keep_alive": "0s"}
            )
        ).json()
        assert r["done_reason"] == "unload"
        assert fake.loaded == {}
        assert (await raw_request(fake, "GET", "/api/ps")).json() == {"models": []}


async def test_keep_alive_forms_and_expiry() -> None:
    async with make_fake() as fake:
        for ka in (10, 2.5, "5m", "1h30m", "10s"):
            r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": ka})
            assert r.status == 200, ka
        r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": -1})
        assert r.status == 200 and fake.loaded[CHAT].expires_at == math.inf
        ps = (await raw_request(fake, "GET", "/api/ps")).json()["models"]
        assert int(ps[0]["expires_at"][:4]) > 2200
        for bad, msg in (
            ("-1", 'time: missing unit in duration "-1"'),
            ("abc", "time: invalid duration"),
        ):
            r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": bad})
            assert r.status == 400 and r.json()["error"].startswith(msg)
        # a number is whole seconds (Go: int(t) * time.Second): 0.9 unloads like 0
        r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": 0.9})
        assert r.json()["done_reason"] == "unload" and CHAT not in fake.loaded
        # expiry: idle deadline elapses → unloaded without any further request
        await raw_request(
            fake, "POST", "/api/generate", {"model": SMART, "prompt": "x", "keep_alive": "200ms"}
        )
        assert SMART in fake.loaded
        await wait_until(lambda: SMART not in fake.loaded, 3)
        assert (SMART, "expired") in fake.unload_events
        # keep_alive 0 with a prompt: unloaded when the request finishes
        await raw_request(
            fake, "POST", "/api/generate", {"model": SMART, "prompt": "x", "keep_alive": 0}
        )
        assert SMART not in fake.loaded
        assert parse_go_duration("1h30m") == 5400 and parse_go_duration("-1m") == -60


async def test_num_ctx_change_forces_reload() -> None:
    async with make_fake(load_delay_s=0.1) as fake:
        base = {"model": CHAT, "prompt": "x", "stream": False}
        a = (await raw_request(fake, "POST", "/api/generate", base)).json()
        b = (await raw_request(fake, "POST", "/api/generate", base)).json()
        c = (
            await raw_request(fake, "POST", "/api/generate", {**base, "options": {"num_ctx": 2048}})
        ).json()
        d = (
            await raw_request(fake, "POST", "/api/generate", {**base, "options": {"num_ctx": 2048}})
        ).json()
        assert a["load_duration"] >= 90_000_000 and c["load_duration"] >= 90_000_000
        assert b["load_duration"] < 50_000_000 and d["load_duration"] < 50_000_000
        assert fake.load_events == [(CHAT, 4096), (CHAT, 2048)]
        assert fake.loaded[CHAT].context_length == 2048
        # num_ctx is capped at the model's trained context length
        await raw_request(fake, "POST", "/api/generate", {**base, "options": {"num_ctx": 10**6}})
        assert fake.loaded[CHAT].context_length == 4096


async def test_lru_eviction_beyond_max_loaded_models() -> None:
    async with make_fake(max_loaded_models=2) as fake:
        for m in (CHAT, SMART):
            await raw_request(fake, "POST", "/api/generate", {"model": m})
            await asyncio.sleep(0.01)
        await raw_request(fake, "POST", "/api/generate", {"model": CHAT})  # touch: SMART is LRU
        await raw_request(fake, "POST", "/api/embed", {"model": EMB, "input": "x"})
        assert set(fake.loaded) == {CHAT, EMB}
        assert (SMART, "evicted") in fake.unload_events


async def test_slots_never_exceed_num_parallel_and_queue() -> None:
    async with make_fake(num_parallel=2, tokens_per_s=400) as fake:
        body = {"model": CHAT, "prompt": "x", "stream": False}
        rs = await asyncio.gather(
            *(raw_request(fake, "POST", "/api/generate", body) for _ in range(7))
        )
        assert all(r.status == 200 for r in rs)
        assert fake.max_in_flight_seen[CHAT] == 2
        assert fake.max_active_seen == 2
        # two models → independent slots
        fake.reset_stats()
        rs = await asyncio.gather(
            *(
                raw_request(fake, "POST", "/api/generate", {**body, "model": m})
                for m in [CHAT, SMART] * 3
            )
        )
        assert all(r.status == 200 for r in rs)
        assert fake.max_in_flight_seen == {CHAT: 2, SMART: 2}
        assert fake.max_active_seen == 4
        assert fake.active == 0 and fake.queued == 0


async def test_busy_503_beyond_max_queue() -> None:
    async with make_fake(num_parallel=1, max_queue=2, tokens_per_s=200) as fake:
        body = {"model": CHAT, "prompt": "x", "stream": False}
        rs = await asyncio.gather(
            *(raw_request(fake, "POST", "/api/generate", body) for _ in range(6))
        )
        statuses = sorted(r.status for r in rs)
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2
        busy = next(r for r in rs if r.status == 503)
        assert busy.json() == {"error": BUSY_ERROR}
        assert fake.rejected_busy == statuses.count(503)
        assert fake.max_in_flight_seen[CHAT] == 1


async def test_embedding_model_single_slot_and_vectors() -> None:
    async with make_fake(num_parallel=4) as fake:
        texts = ["alpha", "beta", "alpha"]
        r = (await raw_request(fake, "POST", "/api/embed", {"model": EMB, "input": texts})).json()
        vecs = r["embeddings"]
        assert len(vecs) == 3 and all(len(v) == 768 for v in vecs)
        assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
        assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5 for v in vecs)
        assert r["prompt_eval_count"] == 3 and r["total_duration"] > 0 and r["load_duration"] > 0
        r = (
            await raw_request(
                fake, "POST", "/api/embed", {"model": EMB, "input": "alpha", "dimensions": 8}
            )
        ).json()
        assert len(r["embeddings"][0]) == 8
        assert abs(math.sqrt(sum(x * x for x in r["embeddings"][0])) - 1) < 1e-5
        r = (await raw_request(fake, "POST", "/api/embed", {"model": EMB, "input": []})).json()
        assert r["embeddings"] == []
        r = await raw_request(fake, "POST", "/api/embed", {"model": EMB, "input": 3})
        assert r.status == 400 and r.json()["error"] == "invalid input type"
        leg = (
            await raw_request(fake, "POST", "/api/embeddings", {"model": EMB, "prompt": "alpha"})
        ).json()
        assert len(leg["embedding"]) == 768
        assert abs(math.sqrt(sum(x * x for x in leg["embedding"])) - 1) > 0.1  # not normalised
        leg = (
            await raw_request(fake, "POST", "/api/embeddings", {"model": EMB, "prompt": ""})
        ).json()
        assert leg == {"embedding": []}
        rs = await asyncio.gather(
            *(
                raw_request(fake, "POST", "/api/embed", {"model": EMB, "input": str(i)})
                for i in range(5)
            )
        )
        assert all(r.status == 200 for r in rs)
        assert fake.max_in_flight_seen[EMB] == 1  # embedding models run one slot


async def test_thinking_and_tools() -> None:
    async with make_fake() as fake:
        body = {"model": SMART, "messages": [{"role": "user", "content": "hi"}], "think": True}
        objs = ndjson(await raw_request(fake, "POST", "/api/chat", body))
        thinking = [o for o in objs if o["message"].get("thinking")]
        assert len(thinking) == fake.thinking_tokens
        assert all(o["message"]["content"] == "" for o in thinking)
        one = (await raw_request(fake, "POST", "/api/chat", {**body, "stream": False})).json()
        assert one["message"]["thinking"] and one["message"]["content"]
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string"},
                            "unit": {"type": "string", "enum": ["celsius", "f"]},
                        },
                    },
                },
            }
        ]
        msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
        objs = ndjson(
            await raw_request(
                fake, "POST", "/api/chat", {"model": SMART, "messages": msgs, "tools": tools}
            )
        )
        calls = [o for o in objs if o["message"].get("tool_calls")]
        assert len(calls) == 1 and calls[0]["done"] is False
        fn = calls[0]["message"]["tool_calls"][0]["function"]
        assert fn["name"] == "get_current_weather"
        assert fn["arguments"] == {"location": "Paris", "unit": "celsius"}
        assert objs[-1]["done"] is True
        r = await raw_request(
            fake, "POST", "/api/chat", {"model": CHAT, "messages": msgs, "tools": tools}
        )
        assert r.status == 400 and r.json()["error"] == f'"{CHAT}" does not support tools'


# ----------------------------------------------------------------------------- faults


async def test_die_after_chunks_drops_connection() -> None:
    async with make_fake() as fake:
        fake.die_after_chunks = 3
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status == 200 and not r.complete
        assert len(r.chunks) == 3 and all(not json.loads(c)["done"] for c in r.chunks)
        assert fake.die_after_chunks is None and fake.dropped == 1
        await wait_until(lambda: fake.active == 0)
        # consumed: the next stream is complete; the official client notices truncation
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.complete and ndjson(r)[-1]["done"] is True
        fake.die_after_chunks = 2
        client = ollama.AsyncClient(host=fake.url)
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in await client.chat(
                model=CHAT, messages=[{"role": "user", "content": "x"}], stream=True
            ):
                pass
        await client.close()
        fake.die_after_chunks = 1
        r = await raw_request(
            fake,
            "POST",
            "/v1/chat/completions",
            {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        assert len(r.chunks) == 1 and not r.complete


async def test_client_disconnect_mid_stream_is_cancelled() -> None:
    async with make_fake(tokens_per_s=50) as fake:
        fake.response_tokens = 500
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        writer.write(post_bytes("/api/generate", {"model": CHAT, "prompt": "long"}))
        await writer.drain()
        got = b""
        while got.count(b"\n") < 8:
            got += await asyncio.wait_for(reader.read(4096), 5)
        assert fake.active == 1
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: fake.cancelled == 1)
        await wait_until(lambda: fake.active == 0 and fake.loaded[CHAT].in_flight == 0)
        rec = fake.requests_to("/api/generate")[-1]
        assert rec.client_disconnected
        # the slot is free again
        r = await raw_request(
            fake,
            "POST",
            "/api/generate",
            {"model": CHAT, "prompt": "x", "stream": False, "options": {"num_predict": 2}},
        )
        assert r.status == 200


async def test_client_disconnect_while_queued_and_non_stream() -> None:
    async with make_fake(num_parallel=1, tokens_per_s=50) as fake:
        fake.response_tokens = 300
        holder = asyncio.ensure_future(
            raw_request(
                fake,
                "POST",
                "/api/generate",
                {"model": CHAT, "prompt": "a", "stream": False},
                timeout=20,
            )
        )
        await wait_until(lambda: fake.active == 1)
        waiter = asyncio.ensure_future(
            raw_request(
                fake, "POST", "/api/generate", {"model": CHAT, "prompt": "b", "stream": False}
            )
        )
        await wait_until(lambda: fake.queued == 1)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await wait_until(lambda: fake.cancelled == 1 and fake.queued == 0)
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await wait_until(lambda: fake.cancelled == 2 and fake.active == 0)


async def test_fail_next() -> None:
    async with make_fake() as fake:
        fake.fail_next(500, "boom", count=2, path="/api/chat")
        body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stream": False}
        for _ in range(2):
            r = await raw_request(fake, "POST", "/api/chat", body)
            assert r.status == 500 and r.json() == {"error": "boom"}
        assert (await raw_request(fake, "GET", "/api/tags")).status == 200
        assert (await raw_request(fake, "POST", "/api/chat", body)).status == 200
        fake.fail_next(503)
        assert (await raw_request(fake, "GET", "/")).status == 200  # liveness is not consumed
        r = await raw_request(
            fake, "POST", "/v1/chat/completions", {"model": CHAT, "messages": body["messages"]}
        )
        assert r.status == 503
        assert r.json()["error"] == {
            "message": BUSY_ERROR,
            "type": "api_error",
            "param": None,
            "code": None,
        }
        assert fake.requests_to("/v1/chat/completions")[-1].status == 503


async def test_fail_mid_stream_error_line() -> None:
    async with make_fake() as fake:
        fake.fail_mid_stream(3, "llama runner process has terminated")
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
        )
        objs = ndjson(r)
        assert r.status == 200 and r.complete
        assert len(objs) == 4 and objs[-1] == {"error": "llama runner process has terminated"}
        fake.fail_mid_stream(2)
        r = await raw_request(
            fake,
            "POST",
            "/v1/chat/completions",
            {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.complete and b"[DONE]" not in r.body and len(r.chunks) == 3


async def test_stall_before_first_byte_and_mid_stream() -> None:
    async with make_fake() as fake:
        fake.stall_s = 0.3
        t0 = time.monotonic()
        r = await raw_request(
            fake,
            "POST",
            "/api/chat",
            {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
        )
        assert time.monotonic() - t0 >= 0.3 and r.complete
        fake.stall_s = 0
        fake.stall_mid_stream_s = 0.3
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        writer.write(post_bytes("/api/generate", {"model": CHAT, "prompt": "y"}))
        t0 = time.monotonic()
        await asyncio.wait_for(reader.readuntil(b"false}\n"), 5)
        first = time.monotonic() - t0
        while b'"done":true' not in await asyncio.wait_for(reader.readuntil(b"\n"), 5):
            pass
        total = time.monotonic() - t0
        writer.close()
        await writer.wait_closed()
        assert first < 0.25 and total >= 0.3


async def test_refuse_connections_and_revive_same_port() -> None:
    async with make_fake() as fake:
        port = fake.port
        assert (await raw_request(fake, "GET", "/")).status == 200
        fake.refuse_connections()
        with pytest.raises(OSError):
            await raw_request(fake, "GET", "/")
        await fake.revive()
        assert fake.port == port
        assert (await raw_request(fake, "GET", "/")).status == 200


async def test_refuse_drops_open_streams() -> None:
    async with make_fake(tokens_per_s=50) as fake:
        fake.response_tokens = 200
        task = asyncio.ensure_future(
            raw_request(fake, "POST", "/api/generate", {"model": CHAT, "prompt": "x"})
        )
        await wait_until(lambda: fake.active == 1)
        fake.refuse_connections()
        r = await asyncio.wait_for(task, 5)
        assert not r.complete
        await wait_until(lambda: fake.active == 0)
        await fake.revive()


async def test_keepalive_connection_reuse_and_recording() -> None:
    async with make_fake() as fake, httpx.AsyncClient(base_url=fake.url) as client:
        for _ in range(3):
            assert (await client.get("/api/version")).status_code == 200
        r = await client.post(
            "/api/chat", json={"model": CHAT, "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 200 and r.text.count("\n") == 13
        r = await client.request("DELETE", "/api/delete", json={"model": "missing"})
        assert r.status_code == 404 and r.json() == {"error": "model 'missing' not found"}
        assert len(fake.requests) == 5
        rec = fake.requests[3]
        assert rec.method == "POST" and rec.path == "/api/chat" and rec.json()["model"] == CHAT
        assert rec.header("content-type") == "application/json" and rec.status == 200
        assert rec.started_at <= time.time()


# ----------------------------------------------------------------------------- admin


async def test_pull_push_create_copy_delete_raw() -> None:
    pullable = {"tinyllama": FakeModel("tinyllama", size=637_700_138, parameter_size="1B")}
    async with FakeOllama(models(), pullable=pullable, tokens_per_s=0) as fake:
        r = await raw_request(fake, "POST", "/api/pull", {"model": "tinyllama"})
        objs = ndjson(r)
        assert objs[0] == {"status": "pulling manifest"}
        assert objs[-1] == {"status": "success"}
        statuses = [o["status"] for o in objs]
        assert statuses[-4:-1] == [
            "verifying sha256 digest",
            "writing manifest",
            "removing any unused layers",
        ]
        layer = [o for o in objs if o.get("digest") == objs[1]["digest"]]
        assert len(layer) >= 3 and layer[-1]["completed"] == layer[-1]["total"]
        assert "tinyllama:latest" in {
            t["name"] for t in (await raw_request(fake, "GET", "/api/tags")).json()["models"]
        }
        r = await raw_request(fake, "POST", "/api/pull", {"model": "does-not-exist"})
        assert r.status == 200 and ndjson(r)[-1] == {
            "error": "pull model manifest: file does not exist"
        }
        r = await raw_request(
            fake, "POST", "/api/pull", {"model": "does-not-exist", "stream": False}
        )
        assert r.status == 500 and r.json() == {"error": "pull model manifest: file does not exist"}
        r = await raw_request(fake, "POST", "/api/pull", {"model": "tinyllama", "stream": False})
        assert r.json() == {"status": "success"}
        r = await raw_request(fake, "POST", "/api/pull", {"model": "bad name!"})
        assert r.status == 400
        # push needs a namespace
        r = await raw_request(fake, "POST", "/api/push", {"model": CHAT, "stream": False})
        assert r.status == 500 and "namespace" in r.json()["error"]
        await raw_request(fake, "POST", "/api/copy", {"source": CHAT, "destination": "me/mine:v1"})
        r = await raw_request(fake, "POST", "/api/push", {"model": "me/mine:v1"})
        assert ndjson(r)[-1] == {"status": "success"}
        # copy / delete
        r = await raw_request(fake, "POST", "/api/copy", {"source": "ghost", "destination": "x"})
        assert r.status == 404 and r.json() == {"error": 'model "ghost" not found'}
        r = await raw_request(fake, "DELETE", "/api/delete", {"model": "me/mine:v1"})
        assert r.status == 200 and r.body == b""
        r = await raw_request(fake, "DELETE", "/api/delete", {"name": "me/mine:v1"})
        assert r.status == 404
        # blobs
        data = os.urandom(300_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert (await raw_request(fake, "HEAD", f"/api/blobs/{digest}")).status == 404
        bad = await raw_request(fake, "POST", f"/api/blobs/sha256:{'0' * 64}", data)
        assert bad.status == 400 and "digest mismatch" in bad.json()["error"]
        assert (await raw_request(fake, "POST", f"/api/blobs/{digest}", data)).status == 201
        assert (await raw_request(fake, "HEAD", f"/api/blobs/{digest}")).status == 200
        assert (await raw_request(fake, "POST", f"/api/blobs/{digest}", data)).status == 200
        assert (await raw_request(fake, "HEAD", "/api/blobs/sha256:xyz")).status == 400
        r = await raw_request(
            fake,
            "POST",
            "/api/create",
            {"model": "frank", "files": {"m.gguf": "sha256:" + "1" * 64}},
        )
        assert r.status == 400
        r = await raw_request(
            fake,
            "POST",
            "/api/create",
            {"model": "frank", "files": {"m.gguf": digest}, "stream": False},
        )
        assert r.json() == {"status": "success"}
        r = await raw_request(
            fake,
            "POST",
            "/api/create",
            {"model": "frank2", "from": CHAT, "system": "be terse", "quantize": "q8_0"},
        )
        objs = ndjson(r)
        assert objs[-1] == {"status": "success"} and any("quantizing" in o["status"] for o in objs)
        show = (await raw_request(fake, "POST", "/api/show", {"model": "frank2"})).json()
        assert show["details"]["quantization_level"] == "Q8_0" and show["system"] == "be terse"
        r = await raw_request(fake, "POST", "/api/create", {"model": "frank3"})
        assert r.status == 400


# ----------------------------------------------------------------------------- OpenAI /v1 raw


async def test_v1_chat_sse_framing() -> None:
    async with make_fake() as fake:
        msgs = [{"role": "user", "content": "hello"}]
        r = await raw_request(
            fake,
            "POST",
            "/v1/chat/completions",
            {
                "model": CHAT,
                "messages": msgs,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert r.header("content-type") == "text/event-stream"
        events = r.body.decode().split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        assert len(r.chunks) == len(events) - 1  # one chunk per event
        payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-1])
        deltas = [p["choices"][0]["delta"] for p in payloads[:-2]]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        assert "".join(d["content"] for d in deltas) == FakeOllama.expected_text(
            CHAT, messages=msgs
        )
        finish, usage = payloads[-2], payloads[-1]
        assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
        assert {p["id"] for p in payloads} == {payloads[0]["id"]} and payloads[0]["id"].startswith(
            "chatcmpl-"
        )
        assert all(
            p["object"] == "chat.completion.chunk" and p["system_fingerprint"] == "fp_ollama"
            for p in payloads
        )
        # without include_usage: no usage chunk; stream absent → JSON
        r = await raw_request(
            fake, "POST", "/v1/chat/completions", {"model": CHAT, "messages": msgs, "stream": True}
        )
        events = r.body.decode().split("\n\n")
        assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "stop"
        r = await raw_request(
            fake, "POST", "/v1/chat/completions", {"model": CHAT, "messages": msgs}
        )
        assert (r.header("content-type") or "").startswith("application/json")
        r = await raw_request(fake, "POST", "/v1/chat/completions", {"model": CHAT, "messages": []})
        assert r.status == 400 and r.json()["error"]["message"] == "[] is too short - 'messages'"


async def test_v1_completions_stream_usage_quirk() -> None:
    async with make_fake() as fake:
        r = await raw_request(
            fake,
            "POST",
            "/v1/completions",
            {
                "model": CHAT,
                "prompt": "p",
                "stream": True,
                "max_tokens": 4,
                "stream_options": {"include_usage": True},
            },
        )
        events = [e for e in r.body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[6:]) for e in events[:-1]]
        assert all(p["object"] == "text_completion" for p in payloads)
        assert all(
            p["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            for p in payloads[:-1]
        )
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
        assert payloads[-2]["choices"][0]["finish_reason"] == "length"
        r = await raw_request(fake, "POST", "/v1/completions", {"model": CHAT, "prompt": ["a"]})
        assert r.status == 400


async def test_v1_models_empty_is_null_and_404() -> None:
    async with FakeOllama([]) as fake:
        r = await raw_request(fake, "GET", "/v1/models")
        assert r.json() == {"object": "list", "data": None}
        assert (await raw_request(fake, "GET", "/api/tags")).json() == {"models": []}
        r = await raw_request(fake, "GET", "/v1/models/none:latest")
        assert r.status == 404 and r.json()["error"]["type"] == "not_found_error"


# ----------------------------------------------------------------------------- official clients


def test_ollama_sync_client_end_to_end(tmp_path: Path) -> None:
    pullable = {"tinyllama:latest": FakeModel("tinyllama:latest", parameter_size="1B")}
    fake = FakeOllama(models(), pullable=pullable, tokens_per_s=0, prompt_tokens_per_s=0)
    closers: list[Callable[[], None]] = []
    with run_in_thread(fake) as f, _closing(closers):
        c = ollama.Client(host=f.url)
        closers.append(c.close)
        names = [m.model for m in c.list().models]
        assert set(names) == {CHAT, SMART, EMB}
        msgs = [{"role": "user", "content": "hi there"}]
        r = c.chat(model=CHAT, messages=msgs)
        assert r.message.content == FakeOllama.expected_text(CHAT, messages=msgs)
        assert r.done and r.done_reason == "stop" and r.eval_count == 12
        parts = list(c.chat(model=CHAT, messages=msgs, stream=True))
        assert "".join(p.message.content for p in parts) == r.message.content
        assert parts[-1].done and parts[-1].total_duration
        g = c.generate(model=CHAT, prompt="hello", options={"num_predict": 3})
        assert g.response == "".join(fake_tokens(CHAT, "hello", 3)) and g.done_reason == "length"
        assert g.context
        e = c.embed(model=EMB, input=["a", "b"])
        assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 768
        assert len(c.embeddings(model=EMB, prompt="a").embedding) == 768
        ps = c.ps()
        assert {m.model for m in ps.models} == {CHAT, EMB}
        assert all(m.expires_at is not None and m.context_length for m in ps.models)
        s = c.show(SMART)
        assert s.capabilities == ["completion", "tools", "thinking"]
        assert s.modelinfo is not None and s.modelinfo["qwen3.context_length"] == 40960
        progress = list(c.pull("tinyllama", stream=True))
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        assert any(p.completed for p in progress)
        assert c.pull("tinyllama").status == "success"
        blob = tmp_path / "model.gguf"
        blob.write_bytes(b"GGUF" + os.urandom(100_000))
        digest = c.create_blob(blob)
        assert c.create(model="custom", files={"model.gguf": digest}).status == "success"
        assert c.create(model="custom2", from_=CHAT, system="x").status == "success"
        assert c.copy("custom", "custom-copy").status == "success"
        assert c.delete("custom-copy").status == "success"
        with pytest.raises(ollama.ResponseError) as ei:
            c.delete("custom-copy")
        assert ei.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as ei:
            c.chat(model="missing", messages=msgs)
        assert ei.value.status_code == 404 and ei.value.error == "model 'missing' not found"
        # think + tools through the client types
        r = c.chat(
            model=SMART,
            messages=[{"role": "user", "content": "weather in Oslo?"}],
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    },
                }
            ],
            think=True,
        )
        assert r.message.thinking and r.message.tool_calls
        assert r.message.tool_calls[0].function.arguments == {"city": "Oslo"}
        f.fail_next(503)
        with pytest.raises(ollama.ResponseError) as ei:
            c.generate(model=CHAT, prompt="x")
        assert ei.value.status_code == 503 and ei.value.error == BUSY_ERROR
        f.call(f.refuse_connections)
        with pytest.raises(ConnectionError):
            c.list()
        f.call(f.revive)
        assert c.list().models
        assert f.errors == []


async def test_ollama_async_client() -> None:
    async with make_fake() as fake:
        c = ollama.AsyncClient(host=fake.url)
        try:
            msgs = [{"role": "user", "content": "async"}]
            r = await c.chat(model=CHAT, messages=msgs)
            assert r.message.content == FakeOllama.expected_text(CHAT, messages=msgs)
            parts = [p async for p in await c.generate(model=CHAT, prompt="q", stream=True)]
            assert parts[-1].done and "".join(
                p.response for p in parts
            ) == FakeOllama.expected_text(CHAT, "q")
            e = await c.embed(model=EMB, input="a")
            assert len(e.embeddings) == 1
            assert (await c.ps()).models
            assert (await c.show(CHAT)).details.family == "llama"  # type: ignore[union-attr]
            assert (await c.list()).models
            # concurrent streams through the async client respect slots
            await asyncio.gather(*(c.chat(model=CHAT, messages=msgs) for _ in range(6)))
            assert fake.max_in_flight_seen[CHAT] <= fake.num_parallel
        finally:
            await c.close()
        assert fake.errors == []


def test_openai_client_end_to_end() -> None:
    fake = FakeOllama(models(), tokens_per_s=0, prompt_tokens_per_s=0)
    with (
        run_in_thread(fake) as f,
        openai.OpenAI(base_url=f.url + "/v1", api_key="ollama", max_retries=0) as o,
    ):
        msgs: Any = [{"role": "user", "content": "hello"}]
        r = o.chat.completions.create(model=CHAT, messages=msgs)
        assert r.object == "chat.completion" and r.system_fingerprint == "fp_ollama"
        assert r.choices[0].message.content == FakeOllama.expected_text(CHAT, messages=msgs)
        assert (
            r.choices[0].finish_reason == "stop"
            and r.usage is not None
            and r.usage.completion_tokens == 12
        )
        chunks = list(
            o.chat.completions.create(
                model=CHAT, messages=msgs, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == r.choices[0].message.content
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-2].choices[0].finish_reason == "stop"
        r = o.chat.completions.create(model=CHAT, messages=msgs, max_tokens=3)
        assert r.choices[0].finish_reason == "length"
        tools: Any = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                    },
                },
            }
        ]
        r = o.chat.completions.create(
            model=SMART, messages=[{"role": "user", "content": "weather in Rome?"}], tools=tools
        )
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert json.loads(call.function.arguments) == {"location": "Rome"}  # type: ignore[union-attr]
        c = o.completions.create(model=CHAT, prompt="say", max_tokens=5)
        assert c.choices[0].text == "".join(fake_tokens(CHAT, "say", 5))
        sc = list(o.completions.create(model=CHAT, prompt="say", stream=True))
        assert "".join(x.choices[0].text for x in sc if x.choices) == FakeOllama.expected_text(
            CHAT, "say"
        )
        e = o.embeddings.create(model=EMB, input=["a", "b"], encoding_format="float")
        assert len(e.data) == 2 and len(e.data[0].embedding) == 768
        b64 = o.embeddings.create(model=EMB, input="a", encoding_format="base64")
        raw = base64.b64decode(b64.data[0].embedding)  # type: ignore[arg-type]
        floats = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert list(floats) == pytest.approx(e.data[0].embedding, abs=1e-7)
        default = o.embeddings.create(model=EMB, input="a")  # SDK asks for base64, decodes it
        assert default.data[0].embedding == pytest.approx(e.data[0].embedding, abs=1e-7)
        ids = [m.id for m in o.models.list()]
        assert set(ids) == {CHAT, SMART, EMB}
        m = o.models.retrieve(CHAT)
        assert m.id == CHAT and m.owned_by == "library"
        with pytest.raises(openai.NotFoundError) as ei:
            o.models.retrieve("missing")
        assert "model 'missing' not found" in str(ei.value)
        with pytest.raises(openai.BadRequestError):
            o.embeddings.create(model=EMB, input=[])
        f.fail_next(500, "internal boom")
        with pytest.raises(openai.InternalServerError) as ie:
            o.chat.completions.create(model=CHAT, messages=msgs)
        assert "internal boom" in str(ie.value)
        assert f.errors == []


def test_openai_retries_are_recorded() -> None:
    with (
        run_in_thread(make_fake()) as f,
        openai.OpenAI(base_url=f.url + "/v1", api_key="ollama", max_retries=2) as o,
    ):
        f.fail_next(503, count=2, path="/v1/chat/completions")
        r = o.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content
        recs = f.requests_to("/v1/chat/completions")
        assert [x.status for x in recs] == [503, 503, 200]
        assert [x.header("x-stainless-retry-count") for x in recs] == ["0", "1", "2"]
        assert recs[0].header("authorization") == "Bearer ollama"


# ----------------------------------------------------------------------------- uvloop, subprocess


def test_runs_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with make_fake(num_parallel=2, tokens_per_s=300) as fake:
            rs = await asyncio.gather(
                *(
                    raw_request(
                        fake,
                        "POST",
                        "/api/chat",
                        {"model": CHAT, "messages": [{"role": "user", "content": str(i)}]},
                    )
                    for i in range(5)
                )
            )
            assert all(r.complete and ndjson(r)[-1]["done"] for r in rs)
            assert fake.max_in_flight_seen[CHAT] == 2
            fake.die_after_chunks = 2
            r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "prompt": "x"})
            assert len(r.chunks) == 2 and not r.complete
            fake.response_tokens = 300
            reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
            writer.write(post_bytes("/api/generate", {"model": CHAT, "prompt": "z"}))
            await asyncio.wait_for(reader.readuntil(b"false}\n"), 5)
            writer.close()
            await wait_until(lambda: fake.cancelled == 1 and fake.active == 0)
            fake.refuse_connections()
            with pytest.raises(OSError):
                await raw_request(fake, "GET", "/")
            await fake.revive()
            assert (await raw_request(fake, "GET", "/")).status == 200

    uvloop.run(scenario())
    with run_in_thread(make_fake(), use_uvloop=True) as f:
        c = ollama.Client(host=f.url)
        try:
            assert c.chat(model=CHAT, messages=[{"role": "user", "content": "u"}]).done
        finally:
            c.close()


def test_subprocess_cli() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fake_ollama",
            "--port",
            "0",
            "--model",
            CHAT,
            "--model",
            "nomic-embed-text=embedding",
            "--num-parallel",
            "3",
            "--tokens-per-s",
            "0",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"fake-ollama listening on 127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        c = ollama.Client(host=f"http://127.0.0.1:{m.group(1)}")
        try:
            assert {x.model for x in c.list().models} == {CHAT, EMB}
            assert c.generate(model=CHAT, prompt="hi").done
            assert len(c.embed(model=EMB, input="a").embeddings[0]) == 768
        finally:
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
    assert rc == 0


def test_timestamps_and_helpers() -> None:
    from tests.fake_ollama import rfc3339

    s = rfc3339(1_700_000_000_123_456_789)
    assert RFC3339_NS.match(s) and s.split(".")[1][:9].rstrip("Z+-:0123456789") == ""
    assert ".123456789" in s
    assert ".5" in rfc3339(1_700_000_000_500_000_000)
    assert "." not in rfc3339(1_700_000_000_000_000_000)


async def test_partial_offload_and_logprobs_validation() -> None:
    async with make_fake(vram_bytes=2_500_000_000) as fake:
        await raw_request(fake, "POST", "/api/generate", {"model": CHAT})
        await raw_request(fake, "POST", "/api/generate", {"model": SMART})
        ps = {p["name"]: p for p in (await raw_request(fake, "GET", "/api/ps")).json()["models"]}
        assert ps[CHAT]["size_vram"] == ps[CHAT]["size"]
        assert 0 < ps[SMART]["size_vram"] < ps[SMART]["size"]
        body = {"model": CHAT, "prompt": "x", "top_logprobs": 21}
        r = await raw_request(fake, "POST", "/api/generate", body)
        assert r.status == 400 and "top_logprobs" in r.json()["error"]


async def test_keep_alive_last_writer_wins_and_reload_waits_for_in_flight() -> None:
    async with make_fake(tokens_per_s=100) as fake:
        await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": -1})
        assert fake.loaded[CHAT].expires_at == math.inf
        await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "keep_alive": "1m"})
        assert fake.loaded[CHAT].expires_at < time.time() + 61
        # a num_ctx change waits for the running request, then reloads
        body = {"model": CHAT, "prompt": "x", "stream": False}
        first = asyncio.ensure_future(raw_request(fake, "POST", "/api/generate", body))
        await wait_until(lambda: fake.active == 1)
        second = asyncio.ensure_future(
            raw_request(fake, "POST", "/api/generate", {**body, "options": {"num_ctx": 1024}})
        )
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert a.status == b.status == 200
        assert fake.max_in_flight_seen[CHAT] == 1
        assert fake.load_events[-1] == (CHAT, 1024)
        assert (CHAT, "reload") in fake.unload_events


async def test_expect_100_continue_blob_upload_and_head_tags() -> None:
    async with make_fake() as fake:
        data = b"x" * 50_000
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        writer.write(
            (
                f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(data)
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 201")
        writer.close()
        await writer.wait_closed()
        assert fake.blobs[digest] == len(data)
        rec = fake.requests_to(f"/api/blobs/{digest}")[-1]
        assert rec.body == b"" and rec.body_size == len(data)
        h = await raw_request(fake, "HEAD", "/api/tags")
        assert h.status == 200 and h.body == b"" and int(h.header("content-length") or 0) > 0


# ----------------------------------------------------------------------------- pass-through
# features (issue 13 point 8): what tests/test_passthrough.py compares herd against


async def test_cors_like_ollama() -> None:
    async with make_fake() as fake:
        ask = [
            ("Origin", "http://localhost:8080"),
            ("Access-Control-Request-Method", "POST"),
        ]
        r = await raw_request(fake, "OPTIONS", "/api/chat", headers=ask)
        assert r.status == 204 and r.body == b""
        assert r.header("access-control-allow-origin") == "http://localhost:8080"
        allowed = r.header("access-control-allow-headers") or ""
        assert "X-Stainless-Lang" in allowed.split(",") and "Authorization" in allowed
        assert r.header("access-control-max-age") == "43200"
        r = await raw_request(fake, "GET", "/api/tags", headers=ask[:1])
        assert r.status == 200 and r.header("access-control-allow-origin") == ask[0][1]
        for origin in ("https://evil.example", "http://localhost.evil.example"):
            r = await raw_request(fake, "GET", "/api/tags", headers=[("Origin", origin)])
            assert (r.status, r.body) == (403, b""), origin
        for origin in ("app://x", "chrome-extension://abc", "http://127.0.0.1"):
            r = await raw_request(fake, "GET", "/", headers=[("Origin", origin)])
            assert r.status == 200, origin
        # the server's own origin is not a CORS request
        r = await raw_request(
            fake, "GET", "/", host="box.local:1", headers=[("Origin", "http://box.local:1")]
        )
        assert r.status == 200 and r.header("access-control-allow-origin") is None


async def test_records_the_response_it_sent() -> None:
    async with make_fake() as fake:
        r = await raw_request(fake, "POST", "/api/chat", {"model": CHAT, "messages": []})
        rec = fake.requests_to("/api/chat")[-1]
        assert bytes(rec.response_body) == r.body and rec.status == 200
        assert rec.response_header("content-type") == r.header("content-type")
        r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "prompt": "x"})
        assert bytes(fake.requests_to("/api/generate")[-1].response_body) == r.body


async def test_logprobs_native_and_openai() -> None:
    async with make_fake() as fake:
        body = {"model": CHAT, "prompt": "x", "logprobs": True, "top_logprobs": 2}
        lines = ndjson(await raw_request(fake, "POST", "/api/generate", body))
        for line in lines[:-1]:
            (lp,) = line["logprobs"]
            assert lp["token"] == line["response"] and lp["bytes"] == list(lp["token"].encode())
            assert lp["top_logprobs"][0]["token"] == lp["token"]
            assert len(lp["top_logprobs"]) == 2 and lp["logprob"] <= 0
        assert "logprobs" not in lines[-1]
        r = await raw_request(fake, "POST", "/api/generate", {**body, "stream": False})
        assert "".join(t["token"] for t in r.json()["logprobs"]) == r.json()["response"]
        r = await raw_request(fake, "POST", "/api/generate", {"model": CHAT, "prompt": "x"})
        assert all("logprobs" not in line for line in ndjson(r))
        oa = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "logprobs": True}
        r = await raw_request(fake, "POST", "/v1/chat/completions", oa)
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == r.json()["choices"][0]["message"]["content"]


async def test_format_gives_json_that_fits() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "kind": {"enum": ["a", "b"]},
            "inner": {"$ref": "#/$defs/Inner"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
        },
        "$defs": {"Inner": {"type": "object", "properties": {"s": {"type": "string"}}}},
    }
    async with make_fake() as fake:
        r = await raw_request(
            fake, "POST", "/api/generate", {"model": CHAT, "prompt": "p", "format": schema}
        )
        doc = json.loads("".join(x["response"] for x in ndjson(r)))
        assert isinstance(doc["n"], int) and doc["kind"] == "a"
        assert isinstance(doc["inner"]["s"], str) and isinstance(doc["maybe"], float)
        r = await raw_request(
            fake,
            "POST",
            "/api/generate",
            {"model": CHAT, "prompt": "p", "format": "json", "stream": False},
        )
        assert isinstance(json.loads(r.json()["response"]), dict)
        for fmt in (None, ""):  # set but "missing": plain text
            r = await raw_request(
                fake, "POST", "/api/generate", {"model": CHAT, "prompt": "p", "format": fmt}
            )
            assert r.status == 200
        r = await raw_request(
            fake, "POST", "/api/generate", {"model": CHAT, "prompt": "p", "format": 3}
        )
        assert r.status == 400 and "invalid format" in r.json()["error"]


async def test_responses_api_events_and_object() -> None:
    async with make_fake() as fake:
        r = await raw_request(
            fake, "POST", "/v1/responses", {"model": CHAT, "input": "hi", "stream": True}
        )
        assert r.header("content-type") == "text/event-stream"
        events = []
        for record in r.body.decode().split("\n\n")[:-1]:
            name, data = record.split("\n")
            assert name.startswith("event: ") and data.startswith("data: ")
            payload = json.loads(data[6:])
            assert payload["type"] == name[7:]
            events.append(payload)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        types = [e["type"] for e in events]
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert types[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == FakeOllama.expected_text(CHAT, messages=[{"role": "user", "content": "hi"}])
        done = events[-1]["response"]
        assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == text
        assert done["usage"]["output_tokens"] > 0 and "[DONE]" not in r.body.decode()
        r = await raw_request(fake, "POST", "/v1/responses", {"model": CHAT, "input": "hi"})
        obj = r.json()
        assert obj["object"] == "response" and obj["output"][0]["type"] == "message"
        assert obj["output"][0]["content"][0]["text"] == text
        bad = {"model": CHAT, "input": [{"type": "bogus"}]}
        r = await raw_request(fake, "POST", "/v1/responses", bad)
        assert r.status == 400 and r.json()["error"]["type"] == "invalid_request_error"
