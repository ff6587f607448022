"""One real path: official clients → herd → a real llama.cpp node (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import json

import ollama
import openai
import pytest

from tests.conftest import RouterFactory
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request
from tests.real_node import RealNode, real_node_fixture

pytestmark = pytest.mark.real

real_node = pytest.fixture(scope="module")(real_node_fixture)


async def test_real_tokens_through_herd(make_router: RouterFactory, real_node: RealNode) -> None:
    # a fake node without the model beside the real one: herd must pick the real node
    fake = FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=0)
    await fake.start()
    try:
        r = await make_router([real_node.url, fake.url])
        await r.wait_ready(models=2, nodes=2)
        client = ollama.AsyncClient(host=r.url, timeout=60)
        parts = [
            p
            async for p in await client.chat(
                model=real_node.model_name,
                messages=[{"role": "user", "content": "Say hello in one word."}],
                stream=True,
                options={"num_predict": 16, "seed": 1},
            )
        ]
        assert parts[-1].done and (parts[-1].eval_count or 0) > 0
        assert "".join(p.message.content or "" for p in parts).strip()
        await client._client.aclose()
        oa = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = await oa.chat.completions.create(
            model=real_node.model_name,
            max_tokens=16,
            stream=True,
            messages=[{"role": "user", "content": "Name a colour."}],
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.strip()
        await oa.close()
        await r.router.store.flush()
        rows = await r.router.store.traces(limit=5)
        assert [row["status"] for row in rows[:2]] == ["completed", "completed"]
        assert rows[1]["completion_tokens"]  # the native chat's final chunk metrics
        # herd learned real service times for that node:model from Ollama-style metrics
        key = next(k for k in r.router.fleet.stats if k[1].startswith("smollm2"))
        assert r.router.fleet.stats[key].count >= 1
    finally:
        await fake.stop()


async def test_real_stream_relay_matches_direct(
    make_router: RouterFactory, real_node: RealNode
) -> None:
    r = await make_router([real_node.url])
    await r.wait_ready()
    body = json.dumps(
        {
            "model": real_node.model_name,
            "prompt": "One, two, three,",
            "options": {"num_predict": 12, "seed": 7, "temperature": 0},
        }
    ).encode()
    direct, via = await asyncio.gather(
        raw_request(real_node.port, "POST", "/api/generate", body, read_timeout=60),
        raw_request(r.port, "POST", "/api/generate", body, read_timeout=60),
    )

    def texts(data: bytes) -> str:
        return "".join(json.loads(x).get("response", "") for x in data.splitlines())

    assert direct[0] == via[0] == 200
    assert texts(direct[2]) == texts(via[2])
