"""End-to-end checks of tests/real_node.py: real llama.cpp tokens behind the Ollama facade,
driven by the official ollama (sync + async) and openai clients. Assert structure and counts,
never wording (SmolLM2-135M output is not reliable text)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from tests.conftest import skip_or_fail
from tests.real_node import RealNode, real_backend_available, real_node_fixture

pytestmark = [pytest.mark.real, pytest.mark.timeout(90)]

OPTS = {"temperature": 0, "seed": 7, "num_predict": 24}
MSG = [{"role": "user", "content": "Write one short sentence about the sea."}]
T = 30.0  # client timeout, seconds


@pytest.fixture(scope="module")
def node() -> Iterator[RealNode]:
    yield from real_node_fixture()


def _check_final(final: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    assert final.done is True
    assert final.done_reason in ("stop", "length")
    assert final.eval_count and final.eval_count > 0
    assert final.prompt_eval_count and final.prompt_eval_count > 0
    for f in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        v = getattr(final, f)
        assert isinstance(v, int) and v > 0, f
    assert final.total_duration >= final.eval_duration


# --------------------------------------------------------------------------- plain HTTP


async def test_root_version_and_framing(node: RealNode) -> None:
    async with httpx.AsyncClient(base_url=node.url, timeout=T) as c:
        for method in ("GET", "HEAD"):
            r = await c.request(method, "/")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
        assert (await c.get("/")).text == "Ollama is running"
        assert "version" in (await c.get("/api/version")).json()
        assert (await c.get("/api/nope")).status_code == 404
        assert (await c.get("/api/chat")).status_code == 405
        r = await c.post("/api/chat", content=b"")
        assert r.status_code == 400 and r.json() == {"error": "missing request body"}

        body = {"model": node.model_name, "messages": MSG, "options": OPTS}
        async with c.stream("POST", "/api/chat", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/x-ndjson"
            raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) >= 2 and all(lines), "no blank lines in NDJSON"
    objs = [json.loads(x) for x in lines]
    assert all("message" in o for o in objs), "message in every chunk, final one too"
    assert [o["done"] for o in objs] == [False] * (len(objs) - 1) + [True]


async def test_unknown_model_404(node: RealNode) -> None:
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:
        with pytest.raises(ollama.ResponseError) as ei:
            await c.chat(model="nope:1b", messages=MSG)
    assert ei.value.status_code == 404 and ei.value.error == "model 'nope:1b' not found"
    async with httpx.AsyncClient(base_url=node.url, timeout=T) as h:
        r = await h.post("/api/generate", json={"model": "smollm2", "prompt": "x"})
        assert r.status_code == 404 and r.json() == {"error": "model 'smollm2' not found"}
    async with openai.AsyncOpenAI(
        base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=T
    ) as oc:
        with pytest.raises(openai.NotFoundError):
            await oc.chat.completions.create(model="nope:1b", messages=MSG)


# --------------------------------------------------------------------------- ollama client


async def test_sync_client_chat_and_generate(node: RealNode) -> None:
    def run() -> None:
        with ollama.Client(host=node.url, timeout=T) as c:
            chunks = list(c.chat(model=node.model_name, messages=MSG, stream=True, options=OPTS))
            text = "".join(ch.message.content or "" for ch in chunks)
            assert text.strip() and len(chunks) >= 2
            _check_final(chunks[-1])
            assert chunks[-1].eval_count == len(chunks) - 1 or chunks[-1].eval_count >= 1

            r = c.chat(model=node.model_name, messages=MSG, options=OPTS)
            assert r.message.role == "assistant" and r.message.content.strip()
            _check_final(r)

            g = c.generate(model=node.model_name, prompt="Count: one, two,", options=OPTS)
            assert g.response.strip()
            _check_final(g)

            gs = list(c.generate(model=node.model_name, prompt="Hello", stream=True, options=OPTS))
            assert "".join(x.response for x in gs).strip()
            _check_final(gs[-1])

    await asyncio.to_thread(run)


async def test_async_client_chat_and_generate(node: RealNode) -> None:
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:
        parts, final = [], None
        async for ch in await c.chat(
            model=node.model_name, messages=MSG, stream=True, options=OPTS
        ):
            parts.append(ch.message.content or "")
            final = ch
        assert "".join(parts).strip()
        assert final is not None
        _check_final(final)

        r = await c.chat(model=node.model_name, messages=MSG, options=OPTS)
        assert r.message.content.strip()
        _check_final(r)

        # same seed + temperature 0 + same prompt: real, deterministic decoding
        g1 = await c.generate(model=node.model_name, prompt="The sky is", options=OPTS)
        g2 = await c.generate(model=node.model_name, prompt="The sky is", options=OPTS)
        assert g1.response.strip() and g1.response == g2.response
        _check_final(g1)

        raw = await c.generate(
            model=node.model_name, prompt="1, 2, 3,", raw=True, options={**OPTS, "num_predict": 8}
        )
        assert raw.response and raw.eval_count == 8 and raw.done_reason == "length"


async def test_list_ps_show(node: RealNode) -> None:
    gguf_size = await asyncio.to_thread(os.path.getsize, node.gguf)
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:
        tags = await c.list()
        assert [m.model for m in tags.models] == [node.model_name]
        m = tags.models[0]
        assert m.size == gguf_size
        assert m.digest and len(m.digest) == 64
        assert m.details and m.details.format == "gguf" and m.details.quantization_level

        await c.generate(model=node.model_name, prompt="Hi", options=OPTS)
        ps = await c.ps()
        assert [p.model for p in ps.models] == [node.model_name]
        assert ps.models[0].expires_at is not None and ps.models[0].context_length

        show = await c.show("SmolLM2:135M")  # case-insensitive, like Ollama
        assert show.capabilities == ["completion"]
        assert show.modelinfo and show.modelinfo["general.architecture"] == "llama"
        assert show.template and show.details and show.details.family == "llama"


async def test_keep_alive_zero_unloads(node: RealNode) -> None:
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:
        r = await c.generate(model=node.model_name, prompt="", keep_alive=0)
        assert r.done_reason == "unload"
        assert (await c.ps()).models == []
        r = await c.generate(model=node.model_name, prompt="")
        assert r.done_reason == "load"
        assert len((await c.ps()).models) == 1


async def test_two_concurrent_streams_progress_together(node: RealNode) -> None:
    """n_parallel=2: continuous batching, both streams produce tokens at the same time."""
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:

        async def one() -> tuple[float, float, int]:
            first = last = 0.0
            n = 0
            async for ch in await c.chat(
                model=node.model_name,
                messages=MSG,
                stream=True,
                options={**OPTS, "num_predict": 48},
            ):
                if not ch.done:
                    first = first or time.monotonic()
                    last = time.monotonic()
                    n += 1
            return first, last, n

        (f1, l1, n1), (f2, l2, n2) = await asyncio.gather(one(), one())
    assert n1 > 0 and n2 > 0
    assert max(f1, f2) < min(l1, l2), "the two token streams overlap in time"


async def test_client_disconnect_frees_slot_and_errors_are_native(node: RealNode) -> None:
    async with httpx.AsyncClient(timeout=T) as h:
        body = {
            "model": node.model_name,
            "prompt": "Write a long essay.",
            "options": {"num_predict": 800},
        }
        async with h.stream("POST", node.url + "/api/generate", json=body) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n == 3:
                    break  # hang up mid-stream
        for _ in range(50):  # llama-server notices the closed upstream and frees the slot
            slots = (await h.get(node.llama_url + "/slots")).json()
            if not any(s.get("is_processing") for s in slots):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("slot still busy after the client hung up")

        long = [{"role": "user", "content": "word " * 3000}]  # > per-slot context
        r = await h.post(node.url + "/api/chat", json={"model": node.model_name, "messages": long})
        assert r.status_code == 400 and "context" in r.json()["error"]
        r = await h.post(node.url + "/api/embed", json={"model": node.model_name, "input": "x"})
        assert r.status_code == 400 and "embed" in r.json()["error"]


async def test_throughput(node: RealNode, record_property: pytest.RecordProperty) -> None:
    async with ollama.AsyncClient(host=node.url, timeout=T) as c:
        t = time.monotonic()
        r = await c.generate(
            model=node.model_name, prompt="Tell a story.", options={**OPTS, "num_predict": 96}
        )
        wall = time.monotonic() - t
    assert r.eval_count and r.eval_duration and r.total_duration
    tok_s = r.eval_count / r.eval_duration * 1e9
    record_property("decode_tok_s", round(tok_s, 1))
    record_property("startup_s", round(node.startup_seconds, 2))
    print(
        f"\nreal node: startup {node.startup_seconds:.2f}s, {r.eval_count} tokens, "
        f"decode {tok_s:.0f} tok/s, wall {wall:.2f}s"
    )
    assert tok_s > 5  # a very loose floor: CI machines vary a lot
    assert r.total_duration <= wall * 1e9


# --------------------------------------------------------------------------- openai client


async def test_openai_stream_via_v1(node: RealNode) -> None:
    async with openai.AsyncOpenAI(
        base_url=node.url + "/v1", api_key="ollama", max_retries=0, timeout=T
    ) as oc:
        ids = [m.id async for m in oc.models.list()]
        assert node.model_name in ids

        stream = await oc.chat.completions.create(
            model=node.model_name,
            messages=MSG,
            stream=True,
            max_tokens=24,
            temperature=0,
            seed=7,
            stream_options={"include_usage": True},
        )
        text, usage, finish = [], None, None
        async for ev in stream:
            for ch in ev.choices:
                text.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
            usage = ev.usage or usage
        assert "".join(text).strip()
        assert finish in ("stop", "length")
        assert usage is not None and usage.completion_tokens > 0

        r = await oc.chat.completions.create(
            model=node.model_name,
            messages=MSG,
            max_tokens=8,
        )
        assert r.choices[0].message.content and r.usage and r.usage.completion_tokens > 0

        c = await oc.completions.create(model=node.model_name, prompt="Once upon", max_tokens=8)
        assert c.choices[0].text


# --------------------------------------------------------------------------- lifecycle


async def test_lifecycle_start_stop_kill_no_orphans() -> None:
    ok, why = real_backend_available()
    if not ok:
        skip_or_fail(why)
    async with RealNode() as n:
        pid = n.pid
        assert pid and n.running and n.startup_seconds < 30
        async with httpx.AsyncClient(timeout=T) as h:
            assert (await h.get(n.url + "/")).status_code == 200
    assert not n.running and pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    n2 = await RealNode().start()
    try:
        url = n2.url
        n2.kill()  # crash: connection refused afterwards
        async with httpx.AsyncClient(timeout=T) as h:
            with pytest.raises(httpx.ConnectError):
                await h.get(url + "/")
    finally:
        await n2.stop()
