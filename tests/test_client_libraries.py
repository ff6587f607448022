"""LangChain (``langchain-ollama``, ``langchain-openai``) and LiteLLM through herd.

One end-to-end test each, with the libraries as users call them (async, since the router and
the fake node share the test's event loop). They must stay offline: LiteLLM reads its bundled
model-cost map (``LITELLM_LOCAL_MODEL_COST_MAP``, ``LITELLM_OFFLINE_MODE``), LangSmith tracing
is off, and every test runs under ``loopback_only``, which refuses (and records) any name
lookup or connection that is not loopback, so a library phoning home fails the test instead
of leaving the machine. Under uvloop connections bypass Python's socket module, so these
tests run on asyncio's loop only.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import ipaddress
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from tests.conftest import FakeFactory, RouterFactory
from tests.fake_ollama import FakeModel

CHAT = "smart:8b"
EMBED = "embedder:latest"


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(autouse=True, scope="module")
def _freeze_library_objects() -> Iterator[None]:
    """LangChain and LiteLLM leave about 430,000 import-time objects in this process; every
    full collection then walks them for about 0.3 s, a pause that later event-loop latency
    tests (test_store's "loop keeps ticking") would blame on herd. Once this module is done,
    freeze them: never collected, never walked again."""
    yield
    gc.collect()
    gc.freeze()


def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


def _loopback(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse name lookups and TCP/UDP connects that are not loopback; yields the refused."""
    refused: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _loopback(host if isinstance(host, str) else str(host)):
            refused.append(f"lookup {host}")
            raise socket.gaierror(socket.EAI_NONAME, "non-loopback lookup refused by the test")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            refused.append(f"connect {address}")
            raise ConnectionRefusedError("non-loopback connection refused by the test")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    for name in ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "LANGCHAIN_TRACING_V2"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANGSMITH_TRACING", "false")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LITELLM_OFFLINE_MODE", "true")
    monkeypatch.setenv("OPENAI_API_KEY", "ollama")
    yield refused
    assert refused == [], f"non-loopback traffic attempted: {refused}"


def test_loopback_guard_refuses_other_names(loopback_only: list[str]) -> None:
    assert socket.getaddrinfo("127.0.0.1", 80)
    with pytest.raises(socket.gaierror, match="refused by the test"):
        socket.getaddrinfo("models.example.invalid", 443)
    assert loopback_only == ["lookup models.example.invalid"]
    loopback_only.clear()


@pytest.fixture
async def herd_url(make_router: RouterFactory, make_fake: FakeFactory) -> Any:
    fake = await make_fake(
        [
            FakeModel(CHAT, family="qwen3", capabilities=["completion", "tools", "thinking"]),
            FakeModel(EMBED, family="nomic-bert", capabilities=["embedding"], size=270_000_000),
        ],
        tokens_per_s=0,
    )
    r = await make_router([fake.url])
    await r.wait_ready(models=2)
    yield r.url, fake


async def test_langchain_ollama(loopback_only: list[str], herd_url: Any) -> None:
    url, fake = herd_url
    lc = importlib.import_module("langchain_ollama")
    llm = lc.ChatOllama(model=CHAT, base_url=url, temperature=0)
    reply = await llm.ainvoke("why is the sky blue?")
    assert reply.content and reply.response_metadata["done_reason"] == "stop"
    pieces = [c.content async for c in llm.astream("tell me more")]
    assert len(pieces) > 2 and "".join(pieces)
    tools = llm.bind_tools([get_weather])
    called = await tools.ainvoke("What is the weather in Lima?")
    assert called.tool_calls[0]["name"] == "get_weather"
    assert called.tool_calls[0]["args"] == {"city": "Lima"}
    structured = llm.with_structured_output(Person, method="json_schema")
    person = await structured.ainvoke("a person")
    assert isinstance(person, Person)
    sent = fake.requests_to("/api/chat")[-1].json()
    assert sent["format"]["properties"].keys() == {"name", "age"}
    emb = lc.OllamaEmbeddings(model=EMBED, base_url=url)
    vectors = await emb.aembed_documents(["a", "b"])
    assert len(vectors) == 2 and len(vectors[0]) > 0
    # LangChain never closes the ollama clients it makes: close their connections here
    for client in (llm._async_client, emb._async_client):
        await client._client.aclose()


async def test_langchain_openai(loopback_only: list[str], herd_url: Any) -> None:
    url, fake = herd_url
    lc = importlib.import_module("langchain_openai")
    # our own client, closed at the end (the default one is cached for the whole process)
    http = httpx.AsyncClient()
    llm = lc.ChatOpenAI(
        model=CHAT, base_url=url + "/v1", api_key="ollama", max_retries=0, http_async_client=http
    )
    reply = await llm.ainvoke("hello")
    assert reply.content and reply.usage_metadata["output_tokens"] > 0
    pieces = [c.content async for c in llm.astream("more")]
    assert "".join(str(p) for p in pieces)
    called = await llm.bind_tools([get_weather]).ainvoke("What is the weather in Rome?")
    assert called.tool_calls[0]["args"] == {"city": "Rome"}
    person = await llm.with_structured_output(Person, method="json_schema").ainvoke("someone")
    assert isinstance(person, Person)
    sent = fake.requests_to("/v1/chat/completions")[-1].json()
    assert sent["response_format"]["type"] == "json_schema"
    emb = lc.OpenAIEmbeddings(
        model=EMBED,
        base_url=url + "/v1",
        api_key="ollama",
        check_embedding_ctx_length=False,
        http_async_client=http,
    )
    vectors = await emb.aembed_documents(["x", "y"])
    assert len(vectors) == 2 and len(vectors[1]) > 0
    await http.aclose()


async def test_litellm(loopback_only: list[str], herd_url: Any) -> None:
    """LiteLLM's blocking API, in a worker thread: its success logging asks the node's
    ``/api/show`` (with the deprecated ``name`` field) with a blocking client, which on the
    test's own loop would stall the router it is waiting for."""
    url, fake = herd_url
    litellm = importlib.import_module("litellm")
    http = httpx.Client()
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }

    def run() -> tuple[Any, str, Any, Any]:
        litellm.client_session = http
        try:
            # native Ollama provider (/api/chat) and the OpenAI-compatible one (/v1)
            native = litellm.completion(
                model=f"ollama_chat/{CHAT}",
                api_base=url,
                messages=[{"role": "user", "content": "hi"}],
            )
            stream = litellm.completion(
                model=f"openai/{CHAT}",
                api_base=url + "/v1",
                api_key="ollama",
                messages=[{"role": "user", "content": "stream it"}],
                stream=True,
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            called = litellm.completion(
                model=f"openai/{CHAT}",
                api_base=url + "/v1",
                api_key="ollama",
                messages=[{"role": "user", "content": "What is the weather in Kyiv?"}],
                tools=[tool],
            )
            emb = litellm.embedding(model=f"ollama/{EMBED}", api_base=url, input=["x"])
            return native, text, called, emb
        finally:
            litellm.client_session = None
            http.close()

    native, text, called, emb = await asyncio.to_thread(run)
    assert native.choices[0].message.content
    assert fake.requests_to("/api/chat")[-1].json()["model"] == CHAT
    assert text
    call = called.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Kyiv"}
    assert len(emb.data[0]["embedding"]) > 0
