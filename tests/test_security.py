"""Security defaults: admin endpoints resist forged browser requests; client API keys."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import RouterFactory
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

SETTINGS = b'{"auto_pull": true}'


@pytest.fixture
async def node() -> Any:
    fake = FakeOllama(
        [FakeModel("llama3.2:3b")], tokens_per_s=0, pullable={"gemma3:1b": FakeModel("gemma3:1b")}
    )
    await fake.start()
    yield fake
    await fake.stop()


async def test_settings_post_needs_json_and_same_origin(
    make_router: RouterFactory, node: FakeOllama
) -> None:
    r = await make_router([node.url])
    port = r.port
    host = f"127.0.0.1:{port}"
    # a form post (no preflight in browsers) is refused
    status, _, _ = await raw_request(
        port, "POST", "/dashboard/api/settings", SETTINGS, headers={"content-type": "text/plain"}
    )
    assert status == 415
    # a foreign page
    status, _, data = await raw_request(
        port, "POST", "/dashboard/api/settings", SETTINGS, headers={"origin": "http://evil.example"}
    )
    assert status == 403 and "cross-origin" in json.loads(data)["error"]
    # DNS rebinding: the browser thinks it is same-origin on evil.example
    status, _, data = await raw_request(
        port,
        "POST",
        "/dashboard/api/settings",
        SETTINGS,
        headers={"origin": f"http://evil.example:{port}", "host": f"evil.example:{port}"},
    )
    assert status == 403 and "rebinding" in json.loads(data)["error"]
    assert r.router.settings["auto_pull"] is False
    # the dashboard itself (same origin) may
    status, _, data = await raw_request(
        port,
        "POST",
        "/dashboard/api/settings",
        SETTINGS,
        headers={"origin": f"http://{host}", "host": host},
    )
    assert status == 200 and json.loads(data)["settings"]["auto_pull"] is True
    status, _, _ = await raw_request(port, "POST", "/dashboard/api/settings", b'{"nope": 1}')
    assert status == 400


async def test_native_pull_refuses_foreign_pages_but_not_curl(
    make_router: RouterFactory, node: FakeOllama
) -> None:
    r = await make_router([node.url])
    await r.wait_ready()
    body = b'{"model":"gemma3:1b","stream":false}'
    status, _, _ = await raw_request(
        r.port,
        "POST",
        "/api/pull",
        body,
        headers={"origin": "http://evil.example", "content-type": "text/plain"},
    )
    assert status == 403 and "gemma3:1b" not in node.models
    # curl -d sends a form content type and no Origin: Ollama accepts it, so do we
    status, _, _ = await raw_request(
        r.port,
        "POST",
        "/api/pull",
        body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 200 and "gemma3:1b" in node.models
    status, _, _ = await raw_request(
        r.port, "DELETE", "/api/delete", b'{"model":"gemma3:1b"}', headers={"origin": "null"}
    )
    assert status == 403 and "gemma3:1b" in node.models


async def test_admin_token(make_router: RouterFactory, node: FakeOllama) -> None:
    r = await make_router([node.url], admin_token="t0ken")
    status, _, _ = await raw_request(r.port, "POST", "/dashboard/api/settings", SETTINGS)
    assert status == 401
    status, _, _ = await raw_request(
        r.port, "POST", "/dashboard/api/settings", SETTINGS, headers={"x-herd-admin-token": "t0ken"}
    )
    assert status == 200
    status, _, _ = await raw_request(r.port, "GET", "/dashboard/api/settings")
    assert status == 200  # reading stays open without --api-key


async def test_api_keys(make_router: RouterFactory, node: FakeOllama) -> None:
    r = await make_router([node.url], api_keys=["k-alpha", "k-beta"])
    await r.wait_ready()
    status, _, _ = await raw_request(r.port, "GET", "/")
    assert status == 200  # liveness stays open
    body = b'{"model":"llama3.2:3b","prompt":"x","stream":false}'
    status, headers, data = await raw_request(r.port, "POST", "/api/generate", body)
    assert status == 401 and "API key" in json.loads(data)["error"]
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, data = await raw_request(r.port, "GET", "/v1/models")
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    status, _, _ = await raw_request(r.port, "GET", "/fleet/status")
    assert status == 401
    status, _, _ = await raw_request(
        r.port, "POST", "/api/generate", body, headers={"authorization": "Bearer k-beta"}
    )
    assert status == 200
    sent = [q for q in node.requests if q.path == "/api/generate"][-1]
    assert sent.header("authorization") is None  # herd's keys never reach a node
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="k-alpha", max_retries=0)
    assert (await client.models.list()).data
    await client.close()
    bad = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await bad.close()
    await r.router.store.flush()
    rows = await r.router.store.traces(limit=5, status="completed")
    assert any(t.startswith("key:") for t in rows[0]["tags"])
